#!/usr/bin/env python3
"""Offloaded calibration against the in-GPU script, with the checkpoints compared tensor for tensor.

A random Llama-3-8B-shaped model (14.96 GiB bf16) is saved to disk, then calibrated on the same samples:
  (a) quantize_nvfp4.py's path, the model fully on the GPU: first in this process (cold), then again (warm);
  (c) quantize_nvfp4_offload.py's path, under a GPU cap of --gpu_cap for weights (6 GiB: the model is 2.5x
      the cap), once per --checkpoint_every value (default: auto, the script's default, and 8);
  (b) optionally (--original_samples N), the original offload script's approach: one sample per forward
      (full logits, KV cache) inside mtq.quantize, timed on N samples and scaled by sample count.
The warm (a) and the first (c) are exported with ModelOpt's export_hf_checkpoint and compared tensor for tensor.
With --fresh_processes N, (a) and (c) then also run N times each, alternating, every run in a fresh process of
its own (after one untimed fresh process): what a user's single run of either script pays, cold against cold.

    python benchmarks/bench_offload.py              # H100: a few minutes; needs ~45 GB of disk
    python benchmarks/bench_offload.py --tiny       # a 4-layer tiny model split across CPU and disk
"""
from __future__ import annotations

import argparse
import copy
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message=".*is not tested with current version of modelopt.*")
import modelopt.torch.quantization as mtq  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_calibration import (  # noqa: E402
    FULL_RUN,
    LLAMA3_8B,
    PAD_ID,
    TINY,
    TINY_RUN,
    bench_settings,
    build_model,
    free_memory,
    gib,
    make_samples,
    sync,
)

import quantize_nvfp4 as q  # noqa: E402
import quantize_nvfp4_offload as offload  # noqa: E402

TARGET_VS_IN_GPU = 1.5     # (c) at the default --checkpoint_every: time <= this x (a) warm
TARGET_VS_ORIGINAL = 10.0  # (c) at least this many times faster than (b)
TINY_OFFLOAD = {**TINY, "num_hidden_layers": 4}
TINY_CPU_CAP = 600_000     # tiny: the embeddings in RAM, the decoder layers on disk (as the offload self-test)


def save_random_model(folder: Path, shape: dict, device: str, seed: int) -> int:
    model, weight_bytes = build_model(shape, device, seed)
    model.save_pretrained(str(folder), max_shard_size="4GB")
    del model
    free_memory(device)
    return weight_bytes


def timed(fn, device: str) -> tuple[float, object]:
    sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def settings_for(folder: Path, samples, args) -> q.Settings:
    settings = bench_settings(samples, args.max_len, None)
    settings.input_model, settings.algorithm = str(folder), args.algorithm
    return settings


def job_for(settings: q.Settings, samples) -> q.Job:
    config = q.load_model_config(settings)
    skeleton = q.empty_model(config, False)
    return q.Job(config, None, skeleton, q.always_unquantized(skeleton), samples, {})


def export(model, folder: Path | None) -> float | None:
    """ModelOpt's export of the calibrated model (what both scripts write), timed; None when not asked."""
    from modelopt.torch.export import export_hf_checkpoint

    if folder is None:
        return None
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        export_hf_checkpoint(model, export_dir=str(folder))
    return round(time.perf_counter() - start, 2)


def in_gpu(folder: Path, samples, args, export_to: Path | None = None) -> dict:
    settings = settings_for(folder, samples, args)
    job = job_for(settings, samples)
    load_s, model = timed(lambda: q.load_model(settings, job.config, args.device), args.device)
    calib_s, stats = timed(lambda m=model: q.quantize_model(m, settings, job.unquantized, samples, args.device, PAD_ID),
                           args.device)
    export_s = export(model, export_to)
    del model
    return {"load_s": round(load_s, 2), "calibration_s": round(calib_s, 2), "export_s": export_s,
            "peak_gpu_gib": stats.get("peak_gpu_memory_gib"), "tokens_per_s": stats["tokens_per_s"],
            "batches": stats["batches"], "padding_fraction": stats["padding_fraction"]}


