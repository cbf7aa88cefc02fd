#!/usr/bin/env python3
"""NVFP4 quantization for models larger than GPU memory: accelerate offload + layer-by-layer calibration.

The original offload script ran one sample per forward, so every sample dragged every offloaded
weight across PCIe or off the disk again. Here calibration goes layer by layer: each decoder layer's
weights come onto the GPU once, every batch runs through it once (collecting its scales with
ModelOpt's max calibration), and its outputs are the next layer's inputs. A run costs one pass over
the weights plus one forward of compute (--algorithm gptq: two, and its weight update while the layer is on
the GPU; the rewritten weights are kept in the offload folder). --effective_bits adds one reverse pass over the
layers for its scores, from hidden states the forward pass kept. Resume points (--checkpoint_every: by default
spaced 5 minutes apart) are written in the background, and --resume continues a killed run.

    python quantize_nvfp4_offload.py --input_model M --output_model OUT --dataset_yaml Datasets/X.yaml \
        --offload_folder /scratch/offload --max_gpu_memory 60GiB

Takes everything quantize_nvfp4.py takes (the helpers are imported from it, not copied).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import itertools
import json
import math
import os
import shutil
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import quantize_nvfp4 as q

# --------------------------------------------------------------------------- constants
WEIGHTS_DIR = "offloaded_weights"            # accelerate's disk-offloaded weights
LAYERWISE_DIR = "layerwise_calibration"      # resume points: per-layer scales, the newest activation cache
EVAL_WEIGHTS_DIR = "eval_weights"             # --eval's original model, its decoder layers offloaded to disk
PROGRESS_FILE = "manifest.json"              # the last committed layer; written last, atomically
RESUME_FORMAT = "nvfp4-layer-loop-2"         # what this version writes; anything else is not resumed
QUANTIZERS_FILE = "quantizers.pt"            # one layer's quantizer state (a few KiB)
INPUTS_FILE = "next_inputs"                  # .bin: the next layer's inputs as raw bytes; .json: their index
REWRITTEN_FILE = "rewritten.safetensors"     # a layer's weights as GPTQ or smooth_hessian rewrote them; offloaded
                                             # ones are read from here (the source checkpoint is never touched)
JOB_FILE = "nvfp4_offload_job.json"          # which job the checkpoints belong to, for --resume
RESUME_INTERVAL_S = 300                      # --checkpoint_every auto: at most this much calibration lost to a kill
GPU_RESERVE_FRACTION = 0.10                  # CUDA context, allocator slack
BATCH_ROOM_FRACTION = 0.5                    # of the GPU room a --max_gpu_memory cap leaves, what larger layer-loop
                                             # batches may take (the rest: the estimate's margin)
VERIFY_OPTIONS = ("verify", "reference")  # checking an existing checkpoint: quantize_nvfp4.py's alone
LAYER_LOOP_ALGORITHMS = [name for name, a in q.ALGORITHMS.items() if a.layer_loop]
# The activations the layer loop carries from layer to layer: the 16-bit model's (max calibrates on them), and for
# GPTQ also the stream its Hessians are summed over (activations quantized, weights not: what ModelOpt's
# whole-model Hessian pass feeds each layer)
STREAMS = ("outputs", "quantized_outputs")
# --effective_bits: the padded tokens of the layer loop's batches the output-loss score runs on, and whose hidden
# states at every decoder layer's input the scoring store keeps (docs/offload.md: why this many)
SCORE_TOKENS = 16384
SCORE_DIR = "score_inputs"                   # in LAYERWISE_DIR: the scoring store when the plan puts it on disk
STAGE_PLACEMENT = "placement plan"                      # this script's phases, beside quantize_nvfp4.py's
STAGE_LAYER_CALIBRATION = "calibration (layer by layer)"


@dataclasses.dataclass
class OffloadSettings:
    offload_folder: Path
    max_gpu_memory: int | None     # bytes per GPU, for weights
    max_cpu_memory: int | None     # bytes, for weights
    clean_offload: bool
    resume: bool
    checkpoint_every: int | None = None  # layers between resume points; None: by time (RESUME_INTERVAL_S)
    batch_tokens: int = q.DEFAULT_BATCH_TOKENS  # the layer loop's padded tokens per batch (layer_batch_tokens)

    @property
    def layerwise_dir(self) -> Path:
        return self.offload_folder / LAYERWISE_DIR


@dataclasses.dataclass
class Placement:
    device_map: dict
    bytes_per_device: dict           # "cuda:0" / "cpu" / "disk" -> weight bytes
    layers_per_device: dict          # same keys -> decoder layers
    activation_cache_bytes: int      # one layer's cached inputs for every batch (GPTQ: both its streams)
    rewritten_bytes: int = 0         # GPTQ: every decoder layer's rewritten weights, written to the offload folder
    score_store_bytes: int = 0       # --effective_bits: the scoring store (ScoringStore)
    score_store_on_disk: bool = False  # it goes under the offload folder (else RAM)
    gpu_reserve_bytes: int = 0       # room kept on each GPU beside the weights (gpu_reserve_bytes); 0: no GPU
    weights_read_in_place: bool = False  # disk-placed weights read from the source's own files (read_in_place)

    @property
    def offload_disk_bytes(self) -> int:
        """What the offload folder takes: offloaded weights (unless read in place), two layers' activation caches,
        rewritten weights, the scoring store where it goes to disk."""
        store = self.score_store_bytes if self.score_store_on_disk else 0
        weights = 0 if self.weights_read_in_place else self.bytes_per_device.get("disk", 0)
        return weights + 2 * self.activation_cache_bytes + self.rewritten_bytes + store


# --------------------------------------------------------------------------- settings
def parse_memory(text: str) -> int:
    from accelerate.utils import convert_file_size_to_int

    try:
        value = int(text) if text.isdigit() else convert_file_size_to_int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size like 80GiB, 500MB or a number of bytes, "
                                         f"got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"a memory cap must be positive, got {text!r}")
    return value


def parse_checkpoint_every(text: str) -> int | None:
    """'auto' (None: resume points spaced in time) or a number of layers."""
    value = q.parse_auto_or_count(text)
    return None if value == "auto" else value


def build_parser() -> argparse.ArgumentParser:
    parser = q.build_parser()
    parser.description = ("Quantize a Hugging Face causal LM larger than GPU memory to NVFP4 "
                          "(offloaded, layer by layer).")
    for action in parser._actions:  # what this script refuses is not offered
        if action.dest in (*VERIFY_OPTIONS, "gpu_memory_budget"):
            action.help = argparse.SUPPRESS
        elif action.dest == "algorithm":  # the others stay choices so that their refusal says why (build_settings)
            action.metavar = "{" + ",".join(LAYER_LOOP_ALGORITHMS) + "}"
            action.help = q.algorithm_help(LAYER_LOOP_ALGORITHMS)
    group = parser.add_argument_group("offloading")
    group.add_argument("--offload_folder", help="where offloaded weights and per-layer checkpoints go (required)")
    group.add_argument("--max_gpu_memory", type=parse_memory, metavar="SIZE",
                       help="weights per GPU, e.g. 60GiB (default: what is free, less room for activations)")
    group.add_argument("--max_cpu_memory", type=parse_memory, metavar="SIZE",
                       help="weights in CPU RAM before spilling to disk (default: accelerate's estimate of free RAM)")
    group.add_argument("--clean_offload", action="store_true",
                       help="delete what this script put in --offload_folder after a successful run "
                            "(never after a failed one)")
    group.add_argument("--resume", action="store_true", help="continue a killed run from its per-layer checkpoints")
    group.add_argument("--checkpoint_every", type=parse_checkpoint_every, default=None, metavar="auto|N",
                       help=f"a resume point every N layers, or (auto, the default) after the first layer that ends "
                            f"{RESUME_INTERVAL_S // 60} minutes or more after the last one; each writes one layer's "
                            "activation cache to disk in the background while the next layers compute")
    return parser


def build_offload_settings(args: argparse.Namespace) -> OffloadSettings:
    if args.verify or args.reference:
        raise q.UsageError("--verify / --reference check an existing checkpoint, and this script quantizes: run "
                           "python quantize_nvfp4.py --verify DIR (add --eval --reference MODEL --dataset_yaml YAML "
                           "for a quality report)")
    if args.gpu_memory_budget is not None:
        raise q.UsageError("--gpu_memory_budget sizes quantize_nvfp4.py's batches; this script's GPU cap is "
                           "--max_gpu_memory (weights; room for activations is kept beside them)")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise q.UsageError("quantize_nvfp4_offload.py runs as one process: start it with python, not torchrun or "
                           "accelerate launch (for several GPUs, quantize_nvfp4.py places a model across them)")
    if args.algorithm is not None and args.algorithm not in LAYER_LOOP_ALGORITHMS:
        raise q.UsageError(f"--algorithm {args.algorithm}: this script's layer loop calibrates with "
                           f"{', '.join(LAYER_LOOP_ALGORITHMS)} (the others search with quantized forwards of the "
                           "whole model or fold scales across layers); use quantize_nvfp4.py on a GPU that holds the "
                           "model")
    if not args.offload_folder:
        raise q.UsageError("no offload folder: pass --offload_folder DIR (a disk with room for the offloaded weights)")
    folder = Path(args.offload_folder).expanduser().resolve()
    if folder.exists() and not folder.is_dir():
        raise q.UsageError(f"--offload_folder exists and is not a directory: {folder}")
    if not folder.parent.is_dir():
        raise q.UsageError(f"--offload_folder's parent folder does not exist: {folder.parent}")
    return OffloadSettings(folder, args.max_gpu_memory, args.max_cpu_memory, args.clean_offload, args.resume,
                           args.checkpoint_every)


def check_offload_folder(settings: q.Settings, offload: OffloadSettings) -> None:
    """The offload folder is written into and deleted from: it must not be, hold or lie inside the output or model."""
    protected = {"output dir": settings.output_model} if settings.output_model else {}
    protected.update({k: v for k, v in q.protected_paths(settings).items() if k == "input model"})
    q.check_no_overlap(offload.offload_folder, "--offload_folder", protected, inside_too=tuple(protected))


def holding_offload_lock(run_job):
    """Runs `run_job(settings, offload)` with the offload folder checked and locked: two runs sharing one refuse."""
    @functools.wraps(run_job)
    def locked(settings: q.Settings, offload: OffloadSettings):
        check_offload_folder(settings, offload)
        if settings.dry_run:
            q.check_lock_free(offload.offload_folder, "--offload_folder")
            return run_job(settings, offload)
        with q.exclusive_lock(offload.offload_folder, "--offload_folder"):
            return run_job(settings, offload)
    return locked


# --------------------------------------------------------------------------- resume bookkeeping
def layer_batches(samples: list[list[int]], settings: q.Settings, tokens: int) -> list[list[int]]:
    """The batches every layer runs, at most `tokens` padded tokens each (OffloadSettings.batch_tokens), or
    --batch_size rows."""
    return q.group_batches([len(s) for s in samples], settings.batch_size, tokens)


def padded_batch_tokens(samples: list[list[int]], settings: q.Settings, tokens: int) -> list[int]:
    """Each of the layer loop's batches: its rows times its longest sample."""
    lengths = [len(s) for s in samples]
    return [len(batch) * max(lengths[i] for i in batch) for batch in layer_batches(samples, settings, tokens)]


