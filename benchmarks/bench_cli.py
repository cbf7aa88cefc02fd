#!/usr/bin/env python3
"""End to end, as users run it: the two CLIs with their defaults, each in a fresh process, beside ModelOpt's plain
flow on the same model and samples.

A random Llama-3-8B-shaped model (bf16) is saved to disk with a small BPE tokenizer, beside a local JSONL of texts
and a dataset YAML that leaves the calibration settings at the CLI's defaults (512 samples of up to 2048 tokens).
After one untimed `quantize_nvfp4.py --self_test` process (CUDA start-up, Triton kernel compiles), each run is a
fresh process, timed from outside:
  default   quantize_nvfp4.py with its defaults (W4A4, local_hessian)
  max       the same with --algorithm max
  plain     benchmarks/modelopt_plain_flow.py: what ModelOpt's hf_ptq.py does for NVFP4, on the samples ours chose
  offload   quantize_nvfp4_offload.py with its defaults and --max_gpu_memory 6GiB
  forward   a bf16 forward of the default run's batches, no quantizers: the ceiling for calibration
Results (wall, calibration, each run's phase table, peak GPU memory) go to --json; --render writes them into the
"End to end, as users run it" section of docs/benchmarks.md.

    python benchmarks/bench_cli.py --work /tmp/bc --json benchmarks/results/cli_h200.json   # H200: ~7 min, 45 GB disk
    python benchmarks/bench_cli.py --render benchmarks/results/cli_h200.json
    python benchmarks/bench_cli.py --tiny --work /tmp/bc-tiny --json tiny.json               # CPU smoke run
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
sys.path.insert(0, str(ROOT))
import quantize_nvfp4 as q  # noqa: E402

DOCS = ROOT / "docs" / "benchmarks.md"
README = ROOT / "README.md"
# the README's one sentence on speed, rendered from the same results
README_CLAIM = re.compile(r"On an? \S+ this run of an 8B-shaped model .*?"
                          r"\(docs/benchmarks\.md#end-to-end-as-users-run-it\)\)\.", re.DOTALL)
SECTION = "## End to end, as users run it"
NEXT_SECTION = "## Calibration speed and memory"
VARIANTS = ("default", "max", "plain", "offload", "forward")
LABELS = {
    "default": "`quantize_nvfp4.py` (defaults: local_hessian)",
    "max": "`quantize_nvfp4.py --algorithm max`",
    "plain": "ModelOpt's plain flow (`modelopt_plain_flow.py`, as `hf_ptq.py`)",
    "offload": "`quantize_nvfp4_offload.py --max_gpu_memory 6GiB`",
    "forward": "bf16 forward of the default's batches (load + forward)",
}
TARGETS = {  # (numerator, denominator, what, limit, at most)
    "default calibration / max calibration": ("default", "max", "calibration_s", 1.15, True),
    "plain wall / default wall": ("plain", "default", "wall_s", 1.6, False),
    "offload wall / default wall": ("offload", "default", "wall_s", 1.1, True),
}


@dataclasses.dataclass(frozen=True)
class Workload:
    shape: str                 # "8b" or "tiny"
    rows: int                  # texts in the data file (the CLI asks for max_samples x 1.5)
    median_words: int          # text lengths: log-normal around this many words (about 2.5 tokens each)
    cli_flags: tuple = ()      # calibration flags the CLIs get; none: their defaults
    offload_flags: tuple = ("--max_gpu_memory", "6GiB")


FULL = Workload("8b", rows=1000, median_words=400)
TINY = Workload("tiny", rows=48, median_words=30, cli_flags=("--max_samples", "16", "--max_seq_len", "128"),
                offload_flags=("--max_cpu_memory", "600000"))
LENGTH_SIGMA = 0.8


# --------------------------------------------------------------------------- the workload (a child process)
def write_texts(path: Path, workload: Workload, seed: int) -> None:
    """Texts of shuffled words from the shipped samples, log-normal lengths: one {"text": ...} per line."""
    rng = random.Random(seed)
    words = re.findall(r"\w+[.,!?]?", " ".join(q.sample_corpus()))
    with path.open("w", encoding="utf-8") as f:
        for _ in range(workload.rows):
            length = max(8, round(rng.lognormvariate(math.log(workload.median_words), LENGTH_SIGMA)))
            f.write(json.dumps({"text": " ".join(rng.choices(words, k=length))}) + "\n")


def write_yaml(work: Path) -> Path:
    path = work / "data.yaml"
    path.write_text("datasets:\n  - name: texts\n    path: texts.jsonl\n    formatter: raw_text\n", encoding="utf-8")
    return path


def save_model(folder: Path, workload: Workload, device: str, seed: int) -> None:
    from bench_calibration import LLAMA3_8B
    from bench_calibration import TINY as TINY_SHAPE
    from bench_offload import save_random_model

    save_random_model(folder, LLAMA3_8B if workload.shape == "8b" else TINY_SHAPE, device, seed)


def selected_samples(work: Path, workload: Workload, tokenizer) -> list[list[int]]:
    """The samples quantize_nvfp4.py calibrates on with these flags: the plain flow gets the same."""
    args = q.build_parser().parse_args(["--input_model", str(work / "model"), "--dry_run", "--dataset_yaml",
                                        str(work / "data.yaml"), *workload.cli_flags])
    samples, _, _ = q.prepare_calibration_data(q.build_settings(args, {}), tokenizer)
    return samples


def make_workload(work: Path, workload: Workload, device: str, seed: int) -> dict:
    (work / "model").mkdir(parents=True, exist_ok=True)
    tokenizer = q.build_tiny_tokenizer(work / "model", q.sample_corpus())
    save_model(work / "model", workload, device, seed)
    write_texts(work / "texts.jsonl", workload, seed)
    write_yaml(work)
    samples = selected_samples(work, workload, tokenizer)
    (work / "samples.json").write_text(json.dumps(samples))
    lengths = sorted(len(s) for s in samples)
    return {"samples": len(samples), "tokens": sum(lengths), "min": lengths[0], "median": lengths[len(lengths) // 2],
            "max": lengths[-1], "gpu": gpu_name(device)}


def gpu_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.startswith("cuda") else "CPU"


# --------------------------------------------------------------------------- the bf16 forward (a child process)
def default_batches(lengths: list[int], cap: float) -> list[list[int]]:
    """The default run's batches: the longest sample alone first (its memory probe on a GPU), then the plan."""
    probe = [max(range(len(lengths)), key=lambda i: lengths[i])]
    return [probe] + q.batches_after([probe], lengths, None, cap)


