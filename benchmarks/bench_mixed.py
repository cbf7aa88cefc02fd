#!/usr/bin/env python3
"""--effective_bits on the real judge: the product's choice against random choices and ModelOpt auto_quantize's, at
equal bits over the same linears, all from ONE calibration, each judged from its files.

    python benchmarks/bench_mixed.py --cache /tmp/judge-cache --work /tmp/bench-mixed --out results.json \\
        [--bits 5.0 4.75 5.5 6.0] [--auto_quantize screen.json] [--max_samples 64 --max_seq_len 256 --eval_samples 48]
    python benchmarks/bench_mixed.py --render benchmarks/results/mixed_h100.json \\
        benchmarks/results/mixed_screen_cpu.json

The judge, data and quality are bench_algorithms.py's (SmolLM2-135M-Instruct; calibration and held-out rows from
disjoint Python standard-library files; `quantize_nvfp4.py --verify OUT --eval --reference MODEL` on each
checkpoint). One child process calibrates once (W4A4 local_hessian, the default) and computes the output-loss scores
once; every variant is then a full quantize_nvfp4.py run on a copy of that calibrated model, differing only in the
choice (quantize_nvfp4.choose_formats): `pure NVFP4` (no --effective_bits), `output loss` (the product), `random N`
(groups to FP8 in a seeded random order while the budget allows), `auto_quantize` (the groups ModelOpt's
mtq.auto_quantize put in FP8 / 16 bits at the same budget over the same linears, read from screen_mixed.py's JSON:
its own scores, on NVFP4 with max scales; where it chose more bits than the budget, the run is marked).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import random
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import quantize_nvfp4 as q  # noqa: E402
from benchmarks import bench_algorithms as bench  # noqa: E402
from benchmarks import smollm2  # noqa: E402

SEEDS_AT = 5.0      # the budget at which every random seed runs (one seed elsewhere)
KINDS = ("square", "token", "first")  # per linear and format, what a scoring pass adds up (see scoring_hook)


@dataclasses.dataclass(frozen=True)
class Score:
    """A candidate score (the product's is `output loss`): where the gradients and each linear's input are taken
    (`quantized`: every linear in its current format, at first all NVFP4; else every quantizer off), how the
    predicted loss is made of the pass's sums (`kinds`: KINDS -> weight), and in how many rounds the budget is
    spent (each round chooses up to its share of the added bits, applies them and scores again)."""
    quantized: bool
    kinds: dict
    rounds: int = 1


SCORES = {
    "output loss": None,  # the product: quantize_nvfp4.choose_mixed_precision as it is
    "unquantized point": Score(False, {"square": 1.0}),  # the product's score through the bench's own pass
    "quantized point": Score(True, {"square": 1.0}),
    "per-token": Score(False, {"token": 1.0}),
    "per-token quantized": Score(True, {"token": 1.0}),
    "first order": Score(True, {"first": 1.0}),
    "first+second": Score(True, {"first": 1.0, "token": 0.5}),
    "iterative 2": Score(True, {"square": 1.0}, 2),
    "iterative 3": Score(True, {"square": 1.0}, 3),
    "iterative 3 first+second": Score(True, {"first": 1.0, "token": 0.5}, 3),
}


def random_order(seed: int):
    def choose(groups, budget_bits: float) -> None:
        spare = budget_bits * sum(g.weights for g in groups) - sum(g.weights * q.WEIGHT_BITS[g.algo] for g in groups)
        order = list(range(len(groups)))
        random.Random(seed).shuffle(order)
        for index in order:
            if groups[index].upgrade_cost("FP8") <= spare:
                spare -= groups[index].upgrade_cost("FP8")
                groups[index].algo = "FP8"
    return choose


def given_choice(formats: dict[str, str]):
    """auto_quantize's choice: each group the most bits any of its linears got (`formats`: linear -> format)."""
    def choose(groups, budget_bits: float) -> None:
        for group in groups:
            algo = max((formats.get(n, "NVFP4") for n in group.names), key=lambda a: q.WEIGHT_BITS[
                None if a == "BF16" else a])
            group.algo = None if algo == "BF16" else algo
    return choose


def frozen_gemms(model, names: list[str], amaxes: dict) -> dict[str, dict]:
    """quantize_nvfp4.format_gemms with each format's weight computed now, from the calibrated NVFP4 quantizers, so
    that a linear keeps its candidates after an earlier round switched it to FP8 or 16 bits."""
    modules = dict(model.named_modules())
    amax_of = {n: amax for g, amax in amaxes.items() for n in g}
    frozen = {}
    for name in names:
        weights = {algo: weight() for algo, weight in q.format_weights(modules[name], amax_of[name]).items()}
        frozen[name] = q.format_gemms(modules[name], {algo: lambda w=w: w for algo, w in weights.items()})
    return frozen


def scoring_hook(gemms: dict, scores):
    """quantize_nvfp4.output_loss_hook adding, per format (rows of `scores`), every KIND at once: Σ (g·ΔY)²
    elementwise, Σ_t (g_t·ΔY_t)² per token, Σ g·ΔY (signed: the first-order loss change from 16 bits to that format
    at the point the gradient was taken)."""
    def add(index, grad, change):
        product = grad.float() * change.float()
        scores[index, 0] += product.square().sum()
        scores[index, 1] += product.sum(-1).square().sum()
        scores[index, 2] += product.sum()
    return q.output_change_hook(gemms, add)


def emulated_format(gemm: Callable | None):
    """A forward hook that replaces a linear's output by what `gemm` (its current format's, frozen_gemms) computes,
    its input's rounding passed straight through in the backward as ModelOpt's fake quantization does (whose NVFP4
    input quantizer needs CUDA); None: 16 bits, the output left as it is."""
    import torch
    import torch.nn.functional as F

    def hook(module, args, output):
        if gemm is None:
            return None
        x = args[0]
        exact = F.linear(x.float(), module.weight.float())
        with torch.no_grad():
            change = gemm(x) - exact
        return (exact + change).to(output.dtype) + (0 if module.bias is None else module.bias)
    return hook


def scoring_pass(model, gemms: dict, samples, pad_id: int, formats: dict | None):
    """quantize_nvfp4.output_loss_scores' passes with the benchmark's hooks (where `formats` (linear -> format) is
    given, each linear computing its format's GEMM first: the quantized point): linear -> (format, KIND) sums, and
    its seconds."""
    import torch

    began = time.perf_counter()
    names = list(gemms)
    scores = torch.zeros(len(names), len(q.FORMAT_CANDIDATES), len(KINDS), dtype=torch.float64)
    hooks = [(n, emulated_format(gemms[n].get(formats[n]))) for n in formats or ()]
    hooks += [(n, scoring_hook(gemms[n], scores[i])) for i, n in enumerate(names)]
    batches = q.group_batches([len(s) for s in samples], None, q.DEFAULT_BATCH_TOKENS)
    q.gradient_passes(model, samples, pad_id, batches, hooks)
    return {n: scores[i].numpy().copy() for i, n in enumerate(names)}, round(time.perf_counter() - began, 1)


def scored_choice(score: Score, passes: dict):
    """A choose_mixed_precision for `score`, in the product's record shape; `passes` caches the first round's
    scoring pass per point (the calibrated model is the same for every variant)."""
    def choose(model, samples, pad_id: int, budget_bits: float) -> dict:
        began = time.perf_counter()
        modules = dict(model.named_modules())
        names = [n for n in q.quantized_linear_shapes(model) if q.block_searchable(modules[n])]
        fused = q.linear_groups(names)
        amaxes = {g: q.group_amax([modules[n] for n in g]) for g in fused}
        gemms = frozen_gemms(model, names, amaxes)
        groups = [q.LinearGroup(g, sum(modules[n].weight.numel() for n in g), {}, amaxes[g]) for g in fused]
        scoring_s = 0.0
        for round_ in range(1, score.rounds + 1):
            if round_ == 1 and score.quantized in passes:
                sums, seconds = passes[score.quantized]
            else:
                formats = {n: g.algo for g in groups for n in g.names} if score.quantized else None
                sums, seconds = scoring_pass(model, gemms, samples, pad_id, formats)
                if round_ == 1:
                    passes[score.quantized] = sums, seconds
            scoring_s += seconds
            for group in groups:
                group.loss = {**{algo: sum(float(sum(w * sums[n][f, KINDS.index(k)] for k, w in score.kinds.items()))
                                           for n in group.names) for f, algo in enumerate(q.FORMAT_CANDIDATES)},
                              None: 0.0}
            was = {id(g): g.algo for g in groups}
            q.choose_formats(groups, q.WEIGHT_BITS["NVFP4"] + (budget_bits - q.WEIGHT_BITS["NVFP4"]) * round_
                             / score.rounds)
            for group in groups:
                for name in group.names if group.algo != was[id(group)] else ():
                    q.set_format(modules[name], group.algo, group.weight_amax)
        to_disk, weights = q.export_names(model), sum(g.weights for g in groups)
        return {"budget_bits": budget_bits,
                "effective_bits": round(sum(g.weights * q.WEIGHT_BITS[g.algo] for g in groups) / weights, 4),
                "counted": "as quantize_nvfp4.choose_mixed_precision counts",
                "predicted_loss": {"chosen": sum(g.loss[g.algo] for g in groups),
                                   "all_nvfp4": sum(g.loss["NVFP4"] for g in groups)},
                "seconds": round(time.perf_counter() - began, 2), "scoring_s": round(scoring_s, 1),
                "per_linear": {to_disk(n): g.algo or "16-bit" for g in groups for n in g.names}}
    return choose


def calibrate_once():
    """q.load_model / q.quantize_model / q.output_loss_scores replaced so that the first run calibrates and scores
    and every later run starts from a copy of that calibrated model."""
    cache, load, quantize, scores = {"choose": q.choose_mixed_precision, "passes": {}}, q.load_model, \
        q.quantize_model, q.output_loss_scores

    def load_model(settings, config, device, device_map=None, **kwargs):
        return copy.deepcopy(cache["calibrated"]) if "calibrated" in cache else \
            load(settings, config, device, device_map, **kwargs)

    def quantize_model(model, settings, unquantized, samples, device, pad_id, **kwargs):
        if "calibrated" not in cache:
            began = time.perf_counter()
            cache["stats"] = quantize(model, dataclasses.replace(settings, effective_bits=None), unquantized, samples,
                                      device, pad_id, **kwargs)
            cache["calibrated"] = copy.deepcopy(model)
            cache["calibration_s"] = round(time.perf_counter() - began, 1)
        stats = dict(cache["stats"])
        if settings.effective_bits:
            began = time.perf_counter()
            stats["mixed_precision"] = cache["choose"](model, samples, pad_id, settings.effective_bits)
            print(json.dumps({"calibration_seconds": cache.get("calibration_s")}), flush=True)
            stats["mixed_precision"]["choice_s"] = round(time.perf_counter() - began, 1)
        return stats

    def output_loss_scores(*args):
        if "scores" not in cache:
            began = time.perf_counter()
            cache["scores"] = scores(*args)
            cache["scores_s"] = round(time.perf_counter() - began, 1)
            print(json.dumps({"scores_seconds": cache["scores_s"]}), flush=True)
        return cache["scores"]

    q.load_model, q.quantize_model, q.output_loss_scores = load_model, quantize_model, output_loss_scores
    return cache


def child(spec: dict) -> None:
    """Every variant in this process (one calibration); one JSON line per finished checkpoint."""
    cache = calibrate_once()
    choose = q.choose_formats
    for variant in spec["variants"]:
        name, bits, out = variant["name"], variant["bits"], variant["out"]
        if "auto_quantize" in variant:
            formats = auto_quantize_formats(variant["auto_quantize"], bits)
            if formats is None:
                print(json.dumps({"name": name, "bits": bits, "out": out, "status": "no auto_quantize choice at "
                                  f"{bits} bits in {variant['auto_quantize']}", "seconds": 0}), flush=True)
                continue
        q.choose_formats = random_order(variant["seed"]) if "seed" in variant else \
            given_choice(formats) if "auto_quantize" in variant else choose
        score = SCORES.get(variant.get("score"))
        cache["choose"] = scored_choice(score, cache["passes"]) if score else q.choose_mixed_precision
        argv = [*spec["argv"], "--output_model", out, "--overwrite"]
        argv += ["--effective_bits", str(bits)] if bits else []
        began = time.perf_counter()
        status = q.main(argv)
        print(json.dumps({"name": name, "bits": bits, "out": out, "status": status,
                          "seconds": round(time.perf_counter() - began, 1)}), flush=True)


def auto_quantize_formats(path: str, bits: float) -> dict | None:
    """linear -> format of auto_quantize's choice at `bits`, from screen_mixed.py's JSON (read when the variant
    runs, so that the screen may still be writing it when this benchmark starts)."""
    rows = json.loads(Path(path).read_text()).get("rows", []) if Path(path).exists() else []
    return next((r["formats"] for r in rows if r["choice"] == "auto_quantize" and r["budget"] == bits
                 and "formats" in r), None)


def variants(args, work: Path) -> list[dict]:
    """pure NVFP4; at SEEDS_AT bits each score, every seed and auto_quantize; then the curve (each score, seed 0)."""
    first = [b for b in args.bits if b == SEEDS_AT]
    out = [{"name": "pure NVFP4", "bits": None}]
    for bits in first:
        out += [{"name": s, "bits": bits, "score": s} for s in args.scores]
        out += [{"name": f"random {s}", "bits": bits, "seed": s} for s in range(args.seeds)]
    aq = [{"name": "auto_quantize", "bits": b, "auto_quantize": args.auto_quantize} for b in args.bits] \
        if args.auto_quantize else []
    out += aq[:len(first)]
    rest = [b for b in args.bits if b != SEEDS_AT]
    out += [{"name": s, "bits": b, "score": s} for b in rest for s in args.scores]
    out += [{"name": "random 0", "bits": b, "seed": 0} for b in rest if args.seeds] + aq[len(first):]
    for v in out:
        v["out"] = str(work / ("ckpt-" + "".join(c if c.isalnum() else "_" for c in f"{v['name']}-{v['bits']}")))
    return out


def judged(line: dict, model: Path, heldout: Path, args) -> dict:
    out = Path(line["out"])
    row = {"variant": line["name"], "budget_bits": line["bits"], "run_s": line["seconds"]}
    if line["status"] != 0:
        if isinstance(line["status"], str):
            return {**row, "error": line["status"]}
        return {**row, "error": f"exit {line['status']}"}
    manifest = json.loads((out / q.MANIFEST_NAME).read_text())
    mixed = manifest["calibration_run"].get("mixed_precision") or {}
    quality = bench.quality_from_files(out, model, bench.judge_flags(heldout, args), 3600)
    formats: dict[str, int] = {}
    for algo in (mixed.get("per_linear") or {}).values():
        formats[algo] = formats.get(algo, 0) + 1
    return {**row, "effective_bits": mixed.get("effective_bits", q.WEIGHT_BITS["NVFP4"]),
            "formats": formats or manifest["validation"]["formats"],
            "predicted_loss": (mixed.get("predicted_loss") or {}).get("chosen"),
            "scoring_s": mixed.get("scoring_s", mixed.get("seconds")), "choice_s": mixed.get("choice_s"),
            "per_linear": mixed.get("per_linear"),
            **{k: quality.get(k) for k in ("perplexity_original", "perplexity_quantized", "perplexity_increase_pct",
                                           "mean_kl", "top1_agreement", "samples", "tokens", "error")
               if k in quality}}


def run_benchmark(args) -> None:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = Path(args.model) if args.model else smollm2.checkpoint(Path(args.cache))
    calibration, heldout = bench.text_mixes(work)
    argv = ["--input_model", str(model), "--dataset_yaml", str(calibration), "--max_samples", str(args.max_samples),
            "--max_seq_len", str(args.max_seq_len)]
    spec = {"argv": argv, "variants": variants(args, work)}
    results = {"command": "python " + shlex.join(sys.argv), "device": bench.device_name(),
               "versions": {"python": platform.python_version(), **q.library_versions()},
               "judge": {"model": smollm2.CHECKPOINT if not args.model else args.model},
               "data": {"calibration_samples": args.max_samples, "heldout_samples": args.eval_samples,
                        "max_seq_len": args.max_seq_len, "source": bench.TEXT_SOURCE},
               "auto_quantize_from": args.auto_quantize, "rows": []}
    began = time.perf_counter()
    process = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec)], stdout=subprocess.PIPE,
                               text=True)
    for text in process.stdout:
        line = json.loads(text) if text.startswith("{") else None
        if line and "scores_seconds" in line:
            results["scores_seconds"] = line["scores_seconds"]
        if line and line.get("calibration_seconds"):
            results["calibration_seconds"] = line["calibration_seconds"]
        if not line or "name" not in line:
            continue
        row = judged(line, model, heldout, args)
        print(json.dumps({k: v for k, v in row.items() if k != "per_linear"}), flush=True)
        results["rows"].append(row)
        results["seconds"] = round(time.perf_counter() - began, 1)
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    process.wait()