def scoring_batches(samples: list[list[int]], settings: q.Settings, tokens: int) -> list[int]:
    """--effective_bits: which of the layer loop's batches the score runs on, at most SCORE_TOKENS padded tokens
    (at least one batch): all of them where they fit, else every k-th, spread over the sample lengths (the batches
    are sorted by length)."""
    sizes = padded_batch_tokens(samples, settings, tokens)
    chosen, total = [], 0
    for index in range(0, len(sizes), math.ceil(sum(sizes) / SCORE_TOKENS)):
        if chosen and total + sizes[index] > SCORE_TOKENS:
            break
        chosen.append(index)
        total += sizes[index]
    return chosen


def job_fingerprint(settings: q.Settings, job: q.Job, offload: OffloadSettings) -> dict:
    """What must match for resume points to be reused: model, mode, exclusions, the exact tokens and batches."""
    tokens = hashlib.sha256(json.dumps(job.samples).encode()).hexdigest()
    batches = hashlib.sha256(json.dumps(layer_batches(job.samples, settings, offload.batch_tokens)).encode())
    batches = batches.hexdigest()
    return {"input_model": settings.input_model, "mode": settings.mode, "dtype": settings.dtype,
            "algorithm": settings.algorithm,
            "kv_cache": settings.kv_cache, "moe_calibration": settings.moe_calibration,
            "unquantized": job.unquantized, "batch_size": settings.batch_size, "batch_tokens": offload.batch_tokens,
            "calibration_tokens_sha256": tokens,
            "batches_sha256": batches,
            "checkpoint_every": offload.checkpoint_every}


def committed_layer(layerwise_dir: Path) -> int | None:
    """The last layer whose resume point was committed, or None (nothing, or not this version's format)."""
    progress = read_progress(layerwise_dir)
    return None if progress is None else progress["last_completed_layer"]


def read_progress(layerwise_dir: Path) -> dict | None:
    path = layerwise_dir / PROGRESS_FILE
    if not path.is_file():
        return None
    try:
        progress = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return progress if isinstance(progress, dict) and progress.get("format") == RESUME_FORMAT else None


def check_resume(offload: OffloadSettings, fingerprint: dict, dry_run: bool = False) -> int | None:
    """Refuse to silently reuse or silently discard earlier progress; returns the layer to resume after. A dry run
    leaves a finished run's resume points where they are (the real run removes them)."""
    done = committed_layer(offload.layerwise_dir)
    job_file = offload.offload_folder / JOB_FILE
    if done is None:
        if offload.resume:
            q.warn(f"--resume: no unfinished calibration in {offload.layerwise_dir}; starting from the first layer")
        if offload.layerwise_dir.exists():
            if not (job_file.is_file() or (offload.layerwise_dir / PROGRESS_FILE).is_file()):
                raise q.UsageError(f"{offload.layerwise_dir} exists but this script did not write it (no {JOB_FILE} "
                                   "beside it): move it away or choose another --offload_folder")
            if not dry_run:
                shutil.rmtree(offload.layerwise_dir)
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


def layer_dir(layerwise_dir: Path, index: int) -> Path:
    return layerwise_dir / f"layer_{index:04d}"


def resume_point_due(every: int | None, index: int, last: float) -> bool:
    """After layer `index`: every `every` layers, or by default once RESUME_INTERVAL_S have passed since the last
    resume point (or the start). A resume point costs one layer's activation cache on disk: spaced in time, a
    short run writes none and a long one loses at most that much work when it is killed."""
    if every is not None:
        return (index + 1) % every == 0
    return time.perf_counter() - last >= RESUME_INTERVAL_S


def commit_file(path: Path, write: Callable[[Any], None], durable: bool = True) -> None:
    """Write through a temp name, rename: a killed run leaves the old file or the new one, never half of one.

    `durable` also fsyncs, so the file survives a power loss too. The activation caches skip that: their
    fsync ran at the disk's speed on the critical path (an H100 run spent 3.5 s of 11 waiting on it), and
    a process kill, the usual end of a long run, keeps the page cache; their checksums catch the rest.
    """
    temp = path.with_name(path.name + ".tmp")
    try:
        with open(temp, "wb") as handle:
            write(handle)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)  # a half-written temp file would only take the disk's room
        raise


def write_tensors(base: Path, tensors: list) -> None:
    """Tensors as raw bytes, one after another, at memory speed (no pickling, no fsync), plus a JSON index
    of them with a CRC-32 of each, which read_tensors checks."""

    import torch

    index, offset, raw = [], 0, [memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()) for t in tensors]
    for tensor, data in zip(tensors, raw):
        index.append({"dtype": str(tensor.dtype).removeprefix("torch."), "shape": list(tensor.shape), "offset": offset,
                      "crc32": zlib.crc32(data)})
        offset += len(data)

    def write_bytes(handle) -> None:
        for data in raw:
            handle.write(data)

    commit_file(base.with_suffix(".bin"), write_bytes, durable=False)
    commit_file(base.with_suffix(".json"), lambda handle: handle.write(json.dumps(index).encode()))


def read_tensors(base: Path, device: str) -> list:

    import numpy as np
    import torch

    tensors = []
    for entry in json.loads(base.with_suffix(".json").read_text()):
        dtype = getattr(torch, entry["dtype"])
        count = dtype.itemsize * int(np.prod(entry["shape"], dtype=np.int64))
        raw = np.fromfile(base.with_suffix(".bin"), dtype=np.uint8, count=count, offset=entry["offset"])
        if raw.size != count or zlib.crc32(memoryview(raw)) != entry["crc32"]:
            raise q.UsageError(f"--resume: the resume point {base.with_suffix('.bin')} is damaged (short or "
                               f"checksum mismatch, as after a power loss); delete {base.parent.parent} to start over")
        tensors.append(torch.from_numpy(raw).view(dtype).reshape(entry["shape"]).to(device))
    return tensors


def to_cpu(value, non_blocking: bool = False):
    """A copy of nested dicts/lists/tuples with every tensor on the CPU. `non_blocking`: CUDA tensors are copied
    into pinned memory in stream order, without waiting; read them only after the stream has passed that point."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", non_blocking=non_blocking)
    if isinstance(value, dict):
        return {k: to_cpu(v, non_blocking) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_cpu(v, non_blocking) for v in value)
    return value


class BackgroundTask:
    """One task at a time on a background thread; its failure is handed to the main thread by join()."""

    thread: threading.Thread | None = None
    failure: BaseException | None = None

    def launch(self, target: Callable, *args, name: str) -> None:
        self.thread = threading.Thread(target=self._guarded, args=(target, *args), name=name)
        self.thread.start()

    def _guarded(self, target: Callable, *args) -> None:
        try:
            target(*args)
        except BaseException as exc:  # noqa: BLE001 (handed to the main thread by join())
            self.failure = exc

    def join(self) -> BaseException | None:
        """Wait for the task in flight; its failure, if it failed (then forgotten here)."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        failure, self.failure = self.failure, None
        return failure


class ResumeWriter(BackgroundTask):
    """Commits resume points on a background thread while the next layers compute; one write at a time.

    A resume point is the quantizer state of the layers calibrated since the last one, and the next
    layer's inputs (every batch's hidden states). Its files are committed first; the progress file
    last, so it never names a resume point that is not complete. Then older activation caches go.
    """

    def __init__(self, layerwise_dir: Path, progress: dict):
        self.layerwise_dir, self.progress = layerwise_dir, progress

    def submit(self, layer: int, quantizers: dict, next_inputs: list) -> None:
        import torch

        self.wait()
        next_inputs = list(next_inputs)  # the thread's own list: it empties it once copied, freeing GPU memory early
        ready = None
        if next_inputs and next_inputs[0].is_cuda:  # the copies wait for the layer's kernels, not for later ones;
            # the layers' snapshots (layer_snapshot), copied earlier in the same stream, are complete by then too
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(next_inputs[0].device))
        self.launch(self._commit, layer, quantizers, next_inputs, ready, name="resume-writer")

    def wait(self) -> None:
        """Block until the write in flight is committed; re-raise its failure here, on the main thread."""
        failure = self.join()
        if failure is not None:
            raise RuntimeError(f"writing a resume point to {self.layerwise_dir} failed: {failure}") from failure

    def finish_after_failure(self) -> None:
        """Let the write in flight end; the failure already on its way out is the one to report."""
        failure = self.join()
        if failure is not None:
            q.warn(f"writing a resume point to {self.layerwise_dir} failed too: {failure}")

    def _commit(self, layer: int, quantizers: dict, next_inputs: list, ready) -> None:
        import torch

        if ready is not None:  # a side stream: the copy to RAM overlaps the next layer's compute
            stream = torch.cuda.Stream(device=next_inputs[0].device)
            with torch.cuda.stream(stream):
                stream.wait_event(ready)
                host = [t.to("cpu") for t in next_inputs]
            ready.synchronize()  # already passed (the copies above waited for it): the snapshots are in RAM
        else:
            host = list(next_inputs)
        next_inputs.clear()
        for index, state in quantizers.items():
            folder = layer_dir(self.layerwise_dir, index)
            folder.mkdir(parents=True, exist_ok=True)
            commit_file(folder / QUANTIZERS_FILE, lambda handle, state=state: torch.save(state, handle))
        write_tensors(layer_dir(self.layerwise_dir, layer) / INPUTS_FILE, host)
        progress = {**self.progress, "last_completed_layer": layer}
        commit_file(self.layerwise_dir / PROGRESS_FILE, lambda handle: handle.write(json.dumps(progress).encode()))
        for stale in self.layerwise_dir.glob(f"layer_*/{INPUTS_FILE}.*"):
            if int(stale.parent.name.split("_")[1]) < layer:
                stale.unlink()


