#!/usr/bin/env python3
"""Offloaded calibration against the in-GPU script and the original per-sample offload loop.

A random Llama-3-8B-shaped model (14.96 GiB bf16) is saved to disk, then calibrated three ways on the
same samples under a GPU cap of --gpu_cap for weights (6 GiB: the model is 2.5x the cap):
  (a) quantize_nvfp4.py's path, the model fully on the GPU;
  (b) the original offload script's approach: accelerate offload, one sample per forward (full logits,
      KV cache) inside mtq.quantize; every sample streams every offloaded weight to the GPU again, so it
      is timed on the first --original_samples samples and scaled by sample count (the weight traffic
      per forward does not depend on the sample);
  (c) quantize_nvfp4_offload.py's path: the same placement, ModelOpt layer-by-layer calibration.

    python benchmarks/bench_offload.py              # H100: about 6 minutes, needs ~35 GB of disk
"""
from __future__ import annotations

import argparse
import copy
import json
import shlex
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message=".*is not tested with current version of modelopt.*")
import modelopt.torch.quantization as mtq  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import quantize_nvfp4 as q  # noqa: E402
import quantize_nvfp4_offload as offload  # noqa: E402
from bench_calibration import (LLAMA3_8B, PAD_ID, bench_settings, build_model, free_memory, gib,  # noqa: E402
                               make_samples, sync)

TARGET_VS_IN_GPU = 2.0     # (c) time <= this x (a)
TARGET_VS_ORIGINAL = 10.0  # (c) at least this many times faster than (b)


def save_random_model(folder: Path, seed: int) -> int:
    model, weight_bytes = build_model(LLAMA3_8B, "cuda:0", seed)
    model.save_pretrained(str(folder), max_shard_size="4GB")
    del model
    torch.cuda.empty_cache()
    return weight_bytes


def timed(fn) -> tuple[float, object]:
    sync("cuda:0")
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = fn()
    sync("cuda:0")
    return time.perf_counter() - start, out


def settings_for(folder: Path, samples, max_len: int) -> q.Settings:
    settings = bench_settings(samples, max_len, None)
    settings.input_model = str(folder)
    return settings


def job_for(folder: Path, settings: q.Settings, samples) -> q.Job:
    config = q.load_model_config(settings)
    skeleton = q.empty_model(config, False)
    return q.Job(config, None, skeleton, q.always_unquantized(skeleton), samples, {}, time.perf_counter())


def in_gpu(folder: Path, samples, args) -> dict:
    settings = settings_for(folder, samples, args.max_len)
    job = job_for(folder, settings, samples)
    load_s, model = timed(lambda: q.load_model(settings, job.config, "cuda:0"))
    calib_s, stats = timed(lambda: q.quantize_model(model, settings, job.unquantized, samples, "cuda:0", PAD_ID))
    del model
    return {"load_s": round(load_s, 2), "calibration_s": round(calib_s, 2), "peak_gpu_gib": stats["peak_gpu_memory_gib"],
            "tokens_per_s": stats["tokens_per_s"]}


def offloaded(folder: Path, samples, args, work: Path, checkpoint_every: int) -> dict:
    settings = settings_for(folder, samples, args.max_len)
    job = job_for(folder, settings, samples)
    opts = offload.OffloadSettings(work / f"offload-{checkpoint_every}", args.gpu_cap, None, False, False,
                                   checkpoint_every)
    opts.offload_folder.mkdir(parents=True)
    placement = offload.plan_placement(job, settings, opts)
    offload.print_placement(placement, opts)
    load_s, model = timed(lambda: offload.load_offloaded_model(settings, job, placement, opts))
    calib_s, stats = timed(lambda: q.quantize_model(
        model, settings, job.unquantized, samples, "cuda:0", PAD_ID, layerwise_dir=opts.layerwise_dir,
        before_each_pass=offload.between_layers(opts.layerwise_dir), save_every=checkpoint_every))
    del model
    shutil.rmtree(opts.offload_folder)
    return {"load_s": round(load_s, 2), "calibration_s": round(calib_s, 2), "peak_gpu_gib": stats["peak_gpu_memory_gib"],
            "tokens_per_s": stats["tokens_per_s"], "layers_per_device": placement.layers_per_device,
            "weight_gib_per_device": {k: gib(v) for k, v in placement.bytes_per_device.items()},
            "activation_cache_gib": gib(placement.activation_cache_bytes), "checkpoint_every": checkpoint_every}


