#!/usr/bin/env python3
"""Quantize a Hugging Face causal LM to NVIDIA NVFP4 with ModelOpt, for vLLM and TensorRT-LLM.

Flow: YAML dataset mix -> formatted texts -> oversample, tokenize, filter, trim -> length-sorted batches
-> mtq.quantize (the --algorithm's calibration) and our block-scale search -> export_hf_checkpoint into a
staging dir + tokenizer, manifest and model card -> checks of what was written (validation, fidelity,
--eval) -> atomic rename.

    python quantize_nvfp4.py --input_model M --output_model OUT --dataset_yaml Datasets/X.yaml
    python quantize_nvfp4.py --self_test

Sections, in the order the data flows (each starts with a `# ---- name` line):
    constants                    every default, limit and table (ALGORITHMS: one record per --algorithm)
    console                      stage lines and the phase table they keep, progress, errors; other libraries
                                 silenced unless --verbose
    settings                     argv + .env + YAML -> one validated Settings, before anything heavy loads
    pre-load checks              data sources, model, output dir and lock, disk, GPUs: each raises UsageError
                                 (exit 2, one line); prepare_job runs them all, and so does --dry_run
    formatters                   dataset rows -> text, per the YAML's formatter and columns
    calibration data             load, format, tokenize, filter, select; pure functions of the settings
    batching                     length-sorted batches that cost least padding
    model                        config, tokenizer, weights, what stays in 16 bits, ModelOpt's config
    several GPUs                 torch.distributed ranks under accelerate launch
    calibration                  CalibrationState, the forward loop and its hooks (local_hessian's Hessian sums
                                 among them), mtq.quantize
    scale search                 local_hessian and four_over_six block scales after the max pass
    mixed precision              --effective_bits: each linear group's format (NVFP4, FP8, 16-bit) from its
                                 output-loss score (auto_quantize's), under the budget of average weight bits
    export                       export_hf_checkpoint into staging (its shards through our writer, which copies
                                 from the GPU while it writes), tokenizer, manifest, model card, rename
    checks of the written files  validation against vLLM's and TensorRT-LLM's loaders (returns problems)
    export fidelity              each exported linear against the calibrated model
    quality report               the reference emulator reading the files: --eval and --verify
    summary                      the plan before the run and the table after it
    self-test, list configs, main   entry points

quantize_nvfp4_offload.py imports the helpers below; keep them here, once. The standard library and yaml are
imported here; torch, transformers, ModelOpt, datasets and accelerate inside the functions that use them, because
together they take about 15 s to import (ModelOpt's quantization alone 11 s on a 2-core machine): --help, bad input
and most of a --dry_run answer before they load.
"""
from __future__ import annotations

import argparse
import atexit
import codecs
import concurrent.futures
import contextlib
import copy
import dataclasses
import datetime
import difflib
import errno
import fcntl
import fnmatch
import functools
import inspect
import io
import itertools
import json
import logging
import math
import os
import platform
import random
import re
import shutil
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import warnings
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import yaml

try:  # CUDA builds of torch bring Triton, for our scale-search kernel; the CPU path needs none
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None


# --------------------------------------------------------------------------- constants
SCRIPT_DIR = Path(__file__).resolve().parent
SAMPLES_YAML = SCRIPT_DIR / "Datasets" / "Local_Example.yaml"
MANIFEST_NAME = "nvfp4_manifest.json"
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C
EVAL_SAMPLES = 64  # --eval's held-out samples

CALIBRATION_DEFAULTS = {
    "max_samples": 512,
    "max_seq_len": 2048,
    "oversample_ratio": 1.5,
    "seed": 42,
    "min_token_length": 16,
    "batch_size": "auto",   # or samples per forward; "auto" becomes Settings.batch_size None
}
# mode -> (ModelOpt config name, CLI flag, what it is)
MODES = {
    "nvfp4": ("NVFP4_DEFAULT_CFG", "(default)", "W4A4: FP4 weights and FP4 activations"),
    "w4a8": ("W4A8_NVFP4_FP8_CFG", "--w4a8", "FP4 weights, FP8 activations"),
    "weight_only": ("W4A16_NVFP4_CFG", "--weight_only", "W4A16: FP4 weights, 16-bit activations"),
}
# --kv_cache -> ModelOpt's KV-cache config, merged into the mode's (None: KV cache stays 16-bit)
KV_CACHE_CONFIGS = {"none": None, "fp8": "FP8_KV_CFG", "nvfp4": "NVFP4_KV_CFG"}
MIXED_FP8_CONFIG = "FP8_DEFAULT_CFG"  # --effective_bits: the quantizers of a linear it switches to FP8
ALL_MODES = tuple(MODES)


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """One --algorithm: what ModelOpt runs, what it needs, and where it is offered. Every check, default and help
    text about algorithms derives from ALGORITHMS."""
    summary: str                        # what it does, for --help
    method: dict | None = None          # ModelOpt's calibration algorithm; None: the preset's own
    preset: str | None = None           # a ModelOpt config whose static weight-block settings are merged in
    modes: tuple[str, ...] = ("nvfp4", "weight_only")  # the modes it was exported and verified in
    default_for: tuple[str, ...] = ()   # the modes whose default it is
    cuda: bool = True                   # fake-quantized forwards on ModelOpt's CUDA kernels
    scale_search: bool = False          # the max pass, then our block-scale search (a torch path beside Triton's)
    layer_loop: bool = False            # the offload script's layer loop runs it
    smooths: bool = False               # channel ranges moved into the norms before the search (smooth_hessian)

    @property
    def needs_triton(self) -> bool:
        """ModelOpt's static FP4 block kernels: a preset's weight blocks under a CUDA-only algorithm."""
        return self.cuda and self.preset is not None


ALGORITHMS = {
    "max": Algorithm("one pass, each block's scale from its max", {"method": "max"}, modes=ALL_MODES,
                     default_for=("w4a8",), cuda=False, layer_loop=True),
    # ModelOpt's local_hessian recipe (each block's FP8 scale minimizing its output error dwᵀHdw on the inputs'
    # per-block Hessians), with the Hessians summed in the one max pass instead of a second, quantized forward
    "local_hessian": Algorithm("block scales searched to minimize each block's output error",
                               {"method": "max"}, "NVFP4_W4A4_WEIGHT_LOCAL_HESSIAN_CFG", default_for=("weight_only",),
                               cuda=False, scale_search=True, layer_loop=True),
    # the same search after SmoothQuant's channel migration, folded into the RMSNorms before q/k/v and gate/up (both
    # from the one max pass's statistics): NVFP4's activation blocks lose their outlier channels
    "smooth_hessian": Algorithm("local_hessian after each norm-fed input's channel ranges move into the norm",
                                {"method": "max"}, "NVFP4_W4A4_WEIGHT_LOCAL_HESSIAN_CFG", modes=("nvfp4",),
                                default_for=("nvfp4",), cuda=False, scale_search=True, layer_loop=True,
                                smooths=True),
    # ModelOpt's four_over_six recipe (each block's largest value on FP4's 6 or its 4, whichever rounds the block
    # with less squared error; FP8 scales normalized to 256 so that 1.5x fits), searched after the one max pass
    "four_over_six": Algorithm("each block's max on FP4's 6 or 4, whichever rounds it better", {"method": "max"},
                               "NVFP4_FOUR_OVER_SIX_CFG", cuda=False, scale_search=True, layer_loop=True),
    # GPTQ's Hessian-guided rounding with error feedback, on static max block scales, all layers at once
    # (ModelOpt's layer-by-layer mode replays each layer's inputs; measured no better here, and 10x slower)
    "gptq": Algorithm("Hessian-guided rounding with error feedback",
                      {"method": "gptq", "fused": True, "layerwise": {"enable": False}},
                      "NVFP4_W4A4_WEIGHT_MSE_FP8_SWEEP_CFG", layer_loop=True),
    "mse": Algorithm("FP8 block scales minimizing the weight's error", None, "NVFP4_W4A4_WEIGHT_MSE_FP8_SWEEP_CFG"),
    "awq_clip": Algorithm("clipped per-block weight ranges, searched", {"method": "awq_clip"}),
    "awq_lite": Algorithm("per-channel smoothing scales, searched per layer", {"method": "awq_lite"}),
}
DEFAULT_ALGORITHMS = {mode: name for name, a in ALGORITHMS.items() for mode in a.default_for}
HESSIAN_ALGORITHMS = [name for name, a in ALGORITHMS.items() if a.preset == "NVFP4_W4A4_WEIGHT_LOCAL_HESSIAN_CFG"]
MOE_CALIBRATION = ("routed", "all")          # all: every expert sees every calibration token (ModelOpt's remedy)
DATASET_KEYS = {
    "name": str, "path": str, "split": str, "weight": (int, float), "text_column": str,
    "streaming": bool, "formatter": str, "columns": (dict, list), "subset": str, "data_files": (str, list),
}
FORMATTER_COLUMNS = {  # formatter -> the keys its `columns:` mapping may set, in the order of the list form
    "raw_text": ("text",),
    "prompt_answer": ("prompt", "answer", "system", "input"),
    "sharegpt": ("conversations",),
    "chat_completion": ("messages",),
}
# formatter -> the list form of `columns:` (the original README's), as told in errors. raw_text's list holds
# candidate text columns (the first non-empty one in a row is used); the others are positional.
COLUMN_LISTS = {
    "raw_text": "[text, ...] (candidate columns, the first non-empty one is used)",
    "prompt_answer": "[prompt, answer] optionally followed by system, input",
    "sharegpt": "[conversations]",
    "chat_completion": "[messages]",
}
TEXT_COLUMNS = ("text", "content", "document", "body", "story", "passage", "article")
PROMPT_ANSWER_PAIRS = (
    ("prompt", "response"), ("instruction", "output"), ("question", "answer"),
    ("prompt", "completion"), ("query", "response"), ("input", "output"),
)
SYSTEM_COLUMNS = ("system", "system_prompt")
CONVERSATION_COLUMNS = ("conversations", "conversation", "messages", "dialogue", "turns")
ROLE_ALIASES = {
    "system": "system", "human": "user", "user": "user", "prompter": "user",
    "gpt": "assistant", "assistant": "assistant", "model": "assistant", "bot": "assistant",
    "chatgpt": "assistant", "bing": "assistant", "character": "assistant",
}
LOCAL_DATA_BUILDERS = {
    ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text",
    ".arrow": "arrow",
}
# Linears that runtimes fuse into one GEMM (vLLM qkv_proj / gate_up_proj, TRT-LLM likewise): all or none
# of a group may be excluded, or the checkpoint does not load.
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"))
# quant_algo -> its weight block size as the runtimes load it (None: FP8's one scale per tensor)
QUANT_ALGO_GROUP_SIZE = {"NVFP4": 16, "W4A16_NVFP4": 16, "W4A8_NVFP4_FP8": 32, "FP8": None}
MIXED_PRECISION = "MIXED_PRECISION"   # ModelOpt's quant_algo when layers differ; quantized_layers gives each its own
MIXED_LAYER_ALGOS = ("NVFP4", "W4A16_NVFP4", "FP8")  # per-layer formats vLLM's ModelOpt mixed config dispatches
# --effective_bits counts the stored bits per weight of each linear the run would otherwise quantize: 4-bit FP4
# values plus one FP8 scale per block (4.5 for blocks of 16; the per-tensor FP32 scales are not counted), FP8's 8, or
# 16 for a linear left unquantized (key None); averaged over those linears' weights. Embeddings and lm_head stay
# 16-bit and are not counted.
WEIGHT_BITS = {**{algo: 4 + 8 / group for algo, group in QUANT_ALGO_GROUP_SIZE.items() if group},
               "FP8": 8.0, None: 16.0}
FORMAT_CANDIDATES = ("NVFP4", "FP8")  # --effective_bits' quantized formats for a linear (else 16-bit, loss 0)
HESSIAN_BLOCK = 16               # local_hessian's Hessians: one per 16 input features, NVFP4's scale block
HESSIAN_WINDOW = (6, 9)          # local_hessian tries the FP8 scales from 6 steps below each block's max scale to 9
                                 # above (an octave is 8 steps), not all 126: where ModelOpt's full sweep put 99.94%
                                 # of blocks on a trained model, for a third of the search's time (docs/algorithms.md)
HESSIAN_TILE_ROWS = 128          # the Hessian kernel's rows per step
HESSIAN_ROW_SPLITS = 32          # the Hessian kernel's programs per block column: each sums 1/32 of the rows
FOUR_OVER_SIX_FACTORS = (1.0, 1.5)  # four_over_six's block amaxes: the block's max on FP4's 6, or on its 4
FOUR_OVER_SIX_FP8_MAX = 256.0    # ModelOpt's FP8 block-scale normalization for four_over_six (448 otherwise)
HESSIAN_DAMPING = 1e-4           # x the mean diagonal, added to each: a block calibration never excited gets the
                                 # scale with least weight error (with H = 0 every scale ties and the smallest wins)
# smooth_hessian: each channel j of a norm's output divided by s_j = amax(x_j)^a / amax(W[:, j])^(1-a) (SmoothQuant's
# migration, a = 0.5; geometric mean 1), s folded into the norm's weight and the reading linears' columns, so the
# 16-bit model computes the same function while NVFP4's activation blocks lose their outlier channels
SMOOTHING_ALPHA = 0.5
SMOOTHABLE_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")  # y = weight * x / rms(x)
SMOOTHED_READERS = {"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                    "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj")}
E4M3_MAX = 448.0                 # FP8 E4M3's largest value: an FP8 per-tensor scale maps max |x| to it
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
DEFAULT_BATCH_TOKENS = 8192      # when no probe sizes batches: CPU, and the offload script (one layer's activations)
MAX_BATCH_TOKENS = 65536         # GEMMs are saturated long before this on any GPU
BATCH_OVERHEAD_TOKENS = 1024     # one forward's fixed cost (launches, Python) in tokens: batching trades it for padding
AUTO_BUDGET_FRACTION = 0.90      # of total GPU memory when no --gpu_memory_budget is given
DISK_MARGIN = 1.10               # export writes temp files beside the output
# errno of a failed write of our own files -> what to do (the error also names the disk and what was needed)
WRITE_ERRNO_REMEDIES = {
    errno.ENOSPC: "free space or choose another disk",
    errno.EDQUOT: "free space within your quota, have it raised, or choose another disk",
    errno.EFBIG: "the file system or `ulimit -f` caps the file size (FAT32 at 4 GiB): use an ext4, xfs or NTFS disk, "
                 "or raise `ulimit -f`",
    errno.EROFS: "remount it writable or choose another disk",
    errno.EIO: "the disk reported an I/O error: check it (dmesg) or choose another disk",
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "tiktoken.model")
# copied byte for byte from the source into the output (the tokenizer as calibration left it would carry its truncation)
SOURCE_FILES = TOKENIZER_FILES + (
    "special_tokens_map.json", "added_tokens.json", "merges.txt", "chat_template.jinja", "chat_template.json",
    "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json", "generation_config.json")


class UsageError(Exception):
    """Bad input: printed as one line on stderr, exit status 2, no traceback."""


# --------------------------------------------------------------------------- console
def human_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def on_main_rank() -> bool:
    """Rank 0 under torchrun / accelerate launch (which set RANK), or a plain single process."""
    return os.environ.get("RANK", "0") == "0"


# The phases of a run, each announced by stage() as it starts (the offload script adds its own two). The first
# phase, from the process's start, needs no line; the Hessian sums are timed inside calibration and booked apart.
STAGE_STARTUP = "start-up and imports"
STAGE_CHECKS = "pre-load checks"
STAGE_DATA = "calibration data"
STAGE_LOAD = "loading weights"
STAGE_CALIBRATION = "calibration"
STAGE_SEARCH = "scale search"
STAGE_MIXED = "mixed precision scores"  # --effective_bits: the output-loss pass and the choice
STAGE_EXPORT = "export"
STAGE_VALIDATION = "checks of the written files"  # validation and the fidelity check, side by side
STAGE_QUALITY = "quality report"
PHASE_HESSIANS = "Hessian sums"
PROGRESS_INTERVAL_S = 10.0  # off a terminal: at most one progress line per loop this often
# Without --verbose: set before these libraries are imported (each reads them once, at import); a value the user
# set is kept. transformers' progress bars follow huggingface_hub's switch.
QUIET_ENVIRONMENT = {
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "DATASETS_VERBOSITY": "error",
}
QUIET_LOGGERS = ("accelerate", "modelopt", "datasets", "huggingface_hub", "torch.distributed")
QUIET_WARNINGS_FROM = r"(transformers|torch|modelopt|accelerate)(\.|$)"  # modules whose Python warnings go unshown
# Packages that importing ModelOpt's quantization loads a plugin for when they are installed, and that a run never
# uses: each can take seconds to import (vLLM, PEFT, PyTorch Geometric), so a run's process treats them as absent.
UNUSED_PLUGIN_PACKAGES = ("vllm", "peft", "torch_geometric", "diffusers", "megatron", "apex", "fairscale",
                          "transformer_engine", "trl", "fastvideo")


def seconds_since_process_start() -> float:
    """How long this process has run, from /proc (Linux, 10 ms steps); 0 where there is none."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime, in clock ticks since boot
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - started)
    except (OSError, ValueError, IndexError, AttributeError):
        return 0.0


PROCESS_STARTED = time.perf_counter() - seconds_since_process_start()


@dataclasses.dataclass
class Phases:
    """Seconds per phase of a run, back to back from its start: stage() closes one phase and opens the next, so
    the phases add up to the wall time. Work timed inside a phase (the Hessian sums inside calibration) is moved
    out of it into a phase of its own, listed right after it."""
    since: float                                   # perf_counter when the current phase began
    current: str = STAGE_STARTUP
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    carved: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # phase -> phases moved out of it

    @property
    def untouched(self) -> bool:
        return not self.seconds and self.current == STAGE_STARTUP

    def enter(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[self.current] = self.seconds.get(self.current, 0.0) + now - self.since
        self.current, self.since = name, now

    def move(self, seconds: float, out_of: str, into: str) -> None:
        """`seconds` measured inside phase `out_of`, booked to phase `into` instead."""
        if not seconds:
            return
        if out_of == self.current:
            self.since += seconds
        else:
            self.seconds[out_of] = self.seconds.get(out_of, 0.0) - seconds
        self.seconds[into] = self.seconds.get(into, 0.0) + seconds
        self.carved.setdefault(out_of, []).append(into)

    def table(self) -> dict[str, float]:
        """Seconds per phase so far (the current one up to now), in the run's order, rounded to 10 ms."""
        seconds = {**self.seconds, self.current: self.seconds.get(self.current, 0.0) + time.perf_counter() - self.since}
        inside = {name for names in self.carved.values() for name in names}
        ordered = []
        for name in seconds:
            if name not in inside:
                ordered += [name] + [n for n in self.carved.get(name, []) if n not in ordered]
        return {name: round(seconds[name], 2) for name in ordered}


@dataclasses.dataclass
class Console:
    """What the console helpers share. Outside main() (tests, benches) libraries are left as they are."""
    started: float = dataclasses.field(default_factory=time.perf_counter)
    verbose: bool = True
    bars: list = dataclasses.field(default_factory=list)  # open terminal bars, cleared before an error line
    phases: Phases = dataclasses.field(default_factory=lambda: Phases(since=PROCESS_STARTED))


CONSOLE = Console()


def start_console(verbose: bool) -> None:
    """At the start of main(): the run's clock for stage lines and phases (the first run of a process counts from
    the process's start, a later one from here), and other libraries' output off unless verbose."""
    CONSOLE.verbose = verbose
    if CONSOLE.phases.untouched:
        CONSOLE.started = PROCESS_STARTED
    else:
        CONSOLE.started = time.perf_counter()
        CONSOLE.phases = Phases(since=CONSOLE.started)
    if not verbose:
        quiet_libraries()


def quiet_libraries() -> None:
    """Other libraries' logging, progress bars and deprecation / user warnings off; ModelOpt's prints on stdout
    are captured where it is called (modelopt_report)."""
    for name, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for category in (DeprecationWarning, FutureWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category, module=QUIET_WARNINGS_FROM)


def skip_unused_plugins() -> None:
    """UNUSED_PLUGIN_PACKAGES read as not installed in this process, unless one is imported already: None in
    sys.modules makes `import` fail and importlib.util.find_spec answer None, so ModelOpt's plugin loader and
    transformers' availability checks both skip them."""
    for name in UNUSED_PLUGIN_PACKAGES:
        sys.modules.setdefault(name, None)


def write_line(text: str) -> None:
    """One whole line on stderr; open terminal bars are cleared for it and redrawn below it."""
    if CONSOLE.bars:
        from tqdm import tqdm

        tqdm.write(text, file=sys.stderr)
    else:
        print(text, file=sys.stderr, flush=True)


def warn(message: str) -> None:
    if on_main_rank():
        write_line(f"warning: {message}")


def log(message: str) -> None:
    if on_main_rank():
        write_line(message)


def run_seconds() -> float:
    """The run's seconds so far: the clock of the stage lines, the phase table and the summary's wall."""
    return time.perf_counter() - CONSOLE.started


def stage(name: str) -> None:
    """One line as a phase of the run starts, on the run's clock; the phase clock moves on."""
    CONSOLE.phases.enter(name)
    log(f"[{run_seconds():7.1f} s] {name}")


def print_error(message: str) -> None:
    """`error: message` from column 0 on every rank: open terminal bars are closed (cleared) first."""
    for bar in list(CONSOLE.bars):
        bar.close()
    print(f"error: {message}", file=sys.stderr, flush=True)


class Progress:
    """One loop's progress on stderr, main rank only. On a terminal a tqdm bar that is cleared when done; else
    a plain line through log() at most every PROGRESS_INTERVAL_S seconds, none for a loop done sooner.

    Iterate over it (wrapping `iterable`), or call update(n) and close() (or use it in a with-block)."""

    def __init__(self, iterable: Iterable | None = None, *, desc: str, unit: str, total: int | None = None,
                 initial: int = 0, unit_scale: bool = False):
        self.iterable, self.desc, self.unit, self.done = iterable, desc, unit, initial
        self.total = len(iterable) if total is None else total
        self.started = self.last_line = time.monotonic()
        self.bar, self.shown = None, None  # shown: the count of the last plain line
        if on_main_rank() and sys.stderr.isatty() and self.total:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc=desc, unit=unit, initial=initial, unit_scale=unit_scale,
                            leave=False, file=sys.stderr)
            CONSOLE.bars.append(self)

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        if time.monotonic() - self.last_line >= PROGRESS_INTERVAL_S:
            self.plain_line()

    def plain_line(self) -> None:
        self.last_line, self.shown = time.monotonic(), self.done
        plural = self.unit if self.unit.endswith("B") else \
            self.unit + ("es" if self.unit.endswith(("s", "x", "ch", "sh")) else "s")  # a byte unit has no plural
        log(f"{self.desc}: {self.done}/{self.total} {plural} ({self.done / max(self.total, 1):.0%}), "
            f"{self.last_line - self.started:.1f} s")

    def close(self) -> None:
        """Clears the bar; off a terminal, a loop that printed a line ends with one at its final count."""
        if self.bar is not None:
            self.bar.close()
            CONSOLE.bars.remove(self)
            self.bar = None
        elif self.shown is not None and self.shown != self.done:
            self.plain_line()


# --------------------------------------------------------------------------- settings
@dataclasses.dataclass
class DatasetSpec:
    name: str
    path: str
    split: str = "train"
    weight: float = 1.0
    text_column: str | None = None
    streaming: bool = False
    formatter: str = "raw_text"
    columns: dict | None = None
    subset: str | None = None
    data_files: str | list | None = None


@dataclasses.dataclass
class Settings:
    input_model: str
    output_model: Path | None
    dataset_yaml: Path
    datasets: list[DatasetSpec]
    max_samples: int
    max_seq_len: int
    oversample_ratio: float
    seed: int
    min_token_length: int
    batch_size: int | None            # None = auto (token budget)
    gpu_memory_budget: float | None   # GiB
    dtype: str
    trust_remote_code: bool
    mode: str
    skip_layers: list[str]
    overwrite: bool
    dry_run: bool
    kv_cache: str = "none"
    algorithm: str = "max"
    moe_calibration: str = "routed"
    eval: bool = False
    eval_samples: int = EVAL_SAMPLES
    max_ppl_increase: float | None = None   # percent
    effective_bits: float | None = None     # --effective_bits: the mixed-precision budget; None: one format
    hf_token: str | None = dataclasses.field(default=None, repr=False)

    @property
    def modelopt_config_name(self) -> str:
        return MODES[self.mode][0]

    def public_dict(self) -> dict:
        """The settings as recorded in the manifest: no secrets."""
        out = dataclasses.asdict(self)
        out.pop("hf_token")
        out["output_model"] = str(self.output_model) if self.output_model else None
        out["dataset_yaml"] = str(self.dataset_yaml)
        out["batch_size"] = self.batch_size or "auto"
        return out


def read_env_files(*folders: Path) -> dict[str, str]:
    """Values from .env files (later folders win), under the real environment."""
    from dotenv import dotenv_values

    merged: dict[str, str] = {}
    for folder in folders:
        env_file = folder / ".env"
        if env_file.is_file():
            try:
                values = dotenv_values(env_file, encoding="utf-8")
            except UnicodeDecodeError as exc:
                raise UsageError(f"{env_file}: not UTF-8 text ({exc.reason} at byte {exc.start}); "
                                 "save it as UTF-8") from None
            merged.update({k: v for k, v in values.items() if v is not None})
    merged.update(os.environ)
    return merged