def pure_increase(rows: list[dict]) -> float | None:
    return next((r["perplexity_increase_pct"] for r in rows if r["variant"] == "pure NVFP4" and "error" not in r),
                None)


def scoring_seconds(row: dict, results: dict) -> str:
    """A choice's scoring passes' seconds (the product's one pass is timed once, in the run's scores_seconds)."""
    if row["variant"] == "output loss":
        return str(results.get("scores_seconds", "-"))
    return str(row.get("scoring_s")) if row["variant"] in SCORES else "-"


def judge_table(results: dict) -> str:
    """The judge's rows: each choice at its budget, its perplexity increase also as a fraction of pure NVFP4's."""
    pure = pure_increase(results["rows"])
    data = results["data"]
    lines = [f"Command: `{results['command']}`; {results['device']}; "
             + ", ".join(f"{k} {v}" for k, v in results["versions"].items())
             + f"; {data['calibration_samples']} calibration samples of at most {data['max_seq_len']} tokens, "
             f"{data['heldout_samples']} held-out samples; "
             + (f"calibration {results['calibration_seconds']} s, " if "calibration_seconds" in results else "")
             + f"output-loss scoring {results.get('scores_seconds')} s.", "",
             "| budget (bits) | choice | effective bits | linears NVFP4 / FP8 / 16-bit | ppl increase | x pure NVFP4 | "
             "x auto_quantize | mean KL | top-1 | scoring s |", "|---|---|---|---|---|---|---|---|---|---|"]
    auto = {r["budget_bits"]: r["perplexity_increase_pct"] for r in results["rows"]
            if r["variant"] == "auto_quantize" and "error" not in r}
    for r in results["rows"]:
        budget = r["budget_bits"] or "4.5 (none)"
        if "error" in r:
            lines.append(f"| {budget} | {r['variant']} | error: {r['error']} | | | | | | | |")
            continue
        f = r["formats"]
        counts = " / ".join(str(f.get(k) or 0) for k in ("NVFP4", "FP8", "16-bit"))
        ratio = f"{r['perplexity_increase_pct'] / pure:.2f}" if pure else "-"
        versus = f"{r['perplexity_increase_pct'] / auto[r['budget_bits']]:.2f}" if r["budget_bits"] in auto else "-"
        lines.append(f"| {budget} | {r['variant']} | {r['effective_bits']} | {counts} | "
                     f"{r['perplexity_increase_pct']}% | {ratio} | {versus} | {r['mean_kl']} | {r['top1_agreement']} | "
                     f"{scoring_seconds(r, results)} |")
    return "\n".join(lines)