def bf16_forward(work: Path, device: str, cap: float) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(work / "model"), dtype="auto", device_map=device).eval()
    loaded = time.perf_counter()
    samples = json.loads((work / "samples.json").read_text())
    forward = q.calibration_forward(model)
    with torch.no_grad():
        for batch in default_batches([len(s) for s in samples], cap):
            input_ids, mask = q.padded_batch(samples, batch, 0)
            forward(input_ids=input_ids.to(device), attention_mask=mask.to(device))
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    result = {"load_s": round(loaded - start, 2), "calibration_s": round(time.perf_counter() - loaded, 2)}
    if device.startswith("cuda"):
        result["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return result


# --------------------------------------------------------------------------- imports (a child process)
# what a run imports before its first phase (the script, then import_libraries' modules), in dependency order
IMPORTED = ("quantize_nvfp4", "torch", "transformers", "modelopt.torch.quantization", "modelopt.torch.export")
# quantize_nvfp4 first, then ModelOpt's unused plugins skipped, as main() does before it imports the others
IMPORTS = "; ".join(["import quantize_nvfp4", "quantize_nvfp4.skip_unused_plugins()"]
                    + [f"import {module}" for module in IMPORTED[1:]])


def import_profile() -> dict:
    """A fresh process that imports what a run imports before its first phase, under `python -X importtime`: its
    wall time from outside, and per top-level package the import time of what importing it first brought in (the
    cumulative time of the outermost imports, which add up to all of it)."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-X", "importtime", "-c", IMPORTS], cwd=ROOT, capture_output=True,
                            text=True, check=True)
    wall = time.perf_counter() - start
    by_package: dict[str, float] = {}
    for line in result.stderr.splitlines():
        fields = line.split("|")
        if line.startswith("import time:") and len(fields) == 3 and fields[1].strip().isdigit() \
                and not fields[2].startswith("  "):  # outermost: imported by the -c line itself
            package = fields[2].strip().split(".")[0]  # the interpreter's own start-up (site) is no run's import
            if package in {module.split(".")[0] for module in IMPORTED}:
                by_package[package] = by_package.get(package, 0.0) + int(fields[1]) / 1e6
    return {"wall_s": round(wall, 2), "imports_s": round(sum(by_package.values()), 2),
            "by_package_s": {name: round(seconds, 2) for name, seconds in by_package.items() if seconds >= 0.01}}


# --------------------------------------------------------------------------- the runs (this process)
def command(variant: str, work: Path, workload: Workload, device: str) -> list[str]:
    model, out = str(work / "model"), str(work / f"out-{variant}")
    ours = ["--input_model", model, "--output_model", out, "--dataset_yaml", str(work / "data.yaml"),
            *workload.cli_flags]
    if variant == "default":
        return [sys.executable, str(ROOT / "quantize_nvfp4.py"), *ours]
    if variant == "max":
        return [sys.executable, str(ROOT / "quantize_nvfp4.py"), *ours, "--algorithm", "max"]
    if variant == "offload":
        return [sys.executable, str(ROOT / "quantize_nvfp4_offload.py"), *ours, "--offload_folder",
                str(work / "offload"), *workload.offload_flags]
    if variant == "plain":
        return [sys.executable, str(BENCH_DIR / "modelopt_plain_flow.py"), "--input_model", model, "--output_model",
                out, "--samples", str(work / "samples.json"), "--json", str(work / "plain.json")]
    return [sys.executable, __file__, "--child", "forward", "--work", str(work), "--device", device]


def shown(cmd: list[str], work: Path) -> str:
    """The command as a user would type it: python, paths in the repository relative, the work dir as $WORK."""
    parts = ["python" if c == sys.executable else c.replace(str(work), "$WORK").replace(f"{ROOT}/", "") for c in cmd]
    return " ".join(parts)


def run_logged(cmd: list[str], log: Path) -> tuple[int, float]:
    start = time.perf_counter()
    with log.open("w") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    return code, round(time.perf_counter() - start, 2)


def manifest_result(out: Path) -> dict:
    manifest = json.loads((out / q.MANIFEST_NAME).read_text())
    calib = manifest["calibration_run"]
    return {"calibration_s": calib["seconds"], "forward_loop_s": calib["forward_seconds"],
            "hessian_s": calib.get("hessian_seconds"), "scale_search_s": calib.get("scale_search", {}).get("seconds"),
            "peak_gpu_memory_gib": calib.get("peak_gpu_memory_gib"), "tokens": calib["tokens"],
            "max_batch_tokens": calib["max_batch_tokens"], "manifest_wall_s": manifest["timings"]["wall_s"],
            "phases_s": manifest["timings"]["phases_s"],
            "export_hf_checkpoint_s": manifest["timings"].get("export_hf_checkpoint_s"),
            "export_shards_s": manifest["timings"].get("export_shards_s")}


def run_variant(variant: str, work: Path, workload: Workload, device: str, cap: float) -> dict:
    cmd = command(variant, work, workload, device)
    if variant == "forward":
        cmd += ["--cap", str(cap)]
    code, wall = run_logged(cmd, work / f"{variant}.log")
    result = {"command": shown(cmd, work), "returncode": code, "wall_s": wall}
    if code != 0:
        result["log_tail"] = (work / f"{variant}.log").read_text()[-3000:]
        return result
    if variant in ("default", "max", "offload"):
        result.update(manifest_result(work / f"out-{variant}"))
    else:
        result.update(json.loads((work / ("plain.json" if variant == "plain" else "forward.json")).read_text()))
    shutil.rmtree(work / f"out-{variant}", ignore_errors=True)
    shutil.rmtree(work / "offload", ignore_errors=True)
    return result


def check_targets(runs: dict) -> dict:
    checked = {}
    for name, (top, bottom, key, limit, at_most) in TARGETS.items():
        if key in runs.get(top, {}) and key in runs.get(bottom, {}):
            ratio = round(runs[top][key] / runs[bottom][key], 3)
            checked[name] = {"ratio": ratio, "target": f"{'<=' if at_most else '>='} {limit}",
                             "met": ratio <= limit if at_most else ratio >= limit}
    return checked


def uncompiled_packages(names=("torch", "transformers", "modelopt", "accelerate", "safetensors")) -> list[str]:
    """The packages whose modules have no cached byte code: every fresh process would compile them from source (an
    offload run profiled on an H100 machine whose ModelOpt was installed with pip --no-compile, and byte code never
    written, spent 8.6 s compiling 3,075 modules), which no environment pip installed the usual way pays."""
    import importlib.util

    missing = []
    for name in names:
        spec = importlib.util.find_spec(name)
        origin = Path(spec.origin) if spec and spec.origin else None
        if origin is not None and not Path(importlib.util.cache_from_source(str(origin))).is_file():
            missing.append(f"{name} ({origin.parent})")
    return missing


def run_all(args: argparse.Namespace) -> dict:
    workload, work = (TINY if args.tiny else FULL), Path(args.work)
    missing = uncompiled_packages()
    if missing and not args.tiny:
        raise SystemExit(f"no cached byte code for {', '.join(missing)}: each timed process would compile them; "
                         "install as pip does by default, or run python -m compileall on those folders first")
    work.mkdir(parents=True, exist_ok=True)
    code, setup_s = run_logged([sys.executable, __file__, "--child", "workload", "--work", str(work), "--device",
                                args.device, *(["--tiny"] if args.tiny else [])], work / "workload.log")
    if code != 0:
        raise SystemExit(f"building the workload failed:\n{(work / 'workload.log').read_text()[-3000:]}")
    data = json.loads((work / "workload.json").read_text())
    _, warm_up_s = run_logged([sys.executable, str(ROOT / "quantize_nvfp4.py"), "--self_test"], work / "warm-up.log")
    # The real shapes once, untimed: the first process on a machine to run them pays one-time costs (loading the
    # large GEMM and attention kernels: 5 s of an 8-layer slice of this shape's calibration on an H100, against a
    # later fresh process), which the first timed run would otherwise carry alone. Its batches are the planner's
    # largest, which the default's memory probe picks on a card with room for them (80 GB for this shape)
    cap = q.MAX_BATCH_TOKENS if args.device.startswith("cuda") else q.DEFAULT_BATCH_TOKENS
    code, warm_up_forward_s = run_logged(command("forward", work, workload, args.device) + ["--cap", str(cap)],
                                         work / "warm-up-forward.log")
    if code != 0:
        raise SystemExit(f"the warm-up forward failed:\n{(work / 'warm-up-forward.log').read_text()[-3000:]}")
    results = {"workload": {"shape": workload.shape, **data, "setup_s": setup_s, "warm_up_s": warm_up_s,
                            "warm_up_forward_s": warm_up_forward_s, "warm_up_forward_cap": cap,
                            "bytecode_cached": not missing},
               "versions": q.library_versions(), "imports": import_profile(), "runs": {}, "targets": {}}
    runs, cap = results["runs"], q.DEFAULT_BATCH_TOKENS
    for variant in args.variants:
        runs[variant] = run_variant(variant, work, workload, args.device, cap)
        print(f"{variant}: {json.dumps(runs[variant])}", flush=True)
        cap = runs.get("default", {}).get("max_batch_tokens") or cap
        results["targets"] = check_targets(runs)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")  # after each run: a cut-off run keeps these
    return results


# --------------------------------------------------------------------------- --render
def cell(value, unit: str = "") -> str:
    return "" if value is None else f"{value}{unit}"


def runs_table(runs: dict) -> list[str]:
    plain = runs.get("plain", {}).get("wall_s")
    lines = ["| run | wall s | calibration s | of which Hessian sums s | scale search s | peak GPU memory | "
             "ModelOpt plain wall / this wall |", "|---|---|---|---|---|---|---|"]
    for variant, run in runs.items():
        if run["returncode"] != 0:
            lines.append(f"| {LABELS[variant]} | failed (exit {run['returncode']}) | | | | | |")
            continue
        speedup = f"{plain / run['wall_s']:.2f}" if plain and variant != "forward" else ""
        lines.append(f"| {LABELS[variant]} | {run['wall_s']} | {run['calibration_s']} | {cell(run.get('hessian_s'))} "
                     f"| {cell(run.get('scale_search_s'))} | {cell(run.get('peak_gpu_memory_gib'), ' GiB')} "
                     f"| {speedup} |")
    return lines


def phases_table(runs: dict) -> list[str]:
    ours = [v for v in ("default", "max", "offload") if runs.get(v, {}).get("phases_s")]
    phases: list[str] = []
    for variant in ours:  # each run's phases in its order, a phase new to the table after the one it follows
        previous = None
        for phase in runs[variant]["phases_s"]:
            if phase not in phases:
                phases.insert(phases.index(previous) + 1 if previous else 0, phase)
            previous = phase
    lines = ["| phase | " + " | ".join(v for v in ours) + " |", "|---|" + "---|" * len(ours)]
    for phase in phases:
        lines.append(f"| {phase} | " + " | ".join(cell(runs[v]["phases_s"].get(phase)) for v in ours) + " |")
        if phase == q.STAGE_EXPORT and any(runs[v].get("export_hf_checkpoint_s") for v in ours):
            lines.append("| of which ModelOpt's `export_hf_checkpoint` | "
                         + " | ".join(cell(runs[v].get("export_hf_checkpoint_s")) for v in ours) + " |")
        if phase == q.STAGE_EXPORT and any(runs[v].get("export_shards_s") is not None for v in ours):
            lines.append("| of which writing the safetensors shards | "
                         + " | ".join(cell(runs[v].get("export_shards_s")) for v in ours) + " |")
    lines.append("| wall in the manifest (the phases' sum) / seen from outside | "
                 + " | ".join(f"{runs[v]['manifest_wall_s']} / {runs[v]['wall_s']}" for v in ours) + " |")
    return lines


def plain_and_imports(results: dict) -> list[str]:
    """Where the plain flow's wall goes, and what the imports that start every run cost, as paragraphs."""
    lines, plain, imports = [], results["runs"].get("plain", {}), results.get("imports")
    if plain.get("returncode") == 0:
        rest = round(plain["wall_s"] - plain["load_s"] - plain["calibration_s"] - plain["export_s"], 2)
        lines += [paragraph(f"ModelOpt's plain flow, timed inside its script: loading {plain['load_s']} s, "
                            f"calibration {plain['calibration_s']} s, export {plain['export_s']} s; the rest of its "
                            f"{plain['wall_s']} s (interpreter start, imports, exit) {rest} s."), ""]
    if imports:
        packages = ", ".join(f"{name} {seconds} s" for name, seconds in imports["by_package_s"].items()
                             if name in {module.split(".")[0] for module in IMPORTED})
        lines += [paragraph(f"Imports: a fresh process that imports what a run imports before its first phase, and "
                            f"exits, takes {imports['wall_s']} s, of which `python -X importtime` counts "
                            f"{imports['imports_s']} s of imports; what each package brought in, in the order "
                            f"imported: {packages}."), ""]
    return lines


def speedup_headroom(results: dict) -> list[str]:
    """What the end-to-end target leaves for calibration once the default run's other phases are paid, beside the
    bf16 forward of the same batches: whether calibration alone could still reach it."""
    runs = results["runs"]
    top, bottom, key, limit, _ = TARGETS["plain wall / default wall"]
    default, forward = runs.get(bottom, {}), runs.get("forward", {})
    if not all(r.get("returncode") == 0 for r in (runs.get(top, {}), default, forward)):
        return []
    calibrating = (q.STAGE_CALIBRATION, q.PHASE_HESSIANS, q.STAGE_SEARCH)
    other = round(default[key] - sum(default["phases_s"].get(phase, 0) for phase in calibrating), 2)
    allowed, left = round(runs[top][key] / limit, 2), round(runs[top][key] / limit - other, 2)
    leaves = f"which leaves {left} s to calibrate on {default['tokens']:,} tokens" if left > 0 else \
        f"more than that by {-left} s before any calibration"
    return [paragraph(f"At {limit}x ModelOpt's plain flow the default run may take {allowed} s. Everything in it but "
                      f"calibration, Hessian sums and scale search took {other} s (start-up and imports "
                      f"{default['phases_s'].get(q.STAGE_STARTUP)} s), {leaves}; the bf16 forward of the same "
                      f"batches alone took {forward['calibration_s']} s."), ""]


def targets_lines(targets: dict) -> list[str]:
    return [f"- {name}: {t['ratio']} (target {t['target']}): {'met' if t['met'] else 'missed'}"
            for name, t in targets.items()]


def paragraph(text: str) -> str:
    return textwrap.fill(text, width=120, break_long_words=False, break_on_hyphens=False)


def warm_up_text(workload: dict) -> str:
    self_test = "`--self_test` process (CUDA start-up, Triton compiles)"
    if "warm_up_forward_s" not in workload:
        return f"one untimed {self_test}"
    return (f"two untimed processes: a {self_test}, then the bf16 forward of the batches (the first use of the "
            "real shapes' kernels on the machine)")


def bytecode_text(workload: dict) -> str:
    if workload.get("bytecode_cached"):
        return "The packages' byte code was compiled beforehand, as pip installs them (the benchmark checks)."
    return ("In this run the packages had no cached byte code (installed with `--no-compile`), so every timed "
            "process, ModelOpt's plain flow too, compiled about 3,000 modules from source: 8.6 s of start-up in a "
            "profile of the offload run; `bench_cli.py` now refuses to run so.")


def render(results: dict, results_path: str) -> str:
    w, v = results["workload"], results["versions"]
    return "\n".join([
        SECTION, "", "```bash",
        f"python benchmarks/bench_cli.py --work /tmp/bc --json {results_path}",
        f"python benchmarks/bench_cli.py --render {results_path}", "```", "",
        paragraph(f"Machine: {w['gpu']}; torch {v.get('torch')}, transformers {v.get('transformers')}, ModelOpt "
        f"{v.get('nvidia-modelopt')}. Model: Llama-3-8B-shaped, random bf16 weights, saved to disk (read from the page "
        f"cache). Data: a local JSONL at the CLI's defaults: {w['samples']} samples of up to 2048 tokens (min "
        f"{w['min']}, median {w['median']}, max {w['max']}; {w['tokens']:,} tokens). Every run is a fresh process, "
        f"timed from outside, after {warm_up_text(w)}; ModelOpt's plain flow calibrates on the same samples, "
        "padded as `hf_ptq.py` pads them (all to the longest), in batches of 16, with full logits, and imports "
        "ModelOpt as `hf_ptq.py` does, with the plugins of whatever packages the machine has (our scripts skip "
        f"those they never use: `UNUSED_PLUGIN_PACKAGES`). {bytecode_text(w)}"), "",
        *runs_table(results["runs"]), "", "Seconds per phase, from each run's manifest:", "",
        *phases_table(results["runs"]), "", *plain_and_imports(results), "Targets:", "",
        *targets_lines(results["targets"]), "", *speedup_headroom(results), ""])


def readme_claim(results: dict) -> str:
    """The README's sentence on the 8B run, from the results file the docs' table comes from."""
    w, runs = results["workload"], results["runs"]
    gpu = w["gpu"].removeprefix("NVIDIA ").split()[0]
    return paragraph(
        f"On an {gpu} this run of an 8B-shaped model ({w['samples']} samples, {w['tokens'] / 1000:.0f}k tokens) took "
        f"{runs['default']['wall_s']:.0f} s, {runs['default']['calibration_s']:.0f} s of it calibration; ModelOpt's "
        f"plain flow took {runs['plain']['wall_s']:.0f} s on the same samples "
        "([end to end](docs/benchmarks.md#end-to-end-as-users-run-it)).")


def write_readme_claim(results: dict) -> None:
    readme = README.read_text()
    if not README_CLAIM.search(readme):
        raise SystemExit("README.md has no sentence on the 8B run to replace (README_CLAIM)")
    README.write_text(README_CLAIM.sub(lambda _: readme_claim(results), readme, count=1))


def write_section(text: str, title: str = SECTION, before: str = NEXT_SECTION) -> None:
    """`text` (starting with the `title` line) in place of that section of docs/benchmarks.md, or before `before`."""
    docs = DOCS.read_text()
    start = docs.find(title + "\n")
    if start < 0:
        start = end = docs.index(before)
    else:
        end = docs.index("\n## ", start + len(title)) + 1
    DOCS.write_text(docs[:start] + text + docs[end:])


# --------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/bench-cli", help="model, data, logs and outputs (about 45 GB for the 8B)")
    p.add_argument("--json", default="bench_cli.json")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--tiny", action="store_true", help="the tiny Llama on the CPU: a smoke test")
    p.add_argument("--device", default=None, help="default: cuda:0 if available, else cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--render", metavar="RESULTS_JSON",
                   help="write RESULTS_JSON's tables into docs/benchmarks.md and its 8B sentence into README.md")
    p.add_argument("--child", choices=("workload", "forward"), help=argparse.SUPPRESS)
    p.add_argument("--cap", type=float, default=q.DEFAULT_BATCH_TOKENS, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render:
        results = json.loads(Path(args.render).read_text())
        write_section(render(results, args.render))
        write_readme_claim(results)
        return 0
    args.device = args.device or q.pick_device()
    if args.child == "workload":
        data = make_workload(Path(args.work), TINY if args.tiny else FULL, args.device, args.seed)
        (Path(args.work) / "workload.json").write_text(json.dumps(data))
        return 0
    if args.child == "forward":
        result = bf16_forward(Path(args.work), args.device, args.cap)
        (Path(args.work) / "forward.json").write_text(json.dumps(result))
        return 0
    results = run_all(args)
    failed = [v for v, r in results["runs"].items() if r["returncode"] != 0]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