class LayerPrefetcher(BackgroundTask):
    """The next offloaded layer's weights loaded onto the execution device by a background thread (on a
    side CUDA stream) while the current layer computes, so the weight stream overlaps the compute.

    It runs accelerate's own loading (each offload hook's pre_forward) early; ModelOpt's weight-access
    context then finds the weights in place and leaves them, so `release` puts them back to meta.
    """

    def __init__(self, device: str, enabled: bool = True):
        import torch

        self.device, self.enabled, self.loaded = device, enabled, []
        self.stream = torch.cuda.Stream(device=device) if device.startswith("cuda") else None

    def start(self, layer) -> None:
        """Begin loading `layer`'s offloaded weights (nothing to do for a layer held on the device)."""
        modules = offloaded_modules(layer) if self.enabled else []  # else ModelOpt's context loads it when it comes
        if modules:
            self.launch(self._load, modules, name="layer-prefetch")

    def take(self) -> list:
        """Wait for the load started last; the (module, hook) pairs whose weights it put on the device."""
        import torch

        failure = self.join()
        if failure is not None:
            raise failure
        loaded, self.loaded = self.loaded, []
        if self.stream is not None and loaded:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self.stream)
            for module, _ in loaded:  # freed later while this stream may still read them: not reused before
                for tensor in list(module.parameters()) + list(module.buffers()):
                    if tensor.device.type == "cuda":
                        tensor.data.record_stream(current)
        return loaded

    def take_and_start(self, next_layer) -> list:
        """take() the layer loaded last, then start() loading `next_layer` (None: the last one was taken)."""
        loaded = self.take()
        if next_layer is not None:
            self.start(next_layer)
        return loaded

    @staticmethod
    def release(loaded: list) -> None:
        for module, hook in loaded:
            hook.post_forward(module, None)

    def close(self) -> None:
        """After a failure: let a load in flight end, and put what it loaded back."""
        failure = self.join()
        if failure is not None:
            q.warn(f"loading the next layer's weights failed too: {failure}")
        self.release(self.loaded)
        self.loaded = []

    def _load(self, modules: list) -> None:
        import torch

        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
            for module, hook in modules:
                hook.pre_forward(module)
                self.loaded.append((module, hook))


@contextlib.contextmanager
def export_prefetching_layers(model, device: str):
    """While ModelOpt's streaming export of the offloaded model materializes the decoder layers one after another
    (each in enable_weight_access_and_writeback, writeback off), the next layer's offloaded weights load on a
    background thread (LayerPrefetcher), as in the layer loop. Any other weight access, or a layer out of that
    order, goes through ModelOpt's context as it is."""
    from modelopt.torch.quantization.utils import core_utils

    layers, original, prefetch = q.decoder_layers(model), core_utils.enable_weight_access_and_writeback, \
        LayerPrefetcher(device)
    position, expected = {id(layer): index for index, layer in enumerate(layers)}, 0

    @contextlib.contextmanager
    def access(module, root_model, name_to_module=None, writeback=True):
        nonlocal expected
        if writeback or position.get(id(module)) != expected:
            with original(module, root_model, name_to_module, writeback):
                yield
            return
        expected += 1  # the first takes nothing: no load had begun
        loaded = prefetch.take_and_start(layers[expected] if expected < len(layers) else None)
        try:
            with original(module, root_model, name_to_module, writeback=False):
                yield
        finally:
            prefetch.release(loaded)

    core_utils.enable_weight_access_and_writeback = access
    try:
        yield
    finally:
        core_utils.enable_weight_access_and_writeback = original
        prefetch.close()


def offload_hook(module):
    """accelerate's offload hook of `module` (its weights kept in RAM or on disk), or None (held on a device)."""
    from modelopt.torch.quantization.plugins.accelerate import _get_offload_hook

    return _get_offload_hook(module._hf_hook) if hasattr(module, "_hf_hook") else None


def offloaded_modules(layer) -> list:
    """(module, accelerate offload hook) for each module of `layer` whose weights are offloaded (on meta)."""
    found = []
    for module in layer.modules():
        hook = offload_hook(module)
        if hook is not None and any(p.device.type == "meta" for p in module.parameters()):
            found.append((module, hook))
    return found


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
                               f"({total / 2**30:.1f} GiB) for calibration activations "
                               f"({reserve_bytes / 2**30:.1f} GiB): "
                               f"use at most {max(room, 0) / 2**30:.1f} GiB, or lower --max_samples/--max_seq_len")
        caps[gpu] = max(cap, 0)
    caps["cpu"] = offload.max_cpu_memory or defaults["cpu"]
    return caps


def activation_cache_bytes(job: q.Job, settings: q.Settings, dtype, tokens: int) -> int:
    """One layer's cached inputs for all batches: hidden states (GPTQ: of both streams), position embeddings,
    attention masks."""
    import torch

    lengths = [len(s) for s in job.samples]
    batches = layer_batches(job.samples, settings, tokens)
    config = text_config(job)
    hidden = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    width = torch.finfo(dtype).bits // 8
    streams = len(STREAMS) if settings.algorithm == "gptq" else 1
    total = 0
    for batch in batches:
        rows, seq = len(batch), max(lengths[i] for i in batch)
        total += rows * seq * (streams * hidden + 2 * head_dim) * width + rows * seq * seq  # + a bool 4-D mask
    return total


def text_config(job: q.Job):
    return job.config.get_text_config() if hasattr(job.config, "get_text_config") else job.config


def scored_batch_tokens(job: q.Job, settings: q.Settings, tokens: int) -> list[int]:
    """The padded tokens of each batch --effective_bits scores on (scoring_batches)."""
    sizes = padded_batch_tokens(job.samples, settings, tokens)
    return [sizes[b] for b in scoring_batches(job.samples, settings, tokens)]


def score_store_bytes(job: q.Job, settings: q.Settings, dtype, tokens: int) -> int:
    """The scoring store: for each scored batch, the hidden states entering every decoder layer and leaving the last."""
    import torch

    layers = len(decoder_layer_names(job.skeleton))
    width = torch.finfo(dtype).bits // 8
    return (layers + 1) * sum(scored_batch_tokens(job, settings, tokens)) * text_config(job).hidden_size * width


def scoring_work_bytes(job: q.Job, settings: q.Settings, dtype, tokens: int) -> int:
    """What the scores hold on the execution device beside a layer's weights, for their largest batch: in the
    reverse pass each linear's output change under every format, and about as much again for what autograd keeps
    for the layer's backward; for the loss, the logits, their fp32 copy and its gradient."""
    import torch

    outputs = max((sum(m.out_features for m in job.skeleton.get_submodule(name).modules()
                       if isinstance(m, torch.nn.Linear)) for name in decoder_layer_names(job.skeleton)), default=0)
    width, scored = torch.finfo(dtype).bits // 8, max(scored_batch_tokens(job, settings, tokens))
    return scored * max(2 * len(q.FORMAT_CANDIDATES) * outputs * width, text_config(job).vocab_size * (width + 8))


def largest_layer_bytes(job: q.Job, dtype) -> int:
    return max((q.parameter_bytes(job.skeleton.get_submodule(name), dtype)
                for name in decoder_layer_names(job.skeleton)), default=0)


def layer_token_bytes(job: q.Job, dtype) -> int:
    """What a token of a batch holds on the GPU while a decoder layer runs it, at most: the hidden states in and
    out, every linear's output and the MLP's activation in 16 bits, and fp32 copies of the widest input (the
    calibration hooks' statistics); under eager attention also a row of scores per head."""
    import torch

    width, most = torch.finfo(dtype).bits // 8, 0
    for name in decoder_layer_names(job.skeleton):
        linears = [m for m in job.skeleton.get_submodule(name).modules() if isinstance(m, torch.nn.Linear)]
        outputs = sum(m.out_features for m in linears) + max((m.out_features for m in linears), default=0)
        widest = max((m.in_features for m in linears), default=0)
        most = max(most, width * (2 * text_config(job).hidden_size + outputs) + 2 * 4 * widest)
    if getattr(job.skeleton.config, "_attn_implementation", None) == "eager":
        longest = max((len(s) for s in job.samples), default=0)
        most += text_config(job).num_attention_heads * longest * (4 + width)
    return most


def resumed_batch_tokens(offload: OffloadSettings) -> int | None:
    """--resume: the batch size the interrupted run chose (its job file), so that a run resumed under another
    --max_gpu_memory, or on another GPU, runs the same batches."""
    job_file = offload.offload_folder / JOB_FILE
    if not offload.resume or not job_file.is_file():
        return None
    try:
        tokens = json.loads(job_file.read_text()).get("batch_tokens")
    except (json.JSONDecodeError, AttributeError):
        return None
    return tokens if isinstance(tokens, int) and tokens > 0 else None


def layer_batch_tokens(job: q.Job, settings: q.Settings, offload: OffloadSettings) -> int:
    """The layer loop's padded tokens per batch: DEFAULT_BATCH_TOKENS, or, where --max_gpu_memory leaves the GPU
    room beside what gpu_reserve_bytes keeps, up to MAX_BATCH_TOKENS (the main script's limit) in BATCH_ROOM_FRACTION
    of that room: a layer then runs fewer, larger GEMMs. --batch_size sets rows instead, and --effective_bits keeps
    the default, since its scores run on a subset of these batches (scoring_batches); so do MoE models, whose fused
    experts' temporaries layer_token_bytes does not count."""
    import torch

    if (offload.max_gpu_memory is None or settings.batch_size is not None or settings.effective_bits is not None
            or not torch.cuda.device_count() or q.moe_blocks(job.skeleton)):
        return q.DEFAULT_BATCH_TOKENS
    dtype = q.resolve_dtype(settings.dtype, job.config)
    total = min(torch.cuda.get_device_properties(gpu).total_memory for gpu in range(torch.cuda.device_count()))
    spare = int(total * (1 - GPU_RESERVE_FRACTION)) - offload.max_gpu_memory - gpu_reserve_bytes(
        job, settings, dtype, q.DEFAULT_BATCH_TOKENS)
    tokens = int(spare * BATCH_ROOM_FRACTION) // max(layer_token_bytes(job, dtype), 1)
    return max(q.DEFAULT_BATCH_TOKENS, min(tokens, q.MAX_BATCH_TOKENS))


def gptq_hessian_bytes(job: q.Job) -> int:
    """GPTQ's fp32 Hessians (in_features squared, one per linear) of the largest decoder layer, held at once."""
    import torch

    return max((sum(4 * m.in_features ** 2 for m in job.skeleton.get_submodule(name).modules()
                    if isinstance(m, torch.nn.Linear)) for name in decoder_layer_names(job.skeleton)), default=0)