def refuse_unknown_keys(where: str, keys: Iterable, allowed: Iterable[str]) -> None:
    """A UsageError for the first of `keys` not `allowed`, naming the nearest allowed key where one is close."""
    allowed = list(allowed)
    unknown = sorted(str(k) for k in keys if k not in allowed)
    if unknown:
        close = difflib.get_close_matches(unknown[0], allowed, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UsageError(f"{where}: unknown key '{unknown[0]}'{hint}; allowed: {', '.join(allowed)}")


def _check_type(value, expected, where: str):
    if isinstance(value, bool) and expected in ((int, float), int, float):
        raise UsageError(f"{where}: expected a number, got {value!r}")
    if not isinstance(value, expected):
        names = expected.__name__ if isinstance(expected, type) else " or ".join(t.__name__ for t in expected)
        raise UsageError(f"{where}: expected {names}, got {type(value).__name__} {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise UsageError(f"{where}: expected a finite number, got {value}")


def _column_names(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) and v for v in value)


def normalize_columns(columns: dict | list, formatter: str, where: str) -> dict:
    """`columns:` as a mapping of the formatter's keys, from either form; formatters only see this one."""
    keys = FORMATTER_COLUMNS[formatter]
    forms = f"a list {COLUMN_LISTS[formatter]}; or a mapping with keys {', '.join(keys)}"
    if isinstance(columns, list):
        fewest = 2 if formatter == "prompt_answer" else 1
        fits = len(columns) >= fewest and (formatter == "raw_text" or len(columns) <= len(keys))
        if not (fits and _column_names(columns)):
            raise UsageError(f"{where}: 'columns' {columns!r} does not fit formatter '{formatter}'; "
                             f"expected {forms}")
        return {"text": columns} if formatter == "raw_text" else dict(zip(keys, columns))
    bad_keys = sorted(set(columns) - set(keys))
    if bad_keys:
        raise UsageError(f"{where}: 'columns' key '{bad_keys[0]}' does not apply to formatter "
                         f"'{formatter}'; allowed: {', '.join(keys)}")
    for key, value in columns.items():
        if not _column_names(value if key == "text" and isinstance(value, list) else [value]):
            raise UsageError(f"{where}: 'columns.{key}' must be a column name, got {value!r}; expected {forms}")
    return dict(columns)


def parse_dataset_entry(entry, index: int, yaml_path: Path) -> DatasetSpec:
    where = f"{yaml_path}: datasets[{index}]"
    if not isinstance(entry, dict):
        raise UsageError(f"{where}: each entry must be a mapping with at least 'path'")
    where += f" ({entry.get('name') or entry.get('path') or '?'})"
    refuse_unknown_keys(where, entry, DATASET_KEYS)
    if entry.get("path") is None:
        raise UsageError(f"{where}: missing required key 'path'")
    values = {k: v for k, v in entry.items() if v is not None}
    for key, value in values.items():
        _check_type(value, DATASET_KEYS[key], f"{where}: '{key}'")
    check_path_given(values["path"], where)
    spec = DatasetSpec(**{"name": values["path"], **values})
    spec.weight = float(spec.weight)
    if not spec.weight > 0:
        raise UsageError(f"{where}: 'weight' must be > 0, got {spec.weight}")
    if spec.formatter not in FORMATTERS:
        raise UsageError(f"{where}: unknown formatter '{spec.formatter}'; allowed: {', '.join(FORMATTERS)}")
    if spec.columns is not None:
        spec.columns = normalize_columns(spec.columns, spec.formatter, where)
    if spec.text_column and spec.formatter != "raw_text":
        raise UsageError(f"{where}: 'text_column' applies to formatter raw_text only; use 'columns' instead")
    return spec


def check_path_given(path: str, where: str) -> None:
    """An empty path would read every file beside the YAML (column names are checked by normalize_columns)."""
    if not path.strip():
        raise UsageError(f"{where}: 'path' is empty; give a hub ID, a data file or a folder")


def load_mix(yaml_path: Path) -> tuple[list[DatasetSpec], dict]:
    """Read and validate a dataset-mix YAML; local paths are resolved against its folder."""
    if yaml_path.is_dir():
        raise UsageError(yaml_is_directory(yaml_path))
    if not yaml_path.is_file():
        raise UsageError(f"dataset YAML not found: {yaml_path} (pass --dataset_yaml with an existing file)")
    try:
        doc = yaml.safe_load(yaml_path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise UsageError(f"{yaml_path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise UsageError(f"{yaml_path}: malformed YAML{at}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(doc, dict):
        raise UsageError(f"{yaml_path}: top level must be a mapping with a 'datasets:' list")
    refuse_unknown_keys(f"{yaml_path}: top level", doc, ("datasets", "calibration"))
    entries = doc.get("datasets")
    if not isinstance(entries, list) or not entries:
        raise UsageError(f"{yaml_path}: 'datasets:' must be a non-empty list of dataset entries")
    specs = [parse_dataset_entry(entry, i, yaml_path) for i, entry in enumerate(entries)]
    check_unique_names(specs, entries, yaml_path)
    for index, spec in enumerate(specs):
        local = yaml_path.parent / spec.path
        if not Path(spec.path).is_absolute() and local.exists():
            spec.path = str(local.resolve())
        check_local_path(spec.path, [yaml_path.parent, Path.cwd()], f"{yaml_path}: datasets[{index}] ({spec.name})")
    return specs, parse_calibration_block(doc.get("calibration") or {}, yaml_path)


def yaml_is_directory(path: Path) -> str:
    found = sorted(path.glob("*.yaml"))[:3]
    if not found:
        return (f"--dataset_yaml {path} is a directory with no .yaml file in it; pass a YAML file such as "
                f"{SAMPLES_YAML}")
    return f"--dataset_yaml {path} is a directory; pass a YAML file such as {' or '.join(map(str, found))}"


def looks_local(path: str, folders: Iterable[Path]) -> bool:
    """A dataset `path:` that names a file or folder rather than a hub ID (org/name, no folder `org` here)."""
    first = Path(path).expanduser().parts[0] if path.strip() else ""
    return (path.startswith((".", "/", "~")) or Path(path).suffix.lower() in LOCAL_DATA_BUILDERS
            or path.count("/") > 1 or any((folder / first).is_dir() for folder in folders))


def check_local_path(path: str, folders: list[Path], where: str) -> None:
    """A local-looking path that does not exist is a typo, not a hub ID: name the nearest files in its folder."""
    candidates = [folder / Path(path).expanduser() for folder in folders]  # an absolute path stays itself
    if not looks_local(path, folders) or any(c.exists() for c in candidates):
        return
    name = path.rstrip("/").rsplit("/", 1)[-1]
    parent = next((c.parent for c in candidates if c.parent.is_dir()), None)
    near = close_file_names(parent, name) if parent and name else []
    shown = [path.rstrip("/")[: -len(name)] + n for n in near]
    if near:
        hint = f" (did you mean {' or '.join(shown)}?)"
    elif Path(path).expanduser().is_absolute():
        hint = ""
    else:
        hint = f" (relative paths are resolved against the YAML's folder {folders[0].resolve()}, then the working " \
               "directory)"
    raise UsageError(f"{where}: no file matches {path}{hint}")


def close_file_names(folder: Path, name: str) -> list[str]:
    """Up to 3 entries of `folder` that `name` may have meant: the same stem first, then close stems."""
    by_stem: dict[str, list[str]] = {}
    for entry in sorted(p.name for p in folder.iterdir()):
        by_stem.setdefault(Path(entry).stem, []).append(entry)
    stem = Path(name).stem
    same_stem = [e for e in by_stem.get(stem, []) if e != name]
    close = [e for s in difflib.get_close_matches(stem, list(by_stem), n=3) for e in by_stem[s] if e != name]
    return list(dict.fromkeys(same_stem + close))[:3]


def check_unique_names(specs: list[DatasetSpec], entries: list[dict], yaml_path: Path) -> None:
    """Names key the stats and the manifest; an entry without `name:` is named after its path."""
    names = [s.name for s in specs]
    clash = [i for i, n in enumerate(names) if names.count(n) > 1]
    if not clash:
        return
    first, second = clash[0], names.index(names[clash[0]], clash[0] + 1)
    if all("name" in entries[i] for i in (first, second)):
        raise UsageError(f"{yaml_path}: dataset name '{names[first]}' is used twice; names must be unique")
    raise UsageError(f"{yaml_path}: datasets[{first}] and datasets[{second}] are both named '{names[first]}' "
                     "(an entry without 'name:' is named after its path); give each a distinct 'name:'")


def parse_calibration_block(block, yaml_path: Path) -> dict:
    if not isinstance(block, dict):
        raise UsageError(f"{yaml_path}: 'calibration:' must be a mapping")
    refuse_unknown_keys(f"{yaml_path}: calibration", block, CALIBRATION_DEFAULTS)
    for key, value in block.items():
        where = f"{yaml_path}: calibration.{key}"
        if key != "batch_size":
            _check_type(value, (int, float) if key == "oversample_ratio" else int, where)
        elif value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UsageError(f"{where}: expected 'auto' or a positive integer (as --batch_size), got {value!r}")
    return dict(block)


def validate_calibration_numbers(values: dict) -> None:
    for key in ("max_samples", "max_seq_len", "min_token_length"):
        if values[key] < 1:
            raise UsageError(f"{key} must be >= 1, got {values[key]}")
    if not 1 <= values["oversample_ratio"] < math.inf:  # also refuses NaN
        raise UsageError(f"oversample_ratio must be >= 1 and finite, got {values['oversample_ratio']}")
    if values["seed"] < 0:
        raise UsageError(f"seed must be >= 0, got {values['seed']}")
    if values["min_token_length"] > values["max_seq_len"]:
        raise UsageError(f"min_token_length ({values['min_token_length']}) exceeds max_seq_len "
                         f"({values['max_seq_len']}): every sample would be dropped")


def check_algorithm(algorithm: str, mode: str) -> None:
    """What the algorithm needs, before anything loads: a mode it was verified in, CUDA, Triton."""
    needs = ALGORITHMS[algorithm]
    if mode not in needs.modes:
        offered = [name for name, a in ALGORITHMS.items() if mode in a.modes]
        raise UsageError(f"--algorithm {algorithm} is not available with --{mode}: use --algorithm "
                         f"{' or '.join(offered)}, or the default W4A4 mode")
    if not needs.cuda:
        return
    import torch

    if not torch.cuda.is_available():
        raise UsageError(f"--algorithm {algorithm} needs a CUDA GPU (ModelOpt runs its search on fake-quantized "
                         f"CUDA kernels); on this machine use --algorithm {' or '.join(cpu_algorithms())}")
    if needs.needs_triton and triton is None:
        raise UsageError(f"--algorithm {algorithm} needs Triton (ModelOpt's static FP4 block kernels): "
                         "pip install triton, or use --algorithm max")


def check_effective_bits(bits: float | None, mode: str, algorithm: str, kv_cache: str) -> None:
    """--effective_bits: a budget between all-NVFP4 and all-16-bit, and only with what its formats were checked in."""
    if bits is None:
        return
    low, high = WEIGHT_BITS["NVFP4"], WEIGHT_BITS[None]
    if not low <= bits <= high:  # also refuses NaN
        raise UsageError(f"--effective_bits must be between {low:g} (every linear NVFP4) and {high:g} (none "
                         f"quantized), got {bits}")
    if mode != "nvfp4":
        why = "vLLM does not load W4A8_NVFP4_FP8" if mode == "w4a8" else \
            "FP8 layers need input scales, which weight-only calibration does not measure"
        raise UsageError(f"--effective_bits mixes W4A4 NVFP4, FP8 and 16-bit linears: not with --{mode} ({why})")
    if algorithm not in HESSIAN_ALGORITHMS:
        raise UsageError(f"--effective_bits scores NVFP4 under local_hessian's searched block scales: use --algorithm "
                         f"{' or '.join(HESSIAN_ALGORITHMS)} (the W4A4 default), not {algorithm}")
    if kv_cache == "nvfp4":
        raise UsageError("--effective_bits with --kv_cache nvfp4: vLLM's mixed-precision config was not checked with "
                         "an NVFP4 KV cache; use --kv_cache fp8 or none")


def cpu_algorithms() -> list[str]:
    return [name for name, a in ALGORITHMS.items() if not a.cuda]


def algorithm_help(names: Iterable[str] = tuple(ALGORITHMS)) -> str:
    """--algorithm's help, from the table: each of `names`, what it does, and its needs and defaults."""
    parts = []
    for name, a in ((n, ALGORITHMS[n]) for n in names):
        notes = [f"default for {', '.join(MODES[m][1] if m != 'nvfp4' else 'W4A4' for m in a.default_for)}"] \
            if a.default_for else []
        notes += ["CUDA GPU"] if a.cuda else []
        parts.append(f"{name} ({a.summary}{'; ' if notes else ''}{'; '.join(notes)})")
    return "calibration algorithm: " + "; ".join(parts)


def check_eval_plan(args: argparse.Namespace, calibration: dict) -> None:
    """--eval's held-out samples come from what the oversampled mix leaves after the trim: refuse when none can."""
    if args.max_ppl_increase is not None and not 0 <= args.max_ppl_increase < math.inf:
        raise UsageError(f"--max_ppl_increase must be a finite number >= 0 (percent), got {args.max_ppl_increase}")
    if args.eval_samples < 1:
        raise UsageError(f"--eval_samples must be >= 1, got {args.eval_samples}")
    if not (args.eval or args.max_ppl_increase is not None):
        return
    requested = sum(plan_requests([DatasetSpec("mix", "")], calibration["max_samples"],
                                  calibration["oversample_ratio"]).values())
    if requested <= calibration["max_samples"]:
        raise UsageError(f"--eval: no held-out samples possible: the mix loads {requested} samples and calibration "
                         f"takes {calibration['max_samples']}; raise --oversample_ratio (e.g. 1.5) or lower "
                         "--max_samples")


def parse_auto_or_count(text: str) -> int | str:
    """An argparse type for 'auto' or a positive integer (--batch_size; the offload script's --checkpoint_every)."""
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a positive integer, got {text!r}")
    return int(text)


def build_settings(args: argparse.Namespace, env: dict[str, str]) -> Settings:
    """One place where CLI > environment/.env > YAML > defaults are merged and checked."""
    input_model = args.input_model or env.get("INPUT_MODEL")
    output_model = args.output_model or env.get("OUTPUT_MODEL")
    if not input_model:
        raise UsageError("no input model: pass --input_model (local dir or hub ID) or set INPUT_MODEL")
    if not output_model and not args.dry_run:
        raise UsageError("no output dir: pass --output_model or set OUTPUT_MODEL")
    if not args.dataset_yaml:
        raise UsageError("no calibration mix: pass --dataset_yaml (see Datasets/*.yaml)")
    specs, yaml_calibration = load_mix(Path(args.dataset_yaml))
    calibration = {**CALIBRATION_DEFAULTS, **yaml_calibration}
    calibration.update({k: getattr(args, k) for k in CALIBRATION_DEFAULTS if getattr(args, k, None) is not None})
    validate_calibration_numbers(calibration)
    batch_size = calibration.pop("batch_size")  # "auto" or N; Settings holds None for auto
    if args.gpu_memory_budget is not None and not 0 < args.gpu_memory_budget < math.inf:
        raise UsageError(f"--gpu_memory_budget must be a finite number > 0 (GiB), got {args.gpu_memory_budget}")
    check_eval_plan(args, calibration)
    mode = "w4a8" if args.w4a8 else "weight_only" if args.weight_only else "nvfp4"
    algorithm = args.algorithm or DEFAULT_ALGORITHMS[mode]
    check_algorithm(algorithm, mode)
    check_effective_bits(args.effective_bits, mode, algorithm, args.kv_cache)
    return Settings(
        input_model=input_model,
        output_model=Path(output_model).expanduser().resolve() if output_model else None,
        dataset_yaml=Path(args.dataset_yaml), datasets=specs, **calibration,
        batch_size=None if batch_size == "auto" else batch_size,
        gpu_memory_budget=args.gpu_memory_budget, dtype=args.dtype,
        trust_remote_code=args.trust_remote_code, mode=mode, skip_layers=list(args.skip_layers or []),
        overwrite=args.overwrite, dry_run=args.dry_run, kv_cache=args.kv_cache, algorithm=algorithm,
        moe_calibration=args.moe_calibration, eval=args.eval or args.max_ppl_increase is not None,
        eval_samples=args.eval_samples, max_ppl_increase=args.max_ppl_increase, effective_bits=args.effective_bits,
        hf_token=env.get("HF_TOKEN") or None,
    )


# --------------------------------------------------------------------------- pre-load checks
TEXT_DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".txt")


def check_data_file(path: Path, spec: DatasetSpec) -> None:
    """A local data file must be readable and hold something; a text format (JSON, CSV, text) must be UTF-8 all
    through, which takes one pass over it, 1 MiB at a time. Binary formats are read by their own libraries."""

    where = f"dataset '{spec.name}': {path}"
    decoder = codecs.getincrementaldecoder("utf-8")() if path.suffix.lower() in TEXT_DATA_SUFFIXES else None
    content, offset = False, 0
    try:
        with path.open("rb") as handle:
            while chunk := handle.read(2**20):
                content = content or bool(chunk.strip())
                if decoder is None:
                    break  # a binary format: readable and not empty is all we can tell
                decoder.decode(chunk)
                offset += len(chunk)
            if decoder:
                decoder.decode(b"", final=True)
    except OSError as exc:
        raise UsageError(f"{where}: cannot be read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"{where}: not UTF-8 text ({exc.reason} near byte {offset + exc.start}); "
                         "save it as UTF-8 or convert it to parquet") from None
    if not content:
        raise UsageError(f"{where}: the file is empty")


HUB_PROBE_TIMEOUT_S = 3.0  # the hub libraries retry an unreachable hub for ~25 s before they say so
TRUE_VALUES = ("1", "ON", "YES", "TRUE")  # what huggingface_hub reads as set in HF_HUB_OFFLINE


def hub_offline(*variables: str) -> bool:
    return any(os.environ.get(v, "").upper() in TRUE_VALUES for v in ("HF_HUB_OFFLINE",) + variables)


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT") or "https://huggingface.co"


@functools.cache
def hub_unreachable(endpoint: str) -> str | None:
    """Why the hub cannot be reached, or None: one HEAD request (through any proxy set), once per process. It runs
    in a thread we stop waiting for, as a stalled DNS lookup ignores socket timeouts."""

    outcome: list[str | None] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=HUB_PROBE_TIMEOUT_S)
            outcome.append(None)
        except urllib.error.HTTPError as exc:  # an answer; a proxy that could not get one says 407 or 5xx
            outcome.append(f"HTTP {exc.code} {exc.reason}" if exc.code == 407 or exc.code >= 500 else None)
        except urllib.error.URLError as exc:
            reason = exc.reason
            outcome.append(getattr(reason, "strerror", None) or str(reason))
        except OSError as exc:
            outcome.append(exc.strerror or str(exc) or type(exc).__name__)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(HUB_PROBE_TIMEOUT_S + 0.5)
    return outcome[0] if outcome else f"no answer within {HUB_PROBE_TIMEOUT_S:.0f} s"


def check_hub_source(kind: str, repo_id: str, cache: Path | None, cache_root: Path, offline: bool) -> None:
    """A hub model or dataset (`cache`: its copy under `cache_root`, None when not there) is reachable, or offline
    cached: said in seconds, before the hub libraries retry."""
    if offline:
        if cache is None:
            raise UsageError(f"{kind} '{repo_id}' is not in the local Hugging Face cache ({cache_root}) and "
                             f"HF_HUB_OFFLINE is set: unset it to download the {kind}, or pass a local path")
        return
    reason = hub_unreachable(hub_endpoint())
    if reason is None:
        return
    unreachable = f"cannot reach the Hugging Face hub ({hub_endpoint()}: {reason}) to fetch {kind} '{repo_id}'"
    if cache is not None:
        raise UsageError(f"{unreachable}; it is in the local cache ({cache}): set HF_HUB_OFFLINE=1 to use that copy")
    raise UsageError(f"{unreachable}: check the network or proxy; for a gated or private repo set HF_TOKEN; offline, "
                     f"set HF_HUB_OFFLINE=1 with the {kind} in the local cache (HF_HOME)")


def check_hub_dataset(spec: DatasetSpec) -> None:
    if Path(spec.path).expanduser().exists() or spec.path in LOCAL_DATA_BUILDERS.values():  # a builder + data_files
        return
    import datasets

    check_hub_source("dataset", spec.path, cached_dataset(spec.path), Path(datasets.config.HF_DATASETS_CACHE),
                     hub_offline("HF_DATASETS_OFFLINE"))


def check_dataset_source(spec: DatasetSpec) -> None:
    """Fail before anything loads when a local-looking dataset path is missing, or a hub one out of reach."""
    path = Path(spec.path).expanduser()
    if looks_local(spec.path, [Path.cwd()]) and not path.exists():
        raise UsageError(f"dataset '{spec.name}': path not found: {spec.path} "
                         "(relative paths are resolved against the YAML file's folder)")
    check_hub_dataset(spec)


def check_hub_model(repo_id: str) -> None:
    from huggingface_hub import constants, try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except ValueError as exc:  # huggingface_hub's HFValidationError: not a hub ID either
        raise UsageError(f"model not found: {repo_id} is neither a local folder nor a hub ID ({exc})") from None
    cached = Path(found).parent if isinstance(found, str) else None
    check_hub_source("model", repo_id, cached, Path(constants.HF_HUB_CACHE), hub_offline())


def safetensors_problems(path: Path) -> list[str]:
    """A safetensors file's header parses and its data ends exactly where the file does (no truncation)."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 2 <= length <= size - 8:
            return [f"{path.name}: not a safetensors file, or cut off in its header ({size} bytes)"]
        try:
            header = json.loads(handle.read(length))
            ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
        except (ValueError, TypeError, KeyError, IndexError):
            return [f"{path.name}: corrupt safetensors header"]
    data = size - 8 - length
    if ends and max(ends) != data:
        how = "truncated" if max(ends) > data else "has trailing bytes"
        return [f"{path.name}: {how}: its header describes {max(ends)} bytes of tensor data, the file holds {data}"]
    return []


def check_source_files(folder: Path) -> list[str]:
    """Problems with a checkpoint's weight files, from their headers, sizes and index: no tensor is read."""
    weights = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("pytorch_model*.bin"))
    if not weights:
        return [f"{folder}: no weight files (*.safetensors or pytorch_model*.bin) beside config.json"]
    problems = []
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if not index.is_file():
            continue
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError):
            problems.append(f"{index_name}: unreadable or without a weight_map")
            continue
        problems += [f"{shard}: listed in {index_name} but missing" for shard in sorted(shards)
                     if not (folder / shard).is_file()]
    for path in weights:
        if path.suffix == ".safetensors":
            problems += safetensors_problems(path)
    return problems


def check_source_model(settings: Settings) -> None:
    """A local source model's weight files are whole, before anything loads (hub files are checked on download)."""
    folder = Path(settings.input_model).expanduser()
    if not folder.is_dir():
        return
    problems = check_source_files(folder)
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise UsageError(f"source model {folder}: {problems[0]}{more}; re-download or re-save the model")


def check_tokenizer_fits(tokenizer, skeleton) -> None:
    """Token ids past the embedding table would fail only inside the first forward, after loading."""
    rows = skeleton.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise UsageError(f"the tokenizer has {len(tokenizer)} ids but the model's embedding table has {rows} rows: "
                         "the tokenizer does not belong to this model")


def check_something_to_quantize(skeleton, unquantized: list[str]) -> None:
    """--skip_layers patterns that cover every linear would leave ModelOpt nothing to do (it raises after loading)."""
    import torch

    left = [n for n, m in skeleton.named_modules()
            if (isinstance(m, torch.nn.Linear) or is_fused_experts(m)) and not kept_in_16_bits(n, unquantized)]
    if not left:
        raise UsageError("--skip_layers leaves no linear layer to quantize; narrow the patterns "
                         "(e.g. 'layers.0.*' or 'down_proj')")


def protected_paths(settings: Settings) -> dict[str, Path]:
    """What an output dir must never be or contain: the source model, the working dir, this tool, its data."""
    paths = {"working directory": Path.cwd().resolve(), "folder of this script": SCRIPT_DIR,
             "dataset YAML": settings.dataset_yaml.expanduser().resolve()}
    model = Path(settings.input_model).expanduser()
    if model.is_dir():
        paths["input model"] = model.resolve()
    for spec in settings.datasets:
        if Path(spec.path).expanduser().exists():
            paths[f"dataset '{spec.name}'"] = Path(spec.path).expanduser().resolve()
    return paths


def check_no_overlap(target: Path, flag: str, protected: dict[str, Path], inside_too: Iterable[str]) -> None:
    """`target` is not, and does not contain, any protected path; nor does it lie inside those named in `inside_too`."""
    for what, path in protected.items():
        if target == path or target in path.parents:
            relation = "is" if target == path else "contains"
            raise UsageError(f"{flag} {target} {relation} the {what} {path}: refused, with or without --overwrite; "
                             "choose another dir")
        if what in inside_too and path in target.parents:
            raise UsageError(f"{flag} {target} lies inside the {what} {path}: refused; choose a dir outside it")


def leftover_pattern(output: Path, kind: str) -> re.Pattern:
    """Names export_checkpoint gives its temp dir (tmp) and move_into_place an old checkpoint (old)."""
    suffix = r"[a-z0-9_]{8}" if kind == "tmp" else r"\d+"
    return re.compile(rf"\.{re.escape(output.name)}\.{kind}-{suffix}")


def recover_leftovers(output: Path) -> None:
    """What a killed run left beside `output`, found under the output's lock: unfinished exports are removed; a
    checkpoint --overwrite had moved aside comes back when the output is missing or empty, and is removed once a
    finished checkpoint has replaced it."""
    if not output.parent.is_dir() or not on_main_rank():
        return
    siblings = [p for p in output.parent.iterdir() if p.is_dir() and not p.is_symlink()]
    for path in sorted(p for p in siblings if leftover_pattern(output, "tmp").fullmatch(p.name)):
        shutil.rmtree(path)
        log(f"removed {path}: the unfinished export of a run that was killed")
    olds = sorted((p for p in siblings if leftover_pattern(output, "old").fullmatch(p.name)),
                  key=lambda p: p.stat().st_mtime, reverse=True)
    restorable = [p for p in olds if (p / MANIFEST_NAME).is_file()]
    if restorable and (not output.exists() or output.is_dir() and not any(output.iterdir())):
        if output.exists():
            output.rmdir()
        restorable[0].rename(output)
        olds.remove(restorable[0])
        warn(f"restored {output} from {restorable[0].name}: a run with --overwrite was killed while replacing it")
    for path in olds if (output / MANIFEST_NAME).is_file() else ():
        shutil.rmtree(path)
        log(f"removed {path}: the checkpoint a killed --overwrite run had already replaced")


def check_output_dir(output: Path, overwrite: bool, protected: dict[str, Path] | None = None,
                     dry_run: bool = False) -> None:
    """Where the checkpoint may go. A dry run reads only: what a killed run left beside the output is recovered
    by the real run, under its lock."""
    check_no_overlap(output, "--output_model", protected or {}, inside_too=("input model",))
    if not dry_run:
        recover_leftovers(output)
    if output.exists() and not output.is_dir():
        raise UsageError(f"output path exists and is not a directory: {output}; choose another --output_model")
    if output.is_dir() and any(output.iterdir()) and not (output / MANIFEST_NAME).is_file():
        raise UsageError(f"output dir {output} holds files this tool did not write (no {MANIFEST_NAME}): refused, "
                         "with or without --overwrite; choose a new or empty dir")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise UsageError(f"output dir {output} holds a checkpoint this tool wrote: pass --overwrite to replace it, "
                         "or choose another dir")
    parent = output.parent
    if not parent.is_dir():
        raise UsageError(f"output's parent folder does not exist: {parent}")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"output's parent folder is not writable: {parent}")


def estimate_checkpoint_bytes(model, quantized: set[str]) -> int:
    """FP4 weights + FP8 scales (1/16 byte per weight) for quantized linears; 2 bytes otherwise. A tied weight (an
    lm_head sharing the input embeddings) is written once, so it counts once."""
    total = 0
    for name, param in model.named_parameters():  # each tensor once, under its first name
        module, _, kind = name.rpartition(".")
        total += param.numel() * (0.5625 if module in quantized and kind == "weight" else 2)
    return int(total)


def check_free_disk(folder: Path, needed_bytes: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed_bytes:
        raise UsageError(f"not enough free disk in {folder}: {human_bytes(free)} free, about "
                         f"{human_bytes(needed_bytes)} needed for the checkpoint; free space or choose "
                         "another --output_model")


def lock_file(target: Path, flag: str) -> Path:
    """Where the lock of `target` lives: beside it, so that its parent must exist."""
    if not target.parent.is_dir():
        raise UsageError(f"{flag}'s parent folder does not exist: {target.parent}")
    return target.parent / f".{target.name}.lock"


def lock_in_use(target: Path, flag: str, lock_path: Path) -> UsageError:
    return UsageError(f"{flag} {target} is in use by another run (it holds {lock_path}); wait for it to finish or "
                      "choose another dir")


@contextlib.contextmanager
def exclusive_lock(target: Path, flag: str):
    """An exclusive lock on `.{name}.lock` beside `target` while the block runs; a second run on it refuses."""

    lock_path = lock_file(target, flag)
    try:
        handle = lock_path.open("a")
    except OSError as exc:
        raise UsageError(f"{flag}: cannot create the lock file {lock_path}: {exc.strerror}") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.stat(lock_path).st_ino != os.fstat(handle.fileno()).st_ino:
                raise BlockingIOError  # the run that held it removed it meanwhile, and another may have a new one
        except (BlockingIOError, FileNotFoundError):
            raise lock_in_use(target, flag, lock_path) from None
        try:
            yield
        finally:
            lock_path.unlink(missing_ok=True)


def check_lock_free(target: Path, flag: str) -> None:
    """What exclusive_lock would refuse, without creating or taking the lock (a dry run writes nothing)."""

    lock_path = lock_file(target, flag)
    try:
        handle = lock_path.open("r")
    except OSError:  # no lock file, or one we cannot read: no run holds it that exclusive_lock would not report
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise lock_in_use(target, flag, lock_path) from None


def holding_output_lock(run_job: Callable) -> Callable:
    """Runs `run_job(settings, ...)` holding the output's lock; rank 0 only (the others never write). A dry run
    checks that the lock is free and takes nothing."""
    @functools.wraps(run_job)
    def locked(settings: Settings, *rest):
        if settings.output_model is None or not on_main_rank():
            return run_job(settings, *rest)
        if settings.dry_run:
            check_lock_free(settings.output_model, "--output_model")
            return run_job(settings, *rest)
        with exclusive_lock(settings.output_model, "--output_model"):
            return run_job(settings, *rest)
    return locked


def check_algorithm_fits(skeleton, algorithm: str) -> None:
    """Refuse, before loading, a model the chosen algorithm cannot produce a loadable, calibrated checkpoint for."""
    if algorithm == "awq_lite":
        check_awq_foldable(skeleton)
    if algorithm == "gptq" and moe_blocks(skeleton):
        raise UsageError("--algorithm gptq: mixture-of-experts models are not supported (ModelOpt 0.47 updates "
                         "linear layers only and calls GPTQ on experts open research); use --algorithm mse or max")


def check_mixed_precision_fits(skeleton, effective_bits: float | None) -> None:
    """--effective_bits scores and switches dense linears; a mixture-of-experts block's experts would need one
    format for the whole block (vLLM runs them as one fused layer), which is not written yet."""
    if effective_bits is not None and moe_blocks(skeleton):
        raise UsageError("--effective_bits: mixture-of-experts models are not supported yet (a block's experts must "
                         "share one format); quantize this model without --effective_bits")


def check_awq_foldable(skeleton) -> None:
    """awq_lite's checkpoint loads only when every input scale folds into the layer before it: ModelOpt
    folds o_proj's and down_proj's only in the attention and MLP classes it lists. Refuse others before loading.
    """
    from modelopt.torch.export.quant_utils import PQS_FUSE_MODULE_MAPPING

    if moe_blocks(skeleton):
        raise UsageError("--algorithm awq_lite: mixture-of-experts models are not supported (expert scales do not "
                         "fold into a loadable NVFP4 checkpoint); use --algorithm awq_clip, mse or max")
    known = [c for classes, _ in PQS_FUSE_MODULE_MAPPING for c in classes]
    for _, module in skeleton.named_modules():
        children = {n for n, _ in module.named_children()}
        pairs = [pair for _, pair in PQS_FUSE_MODULE_MAPPING if set(pair) <= children]
        if pairs and not any(c in type(module).__name__ for c in known):
            raise UsageError(f"--algorithm awq_lite: ModelOpt cannot fold the {pairs[0][1]} scales of "
                             f"{type(module).__name__} (it folds them for {', '.join(known)}), so the checkpoint "
                             "would not load in vLLM or TensorRT-LLM; use --algorithm awq_clip, mse or max")


def gpu_placement(settings: Settings, job: Job, distributed: bool) -> str | None:
    """None (one GPU, or the CPU) or 'balanced' across GPUs; refuses, before loading, a model too big for them.

    A data-parallel rank has its own GPU only, so its model must fit that one.
    """
    import torch

    count = torch.cuda.device_count()
    if count == 0:
        return None
    gpus = [torch.cuda.current_device()] if distributed else list(range(count))
    budgets = [int(settings.gpu_memory_budget * 2**30) if settings.gpu_memory_budget
               else int(torch.cuda.get_device_properties(i).total_memory * AUTO_BUDGET_FRACTION) for i in gpus]
    weight_bytes = parameter_bytes(job.skeleton, resolve_dtype(settings.dtype, job.config))
    if placement_for(weight_bytes, budgets) == "single":
        return None
    log(f"the weights ({human_bytes(weight_bytes)}) exceed one GPU's budget ({human_bytes(budgets[0])}): placing "
        f"them across {len(budgets)} GPUs with a balanced device map (for speed, use one process per GPU instead)")
    return "balanced"


# --------------------------------------------------------------------------- formatters
def _text(value) -> str | None:
    """A usable string field, or None for missing, None, non-string or blank values."""
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def _first_present(row: dict, candidates: Iterable[str]) -> str | None:
    return next((c for c in candidates if _text(row.get(c)) is not None), None)


def format_raw_text(row: dict, columns: dict) -> str | None:
    wanted = columns.get("text")  # a column name, or candidate names from the list form of `columns:`
    column = _first_present(row, [wanted] if isinstance(wanted, str) else wanted or TEXT_COLUMNS)
    if column is None and not wanted:  # fall back to the first non-empty string column
        column = next((k for k, v in row.items() if _text(v) is not None), None)
    return _text(row.get(column)) if column else None


def format_prompt_answer(row: dict, columns: dict) -> list[dict] | None:
    if "prompt" in columns or "answer" in columns:
        pair = (columns.get("prompt", "prompt"), columns.get("answer", "response"))
    else:
        pair = next((p for p in PROMPT_ANSWER_PAIRS if all(_text(row.get(c)) for c in p)), None)
    if pair is None:
        return None
    prompt, answer = _text(row.get(pair[0])), _text(row.get(pair[1]))
    if prompt is None or answer is None:
        return None
    extra_input = _text(row.get(columns.get("input", "input"))) if pair[0] != "input" else None
    if extra_input:
        prompt = f"{prompt}\n\n{extra_input}"
    system = _text(row.get(columns["system"])) if "system" in columns else \
        _text(row.get(_first_present(row, SYSTEM_COLUMNS) or ""))
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def _turn(turn) -> dict | None:
    if not isinstance(turn, dict):
        return None
    # `or`, not a default: datasets merges both key styles into one schema, filling the absent one with None
    role = turn.get("from") or turn.get("role")
    content = turn.get("value") or turn.get("content")
    role = ROLE_ALIASES.get(role.strip().lower()) if isinstance(role, str) else None
    content = _message_text(content)
    return {"role": role, "content": content} if role and content else None


def _message_text(content) -> str | None:
    """A message content: a string, or a list of parts of which the text parts are kept."""
    if isinstance(content, list):
        parts = [_text(p.get("text")) for p in content if isinstance(p, dict) and p.get("type", "text") == "text"]
        content = "\n".join(p for p in parts if p)
    return _text(content)


def _conversation(row: dict, column: str | None) -> list[dict] | None:
    column = column or next((c for c in CONVERSATION_COLUMNS if isinstance(row.get(c), list)), None)
    turns = row.get(column) if column else None
    if not isinstance(turns, list):
        return None
    messages = [m for m in (_turn(t) for t in turns) if m]
    return messages if any(m["role"] != "system" for m in messages) else None


def format_sharegpt(row: dict, columns: dict) -> list[dict] | None:
    return _conversation(row, columns.get("conversations"))


def format_chat_completion(row: dict, columns: dict) -> list[dict] | None:
    return _conversation(row, columns.get("messages", "messages"))


FORMATTERS: dict[str, Callable[[dict, dict], str | list[dict] | None]] = {
    "raw_text": format_raw_text,
    "prompt_answer": format_prompt_answer,
    "sharegpt": format_sharegpt,
    "chat_completion": format_chat_completion,
}


class ChatTemplateFailed(Exception):
    """The model's chat template raised on a conversation: the sample is skipped, counted and reported."""


def render_conversation(messages: list[dict], tokenizer=None) -> tuple[str, bool] | None:
    """Text for a conversation and whether it came from the chat template (which adds its own BOS)."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False), True
        except Exception as exc:  # the template is the model's code: a rejected system turn, 1/0, a syntax error
            raise ChatTemplateFailed(f"{type(exc).__name__}: {exc}") from exc
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages), False


def format_sample(spec: DatasetSpec, row: dict, tokenizer=None) -> tuple[str, bool] | None:
    columns = dict(spec.columns or {})
    if spec.text_column:
        columns["text"] = spec.text_column
    formatted = FORMATTERS[spec.formatter](row, columns)
    if formatted is None:
        return None
    if isinstance(formatted, str):
        return formatted, False
    return render_conversation(formatted, tokenizer)


def configured_columns(spec: DatasetSpec) -> dict[str, list[str]]:
    """The columns a YAML entry names, by the field that names them; any one of a field's list will do."""
    named = {f"columns.{key}": value for key, value in (spec.columns or {}).items()}
    if spec.text_column:
        named = {"text_column": spec.text_column}
    return {field: value if isinstance(value, list) else [value] for field, value in named.items()}


def formatter_needs(spec: DatasetSpec) -> str:
    """What a row must hold for the entry's formatter to make a sample of it, for the error when none does."""
    columns = {key: " or ".join(map(repr, names)) for key, names in configured_columns(spec).items()}
    text = columns.get("text_column") or columns.get("columns.text")
    conversation = columns.get("columns.conversations") or columns.get("columns.messages")
    if spec.formatter == "raw_text":
        return f"a non-empty string in {text}" if text else "a non-empty string column"
    if spec.formatter == "prompt_answer":
        if "columns.prompt" in columns or "columns.answer" in columns:  # the other defaults as in the formatter
            return (f"non-empty strings in {columns.get('columns.prompt', repr('prompt'))} and "
                    f"{columns.get('columns.answer', repr('response'))}")
        return f"a non-empty pair of {', '.join('/'.join(pair) for pair in PROMPT_ANSWER_PAIRS)}"
    where = conversation or ("'messages'" if spec.formatter == "chat_completion" else
                             " or ".join(map(repr, CONVERSATION_COLUMNS)))
    return f"a list of turns (role/content or from/value, a user or assistant turn among them) in {where}"


# --------------------------------------------------------------------------- calibration data
def split_requests(weights: list[float], total: int) -> list[int]:
    """Split `total` across weights by largest remainder: the parts sum to exactly `total`."""
    norm = sum(weights)
    exact = [total * w / norm for w in weights]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def plan_requests(specs: list[DatasetSpec], max_samples: int, oversample_ratio: float) -> dict[str, int]:
    total = math.ceil(max_samples * oversample_ratio)
    return dict(zip((s.name for s in specs), split_requests([s.weight for s in specs], total)))


def _local_data_files(path: Path, spec: DatasetSpec) -> tuple[str, list[str]]:
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in LOCAL_DATA_BUILDERS)
    builders = {LOCAL_DATA_BUILDERS.get(p.suffix.lower()) for p in files}
    if not files or None in builders:
        raise UsageError(f"dataset '{spec.name}': {path} has no supported data files "
                         f"({', '.join(LOCAL_DATA_BUILDERS)})")
    if len(builders) > 1:
        raise UsageError(f"dataset '{spec.name}': {path} mixes file types {sorted(builders)}; keep one type per entry")
    return builders.pop(), [str(p) for p in files]


def dataset_load_errors() -> tuple:
    """What datasets raises for a file it cannot parse: its own errors; pyarrow's, pandas' and decoding ones are
    ValueErrors; a missing, unreadable or unreachable file an OSError."""
    import datasets

    return datasets.exceptions.DatasetsError, ValueError, OSError


def read_rows(spec: DatasetSpec, dataset) -> Iterable[dict]:
    """The dataset's rows; a streaming dataset parses its files as it is read, so its errors surface here."""
    rows = iter(dataset)
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except dataset_load_errors() as exc:
            raise dataset_error(spec, exc) from None
        yield row


def dataset_error(spec: DatasetSpec, exc: BaseException) -> UsageError:
    """One line for a dataset that failed to load: the innermost cause says what (parse error, clashing schema)."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    text = " ".join(str(exc).split()) or type(exc).__name__
    return UsageError(f"dataset '{spec.name}' ({spec.path}): cannot be loaded: {text[:300]}")


def cached_dataset(repo_id: str) -> Path | None:
    """Where datasets keeps a hub dataset it prepared once (what it reads offline), or None."""
    import datasets
    from datasets.naming import camelcase_to_snakecase

    *namespace, name = repo_id.split("/")
    root = Path(datasets.config.HF_DATASETS_CACHE).expanduser() / "___".join(namespace + [camelcase_to_snakecase(name)])
    return root if any(p.is_dir() for p in root.glob("*/*/*")) else None


def open_dataset(spec: DatasetSpec, token: str | None):
    """A datasets.Dataset or IterableDataset for one YAML entry: hub ID, save_to_disk folder, or files."""
    import datasets

    path = Path(spec.path).expanduser()
    if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if spec.split not in loaded:
                raise UsageError(f"dataset '{spec.name}': split '{spec.split}' not in {path} "
                                 f"(has: {', '.join(loaded)})")
            loaded = loaded[spec.split]
        return loaded.to_iterable_dataset() if spec.streaming else loaded
    if path.exists():
        builder, files = _local_data_files(path, spec)
        for file in files:
            check_data_file(Path(file), spec)
        return datasets.load_dataset(builder, data_files={spec.split: files}, split=spec.split,
                                     streaming=spec.streaming)
    check_hub_dataset(spec)
    return datasets.load_dataset(spec.path, name=spec.subset, split=spec.split, data_files=spec.data_files,
                                 streaming=spec.streaming, token=token)


def dataset_columns(spec: DatasetSpec, dataset, peek: int = 20) -> list[str]:
    """The dataset's column names: from its features, or (a stream of JSON, say) from its first rows."""

    names = getattr(dataset, "column_names", None)
    if names:
        return list(names)
    seen: dict[str, None] = {}
    for row in itertools.islice(read_rows(spec, dataset), peek):
        seen.update(dict.fromkeys(row))
    return list(seen)


def check_columns(spec: DatasetSpec, columns: list[str], where: str) -> None:
    """A column the YAML names that the dataset lacks would silently drop the dataset from the mix: refuse it."""
    for field, names in configured_columns(spec).items():
        if not set(names) & set(columns):
            wanted = " or ".join(repr(n) for n in names)
            raise UsageError(f"{where}: '{field}' names column {wanted}, which the dataset does not have; its "
                             f"columns: {', '.join(columns) or 'none'}; fix '{field}' in the YAML")


def check_contributes(spec: DatasetSpec, where: str, columns: list[str], counts: dict, min_tokens: int) -> None:
    """A dataset that yields no sample changes the mix the user asked for: refuse it, saying why."""
    read, skipped, short = counts["rows_read"], counts["skipped_rows"], counts["too_short"]
    if read - skipped - short > 0:
        return
    if read == 0:
        why = f"split '{spec.split}' has no rows"
    elif skipped == read:
        why = f"none of its {read} rows read has {formatter_needs(spec)} (formatter {spec.formatter})"
    else:
        why = (f"of {read} rows read, {skipped} lack {formatter_needs(spec)} and the other {short} are shorter "
               f"than min_token_length ({min_tokens} tokens)")
    raise UsageError(f"{where}: contributes no calibration sample: {why}; its columns: "
                     f"{', '.join(columns) or 'none'}; fix the entry or remove it from the mix")