def original(folder: Path, samples, args, work: Path) -> dict:
    """The original script's loop on the same placement, on a prefix of the samples."""
    settings = settings_for(folder, samples, args.max_len)
    job = job_for(folder, settings, samples)
    opts = offload.OffloadSettings(work / "offload-original", args.gpu_cap, None, False, False)
    opts.offload_folder.mkdir(parents=True)
    placement = offload.plan_placement(job, settings, opts)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16, device_map=placement.device_map,
                                                 offload_folder=str(opts.offload_folder))
    subset = samples[: args.original_samples]

    def per_sample_loop(m):
        with torch.no_grad():
            for sample in subset:
                m(input_ids=torch.tensor([sample], device="cuda:0"))

    calib_s, _ = timed(lambda: mtq.quantize(model, copy.deepcopy(mtq.NVFP4_DEFAULT_CFG), per_sample_loop))
    del model
    scaled = calib_s * len(samples) / len(subset)
    return {"measured_samples": len(subset), "measured_s": round(calib_s, 2), "calibration_s": round(scaled, 2),
            "tokens_per_s": round(sum(map(len, samples)) / scaled, 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--max_len", type=int, default=2048)
    p.add_argument("--median_len", type=int, default=400)
    p.add_argument("--gpu_cap", type=offload.parse_memory, default="6GiB", help="GPU memory for weights (default 6GiB)")
    p.add_argument("--original_samples", type=int, default=24, help="samples timed for (b), then scaled")
    p.add_argument("--checkpoint_every", type=int, nargs="+", default=[8, 32], help="(c) once per value")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="where the 15 GB model and offload folders go (default: a temp dir)")
    p.add_argument("--json", default="bench_offload.json")
    args = p.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-offload-"))
    folder = work / "llama-8b-shape"
    weight_bytes = save_random_model(folder, args.seed)
    samples = make_samples(args.samples, args.median_len, args.max_len, LLAMA3_8B["vocab_size"], args.seed)
    q.log(f"model {gib(weight_bytes)} GiB on disk, GPU cap {gib(args.gpu_cap)} GiB; {len(samples)} samples, "
          f"{sum(map(len, samples))} tokens")
    # (a) twice: the first run in a process pays cuDNN/cuBLAS plans for each new shape; targets use the warm one
    results = {"a_in_gpu_cold": in_gpu(folder, samples, args)}
    free_memory("cuda:0")
    results["a_in_gpu"] = in_gpu(folder, samples, args)
    free_memory("cuda:0")
    for every in args.checkpoint_every:
        results[f"c_offloaded_every_{every}"] = offloaded(folder, samples, args, work, every)
        free_memory("cuda:0")
    results["b_original"] = original(folder, samples, args, work)
    a, b = results["a_in_gpu"]["calibration_s"], results["b_original"]["calibration_s"]
    print(f"\n{'variant':<34}{'calibration s':>14}{'load s':>9}{'peak GPU GiB':>14}{'vs (a)':>9}{'(b) / this':>12}")
    for name, r in results.items():
        print(f"{name:<34}{r['calibration_s']:>14}{r.get('load_s', '-'):>9}{r.get('peak_gpu_gib', '-'):>14}"
              f"{r['calibration_s'] / a:>9.2f}{b / r['calibration_s']:>12.1f}")
    targets = []
    for name, r in results.items():
        if name.startswith("c_"):
            targets.append({"variant": name, "vs_in_gpu": round(r["calibration_s"] / a, 2),
                            "pass_within_2x": r["calibration_s"] <= TARGET_VS_IN_GPU * a,
                            "speedup_vs_original": round(b / r["calibration_s"], 1),
                            "pass_10x": b / r["calibration_s"] >= TARGET_VS_ORIGINAL})
    for t in targets:
        print(t)
    report = {"device": torch.cuda.get_device_name(0), "versions": q.library_versions(),
              "command": shlex.join(["python"] + sys.argv), "weight_gib": gib(weight_bytes),
              "gpu_cap_gib": gib(args.gpu_cap), "samples": len(samples), "tokens": sum(map(len, samples)),
              "results": results, "targets": targets}
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