def screen_table(results: dict) -> str:
    """screen_mixed.py's rows (in-process proxy); a row above its budget (auto_quantize counted with a 16-bit
    lm_head) is left out."""
    samples, commands = results["samples"], results["command"]
    commands = " then ".join(f"`{c}`" for c in (commands if isinstance(commands, list) else [commands]))
    lines = [f"Commands: {commands}; {samples[0]} calibration and {samples[1]} held-out samples of "
             f"{samples[2]} tokens; gradient scores {results.get('score_seconds')} s.", "",
             "| budget (bits) | choice | effective bits | groups NVFP4 / FP8 / 16-bit | ppl increase | mean KL | "
             "top-1 |", "|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        if r["effective_bits"] > r["budget"] + 1e-3:
            continue
        g = r["groups"]
        lines.append(f"| {r['budget']} | {r['choice']} | {r['effective_bits']} | {g['NVFP4']} / {g['FP8']} / "
                     f"{g['BF16']} | {r['ppl_increase_pct']}% | {r['mean_kl']:.4f} | {r['top1']:.4f} |")
    return "\n".join(lines)


def rendered(path: Path) -> str:
    results = json.loads(path.read_text())
    return judge_table(results) if "data" in results else screen_table(results)


def render(paths: list[Path]) -> None:
    for path in paths:
        if not bench.replace_block(ROOT / "docs" / "algorithms.md", path.stem, rendered(path)):
            raise SystemExit(f"no '{bench.BLOCK_BEGIN.format(path.stem)}' block in docs/algorithms.md")


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        return child(json.loads(sys.argv[2]))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "nvfp4-bench"))
    p.add_argument("--model", help="a model to measure instead of the judge")
    p.add_argument("--work")
    p.add_argument("--out")
    p.add_argument("--render", nargs="+", metavar="RESULTS",
                   help="only rewrite docs/algorithms.md's tables from these files (this script's, screen_mixed.py's)")
    p.add_argument("--bits", type=float, nargs="+", default=[5.0, 4.75, 5.5, 6.0])
    p.add_argument("--scores", nargs="+", choices=list(SCORES), default=["output loss"],
                   help="the scores (and choice procedures) to compare; 'output loss' is the product's")
    p.add_argument("--seeds", type=int, default=3, help=f"random choices at {SEEDS_AT} bits (seed 0 elsewhere)")
    p.add_argument("--auto_quantize", metavar="SCREEN_JSON", help="screen_mixed.py's results with auto_quantize rows")
    p.add_argument("--max_samples", type=int, default=64)
    p.add_argument("--max_seq_len", type=int, default=256)
    p.add_argument("--eval_samples", type=int, default=48)
    args = p.parse_args()
    if args.render:
        return render([Path(r) for r in args.render])
    if not (args.work and args.out):
        p.error("--work and --out are required (or --render)")
    run_benchmark(args)


if __name__ == "__main__":
    main()
