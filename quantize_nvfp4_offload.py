#!/usr/bin/env python3
"""NVFP4 quantization for models larger than GPU memory: accelerate offload + layer-by-layer calibration.

The original offload script ran one sample per forward, so every sample dragged every offloaded
weight across PCIe or off the disk again. Here ModelOpt calibrates layer by layer: each decoder
layer's weights come onto the GPU once for all calibration batches, so a run costs about one pass
over the weights plus the compute. Every layer is checkpointed, and --resume continues a killed run.

    python quantize_nvfp4_offload.py --input_model M --output_model OUT --dataset_yaml Datasets/X.yaml \
        --offload_folder /scratch/offload --max_gpu_memory 60GiB

Takes everything quantize_nvfp4.py takes (the helpers are imported from it, not copied).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import quantize_nvfp4 as q

# --------------------------------------------------------------------------- constants
WEIGHTS_DIR = "offloaded_weights"            # accelerate's disk-offloaded weights
LAYERWISE_DIR = "layerwise_calibration"      # ModelOpt's per-layer calibration checkpoints
JOB_FILE = "nvfp4_offload_job.json"          # which job the checkpoints belong to, for --resume
FAIL_AFTER_ENV = "NVFP4_TEST_FAIL_AFTER_LAYER"  # tests only: fail once this layer's checkpoint is committed
GPU_RESERVE_FRACTION = 0.10                  # CUDA context, allocator slack


@dataclasses.dataclass
class OffloadSettings:
    offload_folder: Path
    max_gpu_memory: int | None     # bytes per GPU, for weights
    max_cpu_memory: int | None     # bytes, for weights
    clean_offload: bool
    resume: bool
    checkpoint_every: int = 8      # layers between resume points (each writes one layer's activation cache)

    @property
    def layerwise_dir(self) -> Path:
        return self.offload_folder / LAYERWISE_DIR


@dataclasses.dataclass
class Placement:
    device_map: dict
    bytes_per_device: dict           # "cuda:0" / "cpu" / "disk" -> weight bytes
    layers_per_device: dict          # same keys -> decoder layers
    activation_cache_bytes: int      # one layer's cached inputs for every batch


# --------------------------------------------------------------------------- settings
def parse_memory(text: str) -> int:
    from accelerate.utils import convert_file_size_to_int

    try:
        value = int(text) if text.isdigit() else convert_file_size_to_int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size like 80GiB, 500MB or a number of bytes, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"a memory cap must be positive, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = q.build_parser()
    parser.description = "Quantize a Hugging Face causal LM larger than GPU memory to NVFP4 (offloaded, layer by layer)."
    group = parser.add_argument_group("offloading")
    group.add_argument("--offload_folder", help="where offloaded weights and per-layer checkpoints go (required)")
    group.add_argument("--max_gpu_memory", type=parse_memory, metavar="SIZE",
                       help="weights per GPU, e.g. 60GiB (default: what is free, less room for activations)")
    group.add_argument("--max_cpu_memory", type=parse_memory, metavar="SIZE",
                       help="weights in CPU RAM before spilling to disk (default: accelerate's estimate of free RAM)")
    group.add_argument("--clean_offload", action="store_true",
                       help="delete what this script put in --offload_folder after a successful run (never after a failed one)")
    group.add_argument("--resume", action="store_true", help="continue a killed run from its per-layer checkpoints")
    group.add_argument("--checkpoint_every", type=int, default=8, metavar="N",
                       help="write a resume point every N layers (default 8); each one writes a layer's activation "
                            "cache to disk, so 1 makes a run I/O-bound (measured 3.6x slower on an 8B model)")
    return parser


def build_offload_settings(args: argparse.Namespace) -> OffloadSettings:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise q.UsageError("quantize_nvfp4_offload.py runs as one process: start it with python, not torchrun or "
                           "accelerate launch (for several GPUs, quantize_nvfp4.py places a model across them)")
    if args.algorithm not in q.SCALE_ONLY_ALGORITHMS:
        raise q.UsageError(f"--algorithm {args.algorithm}: this script calibrates layer by layer without writing "
                           f"offloaded weights back, which {args.algorithm} changes; use one of "
                           f"{', '.join(q.SCALE_ONLY_ALGORITHMS)}, or quantize_nvfp4.py on a GPU that holds the model")
    if not args.offload_folder:
        raise q.UsageError("no offload folder: pass --offload_folder DIR (a disk with room for the offloaded weights)")
    folder = Path(args.offload_folder).expanduser().resolve()
    if folder.exists() and not folder.is_dir():
        raise q.UsageError(f"--offload_folder exists and is not a directory: {folder}")
    if not folder.parent.is_dir():
        raise q.UsageError(f"--offload_folder's parent folder does not exist: {folder.parent}")
    if args.checkpoint_every < 1:
        raise q.UsageError(f"--checkpoint_every must be >= 1, got {args.checkpoint_every}")
    return OffloadSettings(folder, args.max_gpu_memory, args.max_cpu_memory, args.clean_offload, args.resume,
                           args.checkpoint_every)


# --------------------------------------------------------------------------- resume bookkeeping
def job_fingerprint(settings: q.Settings, job: q.Job, offload: OffloadSettings) -> dict:
    """What must match for per-layer checkpoints to be reused: model, mode, exclusions, the exact tokens."""
    tokens = hashlib.sha256(json.dumps(job.samples).encode()).hexdigest()
    return {"input_model": settings.input_model, "mode": settings.mode, "dtype": settings.dtype,
            "algorithm": settings.algorithm,
            "kv_cache": settings.kv_cache, "moe_calibration": settings.moe_calibration,
            "unquantized": job.unquantized, "batch_size": settings.batch_size, "calibration_tokens_sha256": tokens,
            "checkpoint_every": offload.checkpoint_every}


def committed_layer(layerwise_dir: Path) -> int | None:
    """The last layer ModelOpt committed to its checkpoint while calibration was unfinished, or None."""
    manifest = layerwise_dir / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        progress = json.loads(manifest.read_text())
        done, total = progress["last_completed_layer"], progress["num_layers"]
    except (json.JSONDecodeError, KeyError):
        return None
    return done if done + 1 < total else None  # a finished calibration is not resumed: ModelOpt redoes it


def check_resume(settings: q.Settings, offload: OffloadSettings, fingerprint: dict) -> int | None:
    """Refuse to silently reuse or silently discard earlier progress; returns the layer to resume after."""
    done = committed_layer(offload.layerwise_dir)
    job_file = offload.offload_folder / JOB_FILE
    if done is None:
        if offload.resume:
            q.warn(f"--resume: no unfinished calibration in {offload.layerwise_dir}; starting from the first layer")
        shutil.rmtree(offload.layerwise_dir, ignore_errors=True)
        return None
    if not offload.resume:
        raise q.UsageError(f"{offload.layerwise_dir} holds calibration progress from an earlier run (layers 0-{done} "
                           f"done): pass --resume to continue it, or delete that folder to start over")
    earlier = json.loads(job_file.read_text()) if job_file.is_file() else None
    if earlier != fingerprint:
        changed = sorted(k for k in fingerprint if (earlier or {}).get(k) != fingerprint[k])
        raise q.UsageError(f"--resume: the checkpoints in {offload.layerwise_dir} belong to a different job "
                           f"(differs in: {', '.join(changed)}); rerun with the same model, mode, data and seed, "
                           "or delete that folder to start over")
    return done


def between_layers(layerwise_dir: Path):
    """Called before each of ModelOpt's forward passes: prune stale activation caches, honour the test hook.

    ModelOpt writes a next_inputs.pt (every batch's activations) for every layer and keeps them all;
    resuming needs only the newest committed one, so older ones are deleted as calibration moves on.
    """
    fail_after = os.environ.get(FAIL_AFTER_ENV)

    def callback() -> None:
        done = committed_layer(layerwise_dir)
        if done is None:
            return
        for stale in layerwise_dir.glob("layer_*/next_inputs.pt"):
            if int(stale.parent.name.split("_")[1]) < done:
                stale.unlink()
        if fail_after is not None and done >= int(fail_after):
            raise RuntimeError(f"simulated failure after layer {done} ({FAIL_AFTER_ENV}={fail_after})")

    return callback


# --------------------------------------------------------------------------- placement
def max_memory_map(offload: OffloadSettings, reserve_bytes: int) -> dict:
    """accelerate's max_memory: each GPU's cap for weights (leaving room for activations), then CPU."""
    import torch
    from accelerate.utils import get_max_memory

    defaults = get_max_memory()
    caps = {}
    for gpu in range(torch.cuda.device_count()):
        total = torch.cuda.get_device_properties(gpu).total_memory
        room = int(total * (1 - GPU_RESERVE_FRACTION)) - reserve_bytes
        cap = offload.max_gpu_memory or room
        if cap > room:
            raise q.UsageError(f"--max_gpu_memory {cap / 2**30:.1f} GiB leaves no room on GPU {gpu} "
                               f"({total / 2**30:.1f} GiB) for calibration activations ({reserve_bytes / 2**30:.1f} GiB): "
                               f"use at most {max(room, 0) / 2**30:.1f} GiB, or lower --max_samples/--max_seq_len")
        caps[gpu] = max(cap, 0)
    caps["cpu"] = offload.max_cpu_memory or defaults["cpu"]
    return caps


def activation_cache_bytes(job: q.Job, settings: q.Settings, dtype) -> int:
    """One layer's cached inputs for all batches: hidden states, position embeddings, attention masks."""
    import torch

    lengths = [len(s) for s in job.samples]
    batches = q.group_batches(lengths, settings.batch_size, q.DEFAULT_BATCH_TOKENS)
    config = job.config.get_text_config() if hasattr(job.config, "get_text_config") else job.config
    hidden = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    width = torch.finfo(dtype).bits // 8
    total = 0
    for batch in batches:
        rows, seq = len(batch), max(lengths[i] for i in batch)
        total += rows * seq * (hidden + 2 * head_dim) * width + rows * seq * seq  # + a bool 4-D mask
    return total


def plan_placement(job: q.Job, settings: q.Settings, offload: OffloadSettings) -> Placement:
    """Where each module's weights go under the caps, GPU first, then CPU, then disk."""
    import torch
    from accelerate import infer_auto_device_map

    dtype = q.resolve_dtype(settings.dtype, job.config)
    cache = activation_cache_bytes(job, settings, dtype)
    layers = decoder_layer_names(job.skeleton)
    largest_layer = max((q.parameter_bytes(job.skeleton.get_submodule(name), dtype) for name in layers), default=0)
    reserve = 2 * cache + 2 * largest_layer  # current and next layer's inputs; the layer being calibrated
    device_map = infer_auto_device_map(job.skeleton, max_memory=max_memory_map(offload, reserve),
                                       no_split_module_classes=job.skeleton._no_split_modules or [], dtype=dtype)
    bytes_per_device: dict = {}
    for name, param in job.skeleton.named_parameters():
        device = device_label(lookup_device(device_map, name))
        bytes_per_device[device] = bytes_per_device.get(device, 0) + param.numel() * torch.finfo(dtype).bits // 8
    layers_per_device: dict = {}
    for name in layers:
        device = device_label(lookup_device(device_map, name))
        layers_per_device[device] = layers_per_device.get(device, 0) + 1
    return Placement(device_map, bytes_per_device, layers_per_device, cache)


def decoder_layer_names(model) -> list[str]:
    from modelopt.torch.quantization.utils.layerwise_calib import LayerActivationCollector

    layers = LayerActivationCollector.get_decoder_layers(model)
    if not layers:
        raise q.UsageError(f"{type(model).__name__}: ModelOpt finds no decoder layers to calibrate one by one; "
                           "use quantize_nvfp4.py (or quantize_nvfp4.py with a device map across GPUs)")
    names = {id(m): n for n, m in model.named_modules()}
    return [names[id(layer)] for layer in layers]


def lookup_device(device_map: dict, name: str):
    """The device_map entry covering `name` (the longest matching prefix)."""
    while name not in device_map:
        if "." not in name:
            return device_map.get("", "cpu")
        name = name.rsplit(".", 1)[0]
    return device_map[name]


def device_label(device) -> str:
    return f"cuda:{device}" if isinstance(device, int) else str(device)


def check_offload_disk(placement: Placement, job: q.Job, settings: q.Settings, offload: OffloadSettings) -> None:
    """Refuse to start when the offload folder's disk can't hold the offloaded weights, caches and output."""
    needed = placement.bytes_per_device.get("disk", 0) + 2 * placement.activation_cache_bytes
    probe_dir = offload.offload_folder if offload.offload_folder.exists() else offload.offload_folder.parent
    output_dir = settings.output_model.parent
    same_disk = os.stat(probe_dir).st_dev == os.stat(output_dir).st_dev
    if same_disk:
        needed += job.checkpoint_bytes
    else:
        q.check_free_disk(output_dir, job.checkpoint_bytes)
    free = shutil.disk_usage(probe_dir).free
    if free < needed:
        raise q.UsageError(f"not enough free disk for --offload_folder {offload.offload_folder}: {free / 2**30:.1f} GiB "
                           f"free, {needed / 2**30:.1f} GiB needed (offloaded weights, two layers' activation caches"
                           f"{', the output' if same_disk else ''}); point it at a larger disk or raise --max_cpu_memory")


def print_placement(placement: Placement, offload: OffloadSettings) -> None:
    free = shutil.disk_usage(offload.offload_folder).free
    q.log("offload plan (weights):")
    rows = [(device, placement.layers_per_device.get(device, 0), q.human_bytes(size))
            for device, size in sorted(placement.bytes_per_device.items(), key=lambda kv: ("cuda" not in kv[0], kv[0]))]
    q.print_table(("device", "decoder layers", "weights"), rows)
    q.log(f"activation cache per layer: {q.human_bytes(placement.activation_cache_bytes)}; "
          f"free disk in {offload.offload_folder}: {q.human_bytes(free)}")


# --------------------------------------------------------------------------- model
def load_offloaded_model(settings: q.Settings, job: q.Job, placement: Placement, offload: OffloadSettings):
    from transformers import AutoModelForCausalLM

    weights_dir = offload.offload_folder / WEIGHTS_DIR
    weights_dir.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(
        settings.input_model, dtype=q.resolve_dtype(settings.dtype, job.config), device_map=placement.device_map,
        offload_folder=str(weights_dir), trust_remote_code=settings.trust_remote_code, token=settings.hf_token)
    model.eval()
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [type(model).__name__]
    return model


def execution_device(placement: Placement) -> str:
    """Where inputs go: the first GPU in the map, else the CPU."""
    gpus = sorted(d for d in placement.device_map.values() if isinstance(d, int))
    return f"cuda:{gpus[0]}" if gpus else "cpu"


def clean_offload_folder(offload: OffloadSettings) -> None:
    """Delete only what this script created; the folder itself only if nothing else is left in it."""
    for name in (WEIGHTS_DIR, LAYERWISE_DIR):
        shutil.rmtree(offload.offload_folder / name, ignore_errors=True)
    (offload.offload_folder / JOB_FILE).unlink(missing_ok=True)
    if not any(offload.offload_folder.iterdir()):
        offload.offload_folder.rmdir()
    q.log(f"--clean_offload: removed this run's files from {offload.offload_folder}")


# --------------------------------------------------------------------------- main
def run_offload(settings: q.Settings, offload: OffloadSettings) -> int:
    job = q.prepare_job(settings)
    if job is None:
        return 0
    fingerprint = job_fingerprint(settings, job, offload)
    resume_after = check_resume(settings, offload, fingerprint)
    offload.offload_folder.mkdir(parents=True, exist_ok=True)
    placement = plan_placement(job, settings, offload)
    print_placement(placement, offload)
    check_offload_disk(placement, job, settings, offload)
    (offload.offload_folder / JOB_FILE).write_text(json.dumps(fingerprint, indent=2) + "\n")
    if resume_after is not None:
        q.log(f"--resume: layers 0-{resume_after} are already calibrated; continuing from layer {resume_after + 1}")
    load_start = time.perf_counter()
    model = load_offloaded_model(settings, job, placement, offload)
    timings = {"load_model_s": round(time.perf_counter() - load_start, 2)}
    device = execution_device(placement)
    calibration_run = q.quantize_model(model, settings, job.unquantized, job.samples, device, job.pad_id,
                                       layerwise_dir=offload.layerwise_dir,
                                       before_each_pass=between_layers(offload.layerwise_dir),
                                       save_every=offload.checkpoint_every)
    calibration_run["resumed_after_layer"] = resume_after
    extra = {"offload": {"folder": str(offload.offload_folder), "layers_per_device": placement.layers_per_device,
                         "weight_bytes_per_device": placement.bytes_per_device,
                         "activation_cache_bytes": placement.activation_cache_bytes}}
    status = q.finish_job(model, settings, job, calibration_run, timings, device, "quantize_nvfp4_offload.py", extra)
    shutil.rmtree(offload.layerwise_dir)  # exported: the per-layer checkpoints have served their purpose
    if offload.clean_offload:
        clean_offload_folder(offload)
    return status


def run_self_test(args: argparse.Namespace) -> int:
    """The tiny built-in model, split across CPU and disk (and GPU if there is one), end to end."""
    def run_job(job_args: argparse.Namespace, tmp_path: Path) -> int:
        job_args.offload_folder = job_args.offload_folder or str(tmp_path / "offload")
        job_args.max_cpu_memory = job_args.max_cpu_memory or 600_000  # the embeddings in RAM, the decoder layers on disk
        return run_offload(q.build_settings(job_args, {}), build_offload_settings(job_args))

    return q.self_test(args, run_job, layers=4, label="offload self-test")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", message=".*is not tested with current version of modelopt.*")
    try:
        if args.list_configs:
            return q.list_configs()
        if args.self_test:
            return run_self_test(args)
        env = q.read_env_files(q.SCRIPT_DIR, Path.cwd())
        offload = build_offload_settings(args)
        return run_offload(q.build_settings(args, env), offload)
    except q.UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return q.EXIT_USAGE
    except q.ExportRejected as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