def offloaded(folder: Path, samples, args, work: Path, checkpoint_every: int | None, export_to: Path | None = None,
              prefetch: bool = True) -> dict:
    prefetcher = offload.LayerPrefetcher
    if not prefetch:  # the A/B: the loop's own prefetcher, switched off
        offload.LayerPrefetcher = lambda device: prefetcher(device, enabled=False)
    settings = settings_for(folder, samples, args)
    job = job_for(settings, samples)
    opts = offload.OffloadSettings(work / f"offload-{checkpoint_every or 'auto'}-{prefetch}", args.gpu_cap,
                                   TINY_CPU_CAP if args.tiny else None, False, False, checkpoint_every)
    opts.offload_folder.mkdir(parents=True)
    placement = offload.plan_placement(job, settings, opts)
    offload.print_placement(placement, opts)
    load_s, model = timed(lambda: offload.load_offloaded_model(settings, job, placement, opts), args.device)
    device = offload.execution_device(placement)

    def calibrate(m, config, state):
        offload.calibrate_by_layer(m, config, state, samples, settings, device, opts, None)

    calib_s, stats = timed(lambda m=model: q.quantize_model(m, settings, job.unquantized, samples, device, PAD_ID,
                                                            calibrate=calibrate), args.device)
    offload.LayerPrefetcher = prefetcher
    export_s = export(model, export_to)
    del model
    shutil.rmtree(opts.offload_folder)
    return {"load_s": round(load_s, 2), "calibration_s": round(calib_s, 2), "export_s": export_s,
            "peak_gpu_gib": stats.get("peak_gpu_memory_gib"), "tokens_per_s": stats["tokens_per_s"],
            "batches": stats["batches"], "layers_per_device": placement.layers_per_device,
            "weight_gib_per_device": {k: gib(v) for k, v in placement.bytes_per_device.items()},
            "activation_cache_gib": gib(placement.activation_cache_bytes), "checkpoint_every": checkpoint_every,
            "prefetch": prefetch}


def original(folder: Path, samples, args, work: Path) -> dict:
    """The original script's loop on the same placement, on a prefix of the samples."""
    settings = settings_for(folder, samples, args)
    job = job_for(settings, samples)
    opts = offload.OffloadSettings(work / "offload-original", args.gpu_cap, TINY_CPU_CAP if args.tiny else None,
                                   False, False)
    opts.offload_folder.mkdir(parents=True)
    placement = offload.plan_placement(job, settings, opts)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16, device_map=placement.device_map,
                                                 offload_folder=str(opts.offload_folder))
    subset = samples[: args.original_samples]
    device = offload.execution_device(placement)

    def per_sample_loop(m):
        with torch.no_grad():
            for sample in subset:
                m(input_ids=torch.tensor([sample], device=device))

    calib_s, _ = timed(lambda m=model: mtq.quantize(m, copy.deepcopy(mtq.NVFP4_DEFAULT_CFG), per_sample_loop),
                       args.device)
    del model
    shutil.rmtree(opts.offload_folder)
    scaled = calib_s * len(samples) / len(subset)
    return {"measured_samples": len(subset), "measured_s": round(calib_s, 2), "calibration_s": round(scaled, 2),
            "tokens_per_s": round(sum(map(len, samples)) / scaled, 1)}


def fresh_process(variant: str, args, work: Path) -> dict:
    """One (a) or (c) run in a new Python process on the saved model; its result dict."""
    command = [sys.executable, __file__, "--child", variant, "--workdir", str(work), "--device", args.device,
               "--seed", str(args.seed), "--gpu_cap", str(args.gpu_cap), "--samples", str(args.samples),
               "--max_len", str(args.max_len), "--median_len", str(args.median_len), "--algorithm", args.algorithm] + \
        (["--tiny"] if args.tiny else [])
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    row = json.loads([line for line in result.stdout.splitlines() if line.startswith("{")][-1])
    return {**row, "process_s": round(time.perf_counter() - start, 2)}


def fresh_process_pairs(args, work: Path) -> dict:
    """(a) and (c) alternating, each run in its own fresh process, after one untimed fresh (a)."""
    fresh_process("a", args, work)  # the machine's first CUDA process pages in the CUDA libraries: not counted
    runs: dict[str, list] = {"a": [], "c": []}
    for _ in range(args.fresh_processes):
        for variant in ("a", "c"):
            runs[variant].append(fresh_process(variant, args, work))
            print(json.dumps({"fresh_process": variant, **runs[variant][-1]}), flush=True)
    ratios = [c["calibration_s"] / a["calibration_s"] for a, c in zip(runs["a"], runs["c"])]
    return {"runs": runs, "c_vs_a_cold": [round(r, 2) for r in ratios]}