def collect_texts(spec: DatasetSpec, dataset, wanted: int, seed: int, tokenizer=None) -> tuple[list, int]:
    """Up to `wanted` formatted texts from a shuffled dataset; returns (texts, rows skipped)."""
    import datasets

    if isinstance(dataset, datasets.IterableDataset):
        dataset = dataset.shuffle(seed=seed, buffer_size=10_000)
    else:
        dataset = dataset.shuffle(seed=seed)
    texts, skipped, template_failures = [], 0, []
    with Progress(total=wanted, desc=f"format {spec.name}", unit="sample") as bar:
        for row in read_rows(spec, dataset):
            if len(texts) >= wanted:
                break
            try:
                sample = format_sample(spec, row, tokenizer)
            except ChatTemplateFailed as exc:
                sample = None
                template_failures.append(str(exc))
            if sample is None:
                skipped += 1
                continue
            texts.append(sample)
            bar.update(1)
    if template_failures:
        warn(f"dataset '{spec.name}': the model's chat template failed on {len(template_failures)} conversation(s), "
             f"skipped (first: {template_failures[0].splitlines()[0]})")
    return texts, skipped


def tokenize_texts(texts: list[tuple[str, bool]], tokenizer, max_seq_len: int) -> list[list[int]]:
    """Token ids per text; chat-templated texts already carry their special tokens."""
    out: list[list[int]] = []
    for templated in (False, True):
        group = [i for i, (_, t) in enumerate(texts) if t == templated]
        if not group:
            continue
        encoded = tokenizer([texts[i][0] for i in group], truncation=True, max_length=max_seq_len,
                            add_special_tokens=not templated)["input_ids"]
        out.extend(zip(group, encoded))
    return [ids for _, ids in sorted(out, key=lambda pair: pair[0])]


def shuffled_pool(tokenized: dict[str, list[list[int]]], min_tokens: int, seed: int) -> list[tuple[str, list[int]]]:
    """Every sample long enough, as (dataset, ids), shuffled with the seed."""
    pool = [(name, ids) for name, seqs in tokenized.items() for ids in seqs if len(ids) >= min_tokens]
    random.Random(seed).shuffle(pool)
    return pool


def select_samples(tokenized: dict[str, list[list[int]]], min_tokens: int, max_samples: int,
                   seed: int) -> tuple[list[list[int]], dict[str, int]]:
    """Drop short samples, shuffle all with the seed, trim to max_samples; returns samples and kept per dataset."""
    pool = shuffled_pool(tokenized, min_tokens, seed)[:max_samples]
    kept = {name: 0 for name in tokenized}
    for name, _ in pool:
        kept[name] += 1
    return [ids for _, ids in pool], kept


def holdout_samples(tokenized: dict[str, list[list[int]]], min_tokens: int, max_samples: int, seed: int,
                    count: int) -> list[tuple[str, list[int]]]:
    """Samples the trim left out, as (dataset, ids): disjoint from calibration, which stays exactly as without
    them."""
    return shuffled_pool(tokenized, min_tokens, seed)[max_samples: max_samples + count]


def calibration_stats(settings: Settings, requests: dict, loaded: dict, skipped: dict, too_short: dict, kept: dict,
                      samples: list[list[int]], holdout: list[tuple[str, list[int]]]) -> dict:
    """The manifest's record of the data: per dataset, rows requested, loaded (the formatter's skips not counted),
    skipped by the formatter, too short, kept for calibration, held out for --eval, and unused (long enough, but
    beyond --max_samples: the oversampling's surplus)."""
    lengths = [len(s) for s in samples] or [0]
    held = Counter(name for name, _ in holdout)
    return {
        "target_samples": settings.max_samples,
        "requested_samples": sum(requests.values()),
        "kept_samples": len(samples),
        "per_dataset": [{"name": n, "requested": requests[n], "loaded": loaded[n], "skipped_rows": skipped[n],
                         "too_short": too_short[n],
                         "kept": kept[n], "held_out": held[n],
                         "unused": loaded[n] - too_short[n] - kept[n] - held[n]} for n in requests],
        "tokens": {"total": sum(lengths), "min": min(lengths), "mean": round(sum(lengths) / len(lengths), 1),
                   "max": max(lengths)},
    }


def prepare_calibration_data(settings: Settings, tokenizer) -> tuple[list[list[int]], dict, list[list[int]]]:
    """YAML plan -> texts -> tokens -> calibration samples, stats for the manifest, and held-out samples."""
    stage(STAGE_DATA)
    requests = plan_requests(settings.datasets, settings.max_samples, settings.oversample_ratio)
    texts, skipped, tokenized, too_short = {}, {}, {}, {}
    for index, spec in enumerate(settings.datasets):
        where = f"{settings.dataset_yaml}: datasets[{index}] ({spec.name})"
        try:
            dataset = open_dataset(spec, settings.hf_token)
        except dataset_load_errors() as exc:
            raise dataset_error(spec, exc) from None
        columns = dataset_columns(spec, dataset)
        check_columns(spec, columns, where)
        texts[spec.name], skipped[spec.name] = collect_texts(spec, dataset, requests[spec.name],
                                                            settings.seed, tokenizer)
        tokenized[spec.name] = tokenize_texts(texts[spec.name], tokenizer, settings.max_seq_len)
        too_short[spec.name] = sum(len(ids) < settings.min_token_length for ids in tokenized[spec.name])
        counts = {"rows_read": len(texts[spec.name]) + skipped[spec.name], "skipped_rows": skipped[spec.name],
                  "too_short": too_short[spec.name]}
        check_contributes(spec, where, columns, counts, settings.min_token_length)
    samples, kept = select_samples(tokenized, settings.min_token_length, settings.max_samples, settings.seed)
    held = holdout_samples(tokenized, settings.min_token_length, settings.max_samples, settings.seed,
                           settings.eval_samples) if settings.eval else []
    holdout = [ids for _, ids in held]
    if settings.eval and 0 < len(holdout) < settings.eval_samples:
        warn(f"--eval: {len(holdout)} held-out samples left after calibration took {len(samples)}, fewer than "
             f"--eval_samples {settings.eval_samples}; raise --oversample_ratio for more")
    loaded = {name: len(t) for name, t in texts.items()}
    stats = calibration_stats(settings, requests, loaded, skipped, too_short, kept, samples, held)
    if settings.eval and not holdout:
        raise UsageError(f"--eval: no held-out samples left: all {len(samples)} usable samples went to calibration; "
                         "raise --oversample_ratio or lower --max_samples")
    if len(samples) < settings.max_samples:
        counts = ", ".join(f"{d['name']}: requested {d['requested']}, loaded {d['loaded']}, kept {d['kept']}"
                           for d in stats["per_dataset"])
        warn(f"only {len(samples)} of {settings.max_samples} calibration samples available ({counts}); going on")
    return samples, stats, holdout


# --------------------------------------------------------------------------- batching
def group_batches(lengths: list[int], batch_size: int | None, max_batch_tokens: int) -> list[list[int]]:
    """Sample indices sorted longest first, grouped by a sample count or by a padded-token budget.

    Under a token budget the sorted list is cut where it costs least: each batch costs its padded
    tokens plus a fixed per-forward overhead (which also covers a new shape's first-run set-up, measured
    at about 900 tokens on an H100), and an exact search (O(samples x batch size)) picks the cuts.
    Greedy filling pads short samples up to long ones; this keeps padding to a few percent.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    if batch_size:
        return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    sorted_lengths = [lengths[i] for i in order]
    best, cut = [0.0] + [math.inf] * len(order), [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        for start in range(end - 1, -1, -1):
            padded = (end - start) * sorted_lengths[start]
            if padded > max_batch_tokens and end - start > 1:
                break  # earlier starts are longer samples and more of them: only worse
            cost = best[start] + padded + BATCH_OVERHEAD_TOKENS
            if cost < best[end]:
                best[end], cut[end] = cost, start
    batches, end = [], len(order)
    while end > 0:
        batches.append(order[cut[end]: end])
        end = cut[end]
    return batches[::-1]


def padded_batch(samples: list[list[int]], indices: list[int], pad_id: int):
    """Right-padded input_ids and attention_mask for the given samples."""
    import torch

    width = max(len(samples[i]) for i in indices)
    input_ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(indices), width), dtype=torch.long)
    for row, i in enumerate(indices):
        input_ids[row, : len(samples[i])] = torch.tensor(samples[i])
        mask[row, : len(samples[i])] = 1
    return input_ids, mask


def padding_fraction(lengths: list[int], batches: list[list[int]]) -> float:
    slots = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 1 - sum(lengths) / slots if slots else 0.0


# --------------------------------------------------------------------------- model
def resolve_dtype(name: str, config) -> Any:
    import torch

    if name != "auto":
        return getattr(torch, name)
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    # float32 checkpoints are calibrated in bf16: NVFP4 targets 16-bit activations, and fp32 doubles memory.
    return stored if stored in (torch.float16, torch.bfloat16) else torch.bfloat16


MERGE_ADAPTER_HINT = ("merge it into its base model first (peft: PeftModel.from_pretrained(base, adapter)"
                      ".merge_and_unload().save_pretrained(folder), with the base's tokenizer) and quantize that "
                      "folder")


def is_peft_adapter(folder: Path) -> bool:
    return folder.is_dir() and (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file()


def load_model_config(settings: Settings):
    from transformers import AutoConfig

    local = Path(settings.input_model).expanduser()
    if settings.input_model.startswith((".", "/", "~")) and not local.is_dir():
        raise UsageError(f"model not found: {settings.input_model} is not a directory")
    if is_peft_adapter(local):
        raise UsageError(f"{settings.input_model} is a PEFT adapter (adapter_config.json, no config.json): "
                         f"{MERGE_ADAPTER_HINT}")
    if not local.is_dir():
        check_hub_model(settings.input_model)
    try:
        return AutoConfig.from_pretrained(str(local) if local.is_dir() else settings.input_model,
                                          trust_remote_code=settings.trust_remote_code, token=settings.hf_token)
    except (OSError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"model not found or unreadable: {settings.input_model}: {first_line}") from None


def load_tokenizer(settings: Settings):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(settings.input_model, trust_remote_code=settings.trust_remote_code,
                                                  token=settings.hf_token)
    except (OSError, ValueError) as exc:
        folder = Path(settings.input_model).expanduser()
        if folder.is_dir() and not has_tokenizer_files(folder):
            raise UsageError(f"no tokenizer in {folder}: expected tokenizer.json (or tokenizer.model / vocab.json + "
                             "merges.txt) with tokenizer_config.json; copy them from the base model") from None
        text = " ".join(str(exc).split()) or type(exc).__name__  # transformers' messages run over several lines
        raise UsageError(f"tokenizer of {settings.input_model} cannot be loaded: {text[:400]}") from None
    return tokenizer


def has_tokenizer_files(folder: Path) -> bool:
    """A vocabulary file of one of the forms transformers reads (tiktoken's included)."""
    return any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "tiktoken.model")) \
        or all((folder / name).is_file() for name in ("vocab.json", "merges.txt"))


def model_class(config, trust_remote_code: bool):
    """The class the checkpoint names in `architectures`, or an auto class for it; encoders are refused.

    AutoModelForCausalLM is not enough: it refuses most vision-language wrappers and, for some
    (Llama 4), silently picks the text-only class, which drops the vision weights from the export.
    """
    import transformers

    auto_map = getattr(config, "auto_map", None) or {}
    architecture = (getattr(config, "architectures", None) or [None])[0]
    if getattr(config, "is_encoder_decoder", False):
        raise UsageError(unsupported_architecture(architecture or config.model_type, "an encoder-decoder model"))
    if trust_remote_code and "AutoModelForCausalLM" in auto_map:
        return transformers.AutoModelForCausalLM
    named = getattr(transformers, architecture, None) if architecture else None
    if named is None:
        autos = (transformers.AutoModelForCausalLM, transformers.AutoModelForImageTextToText)
        auto = next((a for a in autos if not architecture and type(config) in a._model_mapping), None)
        if auto is None:
            raise UsageError(unsupported_architecture(architecture or config.model_type,
                                                      f"not a text-generating model known to transformers "
                                                      f"{transformers.__version__} (pass --trust_remote_code if the "
                                                      "repo ships its own code)"))
        return auto
    if not named.can_generate():
        raise UsageError(unsupported_architecture(architecture, "an encoder, not a text generator"))
    return named


def unsupported_architecture(architecture: str, why: str) -> str:
    return (f"architecture {architecture} is not supported: {why}; this tool quantizes decoder LLMs (...ForCausalLM) "
            "and vision-language models (...ForConditionalGeneration with a text decoder) for vLLM and TensorRT-LLM")


def empty_model(config, trust_remote_code: bool):
    """The model's module tree on the meta device: names and shapes, no weights, no memory."""
    from accelerate import init_empty_weights

    cls = model_class(config, trust_remote_code)
    with init_empty_weights():
        if hasattr(cls, "from_config"):  # an auto class
            return cls.from_config(config, trust_remote_code=trust_remote_code)
        return cls._from_config(config)


def pattern_matches(name: str, pattern: str) -> bool:
    """Glob on the full module name; a pattern also matches a name ending in '.' + pattern."""
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern)


def resolve_skip_layers(model, patterns: list[str]) -> list[str]:
    """Module names matched by --skip_layers; a pattern matching nothing is an error."""
    import torch

    linear_names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    all_names = [n for n, _ in model.named_modules() if n]
    matched: list[str] = []
    for pattern in patterns:
        hits = [n for n in all_names if pattern_matches(n, pattern)]
        if not hits:
            near = nearest_modules(pattern, all_names)
            nearest = f"; nearest: {', '.join(near)}" if near else ""
            example = linear_names[0] if linear_names else all_names[0]
            raise UsageError(f"--skip_layers '{pattern}' matches no module{nearest} (module names look like {example})")
        matched.extend(h for h in hits if h not in matched)
    return with_fused_siblings(matched, set(all_names))


def nearest_modules(pattern: str, names: list[str], cutoff: float = 0.6) -> list[str]:
    """Up to 3 module names a pattern that matched nothing was probably meant for: each scored by the closer of its
    full name and its last components (as many as the pattern has, those under a `*` left out); the shortest first
    among equals, as a pattern is more often meant for a block than for one of its leaves."""
    parts = pattern.split(".")

    def score(name: str) -> float:
        full = difflib.SequenceMatcher(None, pattern, name).ratio()
        tail = name.split(".")[-len(parts):]
        if len(tail) < len(parts):
            return full
        kept = [(p, t) for p, t in zip(parts, tail) if p != "*"]
        last = difflib.SequenceMatcher(None, ".".join(p for p, _ in kept), ".".join(t for _, t in kept)).ratio()
        return max(full, last)

    scored = sorted(((score(n), n) for n in names), key=lambda pair: (-pair[0], len(pair[1])))
    return [name for value, name in scored[:3] if value >= cutoff]


def with_fused_siblings(names: list[str], all_names: set[str]) -> list[str]:
    """Widen a partial fused group (say q_proj alone) to the whole group, and say so."""
    out = list(names)
    for name in names:
        parent, _, leaf = name.rpartition(".")
        group = next((g for g in FUSED_GROUPS if leaf in g), ())
        added = [f"{parent}.{s}" for s in group if f"{parent}.{s}" in all_names and f"{parent}.{s}" not in out]
        if added:
            warn(f"--skip_layers: {name} is fused with {', '.join(a.rsplit('.', 1)[1] for a in added)} by vLLM and "
                 "TensorRT-LLM; skipping those too so the checkpoint loads")
            out.extend(added)
    return out


def source_checkpoint_dir(settings: Settings,
                          files: Iterable[str] = ("*.safetensors", "*.safetensors.index.json", "*.json")) -> Path:
    """The folder holding the source model's `files`: the local dir, or its snapshot in the hub cache
    (which from_pretrained has filled by now, so nothing is downloaded twice)."""
    local = Path(settings.input_model).expanduser()
    if local.is_dir():
        return local
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(settings.input_model, token=settings.hf_token, allow_patterns=list(files)))


def kept_in_16_bits(name: str, unquantized: list[str]) -> bool:
    """The module is one of the unquantized ones, or inside one (a vision tower, a skipped block)."""
    return any(name == u or name.startswith(u + ".") for u in unquantized)


def parameter_bytes(module, dtype) -> int:
    """The module's parameters in `dtype`: what loading it costs."""
    import torch

    return sum(p.numel() for p in module.parameters()) * torch.finfo(dtype).bits // 8


def always_unquantized(model) -> list[str]:
    """Input and output embeddings, and everything outside the text decoder: kept in 16 bits.

    A vision-language model is calibrated on text, so its vision tower, projector and audio parts
    never see calibration data; they stay as they are, and the runtimes load them in 16 bits.
    """
    targets = [model.get_input_embeddings(), model.get_output_embeddings()]
    embeddings = [n for n, m in model.named_modules() if n and any(m is t for t in targets if t is not None)]
    return embeddings + [n for n in outside_text_decoder(model) if n not in embeddings]