def embeddings_and_layer_bytes(job: q.Job, settings: q.Settings) -> int:
    """What a device needs for accelerate to place the input embeddings on it: they, plus the room it keeps on
    every device it fills first for the largest module still to place: a decoder layer, or a module outside them
    such as lm_head, which outweighs a layer where the vocabulary is large (SmolLM2: 57 MB against 8 MB)."""
    import torch

    dtype = q.resolve_dtype(settings.dtype, job.config)
    embeddings = job.skeleton.get_input_embeddings()
    tied = {id(p) for p in embeddings.parameters()}  # a tied lm_head: placed with the embeddings, no room of its own
    layers = tuple(f"{name}." for name in decoder_layer_names(job.skeleton))
    outside = [sum(p.numel() for p in module.parameters(recurse=False) if id(p) not in tied)
               for name, module in job.skeleton.named_modules() if not f"{name}.".startswith(layers)]
    room = max([largest_layer_bytes(job, dtype), *(n * torch.finfo(dtype).bits // 8 for n in outside)])
    return q.parameter_bytes(embeddings, dtype) + room


def gpu_reserve_bytes(job: q.Job, settings: q.Settings, dtype, tokens: int) -> int:
    """The GPU room kept beside the weights: the current and next layer's inputs (--effective_bits: or the scores'
    reverse pass, which runs after calibration), the layer being calibrated (weights and temporaries) and the next
    one prefetched, a batch's temporaries beyond DEFAULT_BATCH_TOKENS (those of a default batch are left to the
    GPU_RESERVE_FRACTION slack), and GPTQ's Hessians."""
    cache = activation_cache_bytes(job, settings, dtype, tokens)
    scoring = scoring_work_bytes(job, settings, dtype, tokens) if settings.effective_bits is not None else 0
    batch = max(tokens - q.DEFAULT_BATCH_TOKENS, 0) * layer_token_bytes(job, dtype)
    reserve = max(2 * cache, scoring) + 3 * largest_layer_bytes(job, dtype) + batch
    return reserve + (gptq_hessian_bytes(job) if settings.algorithm == "gptq" else 0)


def plan_placement(job: q.Job, settings: q.Settings, offload: OffloadSettings) -> Placement:
    """Where each module's weights go under the caps, GPU first, then CPU, then disk."""
    import torch
    from accelerate import infer_auto_device_map

    dtype = q.resolve_dtype(settings.dtype, job.config)
    tokens = offload.batch_tokens
    cache = activation_cache_bytes(job, settings, dtype, tokens)
    layers = decoder_layer_names(job.skeleton)
    store = score_store_bytes(job, settings, dtype, tokens) if settings.effective_bits is not None else 0
    reserve = gpu_reserve_bytes(job, settings, dtype, tokens)
    rewritten = 0
    if settings.algorithm == "gptq":  # a copy of every decoder layer as GPTQ rewrote it, on disk
        rewritten = sum(q.parameter_bytes(job.skeleton.get_submodule(name), dtype) for name in layers)
    # from_config on meta leaves a tied head untied: accelerate would then place it alone, and on disk it has no
    # entry in the offload index (the checkpoint holds the tied weight once, as the input embeddings')
    job.skeleton.tie_weights()
    caps = max_memory_map(offload, reserve)
    device_map = infer_auto_device_map(job.skeleton, max_memory=dict(caps),
                                       no_split_module_classes=job.skeleton._no_split_modules or [], dtype=dtype)
    bytes_per_device: dict = {}
    for name, param in job.skeleton.named_parameters():
        device = device_label(lookup_device(device_map, name))
        bytes_per_device[device] = bytes_per_device.get(device, 0) + param.numel() * torch.finfo(dtype).bits // 8
    layers_per_device: dict = {}
    for name in layers:
        device = device_label(lookup_device(device_map, name))
        layers_per_device[device] = layers_per_device.get(device, 0) + 1
    # the store goes to RAM where it fits beside the weights placed there (and, without a GPU, the activations)
    room = caps["cpu"] - bytes_per_device.get("cpu", 0) - (0 if torch.cuda.device_count() else 2 * cache)
    return Placement(device_map, bytes_per_device, layers_per_device, cache, rewritten, store, store > room,
                     reserve if torch.cuda.device_count() else 0, read_in_place(job, settings))


def read_in_place(job: q.Job, settings: q.Settings) -> bool:
    """Whether transformers' loader reads disk-placed weights from the source checkpoint's own files instead of
    writing them into the offload folder: a local folder of safetensors, whose weights it converts by renaming
    alone (no WeightConverter, such as fused MoE experts). Otherwise, and for a hub model, they count in full."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter

    folder = Path(settings.input_model).expanduser()
    if not folder.is_dir() or not any(folder.glob("*.safetensors")) or getattr(job.config, "quantization_config",
                                                                               None):
        return False  # a quantized source: its quantizer's converters re-save (and widen) what they load
    return not any(isinstance(t, WeightConverter) for t in get_model_conversion_mapping(job.skeleton))


def decoder_layer_names(model) -> list[str]:
    layers = q.decoder_layers(model)
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


def existing_folder(folder: Path) -> Path:
    """`folder`, or its parent while it is not made yet (a dry run never makes it): where its disk is measured."""
    return folder if folder.exists() else folder.parent


def check_offload_disk(placement: Placement, job: q.Job, settings: q.Settings, offload: OffloadSettings) -> None:
    """Refuse to start when the offload folder's disk can't hold the offloaded weights, caches and output."""
    needed = placement.offload_disk_bytes
    probe_dir = existing_folder(offload.offload_folder)
    output_dir = settings.output_model.parent if settings.output_model else None
    same_disk = output_dir is not None and os.stat(probe_dir).st_dev == os.stat(output_dir).st_dev
    if same_disk:
        needed += job.checkpoint_bytes
    free = shutil.disk_usage(probe_dir).free
    if free < needed:
        weights = "" if placement.weights_read_in_place else "offloaded weights, "
        raise q.UsageError(f"not enough free disk for --offload_folder {offload.offload_folder}: {q.human_bytes(free)} "
                           f"free, {q.human_bytes(needed)} needed ({weights}two layers' activation caches"
                           f"{', GPTQ-rewritten weights' if placement.rewritten_bytes else ''}"
                           f"{', the --effective_bits scoring store' if placement.score_store_on_disk else ''}"
                           f"{', the output' if same_disk else ''}); "
                           "point it at a larger disk or raise --max_cpu_memory")


def check_cpu_run_placement(placement: Placement, job: q.Job, settings: q.Settings) -> None:
    """Without a GPU the input embeddings must sit in RAM: from disk, the whole layer-by-layer calibration runs
    and then the export fails on a meta tensor. accelerate fills RAM in module order, keeping room for a layer."""
    import torch

    embeddings = next(n for n, m in job.skeleton.named_modules() if m is job.skeleton.get_input_embeddings())
    if torch.cuda.device_count() or lookup_device(placement.device_map, f"{embeddings}.weight") != "disk":
        return
    needed = embeddings_and_layer_bytes(job, settings)
    raise q.UsageError(f"--max_cpu_memory puts the input embeddings ({embeddings}) on disk, which a CPU-only run "
                       f"cannot export from: raise --max_cpu_memory to at least {needed} bytes "
                       f"({q.human_bytes(needed)}: the embeddings plus the largest module placed after them)")


def check_gpu_placement(placement: Placement, job: q.Job, settings: q.Settings) -> None:
    """With a GPU, a --max_gpu_memory too small for anything puts every module on the CPU or disk, and accelerate
    then runs the whole calibration on the CPU: refuse it. accelerate keeps room for the largest decoder layer on
    the GPU beside the weights it places there, so the input embeddings need that much more."""
    import torch

    if not torch.cuda.device_count() or any(isinstance(d, int) for d in placement.device_map.values()):
        return
    needed = embeddings_and_layer_bytes(job, settings)
    raise q.UsageError(f"--max_gpu_memory puts no module on the GPU, so the whole calibration would run on the CPU: "
                       f"raise it to at least {needed} bytes ({q.human_bytes(needed)}: the input embeddings plus the "
                       f"largest module placed after them, for which accelerate keeps room), or leave it out")


def print_placement(placement: Placement, offload: OffloadSettings, batch_size: int | None = None) -> None:
    free = shutil.disk_usage(existing_folder(offload.offload_folder)).free
    q.log("offload plan (weights):")
    rows = [(device, placement.layers_per_device.get(device, 0), q.human_bytes(size))
            for device, size in sorted(placement.bytes_per_device.items(), key=lambda kv: ("cuda" not in kv[0], kv[0]))]
    q.print_table(("device", "decoder layers", "weights"), rows)
    rewritten = f"GPTQ-rewritten weights: {q.human_bytes(placement.rewritten_bytes)}; " \
        if placement.rewritten_bytes else ""
    reserve = f"kept on each GPU beside the weights: {q.human_bytes(placement.gpu_reserve_bytes)}; " \
        if placement.gpu_reserve_bytes else ""
    batches = f"{batch_size} samples" if batch_size else f"up to {offload.batch_tokens} padded tokens"
    q.log(f"layer batches of {batches}; activation cache per layer: "
          f"{q.human_bytes(placement.activation_cache_bytes)}; {reserve}{rewritten}"
          f"free disk in {offload.offload_folder}: {q.human_bytes(free)}")
    if placement.bytes_per_device.get("disk") and placement.weights_read_in_place:
        q.log("disk-placed weights are read from the model's own safetensors files (not copied into the folder)")
    if placement.score_store_bytes:
        q.log(f"--effective_bits scoring store: {score_store_place(placement, offload)}")


def score_store_place(placement: Placement, offload: OffloadSettings) -> str:
    """The scoring store's size and where it goes, as the plan and the dry run say it."""
    where = f"on disk in {offload.layerwise_dir / SCORE_DIR}" if placement.score_store_on_disk else "in RAM"
    return (f"{q.human_bytes(placement.score_store_bytes)} {where} (hidden states at every decoder layer for up to "
            f"{SCORE_TOKENS} calibration tokens, or one batch where a batch holds more)")


# --------------------------------------------------------------------------- model
def load_offloaded_model(settings: q.Settings, job: q.Job, placement: Placement, offload: OffloadSettings):
    weights_dir = offload.offload_folder / WEIGHTS_DIR
    weights_dir.mkdir(parents=True, exist_ok=True)
    return q.load_model(settings, job.config, "cpu", placement.device_map, offload_folder=str(weights_dir))


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


# --------------------------------------------------------------------------- layer-by-layer calibration
class StopForward(Exception):
    """Raised by the last decoder layer's stand-in: nothing after it is needed."""


def output_form(output) -> int:
    """0 for a decoder layer returning its hidden states, n for an n-tuple of them and n-1 Nones."""
    import torch

    if isinstance(output, torch.Tensor):
        return 0
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor) \
            and all(item is None for item in output[1:]):
        return len(output)
    raise q.UsageError(f"a decoder layer returned {type(output).__name__}, which the layer-by-layer loop cannot "
                       "pass on to the next layer: use quantize_nvfp4.py for this model")


def hidden_of(output):
    """A decoder layer's output hidden states (output_form says which forms there are)."""
    import torch

    return output if isinstance(output, torch.Tensor) else output[0]


def shaped_like(form: int, hidden):
    return hidden if form == 0 else (hidden,) + (None,) * (form - 1)


def split_hidden(args: tuple, kwargs: dict) -> tuple[Any, tuple]:
    """(hidden states, everything else the model passed a decoder layer)."""
    if args:
        return args[0], (args[1:], kwargs)
    rest = dict(kwargs)
    return rest.pop("hidden_states"), ((), rest)


@contextlib.contextmanager
def replaced_forwards(layers, forwards: dict[int, Callable]):
    """Layers' forward swapped for stand-ins; their accelerate hooks, and so their weight loads, bypassed."""
    saved = {i: layers[i].__dict__.get("forward") for i in forwards}
    for i, forward in forwards.items():
        layers[i].forward = forward
    try:
        yield
    finally:
        for i, forward in saved.items():
            if forward is None:
                del layers[i].forward
            else:
                layers[i].forward = forward


def record_layer_calls(owner, layers, forwards: Iterable[Callable[[], Any]], record_from: int, run_first: bool,
                       enters: Callable[[int], bool] = lambda i: False,
                       move: Callable = lambda t: t) -> tuple[dict[int, list], list, list]:
    """Each of `forwards` (the model's own forward on one batch) with decoder layers replaced by recorders.

    Records, per forward, what the model hands each layer from `record_from` on besides the hidden states (masks,
    position embeddings: they differ by layer type in some models). With `run_first`, layer 0 runs for real, sets
    `owner.form` from its output, and the hidden states reaching layer 1 are kept; otherwise `owner.form` must be
    known. The last layer's recorder stops the forward, so nothing after the layers runs. Returns (those calls, the
    hidden states reaching layer 1, and for the forwards `enters` selects by number what enters layer 0: (hidden
    states, everything else)); kept hidden states go through `move` (e.g. to the CPU) as they come.
    """
    calls: dict[int, list] = {i: [] for i in range(record_from, len(layers))}
    reached, entering, counter = [], [], itertools.count()

    def note_input(module, args, kwargs) -> None:
        if enters(next(counter)):
            hidden, rest = split_hidden(args, kwargs)
            entering.append((move(hidden), rest))

    def note_form(module, args, output) -> None:
        owner.form = output_form(output)

    def recorder(index: int) -> Callable:
        def stand_in(*args, **kwargs):
            hidden, rest = split_hidden(args, kwargs)
            if index in calls:
                calls[index].append(rest)
            if run_first and index == 1:
                reached.append(move(hidden))
            if index == len(layers) - 1:
                raise StopForward
            return shaped_like(owner.form, hidden)
        return stand_in

    hooks = [layers[0].register_forward_pre_hook(note_input, with_kwargs=True)]
    if run_first:
        hooks.append(layers[0].register_forward_hook(note_form))
    try:
        with replaced_forwards(layers, {i: recorder(i) for i in range(1 if run_first else 0, len(layers))}):
            for forward in forwards:
                with contextlib.suppress(StopForward):
                    forward()
    finally:
        for hook in hooks:
            hook.remove()
    return calls, reached, entering


def passing_stand_ins(count: int, form: int | None, last_hidden) -> dict[int, Callable]:
    """Stand-ins for `count` decoder layers that hand the hidden states on, the last one returning `last_hidden`:
    the model's own forward then runs what comes before and after its layers (norm, head, logit scaling) as it
    runs them, on hidden states computed elsewhere."""
    def stand_in(index: int) -> Callable:
        def forward(*args, **kwargs):
            hidden, _ = split_hidden(args, kwargs)
            return shaped_like(form, last_hidden if index == count - 1 else hidden)
        return forward
    return {i: stand_in(i) for i in range(count)}


def layer_pass(layer, inputs: list, calls: list, masks: list, state: q.CalibrationState, keep_outputs: bool) -> list:
    """Every batch through one decoder layer; its hidden-state outputs are the next layer's inputs."""
    outputs = []
    for hidden, (args, kwargs), mask in zip(inputs, calls, masks):
        state.mask = mask  # the layer's pre-hook refines it from its own attention mask
        output = layer(hidden, *args, **kwargs)
        if keep_outputs:
            outputs.append(hidden_of(output))
    return outputs


def algorithm_of(config: dict) -> dict:
    """The config's algorithm as a dict (build_quant_config writes plain max as the string "max")."""
    return config["algorithm"] if isinstance(config["algorithm"], dict) else {"method": config["algorithm"]}


def max_calibrate_kwargs(config: dict) -> dict:
    """What ModelOpt's "max" algorithm passes max_calibrate for this config (its defaults included)."""
    from modelopt.torch.quantization.config import MaxCalibConfig

    kwargs = MaxCalibConfig(**algorithm_of(config)).model_dump()
    for key in ("method", "layerwise", "moe_calib_experts_ratio"):
        kwargs.pop(key)
    return kwargs


def gptq_kwargs(config: dict) -> dict:
    """What ModelOpt's gptq() gets from this config: damping, GPTQ block size, the fused kernel or not."""
    from modelopt.torch.quantization.config import GPTQCalibConfig

    kwargs = GPTQCalibConfig(**algorithm_of(config)).model_dump()
    return {key: kwargs[key] for key in ("perc_damp", "block_size", "fused")}


def gptq_layer(layer, name: str, passes: dict[str, Callable], kwargs: dict) -> dict:
    """ModelOpt's GPTQ (model_calib.gptq) on one decoder layer, as its whole-model run treats that layer.

    The max pass runs on the 16-bit stream. The Hessian pass runs with the weight quantizers off on
    the quantized stream, whose inputs earlier layers computed the same way (activations quantized,
    original weights: the whole-model run updates no weight before its Hessians are summed). Then each
    linear is updated with ModelOpt's GPTQHelper. Returns the rewritten weights, on the CPU, by name.
    """
    from modelopt.torch.quantization.conversion import set_quantizer_by_cfg_context
    from modelopt.torch.quantization.model_calib import max_calibrate
    from modelopt.torch.quantization.utils import is_quantized_linear
    from modelopt.torch.quantization.utils.calib_utils import GPTQHelper

    max_calibrate(layer, passes["outputs"])  # as gptq() calls it
    helpers = [GPTQHelper(module, f"{name}.{child}", offload_to_cpu=True, fused=kwargs["fused"])
               for child, module in layer.named_modules()
               if is_quantized_linear(module) and module.weight_quantizer.is_enabled]
    for helper in helpers:
        helper.setup()
    try:
        with set_quantizer_by_cfg_context(layer, [{"quantizer_name": "*weight_quantizer", "enable": False}]):
            passes["quantized_outputs"](layer)
    finally:
        for helper in helpers:
            helper.cleanup()
    rewritten = {}
    for helper in helpers:
        helper.update_weights(kwargs["block_size"], kwargs["perc_damp"])  # prints its report line (the manifest's)
        rewritten[f"{helper.name}.weight"] = helper.module.weight.detach().to("cpu", copy=True)
        helper.free()
    return rewritten


def keep_rewritten_weights(modules: dict, tensors: dict, path: Path) -> None:
    """The weights GPTQ or smooth_hessian rewrote, written to `path` (for --resume, and for disk-offloaded weights to
    be read from) and installed where the model reads them next (a layer held on a device already computes with
    them)."""
    from safetensors.torch import save

    path.parent.mkdir(parents=True, exist_ok=True)
    commit_file(path, lambda handle: handle.write(save({name: t.contiguous() for name, t in tensors.items()})))
    install_weights(modules, tensors, path, into_held_modules=False)


def install_weights(modules: dict, tensors: dict, path: Path, into_held_modules: bool = True) -> None:
    """Each `module.weight` tensor (by full name) where the model reads it: in the module when it is held on a
    device (unless `into_held_modules` is off); in accelerate's RAM copy when offloaded to RAM; when offloaded to
    disk, accelerate's index entry repointed to `path`, a file of ours holding the same tensors (the source
    checkpoint is never written)."""
    from accelerate.utils.offload import OffloadedWeightsLoader, PrefixedDataset

    for name, tensor in tensors.items():
        module = modules[name.rsplit(".", 1)[0]]
        hook = offload_hook(module)
        if hook is None:  # held on its device
            if into_held_modules:
                module.weight.data = tensor.to(module.weight.device, module.weight.dtype)
            continue
        weights, key = hook.weights_map, "weight"
        while isinstance(weights, PrefixedDataset):
            weights, key = weights.dataset, weights.prefix + key
        held = weights.state_dict if isinstance(weights, OffloadedWeightsLoader) else weights
        if key in held:
            held[key] = tensor.to(held[key].dtype)
        else:
            weights.index[key] = {"safetensors_file": str(path), "weight_name": name,
                                  "dtype": str(tensor.dtype).removeprefix("torch.")}


def insert_quantizers(model, config: dict) -> None:
    """mtq.quantize without calibration: quantizers in place (MoE settings applied), none calibrated yet."""
    import modelopt.torch.quantization as mtq
    from modelopt.torch.quantization.config import QuantizeAlgorithmConfig

    # the settings every algorithm has (GPTQ's own, such as its damping, would be refused here)
    common = {k: v for k, v in algorithm_of(config).items() if k in QuantizeAlgorithmConfig.model_fields}
    mtq.quantize(model, {**config, "algorithm": {**common, "method": None}})


def layer_snapshot(layer, name: str, state: q.CalibrationState) -> dict:
    """What a resume point keeps of a calibrated layer: its quantizers' state and its MoE routing counts, copied
    without waiting for the GPU (the block amaxes are tens of MB a layer): the ResumeWriter waits before it writes."""
    from modelopt.torch.quantization.conversion import quantizer_state
    from modelopt.torch.quantization.utils.core_utils import get_quantizer_state_dict

    coverage = {block: entry.counts for block, entry in state.coverage.items()
                if block.startswith(name + ".") and entry.counts is not None}
    return to_cpu({"quantizer_state": quantizer_state(layer), "buffers": get_quantizer_state_dict(layer),
                   "coverage": coverage}, non_blocking=True)


def restore_layers(model, layers, modules: dict, layerwise_dir: Path, count: int, state: q.CalibrationState,
                   rewritten: bool) -> None:
    """The layers calibrated before the kill, back in their calibrated state (each comes onto the GPU once), with
    the weights the run rewrote: GPTQ's (`rewritten`: every layer has them), smooth_hessian's (where it had a group
    to smooth)."""
    from safetensors.torch import load_file

    names = decoder_layer_names(model)
    for index in q.Progress(range(count), desc="restore calibrated layers", unit="layer"):
        restore_layer(model, layers[index], modules, layer_dir(layerwise_dir, index) / QUANTIZERS_FILE, state)
        state.searched.update(q.searchable_linears(layers[index], names[index]))  # their scales were searched
        path = layer_dir(layerwise_dir, index) / REWRITTEN_FILE
        if path.is_file():
            install_weights(modules, load_file(path), path)
        elif rewritten:
            raise q.UsageError(f"--resume: {path} is missing (GPTQ's weights of layer {index}); delete "
                               f"{layerwise_dir} to start over")


def restore_layer(model, layer, modules: dict, path: Path, state: q.CalibrationState) -> None:
    """One layer's quantizers as they were saved, restored as ModelOpt restores its own layer checkpoints."""
    import torch
    from modelopt.torch.quantization.config import QuantizeConfig
    from modelopt.torch.quantization.conversion import restore_quantizer_state
    from modelopt.torch.quantization.utils.core_utils import (
        enable_weight_access_and_writeback,
        set_quantizer_state_dict,
    )

    with enable_weight_access_and_writeback(layer, model, modules, writeback=False):
        device = next(layer.parameters()).device
        saved = torch.load(path, map_location=device, weights_only=False)  # written by this script, not user input
        restore_quantizer_state(layer, QuantizeConfig(), {"quantizer_state": saved["quantizer_state"]})
        set_quantizer_state_dict(layer, saved["buffers"])
    for block, counts in saved["coverage"].items():
        state.coverage[block].counts, state.coverage[block].forward_pass = counts, state.forward_pass


def calibrate_layer(layer, name: str, passes: dict[str, Callable], state: q.CalibrationState, max_kwargs: dict | None,
                    gptq: dict | None) -> dict:
    """One decoder layer's calibration, its weights in place; returns the weights GPTQ or smooth_hessian rewrote.

    `passes` run every batch through the layer: "outputs" on the 16-bit model's stream, and for GPTQ
    "quantized_outputs" on the stream its Hessians are summed over (see gptq_layer). `gptq`: GPTQ's settings,
    else `max_kwargs`: max_calibrate's."""
    import torch
    from modelopt.torch.quantization.model_calib import max_calibrate

    rewritten = {}
    with torch.no_grad():  # else every cached output keeps its layer's activations alive: 36 GiB a layer on 8B
        if gptq is not None:
            rewritten = gptq_layer(layer, name, passes, gptq)
        else:
            max_calibrate(layer, passes["outputs"], **max_kwargs)
    if state.smoothing:  # smooth_hessian: this layer's norms and their readers, rewritten before the search
        rewritten = q.smooth_groups([g for g in state.smoothing if g.norm_name.startswith(f"{name}.")], state)
    if state.search:  # local_hessian, four_over_six: this layer's block scales, weights in place
        q.search_block_scales(q.searchable_linears(layer, name), state)
    return rewritten


class ScoringStore:
    """--effective_bits: what the scores' reverse pass reads, kept while the layer loop runs forward. For the scored
    batches (scoring_batches): the hidden states entering each decoder layer and leaving the last, in RAM or, where
    the plan put the store on disk, as files in `folder` (each removed once read); and what the model hands each
    layer besides them (position embeddings, masks: the same tensors for every layer, held where they are)."""

    def __init__(self, batches: list[int], folder: Path | None):
        self.batches, self.folder = batches, folder
        self.hidden: dict[int, list] = {}    # layer -> its input hidden states per scored batch (RAM store)
        self.kept: set[int] = set()           # the layers whose inputs are stored
        self.calls: dict[int, list] = {}     # layer -> per scored batch: (args, kwargs) besides the hidden states

    def select(self, per_batch: list) -> list:
        """The scored batches' entries of a per-batch list of the layer loop."""
        return [per_batch[b] for b in self.batches]

    def keep(self, index: int, hidden: list) -> None:
        """Layer `index`'s input hidden states for the scored batches (index = the layer count: the last layer's
        output)."""
        host = [h.detach().to("cpu") for h in hidden]
        self.kept.add(index)
        if self.folder is None:
            self.hidden[index] = host
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        write_tensors(self.folder / f"layer_{index:04d}", host)

    def read(self, index: int, remove: bool = True) -> list:
        """Layer `index`'s stored inputs (on the CPU), removed from the store unless `remove` is off."""
        if remove:
            self.kept.discard(index)
        if self.folder is None:
            return self.hidden.pop(index) if remove else self.hidden[index]
        base = self.folder / f"layer_{index:04d}"
        tensors = read_tensors(base, "cpu")
        if remove:
            base.with_suffix(".bin").unlink()
            base.with_suffix(".json").unlink()
        return tensors


class LayerLoop:
    """ModelOpt's calibration one decoder layer at a time, one pass per layer (GPTQ: two).

    Each layer's weights come onto the GPU once; every batch runs through it once while its quantizers collect
    (max calibration leaves outputs unchanged, so they are the next layer's inputs as they are), then ModelOpt
    finishes that layer's scales (local_hessian, four_over_six: then its block scales are searched, local_hessian's
    on the Hessians that pass summed, while the weights are in place; gptq: a second pass and the weight update,
    see gptq_layer). What runs before the first layer runs in layer 0's pass, which also records what the model
    hands every layer besides the hidden states. At each resume point (--checkpoint_every) its files are written
    in the background. With a ScoringStore (--effective_bits) it keeps the scored batches' inputs of every layer.
    """

    def __init__(self, model, config: dict, state: q.CalibrationState, samples, settings: q.Settings, device: str,
                 offload: OffloadSettings, scoring: ScoringStore | None = None):
        self.model, self.state, self.samples, self.device, self.offload = model, state, samples, device, offload
        self.scoring = scoring
        self.layers, self.names = q.decoder_layers(model), decoder_layer_names(model)
        self.modules = dict(model.named_modules())
        self.batches = layer_batches(samples, settings, offload.batch_tokens)
        self.masks = [q.padded_batch(samples, batch, state.pad_id)[1].to(device) for batch in self.batches]
        self.gptq = gptq_kwargs(config) if algorithm_of(config)["method"] == "gptq" else None
        self.max_kwargs = None if self.gptq else max_calibrate_kwargs(config)
        self.streams = STREAMS if self.gptq else STREAMS[:1]
        self.inputs: dict[str, list] = {}  # per stream: the hidden states entering the next layer, per batch
        self.calls: dict[int, list] = {}   # per layer, per batch: what the model hands it besides hidden states
        self.form: int | None = None       # how the layers return their hidden states (output_form)

    def resume(self, resume_after: int) -> int:
        """The layers calibrated before a kill restored and the next layer's inputs read back; returns that layer."""
        start, folder = resume_after + 1, self.offload.layerwise_dir
        self.form = read_progress(folder)["output_form"]
        restore_layers(self.model, self.layers, self.modules, folder, start, self.state, len(self.streams) > 1)
        cached, count = read_tensors(layer_dir(folder, resume_after) / INPUTS_FILE, self.device), len(self.batches)
        self.inputs = {stream: cached[i * count:(i + 1) * count] for i, stream in enumerate(self.streams)}
        self.calls, _, entering = self.capture_calls(start if self.scoring is None else 0, run_first=False)
        self.keep_first_inputs(entering)
        for index in range(start) if self.scoring is not None else ():  # their other inputs: the scores' pass
            self.scoring.calls[index] = self.scoring.select(self.calls.pop(index))  # replays these layers
        return start

    def keep_first_inputs(self, entering: list) -> None:
        """The scored batches' inputs of layer 0 into the scoring store (capture_calls' `entering`)."""
        if self.scoring is not None:
            self.scoring.keep(0, [hidden for hidden, _ in entering])
            self.scoring.calls[0] = [rest for _, rest in entering]

    def capture_calls(self, record_from: int, run_first: bool) -> tuple[dict[int, list], list, list]:
        """Each batch through the model's own forward with decoder layers replaced by recorders (record_layer_calls):
        what the model hands each layer from `record_from` on, the hidden states reaching layer 1 when `run_first`
        (this is layer 0's calibration pass), and what enters layer 0 in the scored batches."""
        forward, scored = q.calibration_forward(self.model), set(self.scoring.batches if self.scoring else ())
        batches = (functools.partial(q.run_batch, forward, self.samples, batch, self.device, self.state)
                   for batch in self.batches)
        return record_layer_calls(self, self.layers, batches, record_from=record_from, run_first=run_first,
                                  enters=scored.__contains__)

    def stream_pass(self, index: int, stream: str) -> Callable:
        """Every batch of one stream through layer `index`; its outputs become that stream's next inputs."""
        if index == 0:  # the model's own forward up to layer 1, layer 0 running for real
            def first_layer(_layer) -> None:
                recording = stream == STREAMS[0]  # what the model hands the later layers: recorded once
                calls, self.inputs[stream], entering = self.capture_calls(1 if recording else len(self.layers), True)
                if recording:
                    self.calls = calls
                    self.keep_first_inputs(entering)
            return first_layer
        inputs, calls = self.inputs.pop(stream), self.calls[index]
        keep = index + 1 < len(self.layers) or self.scoring is not None  # the last layer's outputs: scored
        return lambda layer: self.inputs.update({stream: layer_pass(layer, inputs, calls, self.masks, self.state,
                                                                    keep_outputs=keep)})

    def calibrate(self, index: int) -> tuple[dict, dict]:
        """Layer `index` calibrated with its weights in place: (GPTQ's rewritten weights, its resume snapshot)."""
        import torch
        from modelopt.torch.quantization.utils.core_utils import enable_weight_access_and_writeback

        layer, name = self.layers[index], self.names[index]
        with enable_weight_access_and_writeback(layer, self.model, self.modules, writeback=False):
            passes = {stream: self.stream_pass(index, stream) for stream in self.streams}
            try:
                rewritten = calibrate_layer(layer, name, passes, self.state, self.max_kwargs, self.gptq)
            except torch.OutOfMemoryError:
                raise q.UsageError("CUDA out of memory in layer-by-layer calibration: lower --max_gpu_memory to "
                                   "leave room for activations, or pass a smaller --batch_size") from None
            return rewritten, layer_snapshot(layer, name, self.state)

    def run(self, start: int) -> None:
        """Layers `start` on, the next one's weights prefetched while one calibrates; resume points committed."""
        folder, last = self.offload.layerwise_dir, len(self.layers) - 1
        writer = ResumeWriter(folder, {"format": RESUME_FORMAT, "num_layers": len(self.layers)})
        prefetch, pending, last_resume_point = LayerPrefetcher(self.device), {}, time.perf_counter()
        try:
            prefetch.start(self.layers[start])
            for index in q.Progress(range(start, len(self.layers)), desc="calibrate layers", unit="layer"):
                loaded = prefetch.take_and_start(self.layers[index + 1] if index < last else None)
                self.keep_scored_inputs(index)
                rewritten, pending[index] = self.calibrate(index)
                prefetch.release(loaded)
                if rewritten:  # the layer's weights are back where accelerate keeps them: the rewrite goes there
                    keep_rewritten_weights(self.modules, rewritten, layer_dir(folder, index) / REWRITTEN_FILE)
                self.calls.pop(index, None)
                if index < last and resume_point_due(self.offload.checkpoint_every, index, last_resume_point):
                    writer.progress["output_form"] = self.form
                    writer.submit(index, pending, [t for stream in self.streams for t in self.inputs[stream]])
                    pending, last_resume_point = {}, time.perf_counter()
        except BaseException:
            prefetch.close()
            writer.finish_after_failure()
            raise
        writer.wait()
        if self.scoring is not None:  # the last layer's outputs, on which the loss is taken
            self.scoring.keep(len(self.layers), self.scoring.select(self.inputs.pop(STREAMS[0])))

    def keep_scored_inputs(self, index: int) -> None:
        """Layer `index`'s inputs (hidden states and the rest) for the scored batches into the scoring store;
        layer 0's are kept by its pass (keep_first_inputs)."""
        if self.scoring is not None and index > 0:
            self.scoring.keep(index, self.scoring.select(self.inputs[STREAMS[0]]))
            self.scoring.calls[index] = self.scoring.select(self.calls[index])


def calibrate_by_layer(model, config: dict, state: q.CalibrationState, samples, settings: q.Settings, device: str,
                       offload: OffloadSettings, resume_after: int | None,
                       scoring: ScoringStore | None = None) -> LayerLoop:
    """quantize_model's `calibrate`: quantizers inserted, then the LayerLoop from the first layer or the one after
    the resume point; fills the state's batches_run, cap and forward_seconds as calibrate_batches does."""
    import torch

    insert_quantizers(model, config)
    q.install_calibration_hooks(model, state)
    loop = LayerLoop(model, config, state, samples, settings, device, offload, scoring)
    state.batches_run, state.cap = loop.batches, offload.batch_tokens
    state.forward_pass = 1  # one pass: MoE routing counts accumulate over every batch
    started = time.perf_counter()
    loop.run(0 if resume_after is None else loop.resume(resume_after))
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    state.forward_seconds = time.perf_counter() - started
    return loop


# --------------------------------------------------------------------------- mixed precision scores, layer by layer
def groups_by_layer(groups: list[tuple[str, ...]], layer_names: list[str]) -> dict[int, list[tuple[str, ...]]]:
    """Each linear group under the decoder layer that holds it."""
    found: dict[int, list] = {}
    for group in groups:
        index = next((i for i, name in enumerate(layer_names) if group[0].startswith(name + ".")), None)
        if index is None:
            raise RuntimeError(f"{group[0]} is quantized but in no decoder layer, which the layer-by-layer scores "
                               "cannot reach; run quantize_nvfp4.py --effective_bits B where the model fits")
        found.setdefault(index, []).append(group)
    return found


def each_layer_loaded(loop: LayerLoop, order: list[int], work: Callable[[int], None], desc: str) -> None:
    """`work(index)` for each decoder layer in `order`, its weights in place (loaded once), the next layer's
    prefetched meanwhile (LayerPrefetcher) and put back to meta after."""
    from modelopt.torch.quantization.utils.core_utils import enable_weight_access_and_writeback

    prefetch = LayerPrefetcher(loop.device)
    try:
        if order:
            prefetch.start(loop.layers[order[0]])
        for position, index in enumerate(q.Progress(order, desc=desc, unit="layer")):
            loaded = prefetch.take_and_start(loop.layers[order[position + 1]] if position + 1 < len(order) else None)
            with enable_weight_access_and_writeback(loop.layers[index], loop.model, loop.modules, writeback=False):
                work(index)
            prefetch.release(loaded)
    except BaseException:
        prefetch.close()
        raise


class LayerScores:
    """choose_mixed_precision's `score` in the offload script: q.output_loss_scores' score (Σ (dLoss/dY · ΔY)² per
    linear and format, every quantizer off), computed one decoder layer at a time from the ScoringStore.

    The loss: the model's own forward from the embeddings with its layers replaced, the last one returning the
    stored last output (final norm, head and loss as the model runs them: q.summed_token_loss), and its gradient
    at those hidden states. Then from the last layer to the first, each layer's weights loaded once: its forward
    recomputed under autograd from its stored inputs, q.output_loss_hook adding each linear's score per format,
    and the backward from the gradient at its output giving the one at its input, for the layer below (activation
    gradients only). Each group's weight amax (its FP8 scale) is taken while its weights are in place. Layers
    calibrated before a --resume have no stored inputs: the scored batches run forward through them once more.
    """

    def __init__(self, loop: LayerLoop):
        self.loop, self.store = loop, loop.scoring

    def __call__(self, model, groups: list[tuple[str, ...]]) -> tuple[dict, dict]:
        import torch

        names = [n for g in groups for n in g]
        rows = {n: i for i, n in enumerate(names)}
        scores = torch.zeros(len(names), len(q.FORMAT_CANDIDATES), dtype=torch.float64, device=self.loop.device)
        in_layer, amaxes = groups_by_layer(groups, self.loop.names), {}

        def score(index: int) -> None:
            nonlocal grads
            grads = self.score_layer(index, in_layer.get(index, []), grads, scores, rows, amaxes)

        with q.quantizers_off(model), q.frozen_parameters(model):
            try:
                self.replay_restored_layers()
                grads = self.loss_gradients()
                each_layer_loaded(self.loop, list(reversed(range(len(self.loop.layers)))), score, "score layers")
            except torch.OutOfMemoryError:
                raise q.UsageError("CUDA out of memory in the --effective_bits scores: lower --max_gpu_memory to "
                                   "leave room for one layer's backward, or pass a smaller --batch_size") from None
        return {n: dict(zip(q.FORMAT_CANDIDATES, scores[rows[n]].tolist())) for n in names}, amaxes

    def replay_restored_layers(self) -> None:
        """After --resume: the stored inputs of the layers calibrated before the kill, from layer 0's."""
        import torch

        missing = [i for i in range(1, len(self.loop.layers)) if i not in self.store.kept]
        hidden = self.store.read(0, remove=False) if missing else []

        def forward(index: int) -> None:
            nonlocal hidden
            with torch.no_grad():
                hidden = [hidden_of(self.loop.layers[index](h.to(self.loop.device), *args, **kwargs))
                          for h, (args, kwargs) in zip(hidden, self.store.calls[index])]
            self.store.keep(index + 1, hidden)
        each_layer_loaded(self.loop, list(range(max(missing, default=0))), forward, "replay restored layers")

    def loss_gradients(self) -> list:
        """dLoss/d(last layer's output) per scored batch (on the CPU until its layer needs it)."""
        import torch

        loop, grads = self.loop, []
        forward = q.text_generator(loop.model)
        for batch, hidden in zip(self.store.batches, self.store.read(len(loop.layers))):
            last = hidden.to(loop.device).requires_grad_(True)
            with replaced_forwards(loop.layers, passing_stand_ins(len(loop.layers), loop.form, last)), \
                    torch.enable_grad():
                loss = q.summed_token_loss(forward, loop.samples, loop.batches[batch], loop.state.pad_id, loop.device)
                grads.append(torch.autograd.grad(loss, last)[0].to("cpu"))
        return grads

    def score_layer(self, index: int, groups: list, grads: list, scores, rows: dict, amaxes: dict) -> list:
        """Layer `index` (weights in place) scored on every scored batch; returns the gradients at its inputs."""
        import torch

        modules, device = self.loop.modules, self.loop.device
        handles = []
        for group in groups:
            amaxes[group] = q.group_amax([modules[n] for n in group])
            handles += [modules[n].register_forward_hook(q.output_loss_hook(
                q.format_gemms(modules[n], q.format_weights(modules[n], amaxes[group])), scores[rows[n]]))
                for n in group]
        inputs, calls = self.store.read(index), self.store.calls.pop(index)
        try:
            with torch.enable_grad():
                for position, (hidden, (args, kwargs)) in enumerate(zip(inputs, calls)):
                    entering = hidden.to(device).requires_grad_(True)
                    output = hidden_of(self.loop.layers[index](entering, *args, **kwargs))
                    grads[position] = torch.autograd.grad(output, entering, grads[position].to(device))[0].to("cpu")
        finally:
            for handle in handles:
                handle.remove()
        return grads


# --------------------------------------------------------------------------- quality report, layer by layer
def check_eval_streamable(settings: q.Settings, job: q.Job, offload: OffloadSettings) -> None:
    """--eval here streams the original model and the emulation of the files one decoder layer at a time, with
    the original weights read from the model's safetensors: refuse, before loading, what that cannot report."""
    if not settings.eval and settings.max_ppl_increase is None:
        return
    elsewhere = ("run python quantize_nvfp4.py --verify OUT --eval --reference MODEL --dataset_yaml YAML on a machine "
                 "that holds the model")
    if settings.kv_cache != "none":
        raise q.UsageError(f"--eval with --kv_cache {settings.kv_cache}: this script's layer-by-layer report does not "
                           f"emulate a quantized KV cache; drop --eval here and {elsewhere}")
    if q.expert_blocks(job.skeleton) or any(q.is_fused_experts(m) for m in job.skeleton.modules()):
        raise q.UsageError(f"--eval on a mixture-of-experts model: this script's layer-by-layer report does not "
                           f"emulate experts; drop --eval here and {elsewhere}")
    if len(q.decoder_layers(job.skeleton)) < 2:
        raise q.UsageError(f"--eval: the layer-by-layer report needs at least two decoder layers; {elsewhere}")
    weights_dir = offload.offload_folder / EVAL_WEIGHTS_DIR
    if weights_dir.exists() and any(weights_dir.iterdir()):
        raise q.UsageError(f"{weights_dir} is not empty (left by a killed run, or not this script's): --eval offloads "
                           "the original model there; move it away or choose another --offload_folder")


def reference_device_map(model, device: str) -> dict:
    """The original model for --eval: every decoder layer on disk (read from the checkpoint one at a time, as
    calibration read them), the rest (embeddings, final norm, head) on the execution device."""
    layers = {id(layer) for layer in q.decoder_layers(model)}
    execution = int(device.split(":")[1]) if device.startswith("cuda") else "cpu"

    def place(module, prefix: str) -> dict:
        if id(module) in layers:
            return {prefix: "disk"}
        children = list(module.named_children())
        if not any(id(m) in layers for _, m in module.named_modules()) or not children:
            return {prefix: execution}
        placed = {}
        for name, child in children:
            placed |= place(child, f"{prefix}.{name}" if prefix else name)
        for name, _ in module.named_parameters(recurse=False):
            placed[f"{prefix}.{name}" if prefix else name] = execution
        for name, _ in module.named_buffers(recurse=False):
            placed[f"{prefix}.{name}" if prefix else name] = execution
        return placed

    return place(model, "")


def run_layer(layer, inputs: list, calls: list, device: str) -> list:
    """Each held-out sample's hidden states through one decoder layer (kept on the CPU between layers)."""
    return [hidden_of(layer(hidden.to(device), *args, **kwargs)).to("cpu")
            for hidden, (args, kwargs) in zip(inputs, calls)]


class StreamedEvaluation:
    """--eval in this script: the original model and the reference emulator of the exported files side by side,
    one decoder layer at a time, each layer's weights loaded once, so it runs under the run's memory caps.

    Two streams of hidden states per held-out sample: the original layer on the original stream, then the same
    layer with its linears emulated from the files (q.emulate_linear: the dequantized FP4 weight, inputs quantized
    with the stored scale) on the quantized stream. The model's own forward computes what comes before the first
    layer and, with the layers replaced, the logits from each stream's last hidden states. Of the 16-bit tensors
    only smooth_hessian's norms differ from the original's: the quantized stream reads them from the files too.
    """

    def __init__(self, model, folder: Path, holdout: list[list[int]], device: str):
        import torch

        self.model, self.device = model, device
        self.layers, self.names = q.decoder_layers(model), decoder_layer_names(model)
        self.modules, self.to_disk = dict(model.named_modules()), q.export_names(model)
        self.reader = q.CheckpointReader(folder)
        quant = json.loads((folder / "hf_quant_config.json").read_text())["quantization"]
        self.layer_algo = q.layer_formats(quant)
        self.samples = [torch.tensor([sample], device=device) for sample in holdout]
        self.form: int | None = None
        self.applied: set[str] = set()

    def first_layer(self) -> tuple[list, list, dict[int, list]]:
        """Layer 0 run for real on every sample: (its inputs, its outputs, what the model hands each layer)."""
        import torch
        from modelopt.torch.quantization.utils.core_utils import enable_weight_access_and_writeback

        forward = q.calibration_forward(self.model)
        samples = (functools.partial(forward, ids, torch.ones_like(ids)) for ids in self.samples)
        with enable_weight_access_and_writeback(self.layers[0], self.model, self.modules, writeback=False):
            calls, reached, entering = record_layer_calls(self, self.layers, samples, record_from=1, run_first=True,
                                                          enters=lambda i: True, move=lambda t: t.to("cpu"))
        calls[0] = [rest for _, rest in entering]
        return [hidden for hidden, _ in entering], reached, calls

    def emulated(self, index: int) -> list:
        """Layer `index`'s quantized linears, and the norms smooth_hessian rescaled, computing from the files
        (weights in place, the original stream already run); returns the input hooks."""
        import torch

        hooks = []
        for child, module in self.layers[index].named_modules():
            prefix = self.to_disk(f"{self.names[index]}.{child}" if child else self.names[index])
            if f"{prefix}.weight_scale" in self.reader and hasattr(module, "weight"):
                hooks += q.emulate_linear(module, prefix, self.reader, self.layer_algo(prefix))
                self.applied.add(prefix)
            elif child.rsplit(".", 1)[-1] in q.SMOOTHED_READERS and f"{prefix}.weight" in self.reader:
                with torch.no_grad():
                    module.weight.copy_(self.reader.tensor(f"{prefix}.weight").to(module.weight.device,
                                                                                   module.weight.dtype))
        return hooks

    def logits(self, ids, last_hidden):
        """The model's own forward from the embeddings to the logits, the decoder layers replaced: the last one
        returns `last_hidden` (norm, head, any logit scaling or soft-capping run as the model runs them)."""
        stand_ins = passing_stand_ins(len(self.layers), self.form, last_hidden.to(self.device))
        with replaced_forwards(self.layers, stand_ins):
            return q.text_generator(self.model)(input_ids=ids, use_cache=False).logits

    def report(self) -> dict:
        import torch
        from modelopt.torch.quantization.utils.core_utils import enable_weight_access_and_writeback

        with torch.no_grad():
            quantized, original, calls = self.first_layer()
            for index in q.Progress(range(len(self.layers)), desc="evaluate layers", unit="layer"):
                layer = self.layers[index]
                with enable_weight_access_and_writeback(layer, self.model, self.modules, writeback=False):
                    if index > 0:
                        original = run_layer(layer, original, calls[index], self.device)
                    hooks = self.emulated(index)
                    try:
                        quantized = run_layer(layer, quantized, calls[index], self.device)
                    finally:
                        for hook in hooks:
                            hook.remove()
            self.check_all_emulated()
            totals: dict = {}
            for ids, reference, emulated in zip(self.samples, original, quantized):
                q.add_metrics(totals, q.token_metrics(self.logits(ids, reference), self.logits(ids, emulated), ids))
        return {"quantized_tensors_emulated": len(self.applied)} | q.quality_summary(
            totals, len(self.samples), "reference NVFP4 emulator reading the exported files, layer by layer")

    def check_all_emulated(self) -> None:
        """Every quantized tensor in the files found its module, or the report would describe a partly quantized
        model (as q.emulate_checkpoint checks)."""
        in_files = {k[: -len(".weight_scale")] for k in self.reader.location if k.endswith(".weight_scale")}
        missed = sorted(in_files - self.applied)
        if missed:
            raise RuntimeError(f"the layer-by-layer emulator found the module of only {len(in_files) - len(missed)} "
                               f"of {len(in_files)} quantized tensors (first missed: {missed[0]}); no quality report")


def streamed_quality_report(settings: q.Settings, job: q.Job, offload: OffloadSettings, device: str,
                            folder: Path) -> dict:
    """--eval on the staged files: a second, original copy of the model whose decoder layers stay on disk (the
    calibrated one has been rewritten by the export), streamed with the emulation of `folder`."""
    weights_dir = offload.offload_folder / EVAL_WEIGHTS_DIR
    weights_dir.mkdir(parents=True, exist_ok=True)
    try:
        model = q.load_model(settings, job.config, "cpu", reference_device_map(job.skeleton, device),
                             offload_folder=str(weights_dir))
        q.use_eager_experts(model)
        return StreamedEvaluation(model, folder, job.holdout, device).report()
    finally:
        shutil.rmtree(weights_dir)


# --------------------------------------------------------------------------- main
def calibrate_offloaded(model, settings: q.Settings, job: q.Job, device: str, offload: OffloadSettings,
                        resume_after: int | None, placement: Placement) -> dict:
    """quantize_nvfp4.py's calibration (hooks, statistics, checks) with the layer loop in place of its forward loop,
    and for --effective_bits its scores computed layer by layer (LayerScores) from what the loop stored."""
    scoring = None
    if settings.effective_bits is not None:
        folder = offload.layerwise_dir / SCORE_DIR if placement.score_store_on_disk else None
        scoring = ScoringStore(scoring_batches(job.samples, settings, offload.batch_tokens), folder)
    loops: list[LayerLoop] = []  # the loop quantize_model's calibrate ran, for the scores that come after it

    def calibrate(model, config: dict, state: q.CalibrationState) -> None:
        loops.append(calibrate_by_layer(model, config, state, job.samples, settings, device, offload, resume_after,
                                        scoring))

    q.stage(STAGE_LAYER_CALIBRATION)
    return q.quantize_model(model, settings, job.unquantized, job.samples, device, job.pad_id, calibrate=calibrate,
                            score=lambda model, groups: LayerScores(loops[0])(model, groups))


@q.holding_output_lock
@holding_offload_lock
def run_offload(settings: q.Settings, offload: OffloadSettings) -> int:
    q.import_libraries(settings)
    job = q.prepare_job(settings)
    tokens = resumed_batch_tokens(offload) or layer_batch_tokens(job, settings, offload)
    offload = dataclasses.replace(offload, batch_tokens=tokens)
    fingerprint = job_fingerprint(settings, job, offload)
    resume_after = check_resume(offload, fingerprint, settings.dry_run)
    q.stage(STAGE_PLACEMENT)
    placement = plan_placement(job, settings, offload)
    print_placement(placement, offload, settings.batch_size)
    check_cpu_run_placement(placement, job, settings)
    check_gpu_placement(placement, job, settings)
    check_offload_disk(placement, job, settings, offload)
    check_eval_streamable(settings, job, offload)
    if settings.dry_run:
        store = [f"the --effective_bits scoring store ({score_store_place(placement, offload)})"] \
            if placement.score_store_bytes else []
        return q.dry_run_passed(settings, job, [
            "the offload folder and its lock", "--resume", "the placement under --max_gpu_memory/--max_cpu_memory",
            *store, f"free disk for the offload folder (about {q.human_bytes(placement.offload_disk_bytes)})"])
    offload.offload_folder.mkdir(parents=True, exist_ok=True)
    (offload.offload_folder / JOB_FILE).write_text(json.dumps(fingerprint, indent=2) + "\n")
    if resume_after is not None:
        q.log(f"--resume: layers 0-{resume_after} are already calibrated; continuing from layer {resume_after + 1}")
    q.stage(q.STAGE_LOAD)
    load_start = time.perf_counter()
    with q.write_errors_are_usage_errors(offload.offload_folder, placement.offload_disk_bytes,
                                         "offloaded weights and calibration checkpoints"):
        model = load_offloaded_model(settings, job, placement, offload)
        timings = {"load_model_s": round(time.perf_counter() - load_start, 2)}
        device = execution_device(placement)
        calibration_run = calibrate_offloaded(model, settings, job, device, offload, resume_after, placement)
    calibration_run["resumed_after_layer"] = resume_after
    extra = {"offload": {"folder": str(offload.offload_folder), "layers_per_device": placement.layers_per_device,
                         "weight_bytes_per_device": placement.bytes_per_device,
                         "activation_cache_bytes": placement.activation_cache_bytes}}
    if placement.score_store_bytes:
        extra["offload"]["score_store"] = {
            "bytes": placement.score_store_bytes, "on_disk": placement.score_store_on_disk,
            "batches": len(scoring_batches(job.samples, settings, offload.batch_tokens)),
            "tokens": sum(scored_batch_tokens(job, settings, offload.batch_tokens))}
    report = functools.partial(streamed_quality_report, settings, job, offload, device)
    with export_prefetching_layers(model, device):
        status = q.finish_job(model, settings, job, calibration_run, timings, device, "quantize_nvfp4_offload.py",
                              extra, report_quality=report)
    if offload.layerwise_dir.exists():  # exported: the resume points have served their purpose
        shutil.rmtree(offload.layerwise_dir)
    if offload.clean_offload:
        clean_offload_folder(offload)
    return status


def run_self_test(args: argparse.Namespace) -> int:
    """The tiny built-in model, split across CPU and disk (and GPU if there is one), end to end."""
    def run_job(job_args: argparse.Namespace, tmp_path: Path) -> int:
        job_args.offload_folder = job_args.offload_folder or str(tmp_path / "offload")
        job_args.max_cpu_memory = job_args.max_cpu_memory or 600_000  # embeddings in RAM, decoder layers on disk
        return run_offload(q.build_settings(job_args, {}), build_offload_settings(job_args))

    return q.self_test(args, run_job, layers=4, label="offload self-test")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    q.start_console(args.verbose)
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
        q.print_error(str(exc))
        return q.EXIT_USAGE
    except q.ExportRejected as exc:
        q.print_error(str(exc))
        return 1
    except KeyboardInterrupt:  # resume points already committed stay in the offload folder
        q.print_error("interrupted: the output dir was not written; the same command with --resume continues from "
                      "the last resume point, if one was committed")
        return q.EXIT_INTERRUPTED


if __name__ == "__main__":
    q.exit_without_teardown(main())