def run_child(args) -> int:
    """--child a|c: one run on the model saved in --workdir; prints one JSON line."""
    work = Path(args.workdir)
    samples = make_samples(args.samples, args.median_len, args.max_len,
                           (TINY_OFFLOAD if args.tiny else LLAMA3_8B)["vocab_size"], args.seed)
    row = in_gpu(work / "random-llama", samples, args) if args.child == "a" else \
        offloaded(work / "random-llama", samples, args, work, None)
    print(json.dumps({k: row[k] for k in ("load_s", "calibration_s", "peak_gpu_gib")}), flush=True)
    return 0


def compare_checkpoints(a: Path, c: Path) -> dict:
    """Every tensor of both exports: the names that differ, and the largest relative difference among scales."""
    def tensors(folder: Path) -> dict:
        out = {}
        for file in sorted(folder.glob("*.safetensors")):
            out.update(load_file(str(file)))
        return out

    ta, tc = tensors(a), tensors(c)
    different = sorted(k for k in ta.keys() & tc.keys() if not torch.equal(ta[k], tc[k]))
    worst = 0.0
    for key in different:
        if ta[key].dtype in (torch.float32, torch.bfloat16, torch.float16) and ta[key].numel() == 1:
            worst = max(worst, abs(ta[key].float().item() / tc[key].float().item() - 1))
    return {"tensors": len(ta), "identical": not different and ta.keys() == tc.keys(),
            "missing_or_extra": sorted(ta.keys() ^ tc.keys())[:10], "different": len(different),
            "first_different": different[:10], "max_relative_scalar_difference": worst}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="4-layer tiny Llama on CPU and disk: a smoke test")
    p.add_argument("--samples", type=int, help=f"calibration samples (default {FULL_RUN['samples']})")
    p.add_argument("--max_len", type=int, help=f"longest sample (default {FULL_RUN['max_len']})")
    p.add_argument("--median_len", type=int, help=f"median sample length (default {FULL_RUN['median_len']})")
    p.add_argument("--gpu_cap", type=offload.parse_memory, default="6GiB", help="GPU memory for weights (default 6GiB)")
    p.add_argument("--algorithm", default="max", choices=offload.LAYER_LOOP_ALGORITHMS,
                   help="calibration algorithm of (a) and (c) (default max)")
    p.add_argument("--original_samples", type=int, default=0,
                   help="time (b) on this many samples, then scale (0: skip)")
    p.add_argument("--checkpoint_every", type=offload.parse_checkpoint_every, nargs="+", default=[None, 8],
                   metavar="auto|N", help="(c) once per value (default: auto, the script's default, and 8); the first "
                   "is exported and compared with (a)")
    p.add_argument("--prefetch_ab", action="store_true", help="then (c) at the default interval again, without and "
                                                                 "with the next layer's weights prefetched")
    p.add_argument("--no_export", action="store_true", help="skip the exports and the checkpoint comparison")
    p.add_argument("--fresh_processes", type=int, default=0, metavar="N",
                   help="then (a) and (c) N times each, alternating, each in a fresh process (cold against cold)")
    p.add_argument("--child", choices=("a", "c"), help=argparse.SUPPRESS)  # one fresh-process run
    p.add_argument("--device", default=q.pick_device(), help="default: cuda:0 if available, else cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="where the model, offload folders and exports go (default: temp)")
    p.add_argument("--json", default="bench_offload.json")
    args = p.parse_args(argv)
    for key, default in (TINY_RUN if args.tiny else FULL_RUN).items():
        setattr(args, key, getattr(args, key) or default)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return run_child(args)
    shape, device = TINY_OFFLOAD if args.tiny else LLAMA3_8B, args.device
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-offload-"))
    folder = work / "random-llama"
    weight_bytes = save_random_model(folder, shape, device, args.seed)
    samples = make_samples(args.samples, args.median_len, args.max_len, shape["vocab_size"], args.seed)
    q.log(f"model {gib(weight_bytes)} GiB on disk, GPU cap {gib(args.gpu_cap)} GiB; {len(samples)} samples, "
          f"{sum(map(len, samples))} tokens")
    exports = None if args.no_export else {"a": work / "export-a", "c": work / "export-c"}
    # (a) twice: the first run in a process pays cuDNN/cuBLAS plans for each new shape; targets use the warm one
    results = {"a_in_gpu_cold": in_gpu(folder, samples, args)}
    free_memory(device)
    results["a_in_gpu"] = in_gpu(folder, samples, args, exports and exports["a"])
    free_memory(device)
    for n, every in enumerate(args.checkpoint_every):
        results[f"c_offloaded_every_{every or 'auto'}"] = offloaded(folder, samples, args, work, every,
                                                          exports["c"] if exports and n == 0 else None)
        free_memory(device)
    if args.prefetch_ab:  # the default again without, then with, the next layer's weights loaded during this one's
        for prefetch in (False, True):
            results[f"c_offloaded_every_auto_prefetch_{'on' if prefetch else 'off'}"] = offloaded(
                folder, samples, args, work, None, prefetch=prefetch)
            free_memory(device)
    if args.original_samples:
        results["b_original"] = original(folder, samples, args, work)
    a, b = results["a_in_gpu"]["calibration_s"], (results.get("b_original") or {}).get("calibration_s")
    print(f"\n{'variant':<28}{'calibration s':>14}{'load s':>9}{'export s':>10}{'peak GPU GiB':>14}{'vs (a)':>9}"
          f"{'(b) / this':>12}")
    for name, r in results.items():
        speedup = f"{b / r['calibration_s']:.1f}" if b else "-"
        print(f"{name:<28}{r['calibration_s']:>14}{r.get('load_s', '-'):>9}{str(r.get('export_s') or '-'):>10}"
              f"{str(r.get('peak_gpu_gib') or '-'):>14}{r['calibration_s'] / a:>9.2f}{speedup:>12}")
    comparison = compare_checkpoints(exports["a"], exports["c"]) if exports else None
    if args.fresh_processes:
        free_memory(device)
        results["fresh_processes"] = fresh_process_pairs(args, work)
        print(f"(c) / (a), each the first calibration of a fresh process: {results['fresh_processes']['c_vs_a_cold']}")
    if comparison:
        print(f"\ncheckpoint of c_offloaded_every_{args.checkpoint_every[0] or 'auto'} vs a_in_gpu: "
              f"{'IDENTICAL' if comparison['identical'] else 'DIFFERENT'} ({comparison['tensors']} tensors, "
              f"{comparison['different']} differ, largest relative scale difference "
              f"{comparison['max_relative_scalar_difference']:.3g})")
    targets = []
    for name, r in results.items():
        if name.startswith("c_"):
            target = {"variant": name, "vs_in_gpu": round(r["calibration_s"] / a, 2)}
            if name == f"c_offloaded_every_{args.checkpoint_every[0] or 'auto'}":
                target["pass_within_1.5x"] = r["calibration_s"] <= TARGET_VS_IN_GPU * a
            if b:
                target.update(speedup_vs_original=round(b / r["calibration_s"], 1),
                              pass_10x=b / r["calibration_s"] >= TARGET_VS_ORIGINAL)
            targets.append(target)
    if args.fresh_processes:  # cold against cold: what a user's single run of either script pays
        ratios = results["fresh_processes"]["c_vs_a_cold"]
        targets.append({"variant": "fresh-process pairs", "c_vs_a_cold": ratios,
                        "pass_within_1.5x": all(r <= TARGET_VS_IN_GPU for r in ratios)})
    for t in targets:
        print(t)
    report = {"device": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
              "versions": q.library_versions(), "command": shlex.join(["python"] + sys.argv),
              "weight_gib": gib(weight_bytes), "gpu_cap_gib": gib(args.gpu_cap), "samples": len(samples),
              "tokens": sum(map(len, samples)), "results": results, "checkpoint_comparison": comparison,
              "targets": targets}
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.json}")
    for made in ([work] if args.workdir is None else [folder, *(exports or {}).values()]):  # only what this run wrote
        shutil.rmtree(made, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