def outside_text_decoder(model) -> list[str]:
    """The largest modules holding linear layers but neither holding nor inside the text decoder."""
    import torch

    decoder = text_decoder(model)
    if decoder is None:
        return []
    decoder_name = next(n for n, m in model.named_modules() if m is decoder)
    ancestors = {".".join(decoder_name.split(".")[:i]) for i in range(len(decoder_name.split(".")) + 1)}
    outside = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name.startswith(decoder_name + "."):
            continue
        parts = name.split(".")
        top = next(".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) not in ancestors)
        if top not in outside:
            outside.append(top)
    return outside


def text_decoder(model):
    """The language model's decoder stack: what calibration on text reaches."""
    get_decoder = getattr(model, "get_decoder", None)
    if get_decoder is None:
        return None
    try:
        decoder = get_decoder()
    except (AttributeError, ValueError, NotImplementedError):  # exotic wrappers: quantize every linear
        return None
    inner = getattr(decoder, "get_decoder", None)  # Llama 4's language_model is itself a ...ForCausalLM
    return inner() if inner is not None and decoder is not model and inner() is not decoder else decoder


def build_quant_config(mode: str, unquantized: list[str], kv_cache: str = "none", algorithm: str = "max",
                       moe_calibration: str = "routed") -> dict:
    """A deep copy of the mode's ModelOpt config: given modules off, KV cache and algorithm merged in."""
    import modelopt.torch.quantization as mtq

    config = copy.deepcopy(getattr(mtq, MODES[mode][0]))
    for name in unquantized:
        config["quant_cfg"].append({"quantizer_name": f"{name}.*", "enable": False})
    if KV_CACHE_CONFIGS[kv_cache]:
        # last, so it wins over --skip_layers: the runtimes quantize every layer's KV cache, and a layer
        # without scales would get 1.0. As mtq.update_quant_cfg_with_kv_cache_quant, without its print.
        config["quant_cfg"] += copy.deepcopy(getattr(mtq, KV_CACHE_CONFIGS[kv_cache])["quant_cfg"])
    algo, weight_blocks = algorithm_preset(algorithm)
    if weight_blocks:  # the preset's static block settings (type, four_over_six) on the mode's block size
        for entry in config["quant_cfg"]:
            if entry.get("quantizer_name") == "*weight_quantizer" and isinstance(entry.get("cfg"), dict):
                blocks = {k: v for k, v in weight_blocks.items() if not isinstance(k, int)}
                entry["cfg"] = {**entry["cfg"], "block_sizes": {**entry["cfg"]["block_sizes"], **blocks}}
    if moe_calibration == "all":
        algo["moe_calib_experts_ratio"] = 1.0
    config["algorithm"] = algo
    return config


def algorithm_preset(algorithm: str) -> tuple[dict, dict | None]:
    """Deep copies of --algorithm's ModelOpt algorithm and, for presets, its weight block settings."""
    import modelopt.torch.quantization as mtq

    chosen = ALGORITHMS[algorithm]
    if chosen.preset is None:
        return copy.deepcopy(chosen.method), None
    preset = getattr(mtq, chosen.preset)
    weight = next(e for e in preset["quant_cfg"] if e.get("quantizer_name") == "*weight_quantizer" and e.get("cfg"))
    return copy.deepcopy(dict(chosen.method or preset["algorithm"])), copy.deepcopy(dict(weight["cfg"]["block_sizes"]))


def load_model(settings: Settings, config, device: str, device_map: str | dict | None = None, **kwargs):
    """The weights, checked: nothing missing (transformers would fill it with random values), nothing the
    model does not know, every value finite. `kwargs` go to from_pretrained (the offload folder)."""
    dtype = resolve_dtype(settings.dtype, config)
    model, info = model_class(config, settings.trust_remote_code).from_pretrained(
        settings.input_model, dtype=dtype, trust_remote_code=settings.trust_remote_code, token=settings.hf_token,
        device_map=device_map or {"": device}, low_cpu_mem_usage=True, output_loading_info=True, **kwargs)
    model.eval()
    check_loaded_weights(model, info, settings.input_model)
    if not getattr(model.config, "architectures", None):  # export_hf_checkpoint requires it
        model.config.architectures = [type(model).__name__]
    return model


def check_loaded_weights(model, info: dict, source: str) -> None:
    """Refuse a checkpoint that lost tensors (a shard or index entry), has tensors this model does not load
    (another model's), or holds NaN or infinite values: each would quantize into a wrong model with exit 0."""
    import torch

    for kind, why in (("missing_keys", "are not in the checkpoint (transformers would fill them with random "
                                       "values); a shard or index entry is lost: download the model again"),
                      ("unexpected_keys", "are in the checkpoint but not in this model class; is the config "
                                          "from another model?"),
                      ("mismatched_keys", "have another shape in the checkpoint than the config gives")):
        keys = sorted(str(k) for k in info.get(kind) or [])
        if keys:
            raise UsageError(f"{source}: {len(keys)} weights {why} (first: {', '.join(keys[:3])})")
    bad = [name for name, p in model.named_parameters() if p.device.type != "meta" and not torch.isfinite(p).all()]
    if bad:
        raise UsageError(f"{source}: {len(bad)} weight tensors hold NaN or infinite values (first: "
                         f"{', '.join(bad[:3])}): the checkpoint is corrupt; quantizing it would export garbage")


# --------------------------------------------------------------------------- several GPUs
@dataclasses.dataclass
class Ranks:
    rank: int = 0
    world: int = 1

    @property
    def distributed(self) -> bool:
        return self.world > 1


def init_distributed() -> Ranks:
    """Under torchrun / accelerate launch: one process per GPU, NCCL (gloo on CPU), torch.distributed only.

    Every rank loads the model and builds the same calibration set, calibrates on its share of the
    batches, and ModelOpt's max calibration all-reduces every amax with MAX across the ranks.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()

    import torch
    import torch.distributed as dist

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=datetime.timedelta(hours=2))
    log(f"data parallel: {world} processes, each calibrating 1/{world} of the batches")
    return Ranks(dist.get_rank(), dist.get_world_size())


def current_ranks() -> Ranks:
    import torch.distributed as dist

    return Ranks(dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else Ranks()


def rank_share(batches: list[list[int]], lengths: list[int], rank: int, world: int) -> list[list[int]]:
    """This rank's batches: each batch, largest first, to the least-loaded rank (padded tokens); same on every rank."""
    if len(batches) < world:
        raise UsageError(f"{len(batches)} calibration batches for {world} processes: use fewer processes, more "
                         "--max_samples, or a smaller --batch_size")
    loads, owner = [0] * world, {}
    for index in sorted(range(len(batches)), key=lambda i: (-padded_tokens(lengths, batches[i]), i)):
        target = min(range(world), key=lambda r: (loads[r], r))
        loads[target] += padded_tokens(lengths, batches[index])
        owner[index] = target
    return [batch for index, batch in enumerate(batches) if owner[index] == rank]


def all_reduce_min(value: int, device: str) -> int:
    import torch
    import torch.distributed as dist

    tensor = torch.tensor([value], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())


def check_ranks_agree(model, device: str) -> None:
    """After ModelOpt's sync every rank must hold the same amax; it only warns when a sync fails."""
    import torch
    import torch.distributed as dist

    amaxes = [m._amax.float().sum() for m in model.modules() if getattr(m, "_amax", None) is not None
              and type(m).__name__.endswith("Quantizer")]
    fingerprint = torch.stack(amaxes).to(device) if amaxes else torch.zeros(1, device=device)
    high, low = fingerprint.clone(), fingerprint.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    if not torch.equal(high, low):
        raise RuntimeError("quantizer amax differs between processes after ModelOpt's data-parallel sync: "
                           "the calibration is not the same on every rank")


def sum_across_ranks(sums: dict) -> None:
    """Per-linear [sum, rows] pairs (linears fed one tensor share one pair) summed over every rank's batches, in
    place, so that every rank decides alike."""
    import torch

    shared = {id(total): total for _, total in sorted(sums.items())}
    for total in shared.values():
        total[1] = torch.as_tensor(total[1], dtype=torch.float32, device=total[0].device)
        for tensor in total:
            torch.distributed.all_reduce(tensor)


def placement_for(weight_bytes: int, gpu_budgets: list[int]) -> str:
    """'single' when the 16-bit weights fit one GPU's budget, 'balanced' across GPUs when they fit all of them."""
    if not gpu_budgets or weight_bytes <= gpu_budgets[0]:
        return "single"
    if len(gpu_budgets) > 1 and weight_bytes <= sum(gpu_budgets):
        return "balanced"
    raise UsageError(f"the model's weights ({human_bytes(weight_bytes)}) exceed the GPU memory "
                     f"({human_bytes(sum(gpu_budgets))} over {len(gpu_budgets)} GPU(s)): use quantize_nvfp4_offload.py")


# --------------------------------------------------------------------------- calibration
@dataclasses.dataclass
class ExpertCoverage:
    """One MoE block's routing during calibration, counted by count_routed_tokens."""
    experts: int
    top_k: int
    forward_pass: int | None = None   # the pass the counts are from: an algorithm's second pass starts them anew
    counts: Any = None                # tokens routed to each expert (a tensor)


@dataclasses.dataclass
class DeviceClock:
    """Seconds spent in `timing(device)` blocks, summed: on a GPU from CUDA events read once at the end (a sync per
    block would stall the forward), elsewhere from the wall clock."""
    seconds: float = 0.0
    events: list = dataclasses.field(default_factory=list)

    @contextlib.contextmanager
    def timing(self, device):
        import torch

        if device.type != "cuda":
            start = time.perf_counter()
            yield
            self.seconds += time.perf_counter() - start
            return
        stream = torch.cuda.current_stream(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        yield
        end.record(stream)
        self.events.append((start, end))

    def total(self) -> float:
        for start, end in self.events:
            end.synchronize()
            self.seconds += start.elapsed_time(end) / 1000
        self.events.clear()
        return self.seconds


@dataclasses.dataclass
class CalibrationState:
    """What one calibration shares between its forward loop, hooks, calibrators and block-scale search. The
    offload script's layer loop runs instead of calibrate_batches and fills the same fields: batches_run,
    forward_seconds and cap."""
    pad_id: int
    search: str | None = None             # the algorithm whose block-scale search follows the max pass
    hessians: dict | None = None          # local_hessian: linear -> [per-block Σ x xᵀ, real rows]
    zero_linear_padding: bool = False     # GPTQ sums every input row into its Hessians: padding is zeroed first
    coverage: dict[str, ExpertCoverage] = dataclasses.field(default_factory=dict)
    mask: Any = None                      # the batch's real-token mask, refined by each decoder layer
    hessian_input: tuple | None = None    # (input, its sums): linears fed the same tensor share one sum
    handles: list | None = None           # our hooks while they are installed
    forward_pass: int = 0                 # ModelOpt's calls of the forward loop (an algorithm may make two)
    done: list = dataclasses.field(default_factory=list)  # batches run while planning (the memory probe)
    plan: list | None = None              # this rank's batches, planned on the first pass
    cap: float | None = None              # padded tokens per batch, at most
    batches_run: list | None = None       # the first pass's batches, for the statistics
    forward_seconds: float = 0.0
    oom_retries: int = 0
    peak_before_probe: int = 0            # bytes: the probe's peak, which the reset after it would lose
    searched: set = dataclasses.field(default_factory=set)
    search_seconds: float = 0.0
    hessian_clock: DeviceClock = dataclasses.field(default_factory=DeviceClock)
    smoothing: list | None = None         # smooth_hessian: the SmoothingGroups, their statistics, what was smoothed


def calibration_forward(model) -> Callable:
    """The cheapest forward that still runs every quantized linear: no KV cache, no full logits.

    The signature is read from the class: accelerate's offload hooks replace the instance's forward
    with a wrapper, and calling anything but the instance would bypass them.
    """
    model = text_generator(model)
    params = inspect.signature(type(model).forward).parameters
    kwargs = {"use_cache": False} if "use_cache" in params else {}
    if "logits_to_keep" in params:
        kwargs["logits_to_keep"] = 1
    elif "num_logits_to_keep" in params:
        kwargs["num_logits_to_keep"] = 1
    elif getattr(model, "base_model_prefix", None) and hasattr(model, model.base_model_prefix):
        base = getattr(model, model.base_model_prefix)  # lm_head is never quantized: skip it entirely
        return lambda input_ids, attention_mask: base(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    return lambda input_ids, attention_mask: model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


def text_generator(model):
    """The model to run on text: a vision-language wrapper's own language model when that is a complete
    causal LM (Llama 4, whose wrapper's forward needs image outputs), else the model itself."""
    language_model = getattr(model, "language_model", None)
    can_generate = getattr(language_model, "can_generate", None)
    return language_model if can_generate is not None and can_generate() else model


def max_collectable(quantizer) -> bool:
    """A per-tensor max calibrator (NVFP4/FP8 inputs, NVFP4 weights' global amax): one amax, no axis."""
    from modelopt.torch.quantization.calib import MaxCalibrator

    calibrator = getattr(quantizer, "_calibrator", None)
    return (isinstance(calibrator, MaxCalibrator) and not isinstance(calibrator, sync_free_max_calibrator())
            and calibrator._axis is None and not quantizer.is_static_block_quant
            and quantizer.pre_quant_scale is None and quantizer.bias_calibrator is None
            and not quantizer.rotate_is_enabled)


def mask_for_rows(x, mask, layout: str = "rows"):
    """`mask` shaped to broadcast over x's rows, or None when x has another layout.

    "rows": activations [B, T, ...] or flattened [B*T, ...]. "heads": attention's key and value
    states [B, heads, T, head_dim]. Weights, and routed expert inputs (MoE), carry no batch layout.
    """
    if mask is None:
        return None
    if layout == "heads":
        if x.dim() == 4 and x.shape[0] == mask.shape[0] and x.shape[2] == mask.shape[1]:
            return mask[:, None, :].to(x.dtype)
        return None
    rows = x.shape[:-1]
    if rows == mask.shape or (x.dim() == 2 and rows[0] == mask.numel()):
        return mask.reshape(rows).to(x.dtype)
    return None


def masked_amax(x, mask, layout: str = "rows"):
    """max |x| over the rows `mask` keeps (all rows without one): one read of x, no copy, no GPU sync."""
    import torch

    row_mask = mask_for_rows(x, mask, layout)
    if row_mask is not None:
        low, high = torch.aminmax(x, dim=-1)
        return (torch.maximum(high, -low) * row_mask).max()
    low, high = torch.aminmax(x)
    return torch.maximum(high, -low)


@functools.cache
def sync_free_max_calibrator():
    """ModelOpt's MaxCalibrator without its per-call GPU syncs, and blind to padded activation rows.

    MaxCalibrator.collect asserts on NaN/inf after every call: three GPU->CPU syncs per quantizer per
    batch, which left the GPU idle most of the time (measured 0.31x of a plain forward on an H100).
    This subclass takes the same max (tests check it is bit-identical) and checks finiteness once.
    """
    import torch
    from modelopt.torch.quantization.calib import MaxCalibrator

    class SyncFreeMaxCalibrator(MaxCalibrator):
        def __init__(self, original: MaxCalibrator, mask_source: CalibrationState | None, layout: str = "rows"):
            self.__dict__.update(original.__dict__)
            self._mask_source = mask_source  # activations only: a weight is never masked
            self._layout = layout

        @torch.no_grad()
        def collect(self, x):
            mask = self._mask_source.mask if self._mask_source is not None else None
            amax = masked_amax(x, mask, self._layout).detach()
            if self._calib_amax is None or x.device.type == "meta":  # meta: as MaxCalibrator does
                self._calib_amax = amax
            else:
                self._calib_amax = torch.maximum(self._calib_amax, amax)

        @torch.no_grad()
        def compute_amax(self):
            amax = self._calib_amax
            if amax is not None and amax.device.type != "meta" and not torch.isfinite(amax).all():
                raise FloatingPointError(f"calibration produced a non-finite amax ({amax.float().max().item()}): "
                                         "activations overflow in this dtype; try --dtype bfloat16")
            return amax

    return SyncFreeMaxCalibrator


@functools.cache
def collect_once_calibrator():
    """ModelOpt's MaxCalibrator for a linear's static-block weight quantizer, collecting on its first call only.

    Calibration shows the quantizer the same weight in every batch, so the first call's block maxima are those
    of all calls; each call of MaxCalibrator.collect syncs the GPU three times (its NaN/inf checks): collecting once
    took an 8B-shaped calibration (224 quantizers x 21 batches, H100) from 29.6 s to 26.0 s.
    """
    from modelopt.torch.quantization.calib import MaxCalibrator

    class CollectOnceMaxCalibrator(MaxCalibrator):
        def __init__(self, original: MaxCalibrator):
            self.__dict__.update(original.__dict__)

        def collect(self, x):
            if self._calib_amax is None:
                super().collect(x)

    return CollectOnceMaxCalibrator


def token_mask(attention, rows: tuple, current):
    """Real tokens from a decoder layer's attention mask, or `current` when the mask's form is unknown.

    A 2-D mask is the padding mask itself. In a 4-D mask every real token attends to itself and no
    token attends to padding, so a key is real when any query attends to it (sliding windows included).
    """
    import torch

    if attention is None:
        return None  # transformers passes no mask when a batch has no padding
    if not isinstance(attention, torch.Tensor):
        return current  # e.g. flex attention's BlockMask
    if attention.dim() == 2 and tuple(attention.shape) == tuple(rows):
        return attention
    if attention.dim() == 4 and attention.shape[0] == rows[0] and attention.shape[-2:] == (rows[1], rows[1]):
        allowed = attention[:, 0] if attention.dtype == torch.bool else \
            attention[:, 0] > torch.finfo(attention.dtype).min / 2
        return allowed.any(dim=-2)
    return current


def mask_from_attention(state: CalibrationState):
    """A decoder-layer pre-hook keeping state.mask right, also when the offload script calls layers itself."""
    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.get("hidden_states")
        if "attention_mask" in kwargs and hidden is not None:
            state.mask = token_mask(kwargs["attention_mask"], tuple(hidden.shape[:-1]), state.mask)
    return hook


def zero_padding(state: CalibrationState):
    """A pre-hook zeroing padded rows of a linear's input, for quantizers with other calibrators."""
    def hook(module, args):
        row_mask = mask_for_rows(args[0], state.mask) if args else None
        if row_mask is None:
            return None
        return (args[0] * row_mask.unsqueeze(-1),) + args[1:]
    return hook


def real_rows(x, mask):
    """x's rows as a 2-D view, and the flat mask of its real-token rows (None: every row is real)."""
    rows = x.reshape(-1, x.shape[-1])
    row_mask = mask_for_rows(x, mask)
    return rows, None if row_mask is None else row_mask.reshape(-1)


def real_row_count(rows, row_mask):
    """Real rows: a Python int when every row is real, else an int64 sum on the rows' device, which needs no GPU
    sync (a 16-bit sum would round counts above 256; a new device tensor from a Python int would sync)."""
    import torch

    return rows.shape[0] if row_mask is None else row_mask.sum(dtype=torch.int64)


def block_hessian_reference(rows, row_mask):
    """Σ x_b x_bᵀ over the real rows, per block of HESSIAN_BLOCK inputs, in fp32: only the real rows are selected
    (one gather), then one batched product."""
    import torch

    if row_mask is not None:
        rows = rows.index_select(0, row_mask.nonzero().reshape(-1))
    blocks = rows.float().view(rows.shape[0], -1, HESSIAN_BLOCK)
    return torch.einsum("tbi,tbj->bij", blocks, blocks)


if triton is not None:
    # Not specialized on the row count: one compile serves every batch and model (a first 8B run compiled
    # variants of its own otherwise, seconds of its calibration on an H100)
    @triton.jit(do_not_specialize=["rows"])
    def block_hessian_kernel(x_ptr, mask_ptr, out_ptr, rows, row_stride, rows_per_program,
                             HAS_MASK: tl.constexpr, BLOCK: tl.constexpr, TILE: tl.constexpr):
        """block_hessian_reference as a kernel: a program sums one block column's 16x16 product over its share of
        the rows, TILE rows at a time, 16-bit in and fp32 accumulated; padding rows load as zeros (no copy)."""
        column, split = tl.program_id(0), tl.program_id(1)
        lane = tl.arange(0, BLOCK)
        first = split * rows_per_program
        acc = tl.zeros([BLOCK, BLOCK], tl.float32)
        for offset in tl.range(0, rows_per_program, TILE):
            row = first + offset + tl.arange(0, TILE)
            keep = (row < rows) & (row < first + rows_per_program)
            if HAS_MASK:
                keep = keep & (tl.load(mask_ptr + row, mask=keep, other=0) != 0)
            x = tl.load(x_ptr + row[:, None] * row_stride + column * BLOCK + lane[None, :], mask=keep[:, None],
                        other=0.0)
            acc += tl.dot(tl.trans(x), x, allow_tf32=False)
        tl.store(out_ptr + (split * tl.num_programs(0) + column) * BLOCK * BLOCK + lane[:, None] * BLOCK
                 + lane[None, :], acc)


def block_hessian_on_gpu(rows, row_mask):
    """block_hessian_reference's sums from block_hessian_kernel: partial sums per row split, added in fp32 (a fixed
    order, so a run repeats bit for bit)."""
    import torch

    count, columns = rows.shape[0], rows.shape[1] // HESSIAN_BLOCK
    splits = max(1, min(HESSIAN_ROW_SPLITS, triton.cdiv(count, HESSIAN_TILE_ROWS)))
    per_program = triton.cdiv(triton.cdiv(count, splits), HESSIAN_TILE_ROWS) * HESSIAN_TILE_ROWS
    partial = torch.empty(splits, columns, HESSIAN_BLOCK, HESSIAN_BLOCK, dtype=torch.float32, device=rows.device)
    mask = row_mask.contiguous() if row_mask is not None else rows  # an unused pointer when there is no mask
    with torch.cuda.device(rows.device):
        block_hessian_kernel[(columns, splits)](
            rows, mask, partial, count, rows.stride(0), per_program, HAS_MASK=row_mask is not None,
            BLOCK=HESSIAN_BLOCK, TILE=HESSIAN_TILE_ROWS, num_warps=4)
    return partial.sum(0)


def block_hessian(x, mask):
    """One linear input's per-block Σ x_b x_bᵀ over its real rows (fp32) and the number of real rows."""
    rows, row_mask = real_rows(x, mask)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    count = real_row_count(rows, row_mask)
    if rows.is_cuda and triton is not None:
        return block_hessian_on_gpu(rows, row_mask), count
    return block_hessian_reference(rows, row_mask), count


def sum_block_hessian(name: str, state: CalibrationState):
    """A linear's pre-hook adding its real input rows x to the per-block sums Σ x_b x_bᵀ (fp32, as ModelOpt).

    Linears fed the same tensor (q/k/v, gate/up) share one sum, computed once: the hook keeps the last input.
    """
    def hook(module, args):
        x, sums, last = args[0], state.hessians, state.hessian_input
        if last is not None and last[0] is x:
            sums[name] = last[1]
            return
        with state.hessian_clock.timing(x.device):
            hessian, count = block_hessian(x, state.mask)
            total = sums.setdefault(name, [0, 0])
            total[0], total[1] = total[0] + hessian, total[1] + count
        state.hessian_input = (x, total)
    return hook


def moe_blocks(model) -> list[tuple[str, Any, Any]]:
    """(name, block, router) for every mixture-of-experts block: a module with `experts` and a `gate`/`router`."""
    import torch

    found = []
    for name, module in model.named_modules():
        router = getattr(module, "gate", None) or getattr(module, "router", None)
        experts = getattr(module, "experts", None)
        if isinstance(experts, torch.nn.Module) and isinstance(router, torch.nn.Module):
            found.append((name, module, router))
    return found


def under_experts(name: str) -> bool:
    """A module or quantizer inside a mixture-of-experts `experts` container."""
    return ".experts." in f".{name}"


def is_fused_experts(module) -> bool:
    """transformers 5's fused experts: 3-D gate_up_proj and down_proj parameters, one slice per expert."""
    import torch

    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return isinstance(gate_up, torch.nn.Parameter) and isinstance(down, torch.nn.Parameter) and gate_up.dim() == 3


def expert_count(block, router) -> int:
    experts = block.experts
    for source in (experts, router, block):
        for attr in ("num_experts", "n_routed_experts", "num_local_experts"):
            if isinstance(getattr(source, attr, None), int):
                return getattr(source, attr)
    return len(experts) if hasattr(experts, "__len__") else router.weight.shape[0]


def routed_indices(router, output):
    """The [tokens, top_k] expert choices a router made: v5 routers return them, v4 ones return logits."""
    import torch

    if isinstance(output, tuple) and len(output) >= 3 and not output[2].is_floating_point():
        return output[2]
    logits = output[0] if isinstance(output, tuple) else output
    top_k = getattr(router, "top_k", None)
    if not isinstance(logits, torch.Tensor) or not isinstance(top_k, int):
        return None
    return torch.topk(logits.float(), top_k, dim=-1).indices


def count_routed_tokens(name: str, state: CalibrationState):
    """A router forward hook: tokens per expert, real tokens only, from the last pass through this block.

    ModelOpt's "all experts" calibration calls the router once more with top_k raised to every expert;
    only calls with the model's own top_k are counted.
    """
    import torch

    def hook(router, inputs, output):
        indices = routed_indices(router, output)
        entry = state.coverage.get(name)
        if indices is None or entry is None or indices.shape[-1] != entry.top_k:
            return
        if entry.forward_pass != state.forward_pass:  # an algorithm's second pass
            entry.forward_pass = state.forward_pass
            entry.counts = torch.zeros(entry.experts, dtype=torch.long, device=indices.device)
        keep = mask_for_rows(inputs[0], state.mask) if inputs else None
        chosen = indices if keep is None else indices[keep.reshape(-1) > 0]
        entry.counts += torch.bincount(chosen.reshape(-1).long(), minlength=entry.experts)[: entry.experts]
    return hook


def expert_blocks(model) -> dict[str, ExpertCoverage]:
    """One entry per MoE block: its expert count and top_k, counted by count_routed_tokens."""
    blocks = {}
    for name, block, router in moe_blocks(model):
        top_k = getattr(router, "top_k", None) or getattr(block, "top_k", None)
        if isinstance(top_k, int):
            blocks[name] = ExpertCoverage(expert_count(block, router), top_k)
    return blocks


def expert_coverage(state: CalibrationState, moe_calibration: str) -> dict | None:
    """Per MoE block: tokens routed to each expert and the experts no calibration token was routed to."""
    import torch

    coverage = state.coverage
    if not coverage:
        return None
    layers = {}
    for name, entry in coverage.items():
        counts = entry.counts
        if counts is None:
            counts = torch.zeros(entry.experts, dtype=torch.long)
        if current_ranks().distributed:
            import torch.distributed as dist

            dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        tokens = counts.cpu().tolist()
        layers[name] = {"experts": entry.experts, "top_k": entry.top_k, "tokens_per_expert": tokens,
                        "unrouted_experts": [i for i, n in enumerate(tokens) if n == 0]}
    unrouted = sum(len(v["unrouted_experts"]) for v in layers.values())
    return {"moe_calibration": moe_calibration, "moe_blocks": len(layers), "unrouted_experts": unrouted,
            "note": "every expert was calibrated on every token (--moe_calibration all)" if moe_calibration == "all"
            else "experts with no routed tokens share their layer's input scales (ModelOpt's fused experts) and "
                 "take weight scales from the weights", "layers": layers}


def uncalibrated_quantizers(model) -> list[str]:
    """Enabled quantizers whose amax is unset, zero or not finite: what would export as a broken scale."""
    import torch
    from modelopt.torch.quantization.nn import TensorQuantizer

    bad = []
    for name, quantizer in model.named_modules():
        if not isinstance(quantizer, TensorQuantizer) or not quantizer.is_enabled:
            continue
        if "weight_quantizer" not in name and "input_quantizer" not in name and not name.endswith("_bmm_quantizer"):
            continue
        amax = getattr(quantizer, "_amax", None)
        if amax is None and getattr(quantizer, "_dynamic", False):
            continue
        if amax is None or amax.numel() == 0 or not torch.isfinite(amax).all() or not (amax > 0).any():
            bad.append(name)
    return bad


def keep_unreached_in_16_bits(model) -> list[str]:
    """Modules whose input quantizer never saw a token stay in 16 bits; returns their names.

    Some hybrid and state-space blocks use a wrapped linear's weight outside the linear's own forward
    (a fused kernel reads `out_proj.weight`), so its input is never measured and it has no input scale
    to export. Switching all its quantizers off exports it in 16 bits and lists it in exclude_modules.
    MoE experts are left to check_calibrated, which stops with the remedies for them.
    """
    from modelopt.torch.quantization.nn import TensorQuantizer

    kept = []
    for name, module in model.named_modules():
        input_quantizer = getattr(module, "input_quantizer", None)
        if (not isinstance(input_quantizer, TensorQuantizer) or not input_quantizer.is_enabled or under_experts(name)
                or getattr(input_quantizer, "_amax", None) is not None or getattr(input_quantizer, "_dynamic", False)):
            continue
        for child in module.modules():
            if isinstance(child, TensorQuantizer):
                child.disable()
        kept.append(name)
    if kept:
        warn(f"{len(kept)} module(s) never ran their own forward during calibration (their weights are used "
             f"elsewhere), so they stay in 16 bits: {', '.join(kept[:4])}{' ...' if len(kept) > 4 else ''}")
    return kept


def check_calibrated(model) -> None:
    bad = uncalibrated_quantizers(model)
    if bad:
        hint = ("pass --moe_calibration all, " if any(under_experts(n) for n in bad) else "") + \
            "raise --max_samples, or keep those modules in 16 bits with --skip_layers"
        raise UsageError(f"{len(bad)} quantizers got no usable calibration data (first: {', '.join(bad[:3])}); "
                         f"nothing was exported: {hint}")


def quantizer_role(name: str) -> tuple[bool, str]:
    """(masked, layout) for a quantizer's calibrator, from its module name.

    Weights are never masked. Routed expert inputs have no batch layout; their padded rows are zero
    instead (see install_calibration_hooks), which leaves a max unchanged.
    """
    leaf = name.rpartition(".")[2]
    if "weight_quantizer" in name or under_experts(name):
        return False, "rows"
    return True, "heads" if leaf.endswith("_bmm_quantizer") else "rows"


def decoder_layers(model):
    """The model's decoder layers, found as ModelOpt finds them (its registry of model families)."""
    from modelopt.torch.quantization.utils.layerwise_calib import LayerActivationCollector

    return LayerActivationCollector.get_decoder_layers(model)


def install_calibration_hooks(model, state: CalibrationState) -> None:
    """Once per quantize call: sync-free calibrators, and the padding mask kept current for them.

    The mask is set by run_batch and, because the offload script's layer loop calls each decoder
    layer on cached inputs outside our model forward, by every decoder layer from its attention_mask.
    With right padding and a causal mask real tokens never attend to padding, so leaving padded rows
    out of the amax is exact: the scales do not depend on the batch size. Mixture-of-experts blocks
    get their padded rows zeroed, so experts see no padding and the router counts none.
    """
    from modelopt.torch.quantization.nn import TensorQuantizer

    if state.handles is not None:
        return
    calibrator_class, handles = sync_free_max_calibrator(), []
    for name, quantizer in list(model.named_modules()):
        if isinstance(quantizer, TensorQuantizer) and max_collectable(quantizer):
            masked, layout = quantizer_role(name)
            quantizer._calibrator = calibrator_class(quantizer._calibrator, state if masked else None, layout)
    for module in list(model.modules()):
        input_quantizer = getattr(module, "input_quantizer", None)
        other_calibrator = getattr(input_quantizer, "is_enabled", False) and \
            not isinstance(input_quantizer._calibrator, calibrator_class)
        # GPTQ's Hessians sum every input row of every quantized linear: padding would count
        hessian = state.zero_linear_padding and getattr(getattr(module, "weight_quantizer", None),
                                                                "is_enabled", False)
        if other_calibrator or hessian:
            handles.append(module.register_forward_pre_hook(zero_padding(state)))
    if state.search:  # the max pass alone, weights untouched: their block maxima need one look
        collect_weights_once(model)
    if state.hessians is not None:
        for name, module in list(model.named_modules()):
            if block_searchable(module):
                handles.append(module.register_forward_pre_hook(sum_block_hessian(name, state)))
    for name, block, router in moe_blocks(model):
        handles.append(block.register_forward_pre_hook(zero_padding(state)))
        handles.append(router.register_forward_hook(count_routed_tokens(name, state)))
    for layer in decoder_layers(model) or []:
        handles.append(layer.register_forward_pre_hook(mask_from_attention(state), with_kwargs=True))
    if state.smoothing is not None:
        state.smoothing[:] = smoothing_groups(model)
        handles += watch_smoothing_groups(model, state)
        if not state.smoothing:
            warn(f"--algorithm smooth_hessian: this model has no norm it folds scales into "
                 f"({', '.join(SMOOTHABLE_NORMS)} before q/k/v and gate/up): its block scales are searched as "
                 "local_hessian's")
    state.handles = handles


@dataclasses.dataclass
class SmoothingGroup:
    """smooth_hessian: a norm and the linears reading its output (SMOOTHED_READERS), with what the max pass saw:
    each input channel's max |x| over the real rows, and whether the readers, and only they, got the norm's very
    output (else the group keeps its weights as they are)."""
    norm_name: str
    norm: Any
    readers: dict                  # name -> quantized linear, NVFP4 inputs
    amax: Any = None               # per input channel
    fed_elsewhere: bool = False    # a reader got another tensor, or another quantized linear got this one
    scales: Any = None             # s, once smoothed


def smoothing_groups(model) -> list[SmoothingGroup]:
    """Each norm of a kind whose weight multiplies its output (SMOOTHABLE_NORMS) whose SMOOTHED_READERS siblings
    are all searchable linears with quantized inputs."""
    modules, groups = dict(model.named_modules()), []
    for name, norm in modules.items():
        prefix, _, short = name.rpartition(".")
        if short not in SMOOTHED_READERS or type(norm).__name__ not in SMOOTHABLE_NORMS:
            continue
        readers = {f"{prefix}.{r}": modules.get(f"{prefix}.{r}") for r in SMOOTHED_READERS[short]}
        if all(r is not None and block_searchable(r) and getattr(r.input_quantizer, "is_enabled", False)
               for r in readers.values()):
            groups.append(SmoothingGroup(name, norm, readers))
    return groups


def watch_smoothing_groups(model, state: CalibrationState) -> list:
    """Hooks for the max pass: each norm's output is noted (weakly, while the forward holds it); every quantized
    linear's input is checked against the notes, and a group's first reader adds its input's channel maxima over
    the real rows."""
    import torch
    from torch.utils.weak import WeakIdKeyDictionary

    outputs, group_of = WeakIdKeyDictionary(), {id(r): g for g in state.smoothing for r in g.readers.values()}

    def note(group):
        def hook(module, args, output):
            outputs[output] = group
        return hook

    def check(module, args):
        fed = outputs.get(args[0]) if args and isinstance(args[0], torch.Tensor) else None
        mine = group_of.get(id(module))
        if mine is not None and fed is not mine:
            mine.fed_elsewhere = True
        if fed is not None and mine is not fed:
            fed.fed_elsewhere = True
        if mine is not None and fed is mine and module is next(iter(mine.readers.values())):
            amax = masked_channel_amax(args[0], state.mask)
            mine.amax = amax if mine.amax is None else torch.maximum(mine.amax, amax)
    handles = [g.norm.register_forward_hook(note(g)) for g in state.smoothing]
    return handles + [module.register_forward_pre_hook(check) for module in model.modules()
                      if getattr(getattr(module, "weight_quantizer", None), "is_enabled", False)]


def masked_channel_amax(x, mask):
    """Each channel's max |x| over the rows `mask` keeps (all rows without one)."""
    rows, flat = mask_for_rows(x, mask), x.detach().reshape(-1, x.shape[-1]).abs()
    return (flat if rows is None else flat * rows.reshape(-1, 1)).amax(0)


def collect_weights_once(model) -> None:
    """Every searchable linear's weight quantizer on collect_once_calibrator (ModelOpt's plain MaxCalibrator only)."""
    from modelopt.torch.quantization.calib import MaxCalibrator

    for module in list(model.modules()):
        if block_searchable(module) and type(module.weight_quantizer._calibrator) is MaxCalibrator:
            module.weight_quantizer._calibrator = collect_once_calibrator()(module.weight_quantizer._calibrator)


def remove_calibration_hooks(state: CalibrationState) -> None:
    for handle in state.handles or []:
        handle.remove()
    state.handles = state.mask = state.hessian_input = None


def gpu_token_budget(forward, samples, device, budget_gib: float | None, state: CalibrationState):
    """Run the longest sample alone, measure peak memory per token, size batches to the budget.

    Returns (max_batch_tokens, probe_index). The probe is real calibration work, not wasted.
    """
    import torch

    total = torch.cuda.get_device_properties(device).total_memory
    budget = budget_gib * 2**30 if budget_gib else total * AUTO_BUDGET_FRACTION
    probe = max(range(len(samples)), key=lambda i: len(samples[i]))
    base = torch.cuda.memory_allocated(device)
    if budget <= base:
        raise UsageError(f"--gpu_memory_budget {budget / 2**30:.1f} GiB is below the weights' "
                         f"{base / 2**30:.1f} GiB on {device}: raise it or use quantize_nvfp4_offload.py")
    state.peak_before_probe = torch.cuda.max_memory_allocated(device)  # the reset below would lose it
    torch.cuda.reset_peak_memory_stats(device)
    run_batch(forward, samples, [probe], device, state)
    per_token = max(torch.cuda.max_memory_allocated(device) - base, 1) / len(samples[probe])
    tokens = int((budget - base) * 0.9 / per_token)
    return max(len(samples[probe]), min(tokens, MAX_BATCH_TOKENS)), probe


def run_batch(forward, samples, indices, device, state: CalibrationState) -> None:
    input_ids, mask = padded_batch(samples, indices, state.pad_id)
    input_ids, mask = input_ids.to(device), mask.to(device)
    state.mask = mask
    forward(input_ids=input_ids, attention_mask=mask)


def padded_tokens(lengths: list[int], batch: list[int]) -> int:
    return len(batch) * max(lengths[i] for i in batch)


def split_batch(batch: list[int]) -> tuple[list[int], list[int]]:
    half = len(batch) // 2
    return batch[:half], batch[half:]


def batches_after(done: list[list[int]], lengths: list[int], batch_size: int | None, cap: float) -> list[list[int]]:
    """The batches of the samples `done` did not run (indices into `lengths`), grouped as group_batches groups."""
    skip = {i for batch in done for i in batch}
    rest = [i for i in range(len(lengths)) if i not in skip]
    return [[rest[j] for j in batch] for batch in group_batches([lengths[i] for i in rest], batch_size, cap)]


def plan_batches(forward, samples, settings: Settings, device: str, state: CalibrationState) -> None:
    """Decide the batches once; an algorithm's later passes run the same ones.

    On a GPU in auto mode the longest sample runs first, alone, to size the batches (it is real
    calibration work and is not run again). Elsewhere the budget is DEFAULT_BATCH_TOKENS.
    """
    lengths = [len(s) for s in samples]
    state.done, state.cap = [], DEFAULT_BATCH_TOKENS if settings.batch_size is None else math.inf
    ranks = current_ranks()
    if settings.batch_size is None and device.startswith("cuda"):
        state.cap, probe = gpu_token_budget(forward, samples, device, settings.gpu_memory_budget, state)
        state.done = [[probe]]  # every rank ran it: max is idempotent, so that changes nothing
        if ranks.distributed:  # one plan for all ranks: the smallest budget
            state.cap = all_reduce_min(state.cap, device)
    state.plan = batches_after(state.done, lengths, settings.batch_size, state.cap)
    if ranks.distributed:
        state.plan = rank_share(state.plan, lengths, ranks.rank, ranks.world)


def calibrate_batches(model, samples: list[list[int]], settings: Settings, device: str,
                      state: CalibrationState) -> None:
    """The forward loop ModelOpt calls (once per pass of its algorithm): every sample once."""
    import torch

    state.forward_pass = state.forward_pass + 1
    install_calibration_hooks(model, state)
    forward, lengths = calibration_forward(model), [len(s) for s in samples]
    loop_start = time.perf_counter()
    with torch.no_grad():
        if state.plan is None:
            plan_batches(forward, samples, settings, device, state)
        batches_run = list(state.done)
        bar = Progress(total=sum(lengths), desc="calibrate", unit="token", unit_scale=True,
                       initial=sum(lengths[i] for b in batches_run for i in b))
        queue = deque(state.plan)
        while queue:
            batch = queue.popleft()
            if len(batch) > 1 and padded_tokens(lengths, batch) > state.cap:  # after an OOM
                queue.extendleft(reversed(split_batch(batch)))
                continue
            try:
                run_batch(forward, samples, batch, device, state)
            except torch.OutOfMemoryError:
                handle_out_of_memory(batch, lengths, state)
                queue.extendleft(reversed(split_batch(batch)))
                continue
            batches_run.append(batch)
            bar.update(sum(lengths[i] for i in batch))
        bar.close()
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
    state.forward_seconds = state.forward_seconds + time.perf_counter() - loop_start
    if state.batches_run is None:  # the first pass's, for the statistics
        state.batches_run = batches_run


def handle_out_of_memory(batch: list[int], lengths: list[int], state: CalibrationState) -> None:
    """Halve the batch and lower the cap for the rest of the run; a lone sample can't be split."""
    import torch

    if len(batch) == 1:
        raise UsageError(f"CUDA out of memory on a single {lengths[batch[0]]}-token sample: "
                         "lower --max_seq_len or use quantize_nvfp4_offload.py") from None
    state.oom_retries = state.oom_retries + 1
    state.cap = padded_tokens(lengths, batch) // 2
    torch.cuda.empty_cache()


GPTQ_LINE = re.compile(r"^\[(?P<name>[^\]]+)\] Relative MSE error: (?P<error>\S+?),? ")


@contextlib.contextmanager
def modelopt_report(gptq: bool = True):
    """ModelOpt's prints on stdout around one of its calls. Yields a dict that receives, when the block ends, GPTQ's
    line per linear (Hessian-weighted relative error of its update) for the manifest instead of the console; the
    others (Inserted N quantizers, Registered <class> to _QuantAttention ...) are printed with --verbose only.
    Without `gptq` and with --verbose, stdout is left as it is: ModelOpt's lines show as they come."""
    errors: dict[str, float] = {}
    if CONSOLE.verbose and not gptq:
        yield errors
        return
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            yield errors
    finally:
        for line in captured.getvalue().splitlines():
            match = GPTQ_LINE.match(line)
            if match:
                errors[match["name"]] = float(match["error"])
            elif CONSOLE.verbose:
                print(line)


def book_calibration_phases(state: CalibrationState, phase: str) -> None:
    """The Hessian sums, and the block-scale search where the layer loop ran it, moved out of the calibration
    phase into their own."""
    CONSOLE.phases.move(state.hessian_clock.total(), phase, PHASE_HESSIANS)
    if state.search_seconds:
        CONSOLE.phases.move(state.search_seconds, phase, STAGE_SEARCH)


def quantize_model(model, settings: Settings, unquantized: list[str], samples, device: str, pad_id: int,
                   calibrate: Callable[[Any, dict, CalibrationState], None] | None = None,
                   score: Callable | None = None) -> dict:
    """mtq.quantize with our forward loop; returns calibration stats (time, tokens/s, peak memory).

    `calibrate(model, config, state)` replaces that call (the offload script's layer loop); it must
    fill the state's batches_run, forward_seconds and cap as calibrate_batches does. `score`: the
    --effective_bits scores in place of whole_model_scores (see choose_mixed_precision).
    """
    import modelopt.torch.quantization as mtq
    import torch

    config = build_quant_config(settings.mode, unquantized, settings.kv_cache, settings.algorithm,
                                settings.moe_calibration)
    searches = ALGORITHMS[settings.algorithm].scale_search
    state = CalibrationState(pad_id, search=settings.algorithm if searches else None,
                             hessians={} if settings.algorithm in HESSIAN_ALGORITHMS else None,
                             zero_linear_padding=settings.algorithm == "gptq", coverage=expert_blocks(model),
                             smoothing=[] if ALGORITHMS[settings.algorithm].smooths else None)
    on_gpu, phase = device.startswith("cuda"), CONSOLE.phases.current
    if on_gpu:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    try:
        with modelopt_report(gptq=settings.algorithm == "gptq") as gptq_relative_mse:
            if calibrate is None:
                mtq.quantize(model, config, lambda m: calibrate_batches(m, samples, settings, device, state))
            else:
                calibrate(model, config, state)
            book_calibration_phases(state, phase)
            if state.smoothing:
                smooth_groups(state.smoothing, state)
            if state.search:
                search_model_block_scales(model, state)
    finally:
        remove_calibration_hooks(state)
    if current_ranks().distributed:
        check_ranks_agree(model, device)
    if on_gpu:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    unreached = keep_unreached_in_16_bits(model)
    check_calibrated(model)
    mixed = choose_mixed_precision(model, samples, pad_id, settings.effective_bits, score) \
        if settings.effective_bits else None
    lengths = [len(s) for s in samples]
    stats = {"seconds": round(seconds, 2), "tokens": sum(lengths), "tokens_per_s": round(sum(lengths) / seconds, 1),
             "forward_seconds": round(state.forward_seconds, 2), "batches": len(state.batches_run),
             "padding_fraction": round(padding_fraction(lengths, state.batches_run), 4),
             "max_batch_tokens": state.cap if settings.batch_size is None else None,
             "oom_retries": state.oom_retries, "processes": current_ranks().world,
             "kept_16_bit_unreached": unreached}
    if state.search:
        stats["scale_search"] = {"linears": len(state.searched), "seconds": round(state.search_seconds, 2)}
    if state.smoothing is not None:
        stats["smoothing"] = smoothing_record(state.smoothing)
    if state.hessians is not None:
        stats["hessian_seconds"] = round(state.hessian_clock.seconds, 2)
    if gptq_relative_mse:
        stats["gptq_relative_mse"] = gptq_relative_mse
    if mixed:
        stats["mixed_precision"] = mixed
    if on_gpu:
        peak = max(torch.cuda.max_memory_allocated(device), state.peak_before_probe)
        stats["peak_gpu_memory_gib"] = round(peak / 2**30, 2)
    coverage = expert_coverage(state, settings.moe_calibration)
    if coverage:
        stats["moe_expert_coverage"] = coverage
    return stats


def quantized_linear_shapes(model) -> dict[str, dict]:
    """Every module whose weight quantizer is on: its weight shape and whether inputs are quantized."""
    out = {}
    for name, module in model.named_modules():
        wq = getattr(module, "weight_quantizer", None)
        if getattr(wq, "is_enabled", False) and getattr(module, "weight", None) is not None:
            iq = getattr(module, "input_quantizer", None)
            out[name] = {"shape": list(module.weight.shape), "input_scale": bool(getattr(iq, "is_enabled", False))}
    return out


# --------------------------------------------------------------------------- scale search
def block_searchable(module) -> bool:
    """A linear whose static NVFP4 weight blocks our search sets: a 2-D weight, whole blocks (fused 3-D experts
    keep max's scales)."""
    quantizer, weight = getattr(module, "weight_quantizer", None), getattr(module, "weight", None)
    return (getattr(quantizer, "is_enabled", False) and getattr(quantizer, "is_static_block_quant", False)
            and weight is not None and weight.dim() == 2 and weight.shape[1] % HESSIAN_BLOCK == 0)


def round_to_e2m1(x):
    """x rounded to the nearest FP4 E2M1 value, sign kept, magnitudes above 6 saturating. A tie goes to the even
    code (0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4): that is how ModelOpt's exporter
    rounds weights (NVFP4QTensor._cast_fp4), so the scale search and the fidelity check score what is written, and
    how the runtimes' kernels round activations (PTX cvt.rn.satfinite.e2m1x2), so --eval's emulator computes what
    they compute. window_sweep_kernel repeats the rule in Triton.

    E2M1's grid is evenly spaced within each binade (0.5 below 2, 1 below 4, 2 above), so each magnitude is rounded
    on its binade's step by torch.round, whose ties go to even, which is the even code; dividing by a power of two
    is exact. Five passes over x instead of one comparison per code: the CPU search spends most of its time here."""
    import torch

    magnitude = x.abs()
    step = torch.where(magnitude < 2.0, 0.5, torch.where(magnitude < 4.0, 1.0, 2.0)).to(x.dtype)
    return torch.sign(x) * torch.clamp(torch.round(magnitude / step) * step, max=6.0)


def rounding_error(blocks, scale):
    """w - quant(w) for blocks of 16 stored with these block scales (shape [..., 1]); a zero scale zeroes its
    block, as ModelOpt's fake quantization does."""
    import torch

    safe = torch.where(scale > 0, scale, 1.0)
    return blocks - torch.where(scale > 0, round_to_e2m1(blocks / safe) * safe, 0.0)


def sweep_candidates(global_amax, device):
    """The 126 block amaxes ModelOpt's sweep tries, ascending (every positive FP8 E4M3 value under the global
    scale), and their block scales as the checkpoint stores them (FP8 under the global scale): computed in plain
    torch, as ModelOpt's own wrapper would first compile a CUDA extension (about a minute on a machine's first run)."""
    from modelopt.torch.kernels.quantization.gemm._fp8_scale_candidates import fp8_scale_candidates
    from modelopt.torch.quantization.tensor_quant import fp8_eager

    global_amax = global_amax.detach().float().to(device).reshape(())
    amaxes = fp8_scale_candidates(device).float() * global_amax
    return amaxes, fp8_eager(amaxes / 6.0, global_amax / 6.0)


def window_starts(block_amax, amaxes):
    """Each block's first candidate (HESSIAN_WINDOW[0] steps below the first one reaching its max amax, kept
    inside the 126) and the window's width."""
    import torch

    width = min(sum(HESSIAN_WINDOW) + 1, amaxes.numel())
    own = torch.searchsorted(amaxes, block_amax.float().contiguous())
    return (own - HESSIAN_WINDOW[0]).clamp(0, amaxes.numel() - width).to(torch.int32), width


def hessian_sweep_reference(weight, global_amax, hessian, block_amax):
    """local_hessian's windowed FP8 scale sweep in plain torch (the kernel is Triton, CUDA only).

    For every block of 16 inputs, of the window of FP8 E4M3 block scales around its max scale, the one whose
    rounding error dw minimizes dwᵀ H dw (H: that input block's Hessian), the smallest on a tie, as ModelOpt's
    sweep; returns each block's amax.
    """
    import torch

    blocks = weight.float().reshape(weight.shape[0], -1, HESSIAN_BLOCK)
    amaxes, scales = sweep_candidates(global_amax, weight.device)
    starts, width = window_starts(block_amax.reshape(blocks.shape[:2]).to(weight.device), amaxes)
    best_loss = torch.full(blocks.shape[:2], math.inf, device=weight.device)
    best = torch.zeros(blocks.shape[:2], device=weight.device)
    for step in range(width):
        index = starts.long() + step
        error = rounding_error(blocks, scales[index][..., None])
        loss = torch.einsum("cnb,nbd,cnd->cn", error, hessian, error)
        better = loss < best_loss
        best_loss, best = torch.where(better, loss, best_loss), torch.where(better, amaxes[index], best)
    return best.reshape(-1)


if triton is not None:  # a module-level function: Triton resolves a kernel's names in its module's globals
    @triton.jit(do_not_specialize=["rows", "inputs"])  # one compile for every shape, as block_hessian_kernel
    def window_sweep_kernel(w_ptr, h_ptr, start_ptr, scales_ptr, amaxes_ptr, best_ptr, rows, inputs,
                            BLOCK: tl.constexpr, WIDTH: tl.constexpr, ROWS: tl.constexpr):
        """hessian_sweep_reference as a kernel: a program takes 32 rows of one input block, whose Hessian it loads
        once, and tries only their window of candidates (ModelOpt's own kernel tries all 126 in every block)."""
        pid = tl.program_id(0)
        column = pid % inputs
        row = (pid // inputs) * ROWS + tl.arange(0, ROWS)
        valid = row < rows
        block = row * inputs + column
        lane = tl.arange(0, BLOCK)
        w = tl.load(w_ptr + block[:, None] * BLOCK + lane[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
        magnitude, sign = tl.abs(w), tl.where(w >= 0, 1.0, -1.0)
        h = tl.load(h_ptr + column * BLOCK * BLOCK + lane[:, None] * BLOCK + lane[None, :])
        start = tl.load(start_ptr + block, mask=valid, other=0)
        best_loss = tl.full([ROWS], float("inf"), tl.float32)
        best = tl.zeros([ROWS], tl.int32)
        for step in tl.range(WIDTH):
            index = start + step
            scale = tl.load(scales_ptr + index)[:, None]
            safe = tl.where(scale > 0, scale, 1.0)
            s = magnitude / safe  # rounded to E2M1 as round_to_e2m1 rounds it, ties to even
            fp4 = tl.where(s <= 0.25, 0.0, tl.where(s < 0.75, 0.5, tl.where(s <= 1.25, 1.0, tl.where(
                s < 1.75, 1.5, tl.where(s <= 2.5, 2.0, tl.where(s < 3.5, 3.0, tl.where(s <= 5.0, 4.0, 6.0)))))))
            error = tl.where(scale > 0, sign * (magnitude - fp4 * safe), w)
            loss = tl.sum(tl.dot(error, h, allow_tf32=False) * error, axis=1)  # true fp32, as the reference
            better = loss < best_loss
            best_loss = tl.where(better, loss, best_loss)
            best = tl.where(better, index, best)
        tl.store(best_ptr + block, tl.load(amaxes_ptr + best, mask=valid, other=0.0), mask=valid)


def hessian_sweep_kernel(weight, global_amax, hessian, block_amax):
    """hessian_sweep_reference's choice, from window_sweep_kernel."""
    import torch

    amaxes, scales = sweep_candidates(global_amax, weight.device)
    rows, inputs = weight.shape[0], weight.shape[1] // HESSIAN_BLOCK
    starts, width = window_starts(block_amax.reshape(rows, inputs).to(weight.device), amaxes)
    best = torch.empty(rows * inputs, dtype=torch.float32, device=weight.device)
    with torch.cuda.device(weight.device):
        window_sweep_kernel[(triton.cdiv(rows, 32) * inputs,)](
            weight.detach().contiguous().view(-1), hessian.float().contiguous().view(-1), starts.contiguous().view(-1),
            scales.contiguous(), amaxes.contiguous(), best, rows, inputs, BLOCK=HESSIAN_BLOCK, WIDTH=width, ROWS=32,
            num_warps=4)
    return best


def hessian_sweep(weight, global_amax, hessian, block_amax):
    """Each block's amax from the windowed sweep: the Triton kernel on CUDA, the reference elsewhere."""
    if weight.is_cuda and triton is not None:
        return hessian_sweep_kernel(weight, global_amax, hessian, block_amax)
    return hessian_sweep_reference(weight, global_amax, hessian, block_amax)


def four_over_six_search(weight, block_amax, global_amax):
    """Each block's amax for four_over_six: its max amax (largest value on FP4's 6) or 1.5x that (on 4),
    whichever rounds the block with less squared error, 6 on a tie: what ModelOpt's MSE pass for its recipe
    picks, with its FP8 scales (normalized to 256), in plain torch."""
    import torch
    from modelopt.torch.quantization.tensor_quant import fp8_eager

    blocks = weight.float().reshape(weight.shape[0], -1, HESSIAN_BLOCK)
    amax = block_amax.float().reshape(blocks.shape[:2]).to(weight.device)
    scale_range = global_amax.detach().float().to(weight.device).reshape(()) * (448.0 / FOUR_OVER_SIX_FP8_MAX) / 6.0
    candidates = torch.stack([amax * factor for factor in FOUR_OVER_SIX_FACTORS])
    losses = torch.stack([rounding_error(blocks, fp8_eager(c / 6.0, scale_range)[..., None]).square().sum(-1)
                          for c in candidates])
    return candidates.gather(0, losses.argmin(0, keepdim=True)).reshape(-1)  # argmin: the first on a tie


def smoothing_record(groups: list[SmoothingGroup]) -> dict:
    """The manifest's account of smooth_hessian: which norms it rescaled, which it left (and why)."""
    left = {g.norm_name: "its output also fed another linear, or a reader got another input" if g.fed_elsewhere
            else "calibration never reached it" for g in groups if g.scales is None}
    return {"alpha": SMOOTHING_ALPHA, "norms": len(groups) - len(left), "of": len(groups), "left": left,
            "largest_scale": max((float(g.scales.max()) for g in groups if g.scales is not None), default=None)}


def smoothing_scales(amax, weights: list, alpha: float = SMOOTHING_ALPHA):
    """SmoothQuant's s per input channel from the inputs' channel maxima and the readers' weight column maxima,
    normalized to geometric mean 1."""
    import torch

    columns = torch.stack([w.detach().float().abs().amax(0) for w in weights]).amax(0).clamp_min(1e-8)
    scales = amax.float().clamp_min(1e-8) ** alpha / columns ** (1 - alpha)
    return scales / torch.exp(torch.log(scales).mean())


def smooth_groups(groups: list[SmoothingGroup], state: CalibrationState) -> dict:
    """smooth_hessian, after the max pass: each group's input divided by s, folded into its norm's weight and its
    readers' columns; what the pass calibrated follows exactly (input amax, weight block and global amaxes, the
    Hessian sums), so the search then runs as local_hessian's. Across ranks every rank first takes every rank's
    channel maxima. Returns the weights it rewrote, by full name."""
    import torch

    if current_ranks().distributed:
        for group in groups:
            if group.amax is not None:
                torch.distributed.all_reduce(group.amax, op=torch.distributed.ReduceOp.MAX)
    rewritten = {}
    with torch.no_grad():
        for group in groups:
            if not group.fed_elsewhere and group.amax is not None and group.scales is None:
                rewritten.update(smooth_group(group, state.hessians))
    return rewritten


def smooth_group(group: SmoothingGroup, hessians: dict) -> dict:
    """One group's fold (see smooth_groups); the weights keep their dtype."""
    import torch

    readers = list(group.readers.values())
    scales = smoothing_scales(group.amax.to(readers[0].weight.device), [r.weight for r in readers])
    norm = group.norm.weight
    norm.copy_((norm.float() / scales.to(norm.device)).to(norm.dtype))
    input_amax = (group.amax.float().to(scales.device) / scales).max()
    for reader in readers:
        reader.weight.copy_((reader.weight.float() * scales.to(reader.weight.device)).to(reader.weight.dtype))
        quantizer = reader.weight_quantizer
        blocks = reader.weight.float().abs().reshape(-1, HESSIAN_BLOCK).amax(-1)
        quantizer.amax = blocks.reshape(quantizer.amax.shape).to(quantizer.amax.dtype)
        reader.input_quantizer.amax = input_amax.reshape(reader.input_quantizer.amax.shape).to(
            reader.input_quantizer.amax.dtype)
    global_amax = torch.stack([r.weight.float().abs().max().to(scales.device) for r in readers]).max()
    for reader in readers:  # fused siblings share one global scale, as ModelOpt's calibration left them
        reader.weight_quantizer.global_amax = global_amax
    sums = {id(t): t for t in (hessians.get(name) for name in group.readers) if t is not None}
    for total in sums.values():  # H' = D⁻¹ H D⁻¹ per block of 16 inputs, D = diag(s)
        block = scales.to(total[0].device).reshape(-1, HESSIAN_BLOCK)
        total[0] = total[0] / (block[:, :, None] * block[:, None, :])
    group.scales = scales
    return {f"{group.norm_name}.weight": norm, **{f"{name}.weight": r.weight for name, r in group.readers.items()}}


def damped(hessian):
    """Per-block Hessians plus HESSIAN_DAMPING x their mean diagonal on the diagonal."""
    import torch

    eye = torch.eye(hessian.shape[-1], device=hessian.device)
    return hessian + HESSIAN_DAMPING * hessian.diagonal(dim1=-2, dim2=-1).mean() * eye


def searched_block_amax(module, algorithm: str, total):
    """One linear's block amaxes from the run's search (weights in place); `total`: local_hessian's sums."""
    quantizer = module.weight_quantizer
    if algorithm == "four_over_six":
        return four_over_six_search(module.weight, quantizer.amax, quantizer.global_amax)
    hessian = damped(total[0] / max(float(total[1]), 1.0))
    # summed where the input was: across GPUs, before accelerate moved it to this linear's device
    return hessian_sweep(module.weight, quantizer.global_amax, hessian.to(module.weight.device), quantizer.amax)


def searchable_linears(module, prefix: str) -> dict:
    """name -> linear, for the linears under `module` whose block scales the search sets (named from `prefix`)."""
    return {f"{prefix}.{name}" if prefix else name: linear for name, linear in sorted(module.named_modules())
            if block_searchable(linear)}


def search_block_scales(linears: dict, state: CalibrationState, access: Callable | None = None) -> None:
    """local_hessian's or four_over_six's search after the max pass: every block's FP8 scale, under the max
    global scale. The weights must be in place: `access(module)` puts them there, else the caller has."""
    state.hessian_input = None
    start = time.perf_counter()
    for name, module in Progress(linears.items(), desc="block scales", unit="linear"):
        if getattr(module.weight_quantizer, "_amax", None) is None:
            continue  # never calibrated: kept in 16 bits after calibration
        total = state.hessians.pop(name, None) if state.hessians is not None else None
        if state.hessians is not None and total is None:
            continue  # local_hessian, a linear that saw no tokens: max's scales stay
        with access(module) if access else contextlib.nullcontext():
            best = searched_block_amax(module, state.search, total)
        module.weight_quantizer.amax = best.reshape(module.weight_quantizer.amax.shape)
        state.searched.add(name)
    state.search_seconds = state.search_seconds + time.perf_counter() - start


def search_model_block_scales(model, state: CalibrationState) -> None:
    """After the max pass: every linear not searched yet (the offload loop searches its layers as it goes). Across
    ranks, every rank first sums every rank's Hessians, so all search alike."""
    from modelopt.torch.quantization.utils.core_utils import enable_weight_access_and_writeback

    names = sorted(state.hessians) if state.hessians is not None else \
        [name for name in searchable_linears(model, "") if name not in state.searched]
    if names:  # none left after the offload loop
        stage(STAGE_SEARCH)
    if current_ranks().distributed and state.hessians:
        sum_across_ranks(state.hessians)
    modules = dict(model.named_modules())
    search_block_scales({name: modules[name] for name in names}, state,
                        access=lambda module: enable_weight_access_and_writeback(module, model, modules))


# --------------------------------------------------------------------------- mixed precision
@dataclasses.dataclass
class LinearGroup:
    """Linears that take one format (a group the runtimes fuse, or one linear), their weight count, and the predicted
    loss under each candidate format (quant_algo; None: 16-bit): the sum of their output_loss_scores."""
    names: tuple[str, ...]
    weights: int
    loss: dict
    weight_amax: Any = None     # the group's largest |w|: its FP8 weight scale
    algo: str | None = "NVFP4"

    def upgrade_cost(self, algo: str | None) -> float:
        return self.weights * (WEIGHT_BITS[algo] - WEIGHT_BITS[self.algo])


def linear_groups(names: Iterable[str]) -> list[tuple[str, ...]]:
    """The linears grouped as the runtimes fuse them (FUSED_GROUPS under one parent), each other linear alone."""
    remaining, groups = set(names), []
    for name in sorted(remaining):
        if name not in remaining:
            continue
        parent, _, leaf = name.rpartition(".")
        fused = next((g for g in FUSED_GROUPS if leaf in g), (leaf,))
        members = tuple(f"{parent}.{m}" for m in fused if f"{parent}.{m}" in remaining)
        remaining -= set(members)
        groups.append(members)
    return groups


def nvfp4_weight_error(module):
    """w - its NVFP4 value in blocks of 16, under the weight quantizer's (searched) block amaxes and global amax."""
    from modelopt.torch.quantization.tensor_quant import fp8_eager

    quantizer = module.weight_quantizer
    blocks = module.weight.float().reshape(module.weight.shape[0], -1, HESSIAN_BLOCK)
    scale = fp8_eager(quantizer.amax.float().reshape(blocks.shape[:2]) / 6.0, quantizer.global_amax.float() / 6.0)
    return rounding_error(blocks, scale[..., None])


def fp8_weight_error(module, amax):
    """w - its FP8 E4M3 value under one per-tensor scale, amax / 448 (a fused group's largest: group_amax), in
    blocks of 16."""
    weight = module.weight.float()
    error = weight - fake_quant_fp8_input(weight, amax.float().clamp_min(1e-30) / E4M3_MAX)  # the same FP8 rounding
    return error.reshape(weight.shape[0], -1, HESSIAN_BLOCK)


def group_amax(members: list):
    """The largest |w| over a fused group: its FP8 weight scale is one for all, as vLLM (which requantizes differing
    ones to their max) and TensorRT-LLM compute it."""
    return max(m.weight.detach().abs().amax().float() for m in members)


def format_weights(module, weight_amax) -> dict[str, Callable]:
    """format -> a function computing the linear's float32 weight as that format stores it: NVFP4 under its
    calibrated (searched) block scales, FP8 under one per-tensor scale (the group's `weight_amax`). Computed on each
    call, so that scoring a whole model holds one linear's float32 weights at a time."""
    shape = module.weight.shape
    return {"NVFP4": lambda: module.weight.float() - nvfp4_weight_error(module).reshape(shape),
            "FP8": lambda: module.weight.float() - fp8_weight_error(module, weight_amax).reshape(shape)}


def format_gemms(module, weights: dict[str, Callable]) -> dict[str, Callable]:
    """format -> what the linear's GEMM computes from an input in that format: the input rounded as the format rounds
    it under the calibrated input amax (NVFP4 blocks of 16, FP8 per tensor), times `weights`' (format_weights)."""
    import torch.nn.functional as F

    input_amax = module.input_quantizer.amax.float().clone()
    rounding = {"NVFP4": lambda x: fake_quant_nvfp4_input(x, input_amax / (6.0 * E4M3_MAX)),
                "FP8": lambda x: fake_quant_fp8_input(x, input_amax / E4M3_MAX)}
    return {algo: lambda x, algo=algo, weight=weight: F.linear(rounding[algo](x.float()), weight())
            for algo, weight in weights.items()}


def output_change_hook(gemms: dict[str, Callable], add: Callable):
    """A linear's forward hook: under autograd, each format's output change (Y_format - Y, without the bias, which no
    format changes) is kept until Y's gradient arrives, then handed on as add(format index in `gemms`' order,
    dLoss/dY, the change)."""
    import torch
    import torch.nn.functional as F

    def hook(module, args, output):
        if not torch.is_grad_enabled():  # the first, checkpointed pass: the layer is run again for the backward
            return
        with torch.no_grad():
            x = args[0]
            exact = F.linear(x.float(), module.weight.float())
            changes = [(gemm(x) - exact).to(output.dtype) for gemm in gemms.values()]

        def on_gradient(grad):
            for index, change in enumerate(changes):
                add(index, grad, change)
        output.register_hook(on_gradient)
    return hook


def output_loss_hook(gemms: dict[str, Callable], scores):
    """output_change_hook adding Σ (dLoss/dY · ΔY)² to `scores` (one entry per format, in `gemms`' order)."""
    def add(index, grad, change):
        scores[index] += (grad.float() * change.float()).square().sum()
    return output_change_hook(gemms, add)


@contextlib.contextmanager
def quantizers_off(model):
    """Every enabled quantizer of `model` (a whole model or one decoder layer) off: the model before quantization."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    quantizers = [m for m in model.modules() if isinstance(m, TensorQuantizer) and m.is_enabled]
    try:
        for quantizer in quantizers:
            quantizer.disable()
        yield
    finally:
        for quantizer in quantizers:
            quantizer.enable()


@contextlib.contextmanager
def frozen_parameters(model):
    """No parameter of `model` requires grad (the score needs activation gradients only); restored after."""
    grads = {p: p.requires_grad for p in model.parameters()}
    try:
        for parameter in grads:
            parameter.requires_grad_(False)
        yield
    finally:
        for parameter, wanted in grads.items():
            parameter.requires_grad_(wanted)


@contextlib.contextmanager
def unquantized_with_gradients(model):
    """The model as it was before quantization (every quantizer off), with activation gradients (the embeddings
    require grad, no other parameter) and, where transformers supports it, gradient checkpointing per decoder layer,
    so that one layer's activations and output changes are held at a time (ModelOpt's auto_quantize does the same)."""
    checkpointed = getattr(model, "supports_gradient_checkpointing", False)
    with quantizers_off(model), frozen_parameters(model):
        try:
            model.get_input_embeddings().weight.requires_grad_(True)
            if checkpointed:
                # transformers renamed it (the old name warns from 5.2x and goes in v6); >= 5.17 is supported
                enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
                enable({"use_reentrant": True})
                for module in model.modules():  # checkpointing runs in training mode; nothing else is switched to it
                    module.train(hasattr(module, "gradient_checkpointing"))
            yield
        finally:
            if checkpointed:
                (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
            model.eval()


def summed_token_loss(forward: Callable, samples: list[list[int]], batch: list[int], pad_id: int, device):
    """The score's Loss on one batch: the model's next-token cross entropy summed over its real tokens."""
    input_ids, mask = padded_batch(samples, batch, pad_id)
    labels = input_ids.masked_fill(mask == 0, -100)
    output = forward(input_ids=input_ids.to(device), attention_mask=mask.to(device), labels=labels.to(device),
                     use_cache=False)
    return output.loss * int(mask[:, 1:].sum())


def gradient_passes(model, samples: list[list[int]], pad_id: int, batches: list[list[int]],
                    hooks: list[tuple[str, Callable]]) -> None:
    """One forward and backward of the summed token loss per batch through the unquantized model with activation
    gradients, with `hooks` (module name, forward hook; registered in that order) on the named modules."""
    modules, device = dict(model.named_modules()), model.get_input_embeddings().weight.device
    handles = [modules[name].register_forward_hook(hook) for name, hook in hooks]
    forward = text_generator(model)
    try:
        with unquantized_with_gradients(model):
            for batch in Progress(batches, desc="format scores", unit="batch"):
                summed_token_loss(forward, samples, batch, pad_id, device).backward()
    finally:
        for handle in handles:
            handle.remove()


def output_loss_scores(model, amaxes: dict[tuple[str, ...], Any], samples: list[list[int]], pad_id: int) -> dict:
    """linear -> format -> ModelOpt auto_quantize's sensitivity: Σ over calibration tokens of (dLoss/dY · (Y_format -
    Y))², Y the linear's output in the unquantized model and Loss its next-token loss (summed over tokens): a Fisher
    estimate of the loss increase from that linear alone in that format. One forward and backward per batch.
    `amaxes`: each linear group -> its weight amax (group_amax), the FP8 weight scale its linears are scored under."""
    import torch

    modules, device = dict(model.named_modules()), model.get_input_embeddings().weight.device
    names = [n for g in amaxes for n in g]
    scores = torch.zeros(len(names), len(FORMAT_CANDIDATES), dtype=torch.float64, device=device)
    amax_of = {n: amax for g, amax in amaxes.items() for n in g}
    hooks = [(n, output_loss_hook(format_gemms(modules[n], format_weights(modules[n], amax_of[n])), scores[row]))
             for row, n in enumerate(names)]
    lengths, ranks = [len(s) for s in samples], current_ranks()
    batches = group_batches(lengths, None, DEFAULT_BATCH_TOKENS)
    if ranks.distributed:  # each rank scores its share; one sample a batch where there are fewer batches than ranks
        batches = rank_share(batches if len(batches) >= ranks.world else [[i] for i in range(len(samples))], lengths,
                             ranks.rank, ranks.world)
    gradient_passes(model, samples, pad_id, batches, hooks)
    if ranks.distributed:
        torch.distributed.all_reduce(scores)
    return {n: dict(zip(FORMAT_CANDIDATES, row.tolist())) for n, row in zip(names, scores)}


def choose_formats(groups: list[LinearGroup], budget_bits: float) -> None:
    """Each group's format for the least total predicted loss with average weight bits at most `budget_bits`: from
    all NVFP4, greedily the upgrade (to FP8 or 16 bits) that removes the most loss per added bit and still fits."""
    total = sum(g.weights for g in groups)
    spare = budget_bits * total - sum(g.weights * WEIGHT_BITS[g.algo] for g in groups)
    while True:
        moves = [((g.loss[g.algo] - g.loss[algo]) / g.upgrade_cost(algo), n, algo) for n, g in enumerate(groups)
                 for algo in g.loss if WEIGHT_BITS[algo] > WEIGHT_BITS[g.algo] and g.upgrade_cost(algo) <= spare]
        moves = [m for m in moves if m[0] > 0]
        if not moves:
            return
        _, index, algo = max(moves, key=lambda m: m[0])
        spare -= groups[index].upgrade_cost(algo)
        groups[index].algo = algo


def set_format(module, algo: str | None, weight_amax) -> None:
    """A calibrated NVFP4 linear switched to FP8 (ModelOpt's MIXED_FP8_CONFIG quantizers: the group's weight amax,
    and the input amax the max pass measured) or to 16 bits (its quantizers off)."""
    import modelopt.torch.quantization as mtq
    from modelopt.torch.quantization.config import QuantizerAttributeConfig
    from modelopt.torch.quantization.nn import TensorQuantizer

    if algo is None:
        module.weight_quantizer.disable()
        module.input_quantizer.disable()
        return
    fp8 = {e["quantizer_name"]: e["cfg"] for e in getattr(mtq, MIXED_FP8_CONFIG)["quant_cfg"] if "cfg" in e}
    for role, amax in (("weight_quantizer", weight_amax), ("input_quantizer", module.input_quantizer.amax)):
        quantizer = TensorQuantizer(QuantizerAttributeConfig(**fp8[f"*{role}"]))
        quantizer.amax = amax.detach().float().reshape(())
        setattr(module, role, quantizer.to(amax.device))


def linear_format(module, mode: str) -> str:
    """The quant_algo a quantized linear is written in: FP8 where --effective_bits chose it, else the mode's."""
    return "FP8" if module.weight_quantizer.num_bits == (4, 3) else MODE_QUANT_ALGO[mode]


def whole_model_scores(model, groups: list[tuple[str, ...]], samples: list[list[int]], pad_id: int) -> tuple:
    """(output_loss_scores, group -> its weight amax) with the whole model in memory."""
    modules = dict(model.named_modules())
    amaxes = {g: group_amax([modules[n] for n in g]) for g in groups}
    return output_loss_scores(model, amaxes, samples, pad_id), amaxes


def choose_mixed_precision(model, samples: list[list[int]], pad_id: int, budget_bits: float,
                           score: Callable | None = None) -> dict:
    """--effective_bits after calibration and the scale search: every quantized linear scored under each format,
    groups chosen under the budget, their quantizers switched. Returns the manifest's record.

    `score(model, groups)` returns (linear -> format -> score, group -> weight amax): by default
    whole_model_scores; the offload script's layer loop passes its own, computed one decoder layer at a time."""
    stage(STAGE_MIXED)
    start = time.perf_counter()
    modules = dict(model.named_modules())
    names = [n for n in quantized_linear_shapes(model) if block_searchable(modules[n])]
    fused = linear_groups(names)
    score = score or functools.partial(whole_model_scores, samples=samples, pad_id=pad_id)
    scores, amaxes = score(model, fused)
    groups = [LinearGroup(g, sum(modules[n].weight.numel() for n in g),
                          {**{algo: sum(scores[n][algo] for n in g) for algo in FORMAT_CANDIDATES}, None: 0.0},
                          amaxes[g]) for g in fused]
    choose_formats(groups, budget_bits)
    for group in groups:
        for name in group.names if group.algo != "NVFP4" else ():
            set_format(modules[name], group.algo, group.weight_amax)
    to_disk = export_names(model)
    weights = sum(g.weights for g in groups)
    return {"budget_bits": budget_bits,
            "effective_bits": round(sum(g.weights * WEIGHT_BITS[g.algo] for g in groups) / max(weights, 1), 4),
            "counted": "stored bits per weight over the linears calibration quantized: " + ", ".join(
                f"{algo or '16-bit'} {WEIGHT_BITS[algo]:g}" for algo in ("NVFP4", "FP8", None)),
            "predicted_loss": {"chosen": sum(g.loss[g.algo] for g in groups),
                               "all_nvfp4": sum(g.loss["NVFP4"] for g in groups)},
            "seconds": round(time.perf_counter() - start, 2),
            "per_linear": {to_disk(n): g.algo or "16-bit" for g in groups for n in g.names}}


# --------------------------------------------------------------------------- export
def write_error(folder: Path, needed_bytes: int, what: str, code: int) -> UsageError:
    """A write of our own files that failed mid-run, in one line: which disk, why, and what the run needed there."""
    headline = "disk full" if code == errno.ENOSPC else os.strerror(code).lower()
    return UsageError(f"{headline} writing {what} to {folder} (the disk mounted at {mount_point(folder)}): about "
                      f"{human_bytes(needed_bytes)} needed, {human_bytes(shutil.disk_usage(folder).free)} free now; "
                      f"{WRITE_ERRNO_REMEDIES[code]}")


def write_errno(exc: BaseException, folder: Path) -> int | None:
    """The errno of a failed write, however the writer reports it: an OSError (json, accelerate's memmaps), or
    safetensors' "(os error N)", anywhere in the chain (the resume writer's thread wraps its failure); torch.save's
    bare RuntimeError is judged by the disk: ENOSPC when no room is left on it."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in WRITE_ERRNO_REMEDIES:
            return seen.errno
        reported = re.search(r"\(os error (\d+)\)", str(seen))
        if reported and int(reported[1]) in WRITE_ERRNO_REMEDIES:
            return int(reported[1])
        seen = seen.__cause__ or seen.__context__
    if isinstance(exc, RuntimeError) and shutil.disk_usage(folder).free < 2**20:
        return errno.ENOSPC
    return None


@contextlib.contextmanager
def write_errors_are_usage_errors(folder: Path, needed_bytes: int, what: str):
    """write_error for a write in the block that failed on the disk's account."""
    try:
        yield
    except Exception as exc:
        code = write_errno(exc, folder)
        if code is None:
            raise
        raise write_error(folder, needed_bytes, what, code) from None


def mount_point(folder: Path) -> Path:
    path = folder.resolve()
    while not os.path.ismount(path):
        path = path.parent
    return path


def library_versions() -> dict:

    out = {"python": platform.python_version()}
    for package in ("torch", "transformers", "nvidia-modelopt", "accelerate", "datasets", "safetensors"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = None
    return out


def source_file_paths(settings: Settings) -> list[Path]:
    """The source's tokenizer, processor and generation files (SOURCE_FILES): a local dir's, or from the hub cache."""
    folder = source_checkpoint_dir(settings, SOURCE_FILES)
    return [folder / name for name in SOURCE_FILES if (folder / name).is_file()]


def write_tokenizer_and_extras(model, tokenizer, folder: Path, settings: Settings) -> None:
    """The source's files verbatim, over what the export wrote; the loaded tokenizer only if the source has none."""
    copied = source_file_paths(settings)
    for path in copied:
        shutil.copyfile(path, folder / path.name)
    if not any(p.name in TOKENIZER_FILES for p in copied):
        warn(f"{settings.input_model} has none of {', '.join(TOKENIZER_FILES)}; saving the tokenizer as loaded")
        tokenizer.save_pretrained(str(folder))
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and not (folder / "generation_config.json").exists():
        generation_config.save_pretrained(str(folder))
    for f in folder.rglob("*"):  # export_hf_checkpoint writes safetensors 0600: others could not serve them
        f.chmod(0o755 if f.is_dir() else 0o644)


def move_into_place(staging: Path, output: Path) -> None:
    """Replace `output` with `staging` so that a finished-looking dir is always a complete one."""
    old = None
    if output.exists():
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        output.rename(old)
    staging.rename(output)
    if old is not None:
        shutil.rmtree(old)


def fold_awq_scales(model) -> None:
    """Fold awq_lite's per-channel input scales into the layers before, as ModelOpt's export does, and
    into v_proj also for grouped-query attention (averaging the scale over each group of query heads);
    then, as the export would, average them over layers sharing an input and fold them into the norms.

    Done here, before the export, so that the fidelity check sees the folded 16-bit model (the export
    leaves packed weights behind). What cannot fold stays a pre_quant_scale tensor, which neither
    runtime's NVFP4 loader applies (see relabel_folded_awq).
    """
    from modelopt.torch.export.quant_utils import fuse_prequant_to_linear
    from modelopt.torch.export.unified_export_hf import requantize_resmooth_fused_llm_layers

    fuse_prequant_to_linear(model, fuse_grouped_heads=True)
    requantize_resmooth_fused_llm_layers(model)


def relabel_folded_awq(folder: Path, mode: str) -> None:
    """ModelOpt labels a checkpoint NVFP4_AWQ when any scale was folded, though its layers are then plain
    NVFP4 ones; vLLM refuses that label. Rewrite it to the mode's algorithm when no pre_quant_scale is left.
    """
    from modelopt.torch.export.convert_hf_config import convert_hf_quant_config_format

    hf_path, config_path = folder / "hf_quant_config.json", folder / "config.json"
    hf_config = json.loads(hf_path.read_text())
    quant = hf_config["quantization"]
    if quant.get("quant_algo") != "NVFP4_AWQ":
        return
    left = [k for k in CheckpointReader(folder).location if k.endswith(".pre_quant_scale")]
    if left:
        raise RuntimeError(f"awq_lite left {len(left)} per-channel pre_quant_scale tensors (first: {left[0]}) that "
                           "the NVFP4 loaders of vLLM and TensorRT-LLM do not apply: use --algorithm awq_clip or mse")
    for key in ("has_zero_point", "pre_quant_scale"):
        quant.pop(key, None)
    quant["quant_algo"] = MODE_QUANT_ALGO[mode]
    hf_path.write_text(json.dumps(hf_config, indent=4) + "\n")
    config = json.loads(config_path.read_text())
    config["quantization_config"] = convert_hf_quant_config_format(hf_config)
    config_path.write_text(json.dumps(config, indent=2) + "\n")


NAME_SENTINEL = re.compile(r"\.\x00[^*]*?(?=(\.?\*)?$)")  # ModelOpt's name-mapper sentinel, before a '*' or '.*' end


def strip_name_sentinels(folder: Path) -> None:
    """ModelOpt maps exclude_modules to on-disk names with a sentinel (`.\\x00modelopt_name_sentinel`) appended and
    stripped again; an unanchored rename (NemotronH's `model.` -> `backbone.`) rewrites the sentinel, which then
    stays in the pattern, so it matches nothing and the runtimes would load excluded layers as FP4. What precedes
    the sentinel is the mapped name."""
    hf_path, config_path = folder / "hf_quant_config.json", folder / "config.json"
    hf_config, config = json.loads(hf_path.read_text()), json.loads(config_path.read_text())
    for section, key in ((hf_config["quantization"], "exclude_modules"), (config["quantization_config"], "ignore")):
        section[key] = [NAME_SENTINEL.sub("", p) for p in section.get(key) or []]
    hf_path.write_text(json.dumps(hf_config, indent=4) + "\n")
    config_path.write_text(json.dumps(config, indent=2) + "\n")


UNLOADED_FILE = "model-not-loaded-by-transformers.safetensors"


def carry_unloaded_tensors(model, staging: Path, source: Path) -> dict | None:
    """Checkpoint tensors the model class skips on load (the multi-token-prediction layers of DeepSeek-V3
    and GLM-4.5, which vLLM uses for speculative decoding): copied as they are into their own shard,
    listed in the index, and excluded from quantization in both config files."""
    from safetensors.torch import save_file

    reader = CheckpointReader(source)
    keys = sorted(unloaded_keys(type(model), reader.location))
    if not keys:
        return None
    save_file({k: reader.tensor(k).contiguous() for k in keys}, str(staging / UNLOADED_FILE), metadata={"format": "pt"})
    index_path = staging / "model.safetensors.index.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else \
        {"metadata": {}, "weight_map": {k: "model.safetensors" for k in CheckpointReader(staging).location}}
    index["weight_map"].update({k: UNLOADED_FILE for k in keys})
    index_path.write_text(json.dumps(index, indent=2) + "\n")
    excluded = sorted({f"{m.group(1)}.*" if (m := re.match(r"(.*?\.layers\.\d+)\.", k)) else k.rpartition(".")[0]
                       for k in keys})
    add_exclusions(staging, excluded)
    return {"tensors": len(keys), "exclude_modules": excluded, "file": UNLOADED_FILE}


def add_exclusions(folder: Path, patterns: list[str]) -> None:
    """Append exclude patterns to hf_quant_config.json and config.json's quantization_config, which must agree."""
    hf_path, config_path = folder / "hf_quant_config.json", folder / "config.json"
    hf_config, config = json.loads(hf_path.read_text()), json.loads(config_path.read_text())
    for section, key in ((hf_config["quantization"], "exclude_modules"), (config["quantization_config"], "ignore")):
        section[key] = list(section.get(key) or []) + [p for p in patterns if p not in (section.get(key) or [])]
    hf_path.write_text(json.dumps(hf_config, indent=4) + "\n")
    config_path.write_text(json.dumps(config, indent=2) + "\n")


MODEL_CARD_NAME = "README.md"
RUNTIME_NOTES = {  # quant_algo -> where it runs (sources in README "Modes and which runtimes load them")
    "NVFP4": "vLLM: native FP4 GEMMs on Blackwell (SM100/103/12x); on Turing to Hopper it runs weight-only through "
             "Marlin. TensorRT-LLM: Blackwell.",
    "W4A16_NVFP4": "vLLM 2026 releases (Marlin, SM >= 75) and recent TensorRT-LLM builds; older ones reject "
                   "W4A16_NVFP4.",
    "W4A8_NVFP4_FP8": "TensorRT-LLM on Blackwell only; vLLM does not load W4A8_NVFP4_FP8.",
    "FP8": "vLLM and TensorRT-LLM: FP8 GEMMs on Ada, Hopper and Blackwell.",
    MIXED_PRECISION: "vLLM 0.17 and newer (its `modelopt_mixed` config reads each linear's format from "
                     "`quantized_layers`; 0.15 refuses MIXED_PRECISION): FP4 layers as for NVFP4, FP8 layers as FP8.",
}
VLLM_QUANTIZATION = {MIXED_PRECISION: "modelopt_mixed", "FP8": "modelopt"}  # quant_algo -> vLLM's name; else NVFP4's
FORMAT_NAMES = {MIXED_PRECISION: "NVFP4, FP8 and 16-bit layers", "FP8": "FP8"}  # the model card's words; else NVFP4
KV_NOTES = {
    "FP8": "FP8 KV cache: vLLM picks it up from the checkpoint with the default `--kv-cache-dtype auto`.",
    "NVFP4": "NVFP4 KV cache: vLLM reads it as `nvfp4` (FlashInfer; Blackwell, or SM80-120 with head size != 64); "
             "TensorRT-LLM reads `kv_cache_quant_algo` from hf_quant_config.json.",
}


def source_model_id(input_model: str) -> str:
    """What the manifest records as the source: a local model's absolute path, else the hub ID."""
    local = Path(input_model).expanduser()
    return str(local.resolve()) if local.is_dir() else input_model


def smoothing_rows(smoothing: dict | None) -> list[str]:
    """smooth_hessian's line: a user comparing 16-bit tensors with the source's learns why the norms differ."""
    if not smoothing or not smoothing["norms"]:
        return []
    return [f"| smoothed norms | {smoothing['norms']} of {smoothing['of']}: each norm's weight divided, and its "
            f"readers' input columns multiplied, by per-channel scales (SmoothQuant, alpha {smoothing['alpha']}); "
            "the 16-bit function is unchanged |"]


def model_card(manifest: dict, folder_name: str) -> str:
    """The output dir's README.md: what was quantized, how, how well, and how to serve it."""
    args, calib, validation = manifest["arguments"], manifest["calibration"], manifest["validation"]
    algo, kv = validation["quant_algo"], validation.get("kv_cache_quant_algo")
    source = manifest["source_model"]
    unlisted = "every linear not in `quantized_layers` (embeddings, `lm_head`)" if algo == MIXED_PRECISION else "none"
    # the hub links base_model to a model page: a local path (always absolute here) names none
    base_model = [] if Path(source).is_absolute() else [f"base_model: {source}"]
    lines = [
        "---", *base_model, "library_name: transformers", "tags: [nvfp4, modelopt, quantized]", "---", "",
        f"# {folder_name}", "",
        f"`{manifest['source_model']}` quantized to {FORMAT_NAMES.get(algo, 'NVFP4')} (`{algo}`) with NVIDIA ModelOpt "
        f"{manifest['versions'].get('nvidia-modelopt')} by `{manifest['tool']}`.", "",
        "| | |", "|---|---|",
        f"| mode | {MODES[manifest['mode']][2]} (`{manifest['modelopt_config']}`) |",
        f"| calibration algorithm | `{args['algorithm']}` |",
        *smoothing_rows(manifest["calibration_run"].get("smoothing")),
        f"| KV cache | {kv or '16-bit (not quantized)'} |",
        f"| quantized linears | {validation['quantized_linears']} ({formats_cell(validation)}) |",
        *mixed_precision_rows(manifest["calibration_run"].get("mixed_precision")),
        f"| kept in 16 bits | {', '.join(f'`{m}`' for m in manifest['excluded_modules']) or unlisted} |",
        *special_16_bit_rows(manifest),
        f"| calibration data | {calib['kept_samples']} samples, {calib['tokens']['total']} tokens (max "
        f"{args['max_seq_len']} per sample, seed {args['seed']}) from `{Path(args['dataset_yaml']).name}` |", "",
        "## Calibration mix", "", "| dataset | requested | kept |", "|---|---|---|",
        *[f"| {d['name']} | {d['requested']} | {d['kept']} |" for d in calib["per_dataset"]], "",
    ]
    lines += fidelity_section(manifest.get("fidelity"))
    lines += quality_section(manifest.get("quality"))
    coverage = manifest["calibration_run"].get("moe_expert_coverage")
    if coverage:
        lines += ["## Mixture-of-experts coverage", "",
                  f"{coverage['unrouted_experts']} expert(s) over {coverage['moe_blocks']} MoE blocks got no routed "
                  f"calibration token (`--moe_calibration {coverage['moe_calibration']}`); per layer counts are in "
                  f"`{MANIFEST_NAME}`.", ""]
    lines += ["## Serving", "", RUNTIME_NOTES[algo] + (" " + KV_NOTES[kv] if kv else ""), ""]
    if algo != "W4A8_NVFP4_FP8":
        vllm_name = VLLM_QUANTIZATION.get(algo, "modelopt_fp4")
        lines += ["vLLM:", "", "```python", "from vllm import LLM",
                  f'llm = LLM(model="./{folder_name}", quantization="{vllm_name}")', "```", "",
                  f"or `vllm serve ./{folder_name} --quantization {vllm_name}`.", ""]
    lines += ["TensorRT-LLM (PyTorch backend):", "", "```python", "from tensorrt_llm import LLM",
              f'llm = LLM(model="./{folder_name}")  # reads hf_quant_config.json', "```", "",
              f"or `trtllm-serve ./{folder_name}`.", "",
              f"`{MANIFEST_NAME}` records every setting, library version and timing of this run.", ""]
    return "\n".join(lines)


def formats_cell(validation: dict) -> str:
    """A checkpoint's linears per format (mixed precision), or its group size."""
    if validation["quant_algo"] != MIXED_PRECISION:
        return f"group size {validation['group_size'] or 'none: per-tensor scales'}"
    return ", ".join(f"{n} {algo}" for algo, n in validation["formats"].items())


def mixed_precision_rows(mixed: dict | None) -> list[str]:
    """Model-card rows for --effective_bits: the bits reached, and each format's linears."""
    if not mixed:
        return []
    return [f"| effective bits | {mixed['effective_bits']} (budget {mixed['budget_bits']}; {mixed['counted']}) |",
            *[f"| {algo} linears | {cell} |" for algo, cell in format_layers(mixed["per_linear"]).items()]]


def format_layers(per_linear: dict[str, str]) -> dict[str, str]:
    """format -> its linears, compactly: each projection with the decoder layers holding it in that format."""
    layers: dict[str, dict[str, list[int]]] = {}
    for name, algo in per_linear.items():
        match = re.search(r"\.(\d+)\.(.+)$", name)
        projection, index = (match.group(2), int(match.group(1))) if match else (name, -1)
        layers.setdefault(algo, {}).setdefault(projection, []).append(index)
    return {algo: "; ".join(f"{p} {index_ranges(i)}" for p, i in sorted(by.items())) for algo, by in layers.items()}


def index_ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5' (-1: not in a numbered layer)."""
    runs: list[list[int]] = []
    for i in sorted(set(indices)):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs if a >= 0) or "(no layer index)"


def special_16_bit_rows(manifest: dict) -> list[str]:
    """Model-card rows for 16-bit parts the user did not ask for: unloaded checkpoint tensors, unreached modules."""
    rows, carried = [], manifest.get("carried_unloaded")
    unreached = manifest["calibration_run"].get("kept_16_bit_unreached")
    if carried:
        rows.append(f"| copied unchanged, not loaded by transformers | {carried['tensors']} tensors "
                    f"({', '.join(f'`{m}`' for m in carried['exclude_modules'])}, e.g. multi-token-prediction layers "
                    "for speculative decoding), in 16 bits and excluded |")
    if unreached:
        rows.append(f"| 16 bits: never reached by calibration | {', '.join(f'`{m}`' for m in unreached)} (their "
                    "weights are used outside their own forward) |")
    return rows


def fidelity_section(fidelity: dict | None) -> list[str]:
    if not fidelity:
        return []
    unchecked = f" {len(fidelity['unchecked'])} were not checked (no 16-bit linear of their own)." \
        if fidelity["unchecked"] else ""
    return ["## Export fidelity", "",
            f"Each of {fidelity['checked']} quantized linears was run from the exported tensors (as the runtimes "
            f"compute it) and from the original weights on {fidelity['rows_per_linear']} calibration tokens; relative "
            f"output error: median {fidelity['median']}, limit {fidelity['limit']}.{unchecked} Worst:", "",
            "| linear | relative error |", "|---|---|",
            *[f"| `{name}` | {error} |" for name, error in fidelity["worst"].items()], ""]


def quality_section(report: dict | None) -> list[str]:
    if not report:
        return ["## Quality", "", "Not measured (run with `--eval`, or `--verify DIR --eval --reference MODEL`).", ""]
    return ["## Quality", "", f"On {report['samples']} held-out samples ({report['tokens']} tokens) of the "
            f"calibration mix, measured by the {report['method']}:", "",
            "| metric | value |", "|---|---|",
            f"| perplexity, original | {report['perplexity_original']} |",
            f"| perplexity, quantized | {report['perplexity_quantized']} |",
            f"| perplexity increase | {report['perplexity_increase_pct']}% |",
            f"| mean KL(original \\|\\| quantized) | {report['mean_kl']} |",
            f"| top-1 agreement | {report['top1_agreement']} |", ""]


@contextlib.contextmanager
def text_forward(model):
    """While ModelOpt's export runs its dummy forward on token ids: a wrapper whose language model is a
    complete causal LM runs that one (Llama 4's wrapper forward fails without image outputs)."""
    generator = text_generator(model)
    if generator is not model:
        model.forward = generator.forward
    try:
        yield
    finally:
        if generator is not model:
            del model.forward


# safetensors' names for torch dtypes, in the order its writer lays tensors out in a file (then by name)
SAFETENSORS_DTYPES = {
    "torch.uint64": "U64", "torch.int64": "I64", "torch.float64": "F64", "torch.complex64": "C64",
    "torch.float32": "F32", "torch.uint32": "U32", "torch.int32": "I32", "torch.bfloat16": "BF16",
    "torch.float16": "F16", "torch.uint16": "U16", "torch.int16": "I16", "torch.float8_e5m2fnuz": "F8_E5M2FNUZ",
    "torch.float8_e4m3fnuz": "F8_E4M3FNUZ", "torch.float8_e4m3fn": "F8_E4M3", "torch.float8_e5m2": "F8_E5M2",
    "torch.int8": "I8", "torch.uint8": "U8", "torch.bool": "BOOL",
}
SAFETENSORS_ORDER = {dtype: rank for rank, dtype in enumerate(SAFETENSORS_DTYPES)}
PREFETCH_TENSORS = 2  # tensors copied to the CPU ahead of the one being written


def safetensors_header(tensors: dict, metadata: dict | None) -> tuple[bytes, list[str]]:
    """A safetensors file's header (its length, then JSON padded to 8 bytes) and the order the tensors' bytes
    follow in, as safetensors' own writer makes them: by dtype (SAFETENSORS_DTYPES), then by name."""
    order = sorted(tensors, key=lambda k: (SAFETENSORS_ORDER[str(tensors[k].dtype)], k))
    header, offset = ({"__metadata__": metadata} if metadata is not None else {}), 0
    for name in order:
        tensor = tensors[name]
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[str(tensor.dtype)], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, order


def check_savable(tensors: dict) -> None:
    """What safetensors' save_file refuses, in its order: tensors whose bytes overlap in one storage (they would
    be written twice; views that do not overlap, such as a tensor's rows, are written), then a strided tensor."""
    storages: dict[tuple, list[str]] = {}
    for name, tensor in tensors.items():
        storage = tensor.untyped_storage() if tensor.device.type != "meta" else None
        if storage is not None and storage.data_ptr() and storage.nbytes():
            storages.setdefault((tensor.device, storage.data_ptr(), storage.nbytes()), []).append(name)
    for names in (n for n in storages.values() if len(n) > 1):
        areas = sorted((tensors[n].data_ptr(), end_pointer(tensors[n]), n) for n in names)
        for (_, last_stop, last_name), (start, _, name) in zip(areas, areas[1:]):
            if start < last_stop:
                raise RuntimeError(f"{last_name} and {name} share memory; safetensors cannot write both")
    for name, tensor in tensors.items():
        if not tensor.is_contiguous():
            raise ValueError(f"{name} is not contiguous; safetensors writes contiguous tensors only")


def end_pointer(tensor) -> int:
    """One past a tensor's last byte (its start when empty), as safetensors measures an overlap."""
    return tensor.view(-1)[-1].data_ptr() + tensor.element_size() if tensor.numel() else tensor.data_ptr()


def host_bytes(tensor) -> memoryview:
    """A contiguous tensor's bytes in CPU memory (copied there from a GPU)."""
    import torch

    return memoryview(tensor.detach().reshape(-1).to("cpu").view(torch.uint8).numpy())


def write_safetensors(tensors: dict, filename: str | os.PathLike, metadata: dict | None = None,
                      written: Callable[[int], None] = lambda nbytes: None) -> None:
    """safetensors' save_file, byte for byte, with each tensor's copy to the CPU made on a second thread while the
    one before it is written: save_file copies every tensor, one after the other, before it writes the first.
    `written(n)` hears of each tensor's n bytes once they are written."""
    check_savable(tensors)
    header, order = safetensors_header(tensors, metadata)
    with open(filename, "wb") as handle, concurrent.futures.ThreadPoolExecutor(1, "copy-to-cpu") as copier:
        handle.write(header)
        pending = deque(copier.submit(host_bytes, tensors[name]) for name in order[:PREFETCH_TENSORS])
        for name in order[PREFETCH_TENSORS:] + [None] * len(pending):
            data = pending.popleft().result()
            if name is not None:
                pending.append(copier.submit(host_bytes, tensors[name]))
            handle.write(data)
            written(data.nbytes)


# Where export_hf_checkpoint's shards are written: transformers' save_pretrained (safetensors' save_file, imported
# under this name in modeling_utils) for a model in memory, ModelOpt's streaming writer for an offloaded one
SHARD_WRITERS = (("transformers.modeling_utils", "safe_save_file"),
                 ("modelopt.torch.export.unified_export_hf_streaming", "save_file"))


@contextlib.contextmanager
def shards_written_by_write_safetensors(expected_bytes: int):
    """While export_hf_checkpoint runs: each shard is written by write_safetensors instead of safetensors' save_file
    (SHARD_WRITERS: the private names this takes; one a library no longer has is left alone, and then untimed).
    Everything else the exporters do (the shard split, the index, tied weights, config files) stays their own;
    test_export_writer fails if a checkpoint written so ever differs from one written without it. Yields a clock
    of the seconds spent writing shards; a progress line counts the MiB written against `expected_bytes` (the
    checkpoint's estimate: the line stops at 100% if the files come out larger)."""
    import importlib

    import torch

    clock, progress, total_written = DeviceClock(), None, 0

    def count(nbytes: int) -> None:
        nonlocal total_written, progress
        if progress is None:  # its clock starts with the first shard, not with the exporter's work before it
            progress = Progress(desc="write shards", unit="MiB", total=max(expected_bytes >> 20, 1))
        total_written += nbytes
        progress.update(min(total_written >> 20, progress.total) - progress.done)

    def timed_write(tensors: dict, filename: str, metadata: dict | None = None) -> None:
        with clock.timing(torch.device("cpu")):  # the wall clock: the copies from the GPU are waited for
            write_safetensors(tensors, filename, metadata, count)
    originals = []
    try:
        for module_name, attribute in SHARD_WRITERS:
            try:
                module = importlib.import_module(module_name)
            except ImportError:
                continue
            if hasattr(module, attribute):
                originals.append((module, attribute, getattr(module, attribute)))
                setattr(module, attribute, timed_write)
        yield clock
    finally:
        for module, attribute, original in originals:
            setattr(module, attribute, original)
        if progress is not None:
            progress.close()


@contextlib.contextmanager
def shared_input_groups(model):
    """While a forward runs on an offloaded model (export_knowing_shared_inputs): the quantized linears fed the same
    input tensor, grouped in call order, into the list it yields. Inputs are held weakly: each is freed when the
    forward is done with it, as without the hooks."""
    import torch
    from modelopt.torch.quantization.utils.core_utils import has_accelerate_offload
    from torch.utils.weak import WeakIdKeyDictionary

    groups: list[list] = []
    if not has_accelerate_offload(model):
        yield groups
        return
    by_input = WeakIdKeyDictionary()

    def record(module, args):
        if args and isinstance(args[0], torch.Tensor):
            if args[0] not in by_input:
                by_input[args[0]] = []
                groups.append(by_input[args[0]])
            by_input[args[0]].append(module)
    handles = [model.get_submodule(n).register_forward_pre_hook(record) for n in quantized_linear_shapes(model)]
    try:
        yield groups
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def export_knowing_shared_inputs(model, groups: list[list]):
    """While export_hf_checkpoint runs on an offloaded model: ModelOpt finds the linears fed the same input (whose
    input and weight global scales it unifies) with a dummy forward of its own (collect_shared_input_modules), which
    brings every offloaded weight onto the GPU once more (1.7 s of an 8B model's export at a 6 GiB GPU cap). It is
    handed `groups` (shared_input_groups, recorded in capture_linear_io's forward) instead, named as it names them,
    where they cover every linear it would hook and no layernorm is to be fused (AWQ); else its own runs."""
    import modelopt.torch.export.unified_export_hf as exporter
    from modelopt.torch.quantization.utils.core_utils import has_accelerate_offload

    original = exporter.collect_shared_input_modules

    def collect(root, dummy_forward_fn, collect_layernorms=False):
        names = {id(m): n for n, m in root.named_modules()}
        hooked = {id(m) for m in root.modules() if exporter.is_quantlinear(m) and (
            exporter._is_enabled_quantizer(m.input_quantizer) or exporter._is_enabled_quantizer(m.weight_quantizer))}
        found = [[m for m in group if id(m) in hooked] for group in groups]
        if hooked - {id(m) for group in found for m in group} or "awq" in (exporter.get_quantization_format(root)
                                                                           or "").lower():
            return original(root, dummy_forward_fn, collect_layernorms)
        for module in (m for group in found for m in group):
            module.name = names[id(module)]
        input_to_linear = {index: group for index, group in enumerate(g for g in found if g)}
        return input_to_linear, (defaultdict(lambda: None) if collect_layernorms else None)

    if has_accelerate_offload(model):
        exporter.collect_shared_input_modules = collect
    try:
        yield
    finally:
        exporter.collect_shared_input_modules = original


@dataclasses.dataclass
class Export:
    """What export_checkpoint leaves for the checks after it. The export changes the model in memory, so the
    calibrated linears' inputs and outputs on a few calibration samples (capture_linear_io) are taken before it:
    `before`, and for awq_lite `after` its scales were folded into the layers before them."""
    before: dict
    after: dict | None
    carried_unloaded: list[str]
    seconds: float
    modelopt_seconds: float  # of which export_hf_checkpoint
    shard_seconds: float | None  # of which write_safetensors (None: no shard went through it)


@contextlib.contextmanager
def staging_dir(output: Path, needed_bytes: int):
    """A temp dir beside the output for the checkpoint to be written and checked in, removed if anything fails; a
    failed write (full disk, quota, read-only) becomes its one-line error, measured before the removal frees space."""
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        yield staging
    except BaseException as exc:
        code = write_errno(exc, output.parent)
        shutil.rmtree(staging, ignore_errors=True)
        if code is not None:
            raise write_error(output.parent, needed_bytes, "the checkpoint", code) from None
        raise


def export_checkpoint(model, tokenizer, settings: Settings, samples: list[list[int]], pad_id: int, staging: Path,
                      device: str, expected_bytes: int) -> Export:
    """export_hf_checkpoint into `staging`, plus what it leaves out: the tokenizer and processor files, and the
    tensors the model class skips on load (carried over in 16 bits). `expected_bytes`: the estimated checkpoint size,
    for the progress line."""
    from modelopt.torch.export import export_hf_checkpoint

    stage(STAGE_EXPORT)
    start = time.perf_counter()
    with shared_input_groups(model) as groups:
        before, after = capture_linear_io(model, samples, device, pad_id), None
    if settings.algorithm == "awq_lite":
        fold_awq_scales(model)
        after = capture_linear_io(model, samples, device, pad_id, outputs=True)
    modelopt_start = time.perf_counter()
    with warnings.catch_warnings(), text_forward(model), modelopt_report(gptq=False), \
            export_knowing_shared_inputs(model, groups), \
            shards_written_by_write_safetensors(expected_bytes) as shard_clock:
        warnings.simplefilter("ignore", UserWarning)
        export_hf_checkpoint(model, export_dir=str(staging))
    modelopt_seconds = round(time.perf_counter() - modelopt_start, 2)
    relabel_folded_awq(staging, settings.mode)
    strip_name_sentinels(staging)
    carried = carry_unloaded_tensors(model, staging, source_checkpoint_dir(settings))
    write_tokenizer_and_extras(model, tokenizer, staging, settings)
    shard_seconds = round(shard_clock.seconds, 2) if shard_clock.seconds else None
    return Export(before, after, carried, round(time.perf_counter() - start, 2), modelopt_seconds, shard_seconds)


def write_records(staging: Path, manifest: dict, model_name: str) -> None:
    """The manifest, the model card and the quality report (with --eval), each written once and complete, readable
    by all as the rest of a checkpoint is."""
    records = {MANIFEST_NAME: json.dumps(manifest, indent=2) + "\n", MODEL_CARD_NAME: model_card(manifest, model_name)}
    if "quality" in manifest:
        records[REPORT_NAME] = json.dumps(manifest["quality"], indent=2) + "\n"
    for name, text in records.items():
        (staging / name).write_text(text)
        (staging / name).chmod(0o644)
    staging.chmod(0o755)


# --------------------------------------------------------------------------- checks of the written files
MODE_QUANT_ALGO = {"nvfp4": "NVFP4", "w4a8": "W4A8_NVFP4_FP8", "weight_only": "W4A16_NVFP4"}
SIXTEEN_BIT = ("BF16", "F16")
KV_CACHE_SCHEMES = {  # kv_cache_quant_algo -> what config.json's kv_cache_scheme must be for vLLM to agree
    None: lambda scheme: scheme is None,
    "FP8": lambda scheme: isinstance(scheme, dict) and scheme.get("type") == "float" and scheme.get("num_bits") == 8,
    "NVFP4": lambda scheme: scheme == "NVFP4" or (isinstance(scheme, dict) and scheme.get("num_bits") == 4),
}


class CheckpointReader:
    """The tensors of a safetensors checkpoint, read lazily: dtype and shape without loading the data."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.problems: list[str] = []
        index_path = folder / "model.safetensors.index.json"
        files = sorted(p.name for p in folder.glob("*.safetensors"))
        weight_map = json.loads(index_path.read_text())["weight_map"] if index_path.is_file() else None
        if not files:
            self.problems.append(f"{folder}: no .safetensors files [checkpoint: weights]")
        self.handles = {f: safe_open(str(folder / f), "pt") for f in files}
        self.location = {key: f for f, h in self.handles.items() for key in h.keys()}
        if weight_map is not None:
            self.problems += [f"{key}: listed in the index in {f}, which "
                              f"{'lacks it' if f in self.handles else 'is missing'} [index: complete]"
                              for key, f in weight_map.items() if self.location.get(key) != f]
            self.problems += [f"{key}: in {f} but not in model.safetensors.index.json [index: complete]"
                              for key, f in self.location.items() if key not in weight_map]
        elif len(files) > 1:
            self.problems.append(f"{folder}: {len(files)} safetensors files but no model.safetensors.index.json "
                                 "[index: complete]")

    def __contains__(self, key: str) -> bool:
        return key in self.location

    def dtype(self, key: str) -> str:
        return self.handles[self.location[key]].get_slice(key).get_dtype()

    def shape(self, key: str) -> list[int]:
        return list(self.handles[self.location[key]].get_slice(key).get_shape())

    def tensor(self, key: str):
        return self.handles[self.location[key]].get_tensor(key)

    def get(self, key: str):
        """The tensor, or None where the checkpoint has no `key`."""
        return self.tensor(key) if key in self else None


def read_checkpoint_tensors(folder: Path) -> dict:
    """All tensors of a safetensors checkpoint, as name -> tensor (single file or sharded)."""
    reader = CheckpointReader(folder)
    if not reader.handles:
        raise ValueError(f"{folder}: no .safetensors files")
    return {key: reader.tensor(key) for key in reader.location}


def vllm_excludes(name: str, patterns: list[str]) -> bool:
    """vLLM's ModelOpt matching: exact, substring, fnmatch; 'foo*' also as 'foo' and 'foo.*'."""
    expanded = []
    for p in patterns:
        expanded += [p[:-1], p[:-1] + ".*", p] if p.endswith("*") and not p.endswith(".*") else [p]
    return any(name == p or p in name or fnmatch.fnmatchcase(name, p) for p in expanded)


def trtllm_excludes(name: str, patterns: list[str]) -> bool:
    """TensorRT-LLM's matching: fnmatch on the name or any ancestor; a trailing '.*' also matches the parent."""
    parts = name.split(".")
    candidates = [".".join(parts[:i]) for i in range(len(parts), 0, -1)]
    return any(fnmatch.fnmatchcase(c, p) or (p.endswith(".*") and c == p[:-2]) for c in candidates for p in patterns)


def check_quant_configs(folder: Path) -> tuple[dict, list[str]]:
    """hf_quant_config.json and config.json's quantization_config: present, known, and in agreement."""
    try:
        hf = json.loads((folder / "hf_quant_config.json").read_text())
        inline = json.loads((folder / "config.json").read_text()).get("quantization_config")
    except (OSError, json.JSONDecodeError) as exc:
        return {}, [f"{exc} [config: hf_quant_config.json and config.json readable]"]
    quant = hf.get("quantization") or {}
    algo = quant.get("quant_algo")
    if algo == MIXED_PRECISION:
        per_algo = ("quantized_layers",)
    else:  # FP8 has no group size: one scale per tensor
        per_algo = ("exclude_modules", "group_size") if QUANT_ALGO_GROUP_SIZE.get(algo) else ("exclude_modules",)
    required = ("quant_algo", "kv_cache_quant_algo", *per_algo)
    problems = [f"hf_quant_config.json: missing key quantization.{k} [config: vLLM requires it]"
                for k in required if k not in quant]
    problems += [f"hf_quant_config.json: exclude pattern {p!r} holds a control character and matches no module "
                 "[config: exclude_modules]" for p in quant.get("exclude_modules") or [] if not p.isprintable()]
    problems += algo_problems(quant)
    if not isinstance(inline, dict):
        return quant, problems + ["config.json: no quantization_config [config: runtimes read it]"]
    if inline.get("quant_method") != "modelopt":
        problems.append(f"config.json: quantization_config.quant_method {inline.get('quant_method')!r}, expected "
                        "'modelopt' [config: agreement]")
    if inline.get("quant_algo") != algo:
        problems.append(f"config.json: quant_algo {inline.get('quant_algo')!r} but hf_quant_config.json says {algo!r} "
                        "[config: agreement]")
    if inline.get("quantized_layers") != quant.get("quantized_layers"):
        problems.append("config.json: quantization_config.quantized_layers differs from hf_quant_config.json's; vLLM "
                        "reads config.json's [config: agreement]")
    if sorted(inline.get("ignore") or []) != sorted(quant.get("exclude_modules") or []):
        problems.append("config.json: quantization_config.ignore differs from hf_quant_config.json exclude_modules "
                        "[config: agreement]")
    kv_algo, scheme = quant.get("kv_cache_quant_algo"), inline.get("kv_cache_scheme")
    if kv_algo not in KV_CACHE_SCHEMES:
        problems.append(f"hf_quant_config.json: kv_cache_quant_algo {kv_algo!r} is not one of "
                        f"{', '.join(map(str, KV_CACHE_SCHEMES))} [config: kv_cache_quant_algo]")
    elif not KV_CACHE_SCHEMES[kv_algo](scheme):
        problems.append(f"config.json: kv_cache_scheme {scheme!r} does not say {kv_algo}, which hf_quant_config.json "
                        "says; vLLM reads config.json [config: agreement]")
    return quant, problems


def format_problems(where: str, algo, group_size, allowed: Iterable[str]) -> list[str]:
    """One quant_algo (and its group size) against the formats a runtime loads."""
    if algo not in allowed:
        return [f"{where}: quant_algo {algo!r} is not one of {', '.join(allowed)} [config: quant_algo]"]
    if group_size != QUANT_ALGO_GROUP_SIZE[algo]:
        return [f"{where}: group_size {group_size} for {algo}, expected {QUANT_ALGO_GROUP_SIZE[algo]} "
                "[config: group_size]"]
    return []


def algo_problems(quant: dict) -> list[str]:
    """The checkpoint's quant_algo, or for MIXED_PRECISION each quantized_layers entry's: formats this tool checks."""
    algo = quant.get("quant_algo")
    if algo != MIXED_PRECISION:
        return format_problems("hf_quant_config.json", algo, quant.get("group_size"), QUANT_ALGO_GROUP_SIZE)
    layers = quant.get("quantized_layers")
    if not isinstance(layers, dict) or not layers:
        return ["hf_quant_config.json: MIXED_PRECISION without a quantized_layers map [config: quantized_layers]"]
    entries = {name: entry if isinstance(entry, dict) else {} for name, entry in layers.items()}
    return [p for name, e in entries.items() for p in format_problems(
        f"hf_quant_config.json: quantized_layers[{name!r}]", e.get("quant_algo"), e.get("group_size"),
        MIXED_LAYER_ALGOS)]


def layer_formats(quant: dict) -> Callable[[str], str | None]:
    """Exported linear name -> the quant_algo its tensors are in: MIXED_PRECISION's quantized_layers entry (None for
    a linear it does not list, which vLLM loads in 16 bits), else the checkpoint's one quant_algo."""
    if quant.get("quant_algo") != MIXED_PRECISION:
        return lambda name: quant.get("quant_algo")
    layers = quant["quantized_layers"]
    return lambda name: layers[name]["quant_algo"] if name in layers else None


def tensor_scales(algo: str) -> tuple[str, ...]:
    """A quantized linear's per-tensor scales: FP8's weight and input scales; NVFP4's global weight scale and, when
    inputs are quantized, the input scale."""
    if algo == "FP8":
        return ("weight_scale", "input_scale")
    return ("weight_scale_2",) + (() if algo == "W4A16_NVFP4" else ("input_scale",))


def check_scale_values(label: str, values, per_block: bool) -> list[str]:
    """Scales must be finite and positive; a block scale may be 0 only for an all-zero block."""
    import torch

    values = values.float()
    if not torch.isfinite(values).all():
        return [f"{label}: non-finite values [scales: finite]"]
    if per_block and ((values < 0).any() or not (values > 0).any()):
        return [f"{label}: block scales must be >= 0 and not all zero (min {values.min().item()}) [scales: positive]"]
    if not per_block and not (values > 0).all():
        return [f"{label}: scale must be positive, got {values.min().item()} [scales: positive]"]
    return []


def check_linear(reader: CheckpointReader, name: str, shape: tuple, algo: str | None) -> list[str]:
    """One quantized linear [out, in] against what vLLM and TensorRT-LLM load: dtypes, shapes, scales."""
    out_f, in_f = shape
    if algo is None:
        return [f"{name}: written quantized but not in quantized_layers; vLLM would load it as 16-bit "
                "[config: quantized_layers]"]
    if algo == "FP8":
        return check_quantized_tensors(reader, {s: f"{name}.{s}" for s in ("weight", "weight_scale", "input_scale")},
                                       {"weight": ("F8_E4M3", [out_f, in_f]), "weight_scale": ("F32", []),
                                        "input_scale": ("F32", [])})
    group = QUANT_ALGO_GROUP_SIZE[algo]
    if in_f % group:
        return [f"{name}: in_features {in_f} is not a multiple of the group size {group} [tensors: shape]"]
    keys = {s: f"{name}.{s}" for s in ("weight", "weight_scale", "weight_scale_2", "input_scale")}
    return check_nvfp4_tensors(reader, keys, [out_f, in_f // 2], [out_f, in_f // group], algo)


def check_expert_stack(reader: CheckpointReader, key: str, shape: list[int], algo: str) -> list[str]:
    """A 3-D expert stack [experts, in, out] (GPT-OSS, Llama 4) as ModelOpt writes it: FP4 packed along `in`,
    with `{key}_weight_scale` [experts, in/group, out] and per-stack scalar scales."""
    group = QUANT_ALGO_GROUP_SIZE.get(algo)
    if not group:
        return [f"{key}: a {algo} expert stack, which this tool does not check [tensors: dtype and shape]"]
    if len(shape) != 3 or shape[1] % group:
        return [f"{key}: expert stack of shape {shape} is not [experts, in, out] with in a multiple of {group} "
                "[tensors: shape]"]
    experts, in_f, out_f = shape
    keys = {"weight": key, **{s: f"{key}_{s}" for s in ("weight_scale", "weight_scale_2", "input_scale")}}
    return check_nvfp4_tensors(reader, keys, [experts, in_f // 2, out_f], [experts, in_f // group, out_f], algo)


def check_nvfp4_tensors(reader: CheckpointReader, keys: dict[str, str], weight_shape: list[int],
                        scale_shape: list[int], algo: str) -> list[str]:
    rules = {"weight": ("U8", weight_shape), "weight_scale": ("F8_E4M3", scale_shape),
             "weight_scale_2": ("F32", []), "input_scale": ("F32", [])}
    if algo == "W4A16_NVFP4":
        rules.pop("input_scale")
        if keys["input_scale"] in reader:
            return [f"{keys['input_scale']}: present in a weight-only checkpoint [tensors: no extra]"]
    return check_quantized_tensors(reader, keys, rules)


def check_quantized_tensors(reader: CheckpointReader, keys: dict[str, str], rules: dict[str, tuple]) -> list[str]:
    """Each role's tensor (weight, scales) present with its dtype and shape; scale values finite and positive."""
    problems = []
    for role, (dtype, want) in rules.items():
        key = keys[role]
        if key not in reader:
            problems.append(f"{key}: missing [tensors: quantized linear needs {role}]")
        elif reader.dtype(key) != dtype or reader.shape(key) != want:
            problems.append(f"{key}: expected {dtype} {want}, got {reader.dtype(key)} {reader.shape(key)} "
                            "[tensors: dtype and shape]")
        elif role != "weight":
            problems += check_scale_values(key, reader.tensor(key), per_block=bool(want))
    return problems


def check_fused_groups(reader: CheckpointReader, quantized: set[str], linears: set[str],
                       layer_algo: Callable[[str], str | None]) -> list[str]:
    """Layers the runtimes fuse (q/k/v, gate/up) are all quantized or all not, in one format, with equal per-tensor
    scales."""
    import torch

    problems = []
    for parent in sorted({n.rpartition(".")[0] for n in linears}):
        for group in FUSED_GROUPS:
            members = [f"{parent}.{g}" for g in group if f"{parent}.{g}" in linears]
            if len(members) < 2:
                continue
            states = {m in quantized for m in members}
            if len(states) > 1:
                problems.append(f"{parent}: {'/'.join(group)} are partly quantized; vLLM and TensorRT-LLM fuse them "
                                "[fused: all or none]")
                continue
            algos = {layer_algo(m) for m in members} if states == {True} else set()
            if len(algos) > 1:
                problems.append(f"{parent}: {'/'.join(group)} are in different formats ({', '.join(map(str, algos))}); "
                                "vLLM refuses a fused layer whose parts differ [fused: one format]")
                continue
            for suffix in tensor_scales(algos.pop()) if algos else ():
                values = [reader.tensor(f"{m}.{suffix}") for m in members if f"{m}.{suffix}" in reader]
                if len(values) > 1 and not all(torch.equal(values[0], v) for v in values[1:]):
                    problems.append(f"{parent}.{{{','.join(group)}}}.{suffix}: differ; TensorRT-LLM asserts they are "
                                    "equal and vLLM mis-scales all but one [fused: shared scales]")
    return problems


def original_tensors(skeleton, source: Path | None) -> tuple[dict[str, list[int]], str]:
    """The tensors the model had before quantization, by the names and shapes they have on disk.

    With the source checkpoint at hand they come from its safetensors headers. Without it (`--verify
    DIR` alone), from what save_pretrained would write for this config: transformers' load-time
    renames and fusions reversed on the meta skeleton. Never from the calibrated model in memory.
    Returns the tensors and which of the two they came from.
    """
    if source is not None:
        reader = CheckpointReader(source)
        if reader.handles:
            return {key: reader.shape(key) for key in reader.location}, "source checkpoint"
    from transformers.core_model_loading import revert_weight_conversion

    state = revert_weight_conversion(skeleton, skeleton.state_dict())
    return {key: list(t.shape) for key, t in state.items()}, "config"


# On-disk fused expert stacks [experts, ...] that ModelOpt's export writes one linear per expert, for the
# architectures whose vLLM NVFP4 loader maps exactly those names: `{experts}.{e}.{projection}.` + weight,
# weight_scale, weight_scale_2, input_scale (granitemoehybrid.py get_expert_mapping; qwen3_vl_moe.py
# load_weights, whose fused-stack path loads unquantized weights only). GraniteMoe's own loader maps w1/w3/w2
# instead, so it is not listed: its export is refused rather than shipped unloadable.
# Projections are stacked along the output, in this order.
GRANITE_HYBRID, QWEN3_VL_MOE = ("GraniteMoeHybridForCausalLM",), ("Qwen3VLMoeForConditionalGeneration",)
EXPERT_STACK_SPLITS = (  # (architectures, on-disk key, per-expert module prefix, projections)
    (GRANITE_HYBRID, re.compile(r"(.*\.block_sparse_moe)\.input_linear\.weight"), r"\1.experts",
     ("gate_proj", "up_proj")),
    (GRANITE_HYBRID, re.compile(r"(.*\.block_sparse_moe)\.output_linear\.weight"), r"\1.experts", ("down_proj",)),
    (QWEN3_VL_MOE, re.compile(r"(.*\.mlp\.experts)\.gate_up_proj"), r"\1", ("gate_proj", "up_proj")),
    (QWEN3_VL_MOE, re.compile(r"(.*\.mlp\.experts)\.down_proj"), r"\1", ("down_proj",)),
)


def expert_stack_linears(key: str, shape: list[int], hidden: int,
                         architecture: str | None) -> dict[str, tuple[int, int]] | None:
    """The per-expert linears (name -> [out, in]) an on-disk fused expert stack is written as; None for other keys.

    Checkpoints store stacks as [experts, out, in] (Granite) or [experts, in, out] (Qwen3-VL-MoE); the hidden
    size, the input of gate/up and the output of down, tells which (both read the same when it is ambiguous).
    """
    for architectures, pattern, prefix, projections in EXPERT_STACK_SPLITS:
        match = pattern.fullmatch(key)
        if architecture not in architectures or match is None or len(shape) != 3:
            continue
        experts, rows, columns = shape
        rows_are_outputs = columns == hidden if projections != ("down_proj",) else rows == hidden
        out_f, in_f = (rows, columns) if rows_are_outputs else (columns, rows)
        return {f"{match.expand(prefix)}.{e}.{p}": (out_f // len(projections), in_f)
                for e in range(experts) for p in projections}
    return None


def check_against_originals(originals: dict[str, list[int]], reader: CheckpointReader,
                            layer_algo: Callable[[str], str | None], tied: set[str], hidden: int,
                            architecture: str | None) -> tuple[set[str], set[str], list[str]]:
    """Every original tensor is written quantized in its linear's format (a linear's weight, a 3-D expert stack,
    or a fused expert stack split per expert: expert_stack_linears) or carried over with its shape. Returns (what
    was quantized, every key the checkpoint may hold, problems)."""
    quantized, expected, problems = set(), set(), []
    for key, shape in originals.items():
        module = key[: -len(".weight")] if key.endswith(".weight") else None
        if module and f"{module}.weight_scale" in reader and len(shape) == 2:
            algo = layer_algo(module)
            quantized.add(module)
            problems += check_linear(reader, module, tuple(shape), algo)
            expected |= {key, f"{module}.weight_scale"} | {f"{module}.{s}" for s in tensor_scales(algo or "NVFP4")}
        elif f"{key}_weight_scale" in reader:
            algo = layer_algo(key) or "NVFP4"
            quantized.add(key)
            problems += check_expert_stack(reader, key, shape, algo)
            expected |= {key, f"{key}_weight_scale"} | {f"{key}_{s}" for s in tensor_scales(algo)}
        elif key in reader:
            expected.add(key)
            if reader.shape(key) != shape:
                problems.append(f"{key}: shape {reader.shape(key)}, the original has {shape} [tensors: carried over]")
        elif (split := expert_stack_linears(key, shape, hidden, architecture)) is not None:
            quantized |= set(split)
            expected |= {f"{m}.{s}" for m in split for s in ("weight", "weight_scale") + tensor_scales(
                layer_algo(m) or "NVFP4")}
            problems += [p for m, linear in split.items() for p in check_linear(reader, m, linear, layer_algo(m))]
        elif key not in tied:
            problems.append(f"{key}: missing [tensors: complete]")
    return quantized, expected, problems


def export_names(model) -> Callable[[str], str]:
    """In-memory module name -> the name the export writes: ModelOpt's reverse rename rules applied to the
    module's `.weight` key, as export_hf_checkpoint applies them to tensor keys (identity when the model was
    not renamed, or when ModelOpt cannot reverse its conversion and keeps the in-memory names).

    Not ModelOpt's build_reverse_name_mapper: it appends a sentinel starting with `modelopt` to the name, which
    unanchored rules rewrite (NemotronH's `model.` -> `backbone.` turns it into `backbone.pt_name_sentinel`).
    """
    from modelopt.torch.export.quant_aware_conversion import (
        QuantConversionUnsupportedError,
        _apply_rename_rules,
        _build_reverse_rules,
        _compile_rename_rules,
    )

    try:
        _, rules, _ = _build_reverse_rules(model)
    except QuantConversionUnsupportedError:  # the export then keeps the in-memory names as well
        return lambda name: name
    compiled = _compile_rename_rules(rules)
    return lambda name: _apply_rename_rules(f"{name}.weight", compiled)[: -len(".weight")]


def check_kv_scales(reader: CheckpointReader, kv_algo: str | None, linears: Iterable[str]) -> tuple[list[str], set]:
    """With a quantized KV cache every attention layer needs k_proj.k_scale and v_proj.v_scale: FP32 scalars > 0.

    vLLM remaps them to attn.k_scale / attn.v_scale; a missing pair becomes 1.0 there, a zero one fails.
    """
    if kv_algo is None:
        return [], set()
    problems, keys = [], set()
    for parent in sorted({n.rpartition(".")[0] for n in linears if n.endswith(".k_proj")}):
        if f"{parent}.v_proj" not in linears:
            continue
        for key in (f"{parent}.k_proj.k_scale", f"{parent}.v_proj.v_scale"):
            keys.add(key)
            if key not in reader:
                problems.append(f"{key}: missing with kv_cache_quant_algo {kv_algo} [kv cache: scales]")
            elif reader.dtype(key) != "F32" or reader.shape(key) not in ([], [1]):
                problems.append(f"{key}: expected an F32 scalar, got {reader.dtype(key)} {reader.shape(key)} "
                                "[kv cache: scales]")
            else:
                problems += check_scale_values(key, reader.tensor(key), per_block=False)
    return problems, keys


def written_model(folder: Path) -> tuple[Any, Any]:
    """The config a checkpoint folder holds, and its model on the meta device."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(folder))
    return config, empty_model(config, trust_remote_code=False)


def verify_checkpoint(folder: Path, quantized_in_memory: Iterable[str] = (), source: Path | None = None,
                      written: tuple[Any, Any] | None = None) -> tuple[dict, list[str]]:
    """Every rule vLLM's and TensorRT-LLM's ModelOpt NVFP4 loaders rely on, offline; returns (summary, problems).

    `source`: the checkpoint the export came from; what must be written derives from its tensors on
    disk. After an export, `quantized_in_memory` are the modules ModelOpt quantized, by their exported
    names: each must be written as NVFP4. `written`: written_model(folder) where the caller built it already.
    """
    import torch

    quant, problems = check_quant_configs(folder)
    reader = CheckpointReader(folder)
    problems += reader.problems
    algo, patterns = quant.get("quant_algo"), quant.get("exclude_modules") or []
    if algo_problems(quant):
        return {}, problems
    layer_algo = layer_formats(quant)
    config, skeleton = written or written_model(folder)
    originals, checked_against = original_tensors(skeleton, source)
    tie = any(getattr(c, "tie_word_embeddings", False) for c in (config, config.get_text_config()))  # either may say
    tied = {k for k in originals if k.endswith("lm_head.weight")} if tie else set()
    hidden = config.get_text_config().hidden_size
    architecture = (config.architectures or [None])[0]
    quantized, expected, more = check_against_originals(originals, reader, layer_algo, tied, hidden, architecture)
    in_memory = set(quantized_in_memory)
    problems += more + [f"{n}: quantized in memory but not written quantized" for n in sorted(in_memory - quantized)]
    if in_memory:  # after an export: nothing written as NVFP4 that ModelOpt left in 16 bits
        problems += [f"{n}: written as NVFP4 but not quantized in memory [tensors: exactly the quantized modules]"
                     for n in sorted(quantized - in_memory) if not under_experts(n)]
    to_disk = export_names(skeleton)
    linears = {to_disk(n): (m.out_features, m.in_features) for n, m in skeleton.named_modules()
               if isinstance(m, torch.nn.Linear)}
    linears.update({n: None for n in quantized if n not in linears})
    kv_problems, kv_keys = check_kv_scales(reader, quant.get("kv_cache_quant_algo"), linears)
    problems += kv_problems + check_exclusions(reader, quantized, linears, patterns, layer_algo,
                                               mixed=algo == MIXED_PRECISION)
    problems += check_fused_groups(reader, quantized, set(linears), layer_algo)
    extra = set(reader.location) - expected - kv_keys
    carried, carried_problems = check_carried_unloaded(reader, extra, type(skeleton), patterns)
    problems += carried_problems + [f"{k}: unexpected tensor [tensors: no extra]" for k in sorted(extra - carried)]
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        problems.append(f"{folder}: no tokenizer files ({', '.join(TOKENIZER_FILES)}) [files: tokenizer]")
    summary = {"quant_algo": algo, "group_size": quant.get("group_size"),
               "kv_cache_quant_algo": quant.get("kv_cache_quant_algo"), "quantized_linears": len(quantized),
               "unquantized_linears": len(set(linears) - quantized), "tensors": len(reader.location),
               "checked_against": checked_against, "exclude_modules": patterns,
               "formats": dict(sorted(Counter(str(layer_algo(n)) for n in quantized).items()))}
    return summary, problems


def unloaded_keys(cls, keys: Iterable[str]) -> list[str]:
    """The checkpoint keys a model class declares it skips on load (its _keys_to_ignore_on_load_unexpected)."""
    patterns = getattr(cls, "_keys_to_ignore_on_load_unexpected", None) or []
    return [k for k in keys if any(re.search(p, k) for p in patterns)]


def check_carried_unloaded(reader: CheckpointReader, extra: set[str], cls, patterns: list[str]) -> tuple[set, list]:
    """Tensors the model class skips on load (multi-token prediction) may ride along, in 16 bits and excluded."""
    carried = set(unloaded_keys(cls, extra))
    def excluded(module: str) -> bool:
        return vllm_excludes(module, patterns) and trtllm_excludes(module, patterns)

    problems = [f"{k}: carried over but not excluded, or not 16-bit; vLLM would load it as FP4 [exclude: consistent]"
                for k in sorted(carried)
                if reader.dtype(k) not in SIXTEEN_BIT + ("F32",) or not excluded(k.rpartition(".")[0])]
    return carried, problems


def check_exclusions(reader: CheckpointReader, quantized: set[str], linears: dict, patterns: list[str],
                     layer_algo: Callable[[str], str | None], mixed: bool) -> list[str]:
    """A quantized linear must match no exclude pattern; a 16-bit one must match in both runtimes' matchers, or in a
    MIXED_PRECISION checkpoint be absent from quantized_layers (the runtimes load what it does not list in 16 bits)."""
    problems = []
    for name in sorted(linears):
        if name in quantized:
            if vllm_excludes(name, patterns) or trtllm_excludes(name, patterns):
                problems.append(f"{name}: quantized but matched by exclude_modules; the runtimes would load it as "
                                "16-bit [exclude: consistent]")
        elif f"{name}.weight" in reader:
            if reader.dtype(f"{name}.weight") not in SIXTEEN_BIT:
                problems.append(f"{name}.weight: unquantized linear stored as {reader.dtype(f'{name}.weight')} "
                                "[tensors: dtype and shape]")
            if mixed and layer_algo(name) is not None:
                problems.append(f"{name}: left in 16 bits but listed in quantized_layers as {layer_algo(name)} "
                                "[exclude: consistent]")
            elif not mixed and not (vllm_excludes(name, patterns) and trtllm_excludes(name, patterns)):
                problems.append(f"{name}: left in 16 bits but not matched by exclude_modules; the runtimes would load "
                                "it as FP4 [exclude: consistent]")
    return problems


def validate_export(folder: Path, expected: dict[str, str], source: Path | None,
                    written: tuple[Any, Any] | None = None) -> dict:
    """verify_checkpoint on what was just written against the source checkpoint, plus: exactly the modules
    ModelOpt quantized (`expected`: exported name -> the quant_algo meant for it), each in its format, under the
    quant_algo ModelOpt writes for them (MIXED_PRECISION when they differ)."""
    summary, problems = verify_checkpoint(folder, quantized_in_memory=expected, source=source, written=written)
    algos = set(expected.values())
    want = algos.pop() if len(algos) == 1 else MIXED_PRECISION
    if summary and summary["quant_algo"] != want:
        problems.append(f"quant_algo {summary['quant_algo']}, expected {want}")
    elif summary:
        layer_algo = layer_formats(json.loads((folder / "hf_quant_config.json").read_text())["quantization"])
        problems += [f"{n}: written as {layer_algo(n)}, chosen {a}" for n, a in expected.items() if layer_algo(n) != a]
    if problems:
        raise RuntimeError(f"exported checkpoint failed validation ({len(problems)} problems), first: "
                           + "; ".join(problems[:5]))
    return summary


def evaluate_existing(args: argparse.Namespace, env: dict) -> int:
    """--verify DIR --eval --reference ORIGINAL: the emulator on DIR's files against the original model.

    The held-out samples are what is left of the YAML mix after the calibration trim, so pass the
    --dataset_yaml, --max_samples and --seed the checkpoint was calibrated with.
    """
    report, settings = existing_quality_report(args, env)
    print_quality(report)
    return quality_gate(report, settings.max_ppl_increase)


def existing_quality_report(args: argparse.Namespace, env: dict) -> tuple[dict, Settings]:
    """The quality report of the checkpoint --verify names against --reference, and the settings it ran with."""
    if not args.reference:
        raise UsageError("--verify DIR --eval needs --reference ORIGINAL_MODEL (the model DIR was made from)")
    args.input_model, args.output_model = args.reference, args.verify
    settings = build_settings(args, env)
    config = load_model_config(settings)
    _, _, holdout = prepare_calibration_data(settings, load_tokenizer(settings))
    if not holdout:
        raise UsageError("--eval: no held-out samples left after the calibration trim; raise --oversample_ratio")
    stage(STAGE_QUALITY)
    return report_with_emulator(settings, config, Path(args.verify), holdout, pick_device()), settings


def run_verify(folder: Path, source: Path | None = None) -> int:
    """--verify: 0 when the checkpoint is clean, 1 when not (each problem on a line), 2 when there is none.

    With `source` (--reference, a local dir) every tensor of the original checkpoint must be accounted for.
    """
    if not folder.exists():
        raise UsageError(f"--verify: {folder} does not exist")
    if is_peft_adapter(folder):
        raise UsageError(f"--verify: {folder} is a PEFT adapter (adapter_config.json, no config.json), not a "
                         f"quantized checkpoint: {MERGE_ADAPTER_HINT}, then --verify its output")
    if not (folder / "config.json").is_file():
        raise UsageError(f"--verify: {folder} is not a checkpoint dir (no config.json)")
    summary, problems = {}, [f"{p} [files: whole]" for p in check_source_files(folder)]
    if not problems:  # the tensors can be read
        summary, problems = verify_checkpoint(folder, source=source)
    for problem in problems:
        print(f"FAIL {problem}")
    if problems:
        print(f"verify: {folder}: {len(problems)} problem(s)")
        return 1
    kv = f", KV cache {summary['kv_cache_quant_algo']}" if summary["kv_cache_quant_algo"] else ""
    formats = ", ".join(f"{n} {algo}" for algo, n in summary["formats"].items()) \
        if summary["quant_algo"] == MIXED_PRECISION else f"group {summary['group_size'] or 'none: per-tensor scales'}"
    print(f"verify: {folder}: OK against the {summary['checked_against']} ({summary['quant_algo']}, {formats}{kv}, "
          f"{summary['quantized_linears']} quantized / {summary['unquantized_linears']} 16-bit linears, "
          f"{summary['tensors']} tensors)")
    return 0


def dequantize_nvfp4(weight, weight_scale, weight_scale_2, group_size: int):
    """Packed FP4 (low nibble first) x FP8 block scale x FP32 global scale -> float32 weight."""
    import torch

    lut = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=weight.device)
    codes = torch.stack([weight & 0x0F, weight >> 4], dim=-1).reshape(weight.shape[0], -1)
    values = lut[codes.long()]
    scales = weight_scale.float().repeat_interleave(group_size, dim=1)
    return values * scales * weight_scale_2.float()


# --------------------------------------------------------------------------- export fidelity
FIDELITY_SAMPLES = 8          # calibration samples in the capture forward (one padded batch; real rows kept)
FIDELITY_TOKENS = 512         # tokens per sample at most: bounds the capture's activation memory
FIDELITY_ROWS = 256           # input rows kept per linear, on the CPU: bounds the check's memory
FIDELITY_CAP = 0.5            # relative output error above which a linear is broken, whatever the others do
FIDELITY_FLOOR = 0.25         # ... below which it passes, whatever the others do
FIDELITY_MEDIAN_FACTOR = 4.0  # between the two: broken when above this many times the checkpoint's median


class ExportRejected(Exception):
    """The staged export computes something else than the original model: nothing is renamed into place, exit 1."""


def modules_by_exported_name(model) -> dict[str, str]:
    """Exported (on-disk) linear name -> in-memory module name, through the export's own renaming.

    The source checkpoint holds each exported linear's 16-bit weight under `{exported name}.weight`.
    Linears without a module of their own in memory (transformers 5's fused MoE experts, which the
    export writes per expert) are absent.
    """
    to_disk = export_names(model)
    return {to_disk(name): name for name, module in model.named_modules() if hasattr(module, "weight_quantizer")}


def capture_linear_io(model, samples: list[list[int]], device: str, pad_id: int, outputs: bool = False) -> dict:
    """name -> (inputs, outputs or None) of every quantized linear: FIDELITY_ROWS real (unpadded) rows, sampled
    the same way on every call, from one short forward of the 16-bit model (quantizers off; ModelOpt still
    applies pre_quant_scales on disabled quantizers, so the model computes the original function, except
    after GPTQ: its rewritten weights then shape the inputs, while check_fidelity's reference output still
    comes from the source weights)."""
    import torch
    from modelopt.torch.quantization.conversion import set_quantizer_by_cfg_context

    batch = [s[:FIDELITY_TOKENS] for s in samples[:FIDELITY_SAMPLES]]
    input_ids, mask = padded_batch(batch, list(range(len(batch))), pad_id)
    keep = mask.reshape(-1) > 0
    chosen = torch.randperm(int(keep.sum()), generator=torch.Generator().manual_seed(0))[:FIDELITY_ROWS].sort().values
    captured: dict = {}

    def rows(t):
        return t.reshape(-1, t.shape[-1])[keep.to(t.device)][chosen.to(t.device)].detach().cpu()

    def hook(name):
        def record(module, args, output):
            if args[0].reshape(-1, args[0].shape[-1]).shape[0] == keep.numel():  # routed experts see other rows
                captured[name] = (rows(args[0]), rows(output) if outputs else None)
        return record

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in quantized_linear_shapes(model)]
    try:
        with torch.no_grad(), set_quantizer_by_cfg_context(model, [{"quantizer_name": "*", "enable": False}]):
            calibration_forward(model)(input_ids=input_ids.to(device), attention_mask=mask.to(device))
    finally:
        for handle in handles:
            handle.remove()
    return captured


def channel_ratio(scaled, original):
    """Per last-dim channel, the least-squares factor c with scaled ~ original * c."""
    return (scaled * original).sum(0) / (original * original).sum(0).clamp_min(1e-30)


def exported_linear_output(reader: CheckpointReader, name: str, x, algo: str):
    """What the runtime computes for `x` from the exported tensors in `algo`'s format (exported_weight), the input
    quantized with the stored input_scale as the kernels do."""
    weight, quantize = exported_weight(reader, name, algo, x.device), input_fake_quant(algo)
    if quantize is not None:
        x = quantize(x, reader.tensor(f"{name}.input_scale").float().to(x.device))
    return x @ weight.T


def fidelity_limit(median: float) -> float:
    return min(FIDELITY_CAP, max(FIDELITY_FLOOR, FIDELITY_MEDIAN_FACTOR * median))


def smoothed_input_scales(name: str, source: Callable[[str], Any], written: Callable[[str], Any]):
    """For a linear (on-disk name) reading a norm that smooth_hessian may have rescaled (SMOOTHED_READERS): the
    factor per input channel its input was divided by, the source's norm weight over the written one (exactly 1
    where they agree); None for other linears. `source`, `written`: tensor by name, or None."""
    import torch

    for norm, readers in SMOOTHED_READERS.items():
        reader = next((r for r in readers if name.endswith(f".{r}")), None)
        if reader is not None:
            key = f"{name[: -len(reader)]}{norm}.weight"
            before, after = source(key), written(key)
            if before is None or after is None:
                return None
            before, after = before.float(), after.float()
            return torch.where(before == after, torch.ones_like(before), before / after)
    return None


def linear_error(reader: CheckpointReader, name: str, original, before: tuple, after: tuple | None, algo: str,
                 device: str, smoothing=None) -> float:
    """||y_runtime - y_original|| / ||y_original|| for one linear on its captured inputs. `smoothing`: the factors
    smooth_hessian divided its input by (smoothed_input_scales): the original input is the captured one times them.

    Where the export folded scales (awq_lite: into norms, v_proj and up_proj), the runtime's input and
    output are the original ones times per-channel factors; `after` (the folded 16-bit model's inputs and
    outputs on the same tokens) gives them, and the runtime's output is mapped back before comparing.
    """
    import torch

    x = before[0].to(device).float()
    expected = (x if smoothing is None else x * smoothing.to(device)) @ original.to(device).float().T
    if after is None:
        runtime = exported_linear_output(reader, name, x, algo)
    else:
        x_folded, y_folded = after[0].to(device).float(), after[1].to(device).float()
        runtime = exported_linear_output(reader, name, x_folded, algo) / channel_ratio(y_folded, expected)
    return (torch.linalg.norm(runtime - expected) / torch.linalg.norm(expected).clamp_min(1e-30)).item()


def check_fidelity(model, folder: Path, source: Path, before: dict, after: dict | None, device: str) -> dict:
    """Per quantized linear, one at a time: its output from the exported tensors against the source
    checkpoint's 16-bit weight on the captured inputs (capture_linear_io; `after` only where the export
    folded scales). Raises ExportRejected when a linear is far outside NVFP4's normal range (fidelity_limit)."""
    reader, original = CheckpointReader(folder), CheckpointReader(source)
    layer_algo = layer_formats(json.loads((folder / "hf_quant_config.json").read_text())["quantization"])
    errors, unchecked, modules = {}, [], modules_by_exported_name(model)
    names = sorted(k[: -len(".weight_scale")] for k in reader.location if k.endswith(".weight_scale"))
    for name in Progress(names, desc="fidelity", unit="linear"):
        module_name, source_key = modules.get(name), f"{name}.weight"
        if module_name not in before or source_key not in original or (after is not None and module_name not in after):
            unchecked.append(name)
            continue
        smoothing = smoothed_input_scales(name, original.get, reader.get) if after is None else None
        errors[name] = round(linear_error(reader, name, original.tensor(source_key), before[module_name],
                                          after[module_name] if after is not None else None, layer_algo(name),
                                          device, smoothing), 5)
    if names and not errors:
        raise RuntimeError(f"the fidelity check matched none of the {len(names)} quantized linears of the export to a "
                           f"module and a source weight (first: {names[0]}); the export's names are not the source's")
    values = sorted(errors.values())
    median = values[len(values) // 2] if values else 0.0
    limit = fidelity_limit(median)
    worst = sorted(errors.items(), key=lambda kv: -kv[1])
    report = {"measure": "relative output error per quantized linear, exported tensors vs the source weights",
              "rows_per_linear": FIDELITY_ROWS, "checked": len(errors), "unchecked": unchecked,
              "median": median, "limit": round(limit, 5), "worst": dict(worst[:5]), "per_linear": errors}
    broken = [(n, e) for n, e in worst if not e <= limit]
    if broken:
        raise ExportRejected(f"{len(broken)} quantized linear(s) of the export compute far from the original "
                             f"(relative output error {broken[0][1]:.3g} in {broken[0][0]}; limit {limit:.3g}, "
                             f"median {median:.3g}): the exported scales or weights are broken; nothing was written")
    return report


def check_written_files(model, folder: Path, expected: dict[str, str], source: Path | None, exported: Export,
                        device: str) -> tuple[dict, dict]:
    """validate_export and check_fidelity on the staged files at once: the validation reads headers and scales on
    the CPU in a thread while the fidelity check moves weights to the GPU and multiplies there. Both finish before
    this returns; a failed validation is raised first (broken files explain a failed fidelity check).

    The written model's meta skeleton is built here first: building a model sets process-wide state (the default
    dtype, accelerate's patched parameter registration) that must not change under the fidelity check."""
    written = written_model(folder)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="validation") as pool:
        validating = pool.submit(validate_export, folder, expected, source, written)
        try:
            fidelity = check_fidelity(model, folder, source, exported.before, exported.after, device)
        finally:
            validation = validating.result()
    return validation, fidelity


# --------------------------------------------------------------------------- quality report
REPORT_NAME = "quality_report.json"
EVAL_BATCH_TOKENS = 2048  # held-out samples of one length share a forward up to this many tokens: never more
#                           memory than one sample of the default max_seq_len, and far fewer small ops on a CPU


def fake_quant_nvfp4_input(x, input_scale, group: int = 16):
    """What an NVFP4 GEMM does to its input: per-16 FP8 block scales under the stored global input_scale."""
    import torch

    blocks = x.float().reshape(-1, group)
    block_scale = (blocks.abs().amax(-1, keepdim=True) / (6.0 * input_scale)).clamp(max=E4M3_MAX)
    scale = block_scale.to(torch.float8_e4m3fn).float() * input_scale
    quantized = round_to_e2m1(blocks / torch.where(scale > 0, scale, 1.0)) * scale
    return quantized.reshape(x.shape).to(x.dtype)


def fake_quant_fp8_input(x, input_scale):
    """What a W4A8 or FP8 GEMM does to its input: per-tensor FP8 E4M3 with the stored input_scale."""
    import torch

    scaled = (x.float() / input_scale).clamp(-E4M3_MAX, E4M3_MAX)
    return (scaled.to(torch.float8_e4m3fn).float() * input_scale).to(x.dtype)


def input_fake_quant(algo: str):
    """How the runtime quantizes a quantized linear's input for `algo`: NVFP4 blocks, FP8 per tensor, or not at all."""
    return {"NVFP4": fake_quant_nvfp4_input, "W4A8_NVFP4_FP8": fake_quant_fp8_input,
            "FP8": fake_quant_fp8_input}.get(algo)


def exported_weight(reader: CheckpointReader, name: str, algo: str, device=None):
    """The float32 weight the runtime multiplies by: the exported FP4 weight x block scale x global scale, or the
    FP8 weight x its per-tensor scale."""
    tensors = [reader.tensor(f"{name}.{suffix}").to(device) for suffix in ("weight", "weight_scale")]
    if algo == "FP8":
        return tensors[0].float() * tensors[1].float()
    return dequantize_nvfp4(*tensors, reader.tensor(f"{name}.weight_scale_2").to(device), QUANT_ALGO_GROUP_SIZE[algo])


def use_eager_experts(model) -> None:
    """Fused MoE experts call F.linear per expert only in transformers' eager implementation (ModelOpt
    needs it too); the default grouped_mm would bypass the emulator's input quantization."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if hasattr(config, "_experts_implementation"):
            config._experts_implementation = "eager"


FUSED_EXPERT_PROJECTIONS = {"gate_up_proj": ("gate_proj", "up_proj"), "up_proj": ("up_proj",),
                            "down_proj": ("down_proj",)}


def fused_expert_stacks(module) -> dict[str, tuple[str, ...]]:
    """transformers 5's fused experts, gated ([E, 2I, H] gate_up_proj) or not (NemotronH's [E, I, H] up_proj), with
    [E, H, I] down_proj: each 3-D parameter and the per-expert linears ModelOpt's export splits it into."""
    import torch

    stacks = {name: parts for name, parts in FUSED_EXPERT_PROJECTIONS.items()
              if isinstance(getattr(module, name, None), torch.nn.Parameter) and getattr(module, name).dim() == 3}
    return stacks if "down_proj" in stacks and len(stacks) == 2 else {}


def exported_experts(module, name: str, reader: CheckpointReader, to_disk: Callable[[str], str]) -> set[str]:
    """The exported per-expert linears of fused experts `name`, when the files hold every one of them; else empty
    (the module is then left out, and emulate_checkpoint reports what it missed)."""
    stacks = fused_expert_stacks(module)
    if not stacks:
        return set()
    names = {to_disk(f"{name}.{e}.{p}") for e in range(module.down_proj.shape[0]) for parts in stacks.values()
             for p in parts}
    return names if all(f"{n}.weight_scale" in reader for n in names) else set()


def emulate_fused_experts(module, key: Callable[[int, str], str], reader: CheckpointReader, algo: str) -> list:
    """transformers 5's fused experts (fused_expert_stacks), exported one linear per expert (`key(e, proj)` is
    its exported name): dequantized FP4 weights into the 3-D tensors, and each stack's input quantized with
    the max of its experts' input scales, as vLLM's FlashInfer MoE takes it."""
    import torch

    stacks = fused_expert_stacks(module)
    experts = module.down_proj.shape[0]
    with torch.no_grad():
        for stack, parts in stacks.items():
            for e in range(experts):
                getattr(module, stack)[e].copy_(torch.cat([exported_weight(reader, key(e, p), algo) for p in parts]))
    if algo == "W4A16_NVFP4":
        return []
    scales = {stack: torch.stack([reader.tensor(f"{key(e, parts[0])}.input_scale").float().reshape(())
                                  for e in range(experts)]).max() for stack, parts in stacks.items()}
    return quantize_expert_inputs(module, scales, algo)


def emulate_expert_stacks(module, prefix: str, reader: CheckpointReader, algo: str) -> list:
    """Expert stacks [E, in, out] (GPT-OSS, Llama 4) exported as 3-D NVFP4 tensors packed along `in`."""
    import torch

    group = QUANT_ALGO_GROUP_SIZE[algo]

    def dequantized(key: str, e: int):
        weight, scale = reader.tensor(key)[e], reader.tensor(f"{key}_weight_scale")[e]
        return dequantize_nvfp4(weight.T.contiguous(), scale.T.contiguous(),
                                reader.tensor(f"{key}_weight_scale_2"), group).T

    with torch.no_grad():
        for proj in ("gate_up_proj", "down_proj"):
            param = getattr(module, proj)
            for e in range(param.shape[0]):
                param[e].copy_(dequantized(f"{prefix}.{proj}", e))
    if algo == "W4A16_NVFP4":
        return []
    return quantize_expert_inputs(module, {proj: reader.tensor(f"{prefix}.{proj}_input_scale").float()
                                           for proj in ("gate_up_proj", "down_proj")}, algo)


def quantize_expert_inputs(module, stack_scales: dict, algo: str) -> list:
    """During the experts' forward, quantize the input of every product with one of the 3-D stacks
    (parameter name -> input scale), whichever op the implementation uses (F.linear per expert, matmul, @, bmm)."""
    import torch

    quantize = input_fake_quant(algo)
    scales = {getattr(module, stack).untyped_storage().data_ptr(): scale.reshape(())
              for stack, scale in stack_scales.items()}
    ops = {(torch.nn.functional, "linear"): torch.nn.functional.linear, (torch, "matmul"): torch.matmul,
           (torch, "bmm"): torch.bmm, (torch.Tensor, "__matmul__"): torch.Tensor.__matmul__}

    def quantizing(op):
        def call(x, w, *rest, **kwargs):
            scale = scales.get(w.untyped_storage().data_ptr()) if isinstance(w, torch.Tensor) else None
            return op(x if scale is None else quantize(x, scale.to(x.device)), w, *rest, **kwargs)
        return call

    def patch(*_):
        for (owner, name), op in ops.items():
            setattr(owner, name, quantizing(op))

    def unpatch(*_):
        for (owner, name), op in ops.items():
            setattr(owner, name, op)

    return [module.register_forward_pre_hook(patch), module.register_forward_hook(unpatch)]


def emulate_kv_cache(model, reader: CheckpointReader, kv_algo: str, to_disk: Callable[[str], str]) -> None:
    """Keys and values quantized with the stored k_scale / v_scale before attention, as the runtimes
    store them in the cache (FP8 per tensor, or NVFP4 in 16-blocks under that global scale)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    quantize = fake_quant_fp8_input if kv_algo == "FP8" else fake_quant_nvfp4_input
    for name, module in model.named_modules():
        prefix = to_disk(name)
        if f"{prefix}.k_proj.k_scale" in reader:
            device = module.k_proj.weight.device
            module._kv_emulation = (reader.tensor(f"{prefix}.k_proj.k_scale").float().reshape(()).to(device),
                                    reader.tensor(f"{prefix}.v_proj.v_scale").float().reshape(()).to(device))

    def attention(module, query, key, value, attention_mask, **kwargs):
        if hasattr(module, "_kv_emulation"):
            key_scale, value_scale = module._kv_emulation
            key, value = quantize(key, key_scale), quantize(value, value_scale)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("nvfp4_kv_emulation", attention)
    model.set_attn_implementation("nvfp4_kv_emulation")


def copy_unquantized_tensors(model, reader: CheckpointReader, to_disk: Callable[[str], str]) -> None:
    """The export's 16-bit tensors into the model: norms, embeddings, biases. They differ from the
    original's where a scale was folded into them (awq_lite folds its input scales into the norms)."""
    import torch

    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            module, _, leaf = key.rpartition(".")
            exported = f"{to_disk(module)}.{leaf}" if module else key
            if exported in reader and reader.dtype(exported) in SIXTEEN_BIT + ("F32",) and \
                    f"{to_disk(module)}.weight_scale" not in reader:
                tensor.copy_(reader.tensor(exported).to(tensor.dtype))


def emulate_checkpoint(model, folder: Path) -> list:
    """Make a 16-bit model compute what the runtimes compute from `folder`; returns the input hooks.

    Each quantized linear (and MoE expert) gets its dequantized FP4 weight, and (W4A4, W4A8) its input
    quantized with the stored input_scale the way the runtime kernels do; with a quantized KV cache,
    keys and values are quantized with the stored scales. Exported names are matched to the model's
    modules through the export's own renaming; every quantized tensor in the files must find its
    module, or the report would describe a model that was only partly quantized. Plain PyTorch: any device.
    """
    reader = CheckpointReader(folder)
    quant = json.loads((folder / "hf_quant_config.json").read_text())["quantization"]
    layer_algo = layer_formats(quant)
    to_disk, hooks, applied = export_names(model), [], set()
    use_eager_experts(model)
    copy_unquantized_tensors(model, reader, to_disk)
    for name, module in model.named_modules():
        prefix = to_disk(name)
        if is_fused_experts(module) and f"{prefix}.gate_up_proj_weight_scale" in reader:
            hooks += emulate_expert_stacks(module, prefix, reader, layer_algo(f"{prefix}.gate_up_proj"))
            applied |= {f"{prefix}.gate_up_proj", f"{prefix}.down_proj"}
        elif experts := exported_experts(module, name, reader, to_disk):
            key = lambda e, proj, n=name: to_disk(f"{n}.{e}.{proj}")  # noqa: E731
            hooks += emulate_fused_experts(module, key, reader, layer_algo(key(0, "down_proj")))
            applied |= experts
        elif f"{prefix}.weight_scale" in reader and hasattr(module, "weight"):
            hooks += emulate_linear(module, prefix, reader, layer_algo(prefix))
            applied.add(prefix)
    in_files = {k[: -len(".weight_scale")] for k in reader.location if k.endswith(".weight_scale")} | \
        {k[: -len("_weight_scale")] for k in reader.location if k.endswith("_weight_scale")}
    missed = sorted(in_files - applied)
    if missed:
        raise RuntimeError(f"the emulator found the model's module for only {len(in_files) - len(missed)} of "
                           f"{len(in_files)} quantized tensors in {folder} (first missed: {missed[0]}); no quality "
                           "report, since it would describe a partly quantized model")
    if quant.get("kv_cache_quant_algo"):
        emulate_kv_cache(model, reader, quant["kv_cache_quant_algo"], to_disk)
    return hooks


def emulate_linear(module, prefix: str, reader: CheckpointReader, algo: str) -> list:
    """The dequantized weight in `algo`'s format, and a hook quantizing the input with the stored input_scale."""
    import torch

    with torch.no_grad():
        module.weight.copy_(exported_weight(reader, prefix, algo).to(module.weight.dtype))
    quantize = input_fake_quant(algo)
    if quantize is None:
        return []
    scale = reader.tensor(f"{prefix}.input_scale").float().to(module.weight.device)
    return [module.register_forward_pre_hook(lambda m, args, s=scale, f=quantize: (f(args[0], s),) + args[1:])]


def token_metrics(reference_logits, quantized_logits, input_ids) -> dict:
    """Sums over next-token predictions: NLL of both, KL(reference || quantized), top-1 agreements."""
    import torch

    ref = torch.log_softmax(reference_logits[:, :-1].float(), dim=-1)
    quant = torch.log_softmax(quantized_logits[:, :-1].float(), dim=-1)
    targets = input_ids[:, 1:].unsqueeze(-1)
    return {
        "tokens": targets.numel(),
        "nll_reference": -ref.gather(-1, targets).sum().item(),
        "nll_quantized": -quant.gather(-1, targets).sum().item(),
        "kl": (ref.exp() * (ref - quant)).sum().item(),
        "top1_agree": (ref.argmax(-1) == quant.argmax(-1)).sum().item(),
    }


def eval_batches(holdout: list[list[int]]) -> list[list[int]]:
    """Indices of held-out samples of equal length, at most EVAL_BATCH_TOKENS tokens (or one sample) a batch:
    no padding, so each sample is computed as in a forward of its own (bit for bit on the CPU, tested; a GPU's
    matrix kernels may round differently for another batch size)."""
    by_length: dict[int, list[int]] = {}
    for index, sample in enumerate(holdout):
        by_length.setdefault(len(sample), []).append(index)
    return [indices[start:start + max(1, EVAL_BATCH_TOKENS // length)]
            for length, indices in sorted(by_length.items())
            for start in range(0, len(indices), max(1, EVAL_BATCH_TOKENS // length))]


def quality_report(reference_fn, quantized_fn, holdout: list[list[int]], device: str, how: str) -> dict:
    """Perplexity, mean KL and top-1 agreement of the quantized model against the original on held-out text.
    Metrics are taken per sample and summed in the samples' order, as one forward per sample would."""
    import torch

    per_sample: dict[int, dict] = {}
    with torch.no_grad():
        for batch in Progress(eval_batches(holdout), desc="evaluate", unit="batch"):
            ids = torch.tensor([holdout[i] for i in batch], device=device)
            reference, quantized = reference_fn(ids), quantized_fn(ids)
            for row, index in enumerate(batch):
                per_sample[index] = token_metrics(reference[row:row + 1], quantized[row:row + 1], ids[row:row + 1])
    totals: dict = {}
    for index in sorted(per_sample):
        add_metrics(totals, per_sample[index])
    return quality_summary(totals, len(holdout), how)


def add_metrics(totals: dict, metrics: dict) -> None:
    for key, value in metrics.items():
        totals[key] = totals.get(key, 0) + value


def quality_summary(totals: dict, samples: int, how: str) -> dict:
    """The quality report from token_metrics' sums over the held-out samples."""
    n = max(totals.get("tokens", 0), 1)
    ppl_ref, ppl_quant = math.exp(totals.get("nll_reference", 0) / n), math.exp(totals.get("nll_quantized", 0) / n)
    return {"method": how, "samples": samples, "tokens": totals.get("tokens", 0),
            "perplexity_original": round(ppl_ref, 4), "perplexity_quantized": round(ppl_quant, 4),
            "perplexity_increase_pct": round(100 * (ppl_quant / ppl_ref - 1), 3),
            "mean_kl": round(totals.get("kl", 0) / n, 6), "top1_agreement": round(totals.get("top1_agree", 0) / n, 4)}


def report_with_modelopt(model, holdout: list[list[int]], device: str) -> dict:
    """On a GPU, in the same process: quantizers off for the reference, on (fake quant) for the quantized."""
    from modelopt.torch.quantization.conversion import set_quantizer_by_cfg_context

    def reference(ids):
        with set_quantizer_by_cfg_context(model, [{"quantizer_name": "*", "enable": False}]):
            return text_generator(model)(input_ids=ids, use_cache=False).logits

    return quality_report(reference, lambda ids: text_generator(model)(input_ids=ids, use_cache=False).logits,
                          holdout, device,
                          "ModelOpt fake quantization, in process")


def report_with_emulator(settings: Settings, config, folder: Path, holdout: list[list[int]], device: str) -> dict:
    """Reference NVFP4 emulation of the files in `folder` against the original model."""
    reference = load_model(settings, config, device)
    use_eager_experts(reference)  # the same expert arithmetic on both sides
    emulated = load_model(settings, config, device)
    emulate_checkpoint(emulated, folder)
    applied = sum(1 for k in CheckpointReader(folder).location if k.endswith("weight_scale"))

    def logits(model) -> Callable:
        return lambda ids: text_generator(model)(input_ids=ids, use_cache=False).logits

    report = quality_report(logits(reference), logits(emulated), holdout, device,
                            "reference NVFP4 emulator reading the exported files")
    return {"quantized_tensors_emulated": applied} | report


def print_quality(report: dict) -> None:
    log(f"\nquality on {report['samples']} held-out samples ({report['tokens']} tokens; {report['method']})")
    print_table(("metric", "original", "quantized"), [
        ("perplexity", report["perplexity_original"], report["perplexity_quantized"]),
        ("perplexity increase", "", f"{report['perplexity_increase_pct']}%"),
        ("mean KL(original || quantized)", "", report["mean_kl"]),
        ("top-1 agreement", "", report["top1_agreement"]),
    ])


def quality_gate(report: dict | None, max_increase: float | None) -> int:
    """Exit status for --max_ppl_increase: 1 when the quantized model is worse than allowed."""
    if report is None or max_increase is None or report["perplexity_increase_pct"] <= max_increase:
        return 0
    print_error(f"perplexity rose {report['perplexity_increase_pct']}%, more than --max_ppl_increase {max_increase}%")
    return 1


# --------------------------------------------------------------------------- summary
def print_plan(settings: Settings, stats: dict) -> None:
    log(f"calibration plan: {settings.max_samples} samples x <= {settings.max_seq_len} tokens, "
        f"oversample {settings.oversample_ratio}, seed {settings.seed}, min {settings.min_token_length} tokens")
    header = ("dataset", "requested", "loaded", "skipped", "too short", "kept") + ("held out",) * settings.eval \
        + ("unused",)
    rows = [(d["name"], d["requested"], d["loaded"], d["skipped_rows"], d["too_short"], d["kept"])
            + (d["held_out"],) * settings.eval + (d["unused"],) for d in stats["per_dataset"]]
    print_table(header, rows)
    t = stats["tokens"]
    log(f"kept {stats['kept_samples']} samples, {t['total']} tokens (min {t['min']}, mean {t['mean']}, max {t['max']})")


def print_table(header: tuple, rows: list[tuple]) -> None:
    """Aligned columns under a ruled header; a missing value (None) shows as '-'."""
    cells = [tuple(str(c) for c in header)] + [tuple("-" if c is None else str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for n, row in enumerate(cells):
        log(("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths))).rstrip())
        if n == 0:
            log("  " + "  ".join("-" * w for w in widths))


def calibration_samples_cell(stats: dict) -> str:
    """Kept samples, marked when the mix gave fewer than asked for (the run went on, with a warning)."""
    kept, target = stats["kept_samples"], stats["target_samples"]
    return str(kept) if kept >= target else f"{kept} of {target} asked for (SHORT: see the warning above)"


def calibration_time_cell(calib: dict, phases: dict) -> str:
    """The calibration's seconds, and where there was a search, its seconds as the phase table below counts them
    (so that the two agree)."""
    if not calib.get("scale_search") or STAGE_SEARCH not in phases:
        return f"{calib['seconds']} s"
    return f"{calib['seconds']} s, of which scale search {phases[STAGE_SEARCH]} s"


def print_summary(manifest: dict, output: Path) -> None:
    calib, t = manifest["calibration_run"], manifest["timings"]
    rows = [
        ("output", output),
        ("mode", f"{manifest['mode']} ({manifest['modelopt_config']})"),
        ("algorithm / KV cache", f"{manifest['arguments']['algorithm']} / "
                                 f"{manifest['validation'].get('kv_cache_quant_algo') or '16-bit'}"),
        ("quantized / 16-bit linears", f"{manifest['validation']['quantized_linears']} / "
                                       f"{manifest['validation']['unquantized_linears']}"),
        ("calibration samples", calibration_samples_cell(manifest["calibration"])),
        ("calibration tokens", calib["tokens"]),
        ("batches (padding)", f"{calib['batches']} ({calib['padding_fraction']:.1%})"),
        ("calibration time", calibration_time_cell(calib, t.get("phases_s", {}))),
        ("tokens/s (whole calibration)", calib["tokens_per_s"]),
        ("peak GPU memory", f"{calib['peak_gpu_memory_gib']} GiB" if "peak_gpu_memory_gib" in calib else "n/a (CPU)"),
        ("load / export", f"{t['load_model_s']} s / {t['export_s']} s"),
        ("wall (from the process's start)", f"{t['wall_s']} s"),
    ]
    if calib.get("kept_16_bit_unreached"):
        rows.append(("16-bit: never reached by calibration", len(calib["kept_16_bit_unreached"])))
    if "smoothing" in calib:
        rows.append(("norms smoothed (alpha)", f"{calib['smoothing']['norms']} of {calib['smoothing']['of']} "
                                                f"({calib['smoothing']['alpha']})"))
    mixed = calib.get("mixed_precision")
    if mixed:
        rows.append(("effective bits", f"{mixed['effective_bits']} (budget {mixed['budget_bits']})"))
        rows += [(f"{algo} layers", cell) for algo, cell in format_layers(mixed["per_linear"]).items()]
    if manifest.get("carried_unloaded"):
        rows.append(("copied, not loaded by transformers", f"{manifest['carried_unloaded']['tensors']} tensors"))
    fidelity = manifest.get("fidelity")
    if fidelity and fidelity["worst"]:
        name, error = next(iter(fidelity["worst"].items()))
        rows.append(("fidelity: worst linear",
                     f"{error} {name} (median {fidelity['median']}, limit {fidelity['limit']})"))
    coverage = calib.get("moe_expert_coverage")
    if coverage:
        rows.append(("MoE experts with no routed token", f"{coverage['unrouted_experts']} "
                                                         f"(--moe_calibration {coverage['moe_calibration']})"))
    log("\nsummary")
    print_table(("item", "value"), rows)
    if "phases_s" in t:
        print_phases(t["phases_s"], t["wall_s"])


def print_phases(phases: dict[str, float], wall: float) -> None:
    log("\ntime per phase")
    rows = [(name, f"{s:.2f}", f"{s / max(wall, 1e-9):.0%}") for name, s in phases.items()]
    print_table(("phase", "s", "share"), rows + [("wall (from the process's start)", f"{wall:.2f}", "")])


# --------------------------------------------------------------------------- self-test
def build_tiny_tokenizer(folder: Path, corpus: list[str], vocab_size: int = 512):
    """A real BPE tokenizer trained on `corpus`, with a chat template, saved to `folder`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                        show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.chat_template = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
                          "{{ eos_token }}\n{% endfor %}")
    fast.save_pretrained(str(folder))
    return fast


def build_tiny_model(folder: Path, vocab_size: int, hidden: int = 128, layers: int = 2, dtype: str = "bfloat16",
                     seed: int = 0):
    """A random-weight Llama (architectures set, as export needs) saved to `folder`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=3,
                         architectures=["LlamaForCausalLM"], tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(str(folder))
    return model


def sample_corpus() -> list[str]:
    """Every text in the shipped offline sample set, formatted plainly: the tokenizer's training text."""
    specs, _ = load_mix(SAMPLES_YAML)
    corpus = []
    for spec in specs:
        for row in open_dataset(spec, None):
            sample = format_sample(spec, row)
            if sample:
                corpus.append(sample[0])
    return corpus


def self_test(args: argparse.Namespace, run_job: Callable[[argparse.Namespace, Path], int], layers: int = 2,
              label: str = "self-test") -> int:
    """Tiny Llama + tokenizer in a temp dir -> `run_job(args, temp_dir)` on Datasets/samples -> checks."""
    with tempfile.TemporaryDirectory(prefix="nvfp4-selftest-") as tmp:
        tmp_path = Path(tmp)
        tokenizer = build_tiny_tokenizer(tmp_path / "model", sample_corpus())
        build_tiny_model(tmp_path / "model", vocab_size=len(tokenizer), layers=layers)
        args.input_model = str(tmp_path / "model")
        keep_output = bool(args.output_model)
        args.output_model = args.output_model or str(tmp_path / "out")
        args.dataset_yaml = args.dataset_yaml or str(SAMPLES_YAML)
        status = run_job(args, tmp_path)
        if args.dry_run:  # nothing was written to check
            return status
        check_dequantization(Path(args.input_model), Path(args.output_model))
        kept = "" if keep_output else " (temporary; pass --output_model to keep it)"
        log(f"{label} passed, {run_seconds():.1f} s from the process's start: {args.output_model}{kept}")
        return status


def run_self_test(args: argparse.Namespace) -> int:
    return self_test(args, lambda job_args, tmp_path: run(build_settings(job_args, {})))


def check_dequantization(source: Path, exported: Path, max_rel_error: float = 0.25) -> None:
    """Dequantize every exported weight in its layer's format (FP4 blocks, or FP8 with one scale) and compare it with
    the original: close, not equal."""
    import torch

    original, reader = read_checkpoint_tensors(source), CheckpointReader(exported)
    layer_algo = layer_formats(json.loads((exported / "hf_quant_config.json").read_text())["quantization"])
    for name in [k[: -len(".weight_scale")] for k in reader.location if k.endswith(".weight_scale")]:
        algo = layer_algo(name)
        if algo not in QUANT_ALGO_GROUP_SIZE:
            raise RuntimeError(f"{name}: written quantized, but its format in hf_quant_config.json is {algo!r}")
        restored, reference = exported_weight(reader, name, algo), original[f"{name}.weight"].float()
        smoothing = smoothed_input_scales(name, original.get, reader.get)
        reference = reference if smoothing is None else reference * smoothing
        rel = (torch.linalg.norm(restored - reference) / torch.linalg.norm(reference)).item()
        if not 0 < rel < max_rel_error:
            raise RuntimeError(f"{name}: dequantized weight has relative error {rel:.4f}, "
                               f"expected (0, {max_rel_error})")


# --------------------------------------------------------------------------- list configs
def config_uses() -> dict[str, list[str]]:
    """ModelOpt config name -> the options of ours that use it (a mode's config, an algorithm's preset whose weight
    blocks are merged in, a --kv_cache config)."""
    uses: dict[str, list[str]] = {}
    for cfg, flag, what in MODES.values():
        uses.setdefault(cfg, []).append(f"{flag}: {what}")
    for name, algorithm in ALGORITHMS.items():
        if algorithm.preset:
            uses.setdefault(algorithm.preset, []).append(f"--algorithm {name} (its weight blocks)")
    for choice, cfg in KV_CACHE_CONFIGS.items():
        if cfg:
            uses.setdefault(cfg, []).append(f"--kv_cache {choice}")
    uses.setdefault(MIXED_FP8_CONFIG, []).append("--effective_bits (its FP8 layers)")
    return uses


def list_configs() -> int:
    """ModelOpt's FP4 configs (and the FP8 ones an option uses): those our options use, with the option, then the
    rest, which no option of ours selects."""
    import modelopt.torch.quantization as mtq

    uses = config_uses()
    names = sorted(n for n in dir(mtq) if n.endswith("_CFG") and ("FP4" in n or n in uses))
    print(f"ModelOpt {library_versions()['nvidia-modelopt']} configs used by this tool's options:")
    for name in (n for n in names if n in uses):
        print(f"  {name:<40} {'; '.join(uses[name])}")
    methods = [name for name, algorithm in ALGORITHMS.items() if not algorithm.preset]
    print(f"--algorithm {', '.join(methods)}: the mode's config with ModelOpt's calibration method of that name")
    print("Other FP4 configs in ModelOpt (no option here selects them):")
    for name in (n for n in names if n not in uses):
        print(f"  {name}")
    return 0


# --------------------------------------------------------------------------- main
class CliParser(argparse.ArgumentParser):
    """Both scripts' parser: a mistake is one `error:` line and exit status 2, not argparse's usage dump; every
    option is also read with dashes for its underscores (--batch-size, --batch-size=4), and help shows one form."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("epilog", "Options also accept dashes for underscores: --batch-size = --batch_size.")
        super().__init__(*args, **kwargs)

    def option_names(self) -> list[str]:
        # argparse keeps every option string, the argument groups' included, in this one mapping
        return [name for name in self._option_string_actions if name.startswith("--")]

    def underscored(self, arg: str) -> str:
        """A dashed spelling of one of our options (or of its prefix) as argparse knows it; anything else as is."""
        name, equals, value = arg.partition("=")
        if not name.startswith("--") or "-" not in name[2:]:
            return arg
        spelled = "--" + name[2:].replace("-", "_")
        known = any(option.startswith(spelled) for option in self.option_names())
        return spelled + equals + value if known else arg

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args([self.underscored(arg) for arg in args], namespace)

    def parse_args(self, args=None, namespace=None):
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            self.error(self.unknown_argument(extras))
        return parsed

    def unknown_argument(self, extras: list[str]) -> str:
        option = next((arg for arg in extras if arg.startswith("-")), None)
        if option is None:
            return f"unexpected argument '{extras[0]}' (options start with --); see --help"
        name = option.partition("=")[0]
        close = difflib.get_close_matches("--" + name.lstrip("-").replace("-", "_"), self.option_names(), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        return f"unknown option {name}{hint}; see --help"

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"error: {' '.join(message.split())}\n")


def build_parser() -> argparse.ArgumentParser:
    p = CliParser(description="Quantize a Hugging Face causal LM to NVFP4 with NVIDIA ModelOpt.")
    p.add_argument("--input_model", help="local model dir or hub ID (env INPUT_MODEL)")
    p.add_argument("--output_model", help="output dir for the NVFP4 checkpoint (env OUTPUT_MODEL)")
    p.add_argument("--dataset_yaml", help="calibration mix, e.g. Datasets/SWRP_Default.yaml")
    p.add_argument("--max_samples", type=int,
                   help=f"calibration samples (default {CALIBRATION_DEFAULTS['max_samples']})")
    p.add_argument("--max_seq_len", type=int, help=f"tokens per sample (default {CALIBRATION_DEFAULTS['max_seq_len']})")
    p.add_argument("--oversample_ratio", type=float,
                   help="load this many times max_samples before filtering "
                        f"(default {CALIBRATION_DEFAULTS['oversample_ratio']})")
    p.add_argument("--seed", type=int, help=f"sample selection seed (default {CALIBRATION_DEFAULTS['seed']})")
    p.add_argument("--min_token_length", type=int,
                   help=f"drop samples shorter than this (default {CALIBRATION_DEFAULTS['min_token_length']})")
    p.add_argument("--batch_size", type=parse_auto_or_count, default=None, metavar="auto|N",
                   help="samples per calibration forward; auto (default) sizes batches in tokens to the GPU budget; "
                        "overrides the YAML's calibration.batch_size")
    p.add_argument("--gpu_memory_budget", type=float, metavar="GiB",
                   help="cap for weights + calibration activations "
                        f"(default {AUTO_BUDGET_FRACTION * 100:.0f}%% of the GPU)")
    p.add_argument("--dtype", choices=("auto", "float16", "bfloat16"), default="auto",
                   help="load dtype; auto = the checkpoint's (float32 loads as bfloat16)")
    p.add_argument("--trust_remote_code", action="store_true", help="allow the model's own code from the hub")
    modes = p.add_mutually_exclusive_group()
    modes.add_argument("--w4a8", action="store_true", help="W4A8_NVFP4_FP8_CFG: FP4 weights, FP8 activations")
    modes.add_argument("--weight_only", action="store_true", help="W4A16_NVFP4_CFG: FP4 weights, 16-bit activations")
    p.add_argument("--kv_cache", choices=tuple(KV_CACHE_CONFIGS), default="none",
                   help="quantize the KV cache: fp8 (vLLM, TensorRT-LLM) or nvfp4 (Blackwell runtimes); default none")
    p.add_argument("--algorithm", choices=tuple(ALGORITHMS), help=algorithm_help())
    p.add_argument("--effective_bits", type=float, metavar="BITS",
                   help="mixed precision: each linear group NVFP4, FP8 or 16-bit, least predicted loss for this "
                        f"average of weight bits ({WEIGHT_BITS['NVFP4']:g} to {WEIGHT_BITS[None]:g}; dense models, "
                        "W4A4, local_hessian)")
    p.add_argument("--moe_calibration", choices=MOE_CALIBRATION, default="routed",
                   help="mixture-of-experts: calibrate experts on the tokens routed to them (default), or every "
                        "expert on every token (all: slower, no expert left uncalibrated)")
    p.add_argument("--skip_layers", nargs="+", metavar="PATTERN", default=[],
                   help="keep matching modules unquantized (glob on module names, e.g. 'layers.0.*' 'down_proj')")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an output dir this tool wrote (one holding other files is refused)")
    p.add_argument("--dry_run", action="store_true",
                   help="make every check the run makes before loading weights, print the plan, write nothing")
    p.add_argument("--list_configs", action="store_true",
                   help="print ModelOpt's NVFP4 configs, with the options that use them, and exit")
    p.add_argument("--self_test", action="store_true", help="quantize a tiny built-in model on Datasets/samples")
    p.add_argument("--verify", metavar="DIR", help="check an NVFP4 checkpoint against what vLLM and TensorRT-LLM "
                                                   "load; exit 0 when clean, 1 when not")
    p.add_argument("--eval", action="store_true", help="quality report on held-out samples: perplexity, KL, top-1")
    p.add_argument("--eval_samples", type=int, default=EVAL_SAMPLES,
                   help=f"held-out samples for --eval (default {EVAL_SAMPLES})")
    p.add_argument("--max_ppl_increase", type=float, metavar="PCT",
                   help="exit 1 when perplexity rises more than PCT percent (implies --eval)")
    p.add_argument("--reference", metavar="MODEL", help="with --verify DIR --eval: the original model to compare with")
    p.add_argument("--verbose", action="store_true",
                   help="let other libraries print as they do (logging, warnings, progress bars, ModelOpt's lines)")
    return p


def pick_device() -> str:
    """This process's device: its LOCAL_RANK's GPU under torchrun / accelerate launch."""
    import torch

    return f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"


@dataclasses.dataclass
class Job:
    """What the cheap checks produced: everything known before any weight is loaded."""
    config: Any
    tokenizer: Any
    skeleton: Any            # the model on the meta device: names and shapes, no memory
    unquantized: list[str]
    samples: list[list[int]]
    data_stats: dict
    holdout: list[list[int]] = dataclasses.field(default_factory=list)

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)

    @property
    def checkpoint_bytes(self) -> int:
        linears = {n for n, m in self.skeleton.named_modules()
                   if type(m).__name__ == "Linear" and not kept_in_16_bits(n, self.unquantized)}
        return int(estimate_checkpoint_bytes(self.skeleton, linears) * DISK_MARGIN)


def prepare_job(settings: Settings) -> Job:
    """Every check the run makes before the weights load, and the calibration data: what a dry run runs."""
    stage(STAGE_CHECKS)
    for spec in settings.datasets:
        check_dataset_source(spec)
    if settings.output_model:
        check_output_dir(settings.output_model, settings.overwrite, protected_paths(settings), settings.dry_run)
    config = load_model_config(settings)
    model_class(config, settings.trust_remote_code)  # an unsupported architecture is the first thing to say
    check_source_model(settings)
    tokenizer = load_tokenizer(settings)
    skeleton = empty_model(config, settings.trust_remote_code)
    check_tokenizer_fits(tokenizer, skeleton)
    unquantized = always_unquantized(skeleton) + resolve_skip_layers(skeleton, settings.skip_layers)
    check_something_to_quantize(skeleton, unquantized)
    check_algorithm_fits(skeleton, settings.algorithm)
    check_mixed_precision_fits(skeleton, settings.effective_bits)
    samples, data_stats, holdout = prepare_calibration_data(settings, tokenizer)
    print_plan(settings, data_stats)
    job = Job(config, tokenizer, skeleton, unquantized, samples, data_stats, holdout)
    if settings.output_model:
        check_free_disk(settings.output_model.parent, job.checkpoint_bytes)
    return job


def dry_run_passed(settings: Settings, job: Job, extra: Iterable[str] = ()) -> int:
    """The dry run's last line: what it checked, so a user knows what the overnight run can no longer trip on."""
    checked = ["the dataset mix and its samples", "the model config, tokenizer and architecture",
               "--skip_layers", f"--algorithm {settings.algorithm} on this machine"]
    if settings.effective_bits is not None:
        checked.append(f"--effective_bits {settings.effective_bits} (each linear group NVFP4, FP8 or 16-bit, "
                       "chosen after calibration from output-loss scores, which the run adds)")
    if settings.output_model:
        checked += ["the output dir and its lock",
                    f"free disk for the checkpoint (about {human_bytes(job.checkpoint_bytes)})"]
    checked += list(extra)
    log(f"dry run passed: checked {', '.join(checked)}; no weights loaded, nothing written")
    return 0


def finish_job(model, settings: Settings, job: Job, calibration_run: dict, timings: dict, device: str,
               tool: str, extra: dict | None = None,
               report_quality: Callable[[Path], dict] | None = None) -> int:
    """Export into a staging dir, check what was written (validation, fidelity, --eval), write the manifest and
    model card once, rename the staging dir into place, print the summary.

    --eval reads the staged files with `report_quality` where given (the offload script's layer-by-layer report),
    else with the emulator holding the original and the emulated model side by side (report_with_emulator), and on
    a GPU with ModelOpt's in-process numbers beside it.

    Returns the exit status: 1 when --max_ppl_increase is exceeded (the checkpoint is still written).
    """
    expected = expected_quantized(model, job.unquantized, settings.mode)
    manifest = {
        "tool": tool, "source_model": source_model_id(settings.input_model), "mode": settings.mode,
        "modelopt_config": settings.modelopt_config_name, "arguments": settings.public_dict(),
        "versions": library_versions(), "device": device, "calibration": job.data_stats,
        "calibration_run": calibration_run, "timings": timings, **(extra or {}),
    }
    evaluate = settings.eval and bool(job.holdout)
    in_process = None
    if evaluate and report_quality is None:
        in_process = modelopt_quality(model, settings, job, device)  # before the export changes the model
        report_quality = functools.partial(report_with_emulator, settings, job.config, holdout=job.holdout,
                                           device=device)
    output, source = settings.output_model, source_checkpoint_dir(settings)
    estimate = estimate_checkpoint_bytes(model, set(quantized_linear_shapes(model)))
    with staging_dir(output, int(estimate * DISK_MARGIN)) as staging:
        exported = export_checkpoint(model, job.tokenizer, settings, job.samples, job.pad_id, staging, device,
                                     estimate)
        timings["export_s"], manifest["carried_unloaded"] = exported.seconds, exported.carried_unloaded
        timings["export_hf_checkpoint_s"] = exported.modelopt_seconds
        timings["export_shards_s"] = exported.shard_seconds
        stage(STAGE_VALIDATION)
        validation, fidelity = check_written_files(model, staging, expected, source, exported, device)
        manifest["validation"], manifest["excluded_modules"] = validation, validation.pop("exclude_modules")
        manifest["fidelity"] = fidelity
        if evaluate:
            stage(STAGE_QUALITY)
            manifest["quality"] = report_quality(staging)
            if in_process:
                manifest["quality"]["modelopt_in_process"] = in_process
        timings["phases_s"] = CONSOLE.phases.table()
        timings["wall_s"] = round(sum(timings["phases_s"].values()), 2)
        write_records(staging, manifest, output.name)
        move_into_place(staging, output)
    print_summary(manifest, output)
    if "quality" in manifest:
        print_quality(manifest["quality"])
    return quality_gate(manifest.get("quality"), settings.max_ppl_increase)


def expected_quantized(model, unquantized: list[str], mode: str) -> dict[str, str]:
    """The on-disk names of the linears quantized in memory and the quant_algo each is to be written in (the mode's,
    or FP8 where --effective_bits chose it): what the validation expects in the files. A module meant to stay in 16
    bits that was quantized anyway is a bug, never exported."""
    quantized = quantized_linear_shapes(model)
    skipped_but_quantized = [n for n in quantized if kept_in_16_bits(n, unquantized)]
    if skipped_but_quantized:
        raise RuntimeError(f"modules meant to stay unquantized were quantized: {skipped_but_quantized[:3]}")
    to_disk = export_names(model)
    return {to_disk(n): linear_format(model.get_submodule(n), mode) for n in quantized}


def modelopt_quality(model, settings: Settings, job: Job, device: str) -> dict | None:
    """ModelOpt's own in-process numbers for --eval, on a GPU, recorded beside the emulator's.

    The emulator reading the files is the report: ModelOpt's fake quantization is not what the runtimes compute
    from the export, which gives fused layers (q/k/v, gate/up) one shared global scale, and for W4A8 ModelOpt 0.47
    fake quantizes weights in 16-element blocks where the export has 32 (measured per linear on an H100). None
    after GPTQ: it rewrote the weights in memory, so switching the quantizers off no longer gives the original.
    """
    if not device.startswith("cuda") or settings.algorithm == "gptq":
        return None
    stage(STAGE_QUALITY)
    return report_with_modelopt(model, job.holdout, device)


def import_libraries(settings: Settings) -> None:
    """A real run imports torch, transformers and ModelOpt first, so that the phase table shows their import time
    as start-up rather than inside whichever phase needs them first; a dry run answers without ModelOpt. ModelOpt's
    unused plugins are skipped unless the model brings its own code, which may import one of those packages."""
    if not settings.trust_remote_code:
        skip_unused_plugins()
    if settings.dry_run:
        return
    import modelopt.torch.export  # noqa: F401
    import modelopt.torch.quantization  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401


@holding_output_lock
def run(settings: Settings) -> int:
    """The whole job for validated settings: cheap checks first, the model last."""
    import_libraries(settings)
    job = prepare_job(settings)
    device, ranks = pick_device(), current_ranks()
    device_map = gpu_placement(settings, job, ranks.distributed)
    if settings.dry_run:
        return dry_run_passed(settings, job, ["the GPU placement"] if device.startswith("cuda") else [])
    stage(STAGE_LOAD)
    load_start = time.perf_counter()
    model = load_model(settings, job.config, device, device_map)
    timings = {"load_model_s": round(time.perf_counter() - load_start, 2)}
    stage(STAGE_CALIBRATION)
    calibration_run = quantize_model(model, settings, job.unquantized, job.samples, device, job.pad_id)
    status = 0
    if ranks.rank == 0:  # the others wait below, then exit 0
        status = finish_job(model, settings, job, calibration_run, timings, device, "quantize_nvfp4.py")
    if ranks.distributed:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return status


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start_console(args.verbose)
    warnings.filterwarnings("ignore", message=".*is not tested with current version of modelopt.*")
    try:
        if args.list_configs:
            return list_configs()
        if args.self_test:
            return run_self_test(args)
        if args.verify:
            reference = Path(args.reference).expanduser() if args.reference else None
            status = run_verify(Path(args.verify), reference if reference and reference.is_dir() else None)
            if args.eval or args.max_ppl_increase is not None:
                status = max(status, evaluate_existing(args, read_env_files(SCRIPT_DIR, Path.cwd())))
            return status
        env = read_env_files(SCRIPT_DIR, Path.cwd())
        settings = build_settings(args, env)
        init_distributed()
        return run(settings)
    except UsageError as exc:
        print_error(str(exc))
        return EXIT_USAGE
    except ExportRejected as exc:
        print_error(str(exc))
        return 1
    except KeyboardInterrupt:  # the staging dir and lock are gone by now: their context managers ran on the way out
        print_error("interrupted: the output dir was not written")
        return EXIT_INTERRUPTED


def exit_without_teardown(status: int) -> None:
    """End the process with `status` once main() has returned, when all it wrote is closed and renamed into place.
    What the interpreter's exit does first is done as it does it: wait for the threads still running, run the exit
    handlers (logging, child processes, file locks), flush stdout and stderr. os._exit then skips the teardown of
    every module and object of torch, transformers and ModelOpt, one by one, which no output waits for: about 2 s
    after every run."""
    threading._shutdown()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    exit_without_teardown(main())
