#!/usr/bin/env python3
"""Quantize a Hugging Face causal LM to NVIDIA NVFP4 with ModelOpt, for vLLM and TensorRT-LLM.

Flow: YAML dataset mix -> formatted texts -> oversample, tokenize, filter, trim
-> length-sorted batches -> mtq.quantize (max calibration) -> export_hf_checkpoint
into a temp dir + tokenizer + manifest -> validation of what was written -> rename.

    python quantize_nvfp4.py --input_model M --output_model OUT --dataset_yaml Datasets/X.yaml
    python quantize_nvfp4.py --self_test

quantize_nvfp4_offload.py imports the helpers below; keep them here, once.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import fnmatch
import functools
import inspect
import json
import math
import os
import platform
import random
import shutil
import sys
import tempfile
import time
import warnings
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

# --------------------------------------------------------------------------- constants
SCRIPT_DIR = Path(__file__).resolve().parent
SAMPLES_YAML = SCRIPT_DIR / "Datasets" / "Local_Example.yaml"
MANIFEST_NAME = "nvfp4_manifest.json"
EXIT_USAGE = 2

CALIBRATION_DEFAULTS = {
    "max_samples": 512,
    "max_seq_len": 2048,
    "oversample_ratio": 1.5,
    "seed": 42,
    "min_token_length": 16,
}
# mode -> (ModelOpt config name, CLI flag, what it is)
MODES = {
    "nvfp4": ("NVFP4_DEFAULT_CFG", "(default)", "W4A4: FP4 weights and FP4 activations"),
    "w4a8": ("W4A8_NVFP4_FP8_CFG", "--w4a8", "FP4 weights, FP8 activations"),
    "weight_only": ("W4A16_NVFP4_CFG", "--weight_only", "W4A16: FP4 weights, 16-bit activations"),
}
# --kv_cache -> ModelOpt's KV-cache config, merged into the mode's (None: KV cache stays 16-bit)
KV_CACHE_CONFIGS = {"none": None, "fp8": "FP8_KV_CFG", "nvfp4": "NVFP4_KV_CFG"}
# --algorithm -> ModelOpt's calibration algorithm, or the ModelOpt preset config / built-in recipe whose algorithm
# and weight-quantizer block settings are merged into the mode's config. All but max run a fake-quantized
# forward (CUDA only); those with static weight blocks also need Triton.
ALGORITHMS = {
    "max": {"method": "max"},
    "awq_lite": {"method": "awq_lite"},                        # per-channel smoothing scales, searched per layer
    "awq_clip": {"method": "awq_clip"},                        # clipped per-block weight ranges, searched
    "mse": "NVFP4_W4A4_WEIGHT_MSE_FP8_SWEEP_CFG",              # FP8 block scales minimizing the weight's error
    "local_hessian": "NVFP4_W4A4_WEIGHT_LOCAL_HESSIAN_CFG",    # ... minimizing the output's error on the inputs
    "four_over_six": "NVFP4_FOUR_OVER_SIX_CFG",                # each block's largest value on 4 or 6, the better
    "gptq": "general/ptq/nvfp4_default-kv_none-gptq",          # GPTQ's Hessian-based weight updates, layer by layer
}
ALGORITHM_MODES = ("nvfp4", "weight_only")  # the modes each non-max algorithm was exported and verified in
# set scales only: ModelOpt runs these layer by layer without writing weights back (what the offload script needs)
SCALE_ONLY_ALGORITHMS = ("max", "mse", "local_hessian", "four_over_six")
MOE_CALIBRATION = ("routed", "all")          # all: every expert sees every calibration token (ModelOpt's remedy)
DATASET_KEYS = {
    "name": str, "path": str, "split": str, "weight": (int, float), "text_column": str,
    "streaming": bool, "formatter": str, "columns": dict, "subset": str, "data_files": (str, list),
}
FORMATTER_COLUMNS = {  # formatter -> the keys its `columns:` mapping may set
    "raw_text": ("text",),
    "prompt_answer": ("prompt", "answer", "system", "input"),
    "sharegpt": ("conversations",),
    "chat_completion": ("messages",),
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
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
DEFAULT_BATCH_TOKENS = 8192      # when no probe sizes batches: CPU, and layerwise (one layer's activations live)
MAX_BATCH_TOKENS = 65536         # GEMMs are saturated long before this on any GPU
BATCH_OVERHEAD_TOKENS = 1024     # one forward's fixed cost (launches, Python), in tokens: batching trades it for padding
AUTO_BUDGET_FRACTION = 0.90      # of total GPU memory when no --gpu_memory_budget is given
DISK_MARGIN = 1.10               # export writes temp files beside the output
FAIL_RANK_ENV = "NVFP4_TEST_FAIL_RANK"  # tests only: this rank raises during calibration
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "tiktoken.model")


class UsageError(Exception):
    """Bad input: printed as one line on stderr, exit status 2, no traceback."""


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
    eval_samples: int = 64
    max_ppl_increase: float | None = None   # percent
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
            merged.update({k: v for k, v in dotenv_values(env_file).items() if v is not None})
    merged.update(os.environ)
    return merged


def _check_type(value, expected, where: str):
    if isinstance(value, bool) and expected in ((int, float), int, float):
        raise UsageError(f"{where}: expected a number, got {value!r}")
    if not isinstance(value, expected):
        names = expected.__name__ if isinstance(expected, type) else " or ".join(t.__name__ for t in expected)
        raise UsageError(f"{where}: expected {names}, got {type(value).__name__} {value!r}")


def parse_dataset_entry(entry, index: int, yaml_path: Path) -> DatasetSpec:
    where = f"{yaml_path}: datasets[{index}]"
    if not isinstance(entry, dict):
        raise UsageError(f"{where}: each entry must be a mapping with at least 'name' and 'path'")
    where += f" ({entry.get('name', '?')})"
    unknown = sorted(set(entry) - set(DATASET_KEYS))
    if unknown:
        raise UsageError(f"{where}: unknown key '{unknown[0]}'; allowed keys: {', '.join(DATASET_KEYS)}")
    for key in ("name", "path"):
        if key not in entry:
            raise UsageError(f"{where}: missing required key '{key}'")
    values = {k: v for k, v in entry.items() if v is not None}
    for key, value in values.items():
        _check_type(value, DATASET_KEYS[key], f"{where}: '{key}'")
    spec = DatasetSpec(**values)
    spec.weight = float(spec.weight)
    if not spec.weight > 0:
        raise UsageError(f"{where}: 'weight' must be > 0, got {spec.weight}")
    if spec.formatter not in FORMATTERS:
        raise UsageError(f"{where}: unknown formatter '{spec.formatter}'; allowed: {', '.join(FORMATTERS)}")
    bad_columns = sorted(set(spec.columns or {}) - set(FORMATTER_COLUMNS[spec.formatter]))
    if bad_columns:
        raise UsageError(f"{where}: 'columns' key '{bad_columns[0]}' does not apply to formatter "
                         f"'{spec.formatter}'; allowed: {', '.join(FORMATTER_COLUMNS[spec.formatter])}")
    if spec.text_column and spec.formatter != "raw_text":
        raise UsageError(f"{where}: 'text_column' applies to formatter raw_text only; use 'columns' instead")
    return spec


def load_mix(yaml_path: Path) -> tuple[list[DatasetSpec], dict]:
    """Read and validate a dataset-mix YAML; local paths are resolved against its folder."""
    if not yaml_path.is_file():
        raise UsageError(f"dataset YAML not found: {yaml_path} (pass --dataset_yaml with an existing file)")
    try:
        doc = yaml.safe_load(yaml_path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise UsageError(f"{yaml_path}: malformed YAML{at}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(doc, dict):
        raise UsageError(f"{yaml_path}: top level must be a mapping with a 'datasets:' list")
    unknown = sorted(set(doc) - {"datasets", "calibration"})
    if unknown:
        raise UsageError(f"{yaml_path}: unknown top-level key '{unknown[0]}'; allowed: datasets, calibration")
    entries = doc.get("datasets")
    if not isinstance(entries, list) or not entries:
        raise UsageError(f"{yaml_path}: 'datasets:' must be a non-empty list of dataset entries")
    specs = [parse_dataset_entry(entry, i, yaml_path) for i, entry in enumerate(entries)]
    names = [s.name for s in specs]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise UsageError(f"{yaml_path}: dataset name '{duplicate}' is used twice; names must be unique")
    for spec in specs:
        local = yaml_path.parent / spec.path
        if not Path(spec.path).is_absolute() and local.exists():
            spec.path = str(local.resolve())
    return specs, parse_calibration_block(doc.get("calibration") or {}, yaml_path)


def parse_calibration_block(block, yaml_path: Path) -> dict:
    if not isinstance(block, dict):
        raise UsageError(f"{yaml_path}: 'calibration:' must be a mapping")
    unknown = sorted(set(block) - set(CALIBRATION_DEFAULTS))
    if unknown:
        raise UsageError(f"{yaml_path}: calibration: unknown key '{unknown[0]}'; "
                         f"allowed: {', '.join(CALIBRATION_DEFAULTS)}")
    for key, value in block.items():
        expected = (int, float) if key == "oversample_ratio" else int
        _check_type(value, expected, f"{yaml_path}: calibration.{key}")
    return dict(block)


def validate_calibration_numbers(values: dict) -> None:
    for key in ("max_samples", "max_seq_len", "min_token_length"):
        if values[key] < 1:
            raise UsageError(f"{key} must be >= 1, got {values[key]}")
    if values["oversample_ratio"] < 1:
        raise UsageError(f"oversample_ratio must be >= 1, got {values['oversample_ratio']}")
    if values["min_token_length"] > values["max_seq_len"]:
        raise UsageError(f"min_token_length ({values['min_token_length']}) exceeds max_seq_len "
                         f"({values['max_seq_len']}): every sample would be dropped")


def check_algorithm(algorithm: str, mode: str) -> None:
    """Non-max algorithms run quantized forwards that ModelOpt implements for CUDA only: refuse them early."""
    if algorithm == "max":
        return
    if mode not in ALGORITHM_MODES:
        raise UsageError(f"--algorithm {algorithm} is not available with --{mode}: use --algorithm max, or "
                         f"the default W4A4 mode or --weight_only")
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        raise UsageError(f"--algorithm {algorithm} needs a CUDA GPU (ModelOpt runs its search on fake-quantized "
                         "CUDA kernels); on this machine use --algorithm max")
    if isinstance(ALGORITHMS[algorithm], str) and importlib.util.find_spec("triton") is None:
        raise UsageError(f"--algorithm {algorithm} needs Triton (ModelOpt's static FP4 block kernels): "
                         "pip install triton, or use --algorithm max")


def parse_batch_size(text: str) -> int | None:
    if text == "auto":
        return None
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
    if args.gpu_memory_budget is not None and args.gpu_memory_budget <= 0:
        raise UsageError(f"--gpu_memory_budget must be > 0 GiB, got {args.gpu_memory_budget}")
    mode = "w4a8" if args.w4a8 else "weight_only" if args.weight_only else "nvfp4"
    check_algorithm(args.algorithm, mode)
    return Settings(
        input_model=input_model,
        output_model=Path(output_model).expanduser().resolve() if output_model else None,
        dataset_yaml=Path(args.dataset_yaml), datasets=specs, **calibration,
        batch_size=args.batch_size, gpu_memory_budget=args.gpu_memory_budget, dtype=args.dtype,
        trust_remote_code=args.trust_remote_code, mode=mode, skip_layers=list(args.skip_layers or []),
        overwrite=args.overwrite, dry_run=args.dry_run, kv_cache=args.kv_cache, algorithm=args.algorithm,
        moe_calibration=args.moe_calibration, eval=args.eval or args.max_ppl_increase is not None,
        eval_samples=args.eval_samples, max_ppl_increase=args.max_ppl_increase, hf_token=env.get("HF_TOKEN") or None,
    )


# --------------------------------------------------------------------------- formatters
def _text(value) -> str | None:
    """A usable string field, or None for missing, None, non-string or blank values."""
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def _first_present(row: dict, candidates: Iterable[str]) -> str | None:
    return next((c for c in candidates if _text(row.get(c)) is not None), None)


def format_raw_text(row: dict, columns: dict) -> str | None:
    column = columns.get("text") or _first_present(row, TEXT_COLUMNS)
    if column is None:  # fall back to the first non-empty string column
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


def render_conversation(messages: list[dict], tokenizer=None) -> tuple[str, bool] | None:
    """Text for a conversation and whether it came from the chat template (which adds its own BOS)."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        from jinja2.exceptions import TemplateError

        try:
            return tokenizer.apply_chat_template(messages, tokenize=False), True
        except TemplateError:  # e.g. templates that reject a system turn: skip, counted by caller
            return None
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
        return datasets.load_dataset(builder, data_files={spec.split: files}, split=spec.split,
                                     streaming=spec.streaming)
    return datasets.load_dataset(spec.path, name=spec.subset, split=spec.split, data_files=spec.data_files,
                                 streaming=spec.streaming, token=token)


def check_dataset_source(spec: DatasetSpec) -> None:
    """Fail before anything loads when a local-looking dataset path is missing."""
    path = Path(spec.path).expanduser()
    looks_local = spec.path.startswith((".", "/", "~")) or path.suffix.lower() in LOCAL_DATA_BUILDERS \
        or spec.path.count("/") > 1
    if looks_local and not path.exists():
        raise UsageError(f"dataset '{spec.name}': path not found: {spec.path} "
                         "(relative paths are resolved against the YAML file's folder)")


def collect_texts(spec: DatasetSpec, dataset, wanted: int, seed: int, tokenizer=None) -> tuple[list, int]:
    """Up to `wanted` formatted texts from a shuffled dataset; returns (texts, rows skipped)."""
    from tqdm import tqdm

    import datasets

    if isinstance(dataset, datasets.IterableDataset):
        dataset = dataset.shuffle(seed=seed, buffer_size=10_000)
    else:
        dataset = dataset.shuffle(seed=seed)
    texts, skipped = [], 0
    with tqdm(total=wanted, desc=f"format {spec.name}", unit="sample", file=sys.stderr, leave=False,
              disable=not on_main_rank()) as bar:
        for row in dataset:
            if len(texts) >= wanted:
                break
            sample = format_sample(spec, row, tokenizer)
            if sample is None:
                skipped += 1
                continue
            texts.append(sample)
            bar.update(1)
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
                    count: int) -> list[list[int]]:
    """Samples the trim left out: disjoint from calibration, which stays exactly as without them."""
    return [ids for _, ids in shuffled_pool(tokenized, min_tokens, seed)[max_samples: max_samples + count]]


def calibration_stats(settings: Settings, requests: dict, loaded: dict, skipped: dict, kept: dict,
                      samples: list[list[int]]) -> dict:
    lengths = [len(s) for s in samples] or [0]
    return {
        "target_samples": settings.max_samples,
        "requested_samples": sum(requests.values()),
        "kept_samples": len(samples),
        "per_dataset": [{"name": n, "requested": requests[n], "loaded": loaded[n], "skipped_rows": skipped[n],
                         "kept": kept[n]} for n in requests],
        "tokens": {"total": sum(lengths), "min": min(lengths), "mean": round(sum(lengths) / len(lengths), 1),
                   "max": max(lengths)},
    }


def prepare_calibration_data(settings: Settings, tokenizer) -> tuple[list[list[int]], dict, list[list[int]]]:
    """YAML plan -> texts -> tokens -> calibration samples, stats for the manifest, and held-out samples."""
    requests = plan_requests(settings.datasets, settings.max_samples, settings.oversample_ratio)
    texts, skipped, tokenized = {}, {}, {}
    for spec in settings.datasets:
        try:
            dataset = open_dataset(spec, settings.hf_token)
        except (FileNotFoundError, ValueError, ConnectionError) as exc:
            raise UsageError(f"dataset '{spec.name}' ({spec.path}): cannot be loaded: {exc}") from None
        texts[spec.name], skipped[spec.name] = collect_texts(spec, dataset, requests[spec.name],
                                                            settings.seed, tokenizer)
        tokenized[spec.name] = tokenize_texts(texts[spec.name], tokenizer, settings.max_seq_len)
    samples, kept = select_samples(tokenized, settings.min_token_length, settings.max_samples, settings.seed)
    holdout = holdout_samples(tokenized, settings.min_token_length, settings.max_samples, settings.seed,
                              settings.eval_samples) if settings.eval else []
    if settings.eval and len(holdout) < settings.eval_samples:
        warn(f"--eval: only {len(holdout)} of {settings.eval_samples} held-out samples left after calibration took "
             f"{len(samples)}; raise --oversample_ratio for more")
    loaded = {name: len(t) for name, t in texts.items()}
    stats = calibration_stats(settings, requests, loaded, skipped, kept, samples)
    if not samples:
        raise UsageError(f"no calibration samples left after filtering (min_token_length="
                         f"{settings.min_token_length}): check the datasets' columns and formatters in "
                         f"{settings.dataset_yaml}")
    if len(samples) < settings.max_samples:
        counts = ", ".join(f"{d['name']}: requested {d['requested']}, loaded {d['loaded']}, kept {d['kept']}"
                           for d in stats["per_dataset"])
        warn(f"only {len(samples)} of {settings.max_samples} calibration samples available ({counts}); going on")
    return samples, stats, holdout


# --------------------------------------------------------------------------- batching
def group_batches(lengths: list[int], batch_size: int | None, max_batch_tokens: int) -> list[list[int]]:
    """Sample indices sorted longest first, grouped by a sample count or by a padded-token budget.

    Under a token budget the sorted list is cut where it costs least: each batch costs its padded
    tokens plus a fixed per-forward overhead, and an exact search (O(samples x batch size)) picks the
    cuts. Greedy filling pads short samples up to long ones; this keeps padding to a few percent.
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


def load_model_config(settings: Settings):
    from transformers import AutoConfig

    local = Path(settings.input_model).expanduser()
    if settings.input_model.startswith((".", "/", "~")) and not local.is_dir():
        raise UsageError(f"model not found: {settings.input_model} is not a directory")
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
        raise UsageError(f"tokenizer of {settings.input_model} cannot be loaded: {str(exc).splitlines()[0]}") from None
    return tokenizer


def empty_model(config, trust_remote_code: bool):
    """The model's module tree on the meta device: names and shapes, no weights, no memory."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


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
            examples = ", ".join(linear_names[:3])
            raise UsageError(f"--skip_layers pattern '{pattern}' matches no module of this model "
                             f"(module names look like: {examples})")
        matched.extend(h for h in hits if h not in matched)
    return with_fused_siblings(matched, set(all_names))


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


def parameter_bytes(module, dtype) -> int:
    """The module's parameters in `dtype`: what loading it costs."""
    import torch

    return sum(p.numel() for p in module.parameters()) * torch.finfo(dtype).bits // 8


def always_unquantized(model) -> list[str]:
    """Input and output embeddings: kept in 16 bits, whatever the config says."""
    targets = [model.get_input_embeddings(), model.get_output_embeddings()]
    return [n for n, m in model.named_modules() if n and any(m is t for t in targets if t is not None)]


def build_quant_config(mode: str, unquantized: list[str], layerwise_dir: Path | None = None, save_every: int = 1,
                       kv_cache: str = "none", algorithm: str = "max", moe_calibration: str = "routed") -> dict:
    """A deep copy of the mode's ModelOpt config: given modules off, KV cache and algorithm merged in.

    With `layerwise_dir`, max calibration runs layer by layer (each offloaded layer comes onto the
    GPU once for all batches) and checkpoints every `save_every` layers there, so a killed run can resume.
    """
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
    if "layerwise" in algo:  # a recipe's own layer-by-layer pass: in memory, no checkpoints in the working dir
        algo["layerwise"] = {"enable": bool(algo["layerwise"].get("enable"))}
    if layerwise_dir is not None:
        # max only reads weights: no per-layer weight copies in the checkpoints, no write-back to offloaded storage
        algo["layerwise"] = {"enable": True, "checkpoint_dir": str(layerwise_dir), "calib_mutates_weights": False,
                             "save_every": save_every}
    config["algorithm"] = algo if len(algo) > 1 or algorithm != "max" else "max"
    return config


def algorithm_preset(algorithm: str) -> tuple[dict, dict | None]:
    """Deep copies of --algorithm's ModelOpt algorithm and, for presets and recipes, its weight block settings."""
    import modelopt.torch.quantization as mtq

    source = ALGORITHMS[algorithm]
    if isinstance(source, dict):
        return copy.deepcopy(source), None
    if "/" in source:
        from modelopt.recipe import load_recipe

        preset = load_recipe(source).quantize
        algo, entries = preset.algorithm, [e.model_dump() for e in preset.quant_cfg]
    else:
        algo, entries = getattr(mtq, source)["algorithm"], getattr(mtq, source)["quant_cfg"]
    weight = next(e for e in entries if e.get("quantizer_name") == "*weight_quantizer" and e.get("cfg"))
    return copy.deepcopy(dict(algo)), copy.deepcopy(dict(weight["cfg"]["block_sizes"]))


def load_model(settings: Settings, config, device: str, device_map: str | dict | None = None):
    from transformers import AutoModelForCausalLM

    dtype = resolve_dtype(settings.dtype, config)
    model = AutoModelForCausalLM.from_pretrained(
        settings.input_model, dtype=dtype, trust_remote_code=settings.trust_remote_code,
        token=settings.hf_token, device_map=device_map or {"": device}, low_cpu_mem_usage=True)
    model.eval()
    if not getattr(model.config, "architectures", None):  # export_hf_checkpoint requires it
        model.config.architectures = [type(model).__name__]
    return model


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
    import datetime

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


def placement_for(weight_bytes: int, gpu_budgets: list[int]) -> str:
    """'single' when the 16-bit weights fit one GPU's budget, 'balanced' across GPUs when they fit all of them."""
    if not gpu_budgets or weight_bytes <= gpu_budgets[0]:
        return "single"
    if len(gpu_budgets) > 1 and weight_bytes <= sum(gpu_budgets):
        return "balanced"
    raise UsageError(f"the model's weights ({human_bytes(weight_bytes)}) exceed the GPU memory "
                     f"({human_bytes(sum(gpu_budgets))} over {len(gpu_budgets)} GPU(s)): use quantize_nvfp4_offload.py")


# --------------------------------------------------------------------------- calibration
def calibration_forward(model) -> Callable:
    """The cheapest forward that still runs every quantized linear: no KV cache, no full logits.

    The signature is read from the class: ModelOpt's layer-by-layer calibration patches the instance's
    forward (to stop early), and calling anything but the instance would bypass that patch.
    """
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


@functools.lru_cache(maxsize=None)
def sync_free_max_calibrator():
    """ModelOpt's MaxCalibrator without its per-call GPU syncs, and blind to padded activation rows.

    MaxCalibrator.collect asserts on NaN/inf after every call: three GPU->CPU syncs per quantizer per
    batch, which left the GPU idle most of the time (measured 0.31x of a plain forward on an H100).
    This subclass takes the same max (tests check it is bit-identical) and checks finiteness once.
    """
    import torch
    from modelopt.torch.quantization.calib import MaxCalibrator

    class SyncFreeMaxCalibrator(MaxCalibrator):
        def __init__(self, original: MaxCalibrator, mask_source: dict | None, layout: str = "rows"):
            self.__dict__.update(original.__dict__)
            self._mask_source = mask_source  # activations only: a weight is never masked
            self._layout = layout

        @torch.no_grad()
        def collect(self, x):
            mask = self._mask_source.get("mask") if self._mask_source is not None else None
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


def mask_from_attention(holder: dict):
    """A decoder-layer pre-hook keeping holder['mask'] right, also in ModelOpt's layer-by-layer replay."""
    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.get("hidden_states")
        if "attention_mask" in kwargs and hidden is not None:
            holder["mask"] = token_mask(kwargs["attention_mask"], tuple(hidden.shape[:-1]), holder.get("mask"))
    return hook


def zero_padding(holder: dict):
    """A pre-hook zeroing padded rows of a linear's input, for quantizers with other calibrators."""
    def hook(module, args):
        row_mask = mask_for_rows(args[0], holder.get("mask")) if args else None
        if row_mask is None:
            return None
        return (args[0] * row_mask.unsqueeze(-1),) + args[1:]
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


def routed_indices(router, inputs, output):
    """The [tokens, top_k] expert choices a router made: v5 routers return them, v4 ones return logits."""
    import torch

    if isinstance(output, tuple) and len(output) >= 3 and not output[2].is_floating_point():
        return output[2]
    logits = output[0] if isinstance(output, tuple) else output
    top_k = getattr(router, "top_k", None)
    if not isinstance(logits, torch.Tensor) or not isinstance(top_k, int):
        return None
    return torch.topk(logits.float(), top_k, dim=-1).indices


def count_routed_tokens(name: str, holder: dict):
    """A router forward hook: tokens per expert, real tokens only, from the last pass through this block.

    ModelOpt's "all experts" calibration calls the router once more with top_k raised to every expert;
    only calls with the model's own top_k are counted.
    """
    import torch

    def hook(router, inputs, output):
        indices = routed_indices(router, inputs, output)
        entry = holder["coverage"].get(name)
        if indices is None or entry is None or indices.shape[-1] != entry["top_k"]:
            return
        if entry["pass"] != holder.get("pass"):  # a layer-by-layer replay or an algorithm's second pass
            entry["pass"] = holder.get("pass")
            entry["counts"] = torch.zeros(entry["experts"], dtype=torch.long, device=indices.device)
        keep = mask_for_rows(inputs[0], holder.get("mask")) if inputs else None
        chosen = indices if keep is None else indices[keep.reshape(-1) > 0]
        entry["counts"] += torch.bincount(chosen.reshape(-1).long(), minlength=entry["experts"])[: entry["experts"]]
    return hook


def start_coverage(model, holder: dict) -> None:
    """One entry per MoE block: its expert count and top_k, counted by count_routed_tokens."""
    holder["coverage"] = {}
    for name, block, router in moe_blocks(model):
        top_k = getattr(router, "top_k", None) or getattr(block, "top_k", None)
        if isinstance(top_k, int):
            holder["coverage"][name] = {"experts": expert_count(block, router), "top_k": top_k, "pass": None,
                                        "counts": None}


def expert_coverage(holder: dict, moe_calibration: str) -> dict | None:
    """Per MoE block: tokens routed to each expert and the experts no calibration token was routed to."""
    import torch

    coverage = holder.get("coverage") or {}
    if not coverage:
        return None
    layers = {}
    for name, entry in coverage.items():
        counts = entry["counts"]
        if counts is None:
            counts = torch.zeros(entry["experts"], dtype=torch.long)
        if current_ranks().distributed:
            import torch.distributed as dist

            dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        tokens = counts.cpu().tolist()
        layers[name] = {"experts": entry["experts"], "top_k": entry["top_k"], "tokens_per_expert": tokens,
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


def install_calibration_hooks(model, holder: dict) -> None:
    """Once per quantize call: sync-free calibrators, and the padding mask kept current for them.

    The mask is set by run_batch and, because ModelOpt's layer-by-layer calibration replays each
    decoder layer on cached inputs outside our loop, by every decoder layer from its attention_mask.
    With right padding and a causal mask real tokens never attend to padding, so leaving padded rows
    out of the amax is exact: the scales do not depend on the batch size. Mixture-of-experts blocks
    get their padded rows zeroed, so experts see no padding and the router counts none.
    """
    from modelopt.torch.quantization.nn import TensorQuantizer
    from modelopt.torch.quantization.utils.layerwise_calib import LayerActivationCollector

    if "handles" in holder:
        return
    calibrator_class, handles = sync_free_max_calibrator(), []
    for name, quantizer in list(model.named_modules()):
        if isinstance(quantizer, TensorQuantizer) and max_collectable(quantizer):
            masked, layout = quantizer_role(name)
            quantizer._calibrator = calibrator_class(quantizer._calibrator, holder if masked else None, layout)
    for module in list(model.modules()):
        input_quantizer = getattr(module, "input_quantizer", None)
        if getattr(input_quantizer, "is_enabled", False) and not isinstance(input_quantizer._calibrator, calibrator_class):
            handles.append(module.register_forward_pre_hook(zero_padding(holder)))
    for name, block, router in moe_blocks(model):
        handles.append(block.register_forward_pre_hook(zero_padding(holder)))
        handles.append(router.register_forward_hook(count_routed_tokens(name, holder)))
    for layer in LayerActivationCollector.get_decoder_layers(model) or []:
        handles.append(layer.register_forward_pre_hook(mask_from_attention(holder), with_kwargs=True))
    holder["handles"] = handles


def remove_calibration_hooks(holder: dict) -> None:
    for handle in holder.pop("handles", []):
        handle.remove()
    holder["mask"] = None


def gpu_token_budget(model, forward, samples, device, budget_gib: float | None, holder: dict):
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
    holder["peak_before_probe"] = torch.cuda.max_memory_allocated(device)  # the reset below would lose it
    torch.cuda.reset_peak_memory_stats(device)
    run_batch(forward, samples, [probe], device, holder)
    per_token = max(torch.cuda.max_memory_allocated(device) - base, 1) / len(samples[probe])
    tokens = int((budget - base) * 0.9 / per_token)
    return max(len(samples[probe]), min(tokens, MAX_BATCH_TOKENS)), probe


def run_batch(forward, samples, indices, device, holder: dict) -> None:
    input_ids, mask = padded_batch(samples, indices, holder["pad_id"])
    input_ids, mask = input_ids.to(device), mask.to(device)
    holder["mask"] = mask
    forward(input_ids=input_ids, attention_mask=mask)


def padded_tokens(lengths: list[int], batch: list[int]) -> int:
    return len(batch) * max(lengths[i] for i in batch)


def split_batch(batch: list[int]) -> tuple[list[int], list[int]]:
    half = len(batch) // 2
    return batch[:half], batch[half:]


def plan_batches(model, forward, samples, settings: Settings, device: str, holder: dict) -> None:
    """Decide the batches once; layer-by-layer calibration replays the same ones for every layer.

    On a GPU in auto mode the longest sample runs first, alone, to size the batches (it is real
    calibration work and is not run again). Elsewhere the budget is DEFAULT_BATCH_TOKENS.
    """
    lengths = [len(s) for s in samples]
    holder.update(done=[], cap=DEFAULT_BATCH_TOKENS if settings.batch_size is None else math.inf)
    ranks = current_ranks()
    if settings.batch_size is None and device.startswith("cuda") and not holder["layerwise"]:
        holder["cap"], probe = gpu_token_budget(model, forward, samples, device, settings.gpu_memory_budget, holder)
        holder["done"] = [[probe]]  # every rank ran it: max is idempotent, so that changes nothing
        if ranks.distributed:  # one plan for all ranks: the smallest budget
            holder["cap"] = all_reduce_min(holder["cap"], device)
    skip = {i for batch in holder["done"] for i in batch}
    rest = [i for i in range(len(samples)) if i not in skip]
    grouped = group_batches([lengths[i] for i in rest], settings.batch_size, holder["cap"])
    holder["plan"] = [[rest[j] for j in batch] for batch in grouped]
    if ranks.distributed:
        holder["plan"] = rank_share(holder["plan"], lengths, ranks.rank, ranks.world)
    if os.environ.get(FAIL_RANK_ENV) == str(ranks.rank):
        raise RuntimeError(f"simulated failure on rank {ranks.rank} ({FAIL_RANK_ENV})")


def calibrate_batches(model, samples: list[list[int]], settings: Settings, device: str, holder: dict) -> None:
    """The forward loop ModelOpt calls (once, or once per layer when layerwise): every sample once."""
    import torch
    from tqdm import tqdm

    if holder.get("before_each_pass"):
        holder["before_each_pass"]()
    holder["pass"] = holder.get("pass", 0) + 1
    install_calibration_hooks(model, holder)
    forward, lengths = calibration_forward(model), [len(s) for s in samples]
    loop_start = time.perf_counter()
    with torch.no_grad():
        if "plan" not in holder:
            plan_batches(model, forward, samples, settings, device, holder)
        batches_run = list(holder["done"])
        bar = tqdm(total=sum(lengths), desc="calibrate", unit="tok", unit_scale=True, file=sys.stderr,
                   disable=not on_main_rank(),
                   leave=not holder["layerwise"], initial=sum(lengths[i] for b in batches_run for i in b))
        queue = deque(holder["plan"])
        while queue:
            batch = queue.popleft()
            if len(batch) > 1 and padded_tokens(lengths, batch) > holder["cap"]:  # after an OOM
                queue.extendleft(reversed(split_batch(batch)))
                continue
            try:
                run_batch(forward, samples, batch, device, holder)
            except torch.OutOfMemoryError:
                handle_out_of_memory(batch, lengths, holder)
                queue.extendleft(reversed(split_batch(batch)))
                continue
            batches_run.append(batch)
            bar.update(sum(lengths[i] for i in batch))
        bar.close()
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
    holder["forward_seconds"] = holder.get("forward_seconds", 0.0) + time.perf_counter() - loop_start
    holder.setdefault("batches_run", batches_run)


def handle_out_of_memory(batch: list[int], lengths: list[int], holder: dict) -> None:
    """Halve the batch and lower the cap for the rest of the run; a lone sample, or a replayed layer, can't."""
    import torch

    if len(batch) == 1:
        raise UsageError(f"CUDA out of memory on a single {lengths[batch[0]]}-token sample: "
                         "lower --max_seq_len or use quantize_nvfp4_offload.py") from None
    if holder["layerwise"]:  # ModelOpt replays cached inputs batch by batch: the batches must stay as they are
        raise UsageError("CUDA out of memory in layer-by-layer calibration: lower --max_gpu_memory to leave room "
                         "for activations, or pass a smaller --batch_size") from None
    holder["oom_retries"] = holder.get("oom_retries", 0) + 1
    holder["cap"] = padded_tokens(lengths, batch) // 2
    torch.cuda.empty_cache()


def quantize_model(model, settings: Settings, unquantized: list[str], samples, device: str, pad_id: int,
                   layerwise_dir: Path | None = None, before_each_pass: Callable[[], None] | None = None,
                   save_every: int = 1) -> dict:
    """mtq.quantize with our forward loop; returns calibration stats (time, tokens/s, peak memory).

    `before_each_pass` runs before every pass of the forward loop (once per layer when layerwise).
    """
    import modelopt.torch.quantization as mtq
    import torch

    config = build_quant_config(settings.mode, unquantized, layerwise_dir, save_every, settings.kv_cache,
                                settings.algorithm, settings.moe_calibration)
    layerwise = isinstance(config["algorithm"], dict) and config["algorithm"].get("layerwise", {}).get("enable", False)
    holder: dict = {"pad_id": pad_id, "layerwise": layerwise, "before_each_pass": before_each_pass}
    start_coverage(model, holder)
    on_gpu = device.startswith("cuda")
    if on_gpu:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    try:
        mtq.quantize(model, config, lambda m: calibrate_batches(m, samples, settings, device, holder))
    finally:
        remove_calibration_hooks(holder)
    if current_ranks().distributed:
        check_ranks_agree(model, device)
    if on_gpu:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    check_calibrated(model)
    lengths = [len(s) for s in samples]
    stats = {"seconds": round(seconds, 2), "tokens": sum(lengths), "tokens_per_s": round(sum(lengths) / seconds, 1),
             "forward_seconds": round(holder["forward_seconds"], 2), "batches": len(holder["batches_run"]),
             "padding_fraction": round(padding_fraction(lengths, holder["batches_run"]), 4),
             "max_batch_tokens": holder["cap"] if settings.batch_size is None else None,
             "oom_retries": holder.get("oom_retries", 0), "processes": current_ranks().world}
    if on_gpu:
        peak = max(torch.cuda.max_memory_allocated(device), holder.get("peak_before_probe", 0))
        stats["peak_gpu_memory_gib"] = round(peak / 2**30, 2)
    coverage = expert_coverage(holder, settings.moe_calibration)
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


# --------------------------------------------------------------------------- checkpoint validation
QUANT_ALGO_GROUP_SIZE = {"NVFP4": 16, "W4A16_NVFP4": 16, "W4A8_NVFP4_FP8": 32}  # what the runtimes load
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
            self.problems += [f"{key}: listed in the index in {f}, which {'lacks it' if f in self.handles else 'is missing'}"
                              f" [index: complete]" for key, f in weight_map.items() if self.location.get(key) != f]
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
    problems = [f"hf_quant_config.json: missing key quantization.{k} [config: vLLM requires it]"
                for k in ("quant_algo", "kv_cache_quant_algo", "group_size", "exclude_modules") if k not in quant]
    algo = quant.get("quant_algo")
    if algo not in QUANT_ALGO_GROUP_SIZE:
        problems.append(f"hf_quant_config.json: quant_algo {algo!r} is not one of {', '.join(QUANT_ALGO_GROUP_SIZE)} "
                        "[config: quant_algo]")
    elif quant.get("group_size") != QUANT_ALGO_GROUP_SIZE[algo]:
        problems.append(f"hf_quant_config.json: group_size {quant.get('group_size')} for {algo}, expected "
                        f"{QUANT_ALGO_GROUP_SIZE[algo]} [config: group_size]")
    if not isinstance(inline, dict):
        return quant, problems + ["config.json: no quantization_config [config: runtimes read it]"]
    if inline.get("quant_method") != "modelopt":
        problems.append(f"config.json: quantization_config.quant_method {inline.get('quant_method')!r}, expected "
                        "'modelopt' [config: agreement]")
    if inline.get("quant_algo") != algo:
        problems.append(f"config.json: quant_algo {inline.get('quant_algo')!r} but hf_quant_config.json says {algo!r} "
                        "[config: agreement]")
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


def check_linear(reader: CheckpointReader, name: str, shape: tuple, algo: str) -> list[str]:
    """One quantized linear against what vLLM and TensorRT-LLM load: dtypes, shapes, scales."""
    out_f, in_f = shape
    group = QUANT_ALGO_GROUP_SIZE[algo]
    if in_f % group:
        return [f"{name}: in_features {in_f} is not a multiple of the group size {group} [tensors: shape]"]
    rules = {"weight": ("U8", [out_f, in_f // 2]), "weight_scale": ("F8_E4M3", [out_f, in_f // group]),
             "weight_scale_2": ("F32", []), "input_scale": ("F32", [])}
    if algo == "W4A16_NVFP4":
        rules.pop("input_scale")
        if f"{name}.input_scale" in reader:
            return [f"{name}.input_scale: present in a weight-only checkpoint [tensors: no extra]"]
    problems = []
    for suffix, (dtype, want) in rules.items():
        key = f"{name}.{suffix}"
        if key not in reader:
            problems.append(f"{key}: missing [tensors: quantized linear needs {suffix}]")
        elif reader.dtype(key) != dtype or reader.shape(key) != want:
            problems.append(f"{key}: expected {dtype} {want}, got {reader.dtype(key)} {reader.shape(key)} "
                            "[tensors: dtype and shape]")
        elif suffix != "weight":
            problems += check_scale_values(key, reader.tensor(key), per_block=suffix == "weight_scale")
    return problems


def check_fused_groups(reader: CheckpointReader, quantized: set[str], linears: set[str]) -> list[str]:
    """Layers the runtimes fuse (q/k/v, gate/up) are all quantized or all not, with equal global scales."""
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
            for suffix in ("weight_scale_2", "input_scale") if states == {True} else ():
                values = [reader.tensor(f"{m}.{suffix}") for m in members if f"{m}.{suffix}" in reader]
                if len(values) > 1 and not all(torch.equal(values[0], v) for v in values[1:]):
                    problems.append(f"{parent}.{{{','.join(group)}}}.{suffix}: differ; TensorRT-LLM asserts they are "
                                    "equal and vLLM mis-scales all but one [fused: shared scales]")
    return problems


def expected_linears(skeleton, reader: CheckpointReader) -> tuple[dict[str, tuple[int, int]], set[str]]:
    """Every linear the export writes, name -> (out, in); and the state-dict keys the export replaces.

    Fused MoE experts (3-D gate_up_proj [E, 2I, H] and down_proj [E, H, I]) are written per expert as
    experts.E.gate_proj / up_proj / down_proj, the names vLLM's and TensorRT-LLM's MoE loaders map.
    """
    import torch

    linears = {n: (m.out_features, m.in_features) for n, m in skeleton.named_modules() if isinstance(m, torch.nn.Linear)}
    replaced = set()
    for name, module in skeleton.named_modules():
        if not is_fused_experts(module) or f"{name}.gate_up_proj" in reader:  # the latter: left unquantized
            continue
        experts, a, b = module.down_proj.shape
        hidden, inner = (a, b) if module.gate_up_proj.shape[1] == 2 * b else (b, a)  # some store them transposed
        for e in range(experts):
            linears |= {f"{name}.{e}.gate_proj": (inner, hidden), f"{name}.{e}.up_proj": (inner, hidden),
                        f"{name}.{e}.down_proj": (hidden, inner)}
        replaced |= {f"{name}.gate_up_proj", f"{name}.down_proj"}
    return linears, replaced


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


def verify_checkpoint(folder: Path, quantized_in_memory: Iterable[str] = ()) -> tuple[dict, list[str]]:
    """Every rule vLLM's and TensorRT-LLM's ModelOpt NVFP4 loaders rely on, offline; returns (summary, problems).

    After an export, `quantized_in_memory` are the modules ModelOpt quantized: each must be written as NVFP4.
    """
    from transformers import AutoConfig

    quant, problems = check_quant_configs(folder)
    reader = CheckpointReader(folder)
    problems += reader.problems
    written = {k[: -len(".weight_scale")] for k in reader.location if k.endswith(".weight_scale")}
    problems += [f"{n}: quantized in memory but not written as NVFP4" for n in sorted(set(quantized_in_memory) - written)]
    algo, patterns = quant.get("quant_algo"), quant.get("exclude_modules") or []
    if algo not in QUANT_ALGO_GROUP_SIZE:
        return {}, problems
    config = AutoConfig.from_pretrained(str(folder))
    skeleton = empty_model(config, trust_remote_code=False)
    linears, replaced = expected_linears(skeleton, reader)
    quantized = {n for n in linears if f"{n}.weight_scale" in reader}
    expected = {k for k in skeleton.state_dict()} - replaced | {f"{n}.weight" for n in linears}
    kv_problems, kv_keys = check_kv_scales(reader, quant.get("kv_cache_quant_algo"), linears)
    problems += kv_problems
    expected |= kv_keys
    for name, shape in linears.items():
        if name in quantized:
            problems += check_linear(reader, name, shape, algo)
            expected |= {f"{name}.{s}" for s in ("weight_scale", "weight_scale_2", "input_scale")}
            if vllm_excludes(name, patterns) or trtllm_excludes(name, patterns):
                problems.append(f"{name}: quantized but matched by exclude_modules; the runtimes would load it as "
                                "16-bit [exclude: consistent]")
        elif f"{name}.weight" in reader:
            if reader.dtype(f"{name}.weight") not in SIXTEEN_BIT or reader.shape(f"{name}.weight") != list(shape):
                problems.append(f"{name}.weight: unquantized linear stored as {reader.dtype(f'{name}.weight')} "
                                f"{reader.shape(f'{name}.weight')} [tensors: dtype and shape]")
            if not (vllm_excludes(name, patterns) and trtllm_excludes(name, patterns)):
                problems.append(f"{name}: left in 16 bits but not matched by exclude_modules; the runtimes would load "
                                "it as FP4 [exclude: consistent]")
    problems += check_fused_groups(reader, quantized, set(linears))
    tied = {"lm_head.weight"} if getattr(config.get_text_config(), "tie_word_embeddings", False) else set()
    problems += [f"{k}: missing [tensors: complete]" for k in sorted(expected - set(reader.location) - tied)
                 if not k.endswith("input_scale") or algo != "W4A16_NVFP4"]
    problems += [f"{k}: unexpected tensor [tensors: no extra]" for k in sorted(set(reader.location) - expected)]
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        problems.append(f"{folder}: no tokenizer files ({', '.join(TOKENIZER_FILES)}) [files: tokenizer]")
    summary = {"quant_algo": algo, "group_size": quant.get("group_size"),
               "kv_cache_quant_algo": quant.get("kv_cache_quant_algo"), "quantized_linears": len(quantized),
               "unquantized_linears": len(linears) - len(quantized), "tensors": len(reader.location),
               "exclude_modules": patterns}
    return summary, problems


def validate_export(folder: Path, expected: dict[str, dict], mode: str) -> dict:
    """verify_checkpoint on what was just written, plus: exactly the modules ModelOpt quantized, in the right mode."""
    summary, problems = verify_checkpoint(folder, quantized_in_memory=expected)
    if summary and summary["quant_algo"] != MODE_QUANT_ALGO[mode]:
        problems.append(f"quant_algo {summary['quant_algo']}, expected {MODE_QUANT_ALGO[mode]} for --{mode}")
    if problems:
        raise RuntimeError(f"exported checkpoint failed validation ({len(problems)} problems), first: "
                           + "; ".join(problems[:5]))
    return summary


def evaluate_existing(args: argparse.Namespace, env: dict) -> int:
    """--verify DIR --eval --reference ORIGINAL: the emulator on DIR's files against the original model.

    The held-out samples are what is left of the YAML mix after the calibration trim, so pass the
    --dataset_yaml, --max_samples and --seed the checkpoint was calibrated with.
    """
    if not args.reference:
        raise UsageError("--verify DIR --eval needs --reference ORIGINAL_MODEL (the model DIR was made from)")
    args.input_model, args.output_model = args.reference, args.verify
    settings = build_settings(args, env)
    config = load_model_config(settings)
    _, _, holdout = prepare_calibration_data(settings, load_tokenizer(settings))
    if not holdout:
        raise UsageError("--eval: no held-out samples left after the calibration trim; raise --oversample_ratio")
    report = report_with_emulator(settings, config, Path(args.verify), holdout, pick_device())
    print_quality(report)
    return quality_gate(report, settings.max_ppl_increase)


def run_verify(folder: Path) -> int:
    """--verify: 0 when the checkpoint is clean, 1 when not (each problem on a line), 2 when there is none."""
    if not (folder / "config.json").is_file():
        raise UsageError(f"--verify: {folder} is not a checkpoint dir (no config.json)")
    summary, problems = verify_checkpoint(folder)
    for problem in problems:
        print(f"FAIL {problem}")
    if problems:
        print(f"verify: {folder}: {len(problems)} problem(s)")
        return 1
    kv = f", KV cache {summary['kv_cache_quant_algo']}" if summary["kv_cache_quant_algo"] else ""
    print(f"verify: {folder}: OK ({summary['quant_algo']}, group {summary['group_size']}{kv}, "
          f"{summary['quantized_linears']} quantized linears, {summary['unquantized_linears']} excluded, "
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


# --------------------------------------------------------------------------- quality report
REPORT_NAME = "quality_report.json"
E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E4M3_MAX = 448.0


def round_to_e2m1(x):
    """Nearest FP4 E2M1 value (magnitudes above 6 saturate), sign kept."""
    import torch

    grid = torch.tensor(E2M1_GRID, device=x.device)
    index = torch.bucketize(x.abs().clamp(max=6.0), (grid[1:] + grid[:-1]) / 2)
    return torch.sign(x) * grid[index]


def fake_quant_nvfp4_input(x, input_scale, group: int = 16):
    """What an NVFP4 GEMM does to its input: per-16 FP8 block scales under the stored global input_scale."""
    import torch

    blocks = x.float().reshape(-1, group)
    block_scale = (blocks.abs().amax(-1, keepdim=True) / (6.0 * input_scale)).clamp(max=E4M3_MAX)
    scale = block_scale.to(torch.float8_e4m3fn).float() * input_scale
    quantized = round_to_e2m1(blocks / torch.where(scale > 0, scale, 1.0)) * scale
    return quantized.reshape(x.shape).to(x.dtype)


def fake_quant_fp8_input(x, input_scale):
    """What a W4A8 GEMM does to its input: per-tensor FP8 E4M3 with the stored input_scale."""
    import torch

    scaled = (x.float() / input_scale).clamp(-E4M3_MAX, E4M3_MAX)
    return (scaled.to(torch.float8_e4m3fn).float() * input_scale).to(x.dtype)


def use_eager_experts(model) -> None:
    """Fused MoE experts call F.linear per expert only in transformers' eager implementation (ModelOpt
    needs it too); the default grouped_mm would bypass the emulator's input quantization."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if hasattr(config, "_experts_implementation"):
            config._experts_implementation = "eager"


def emulate_fused_experts(module, name: str, reader: CheckpointReader, algo: str, group: int) -> list:
    """Dequantized FP4 weights into the 3-D expert tensors, and each expert's F.linear input quantized
    with its projection's input scale: the max over experts, as vLLM's FlashInfer MoE takes it."""
    import torch

    experts, inner = module.gate_up_proj.shape[0], module.down_proj.shape[2]
    if module.gate_up_proj.shape[1] != 2 * inner:
        raise RuntimeError(f"{name}: the emulator supports experts stored as [E, 2I, H] and [E, H, I] only")

    def weight(e: int, proj: str):
        key = f"{name}.{e}.{proj}"
        return dequantize_nvfp4(reader.tensor(f"{key}.weight"), reader.tensor(f"{key}.weight_scale"),
                                reader.tensor(f"{key}.weight_scale_2"), group)

    with torch.no_grad():
        for e in range(experts):
            module.gate_up_proj[e].copy_(torch.cat([weight(e, "gate_proj"), weight(e, "up_proj")]))
            module.down_proj[e].copy_(weight(e, "down_proj"))
    if algo == "W4A16_NVFP4":
        return []
    scales = {proj: torch.stack([reader.tensor(f"{name}.{e}.{proj}.input_scale").float().reshape(())
                                 for e in range(experts)]).max() for proj in ("gate_proj", "down_proj")}
    quantize = fake_quant_nvfp4_input if algo == "NVFP4" else fake_quant_fp8_input
    plain_linear = torch.nn.functional.linear

    def linear(x, w, b=None):
        first = w.untyped_storage().data_ptr() == module.gate_up_proj.untyped_storage().data_ptr()
        return plain_linear(quantize(x, scales["gate_proj" if first else "down_proj"].to(x.device)), w, b)

    def patch(*_):
        torch.nn.functional.linear = linear

    def unpatch(*_):
        torch.nn.functional.linear = plain_linear

    return [module.register_forward_pre_hook(patch), module.register_forward_hook(unpatch)]


def emulate_kv_cache(model, reader: CheckpointReader, kv_algo: str) -> None:
    """Keys and values quantized with the stored k_scale / v_scale before attention, as the runtimes
    store them in the cache (FP8 per tensor, or NVFP4 in 16-blocks under that global scale)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    quantize = fake_quant_fp8_input if kv_algo == "FP8" else fake_quant_nvfp4_input
    for name, module in model.named_modules():
        if f"{name}.k_proj.k_scale" in reader:
            device = module.k_proj.weight.device
            module._kv_emulation = (reader.tensor(f"{name}.k_proj.k_scale").float().reshape(()).to(device),
                                    reader.tensor(f"{name}.v_proj.v_scale").float().reshape(()).to(device))

    def attention(module, query, key, value, attention_mask, **kwargs):
        if hasattr(module, "_kv_emulation"):
            key_scale, value_scale = module._kv_emulation
            key, value = quantize(key, key_scale), quantize(value, value_scale)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("nvfp4_kv_emulation", attention)
    model.set_attn_implementation("nvfp4_kv_emulation")


def copy_unquantized_tensors(model, reader: CheckpointReader) -> None:
    """The export's 16-bit tensors into the model: norms, embeddings, biases. They differ from the
    original's where a scale was folded into them (awq_lite folds its input scales into the norms)."""
    import torch

    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            if key in reader and reader.dtype(key) in SIXTEEN_BIT + ("F32",) and \
                    f"{key.rpartition('.')[0]}.weight_scale" not in reader:
                tensor.copy_(reader.tensor(key).to(tensor.dtype))


def emulate_checkpoint(model, folder: Path) -> list:
    """Make a 16-bit model compute what the runtimes compute from `folder`; returns the input hooks.

    Each quantized linear (and MoE expert) gets its dequantized FP4 weight, and (W4A4, W4A8) its input
    quantized with the stored input_scale the way the runtime kernels do; with a quantized KV cache,
    keys and values are quantized with the stored scales. Plain PyTorch: any device.
    """
    import torch

    reader = CheckpointReader(folder)
    quant = json.loads((folder / "hf_quant_config.json").read_text())["quantization"]
    algo, group = quant["quant_algo"], int(quant["group_size"])
    hooks = []
    use_eager_experts(model)
    copy_unquantized_tensors(model, reader)
    for name, module in model.named_modules():
        if is_fused_experts(module) and f"{name}.0.gate_proj.weight_scale" in reader:
            hooks += emulate_fused_experts(module, name, reader, algo, group)
            continue
        if f"{name}.weight_scale" not in reader:
            continue
        weight = dequantize_nvfp4(reader.tensor(f"{name}.weight"), reader.tensor(f"{name}.weight_scale"),
                                  reader.tensor(f"{name}.weight_scale_2"), group)
        with torch.no_grad():
            module.weight.copy_(weight.to(module.weight.dtype))
        if algo == "W4A16_NVFP4":
            continue
        scale = reader.tensor(f"{name}.input_scale").float().to(module.weight.device)
        quantize = fake_quant_nvfp4_input if algo == "NVFP4" else fake_quant_fp8_input
        hooks.append(module.register_forward_pre_hook(
            lambda m, args, s=scale, f=quantize: (f(args[0], s),) + args[1:]))
    if quant.get("kv_cache_quant_algo"):
        emulate_kv_cache(model, reader, quant["kv_cache_quant_algo"])
    return hooks


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


def quality_report(reference_fn, quantized_fn, holdout: list[list[int]], device: str, how: str) -> dict:
    """Perplexity, mean KL and top-1 agreement of the quantized model against the original on held-out text."""
    import torch
    from tqdm import tqdm

    totals: dict = {}
    with torch.no_grad():
        for sample in tqdm(holdout, desc="evaluate", unit="sample", file=sys.stderr):
            ids = torch.tensor([sample], device=device)
            for key, value in token_metrics(reference_fn(ids), quantized_fn(ids), ids).items():
                totals[key] = totals.get(key, 0) + value
    n = max(totals.get("tokens", 0), 1)
    ppl_ref, ppl_quant = math.exp(totals.get("nll_reference", 0) / n), math.exp(totals.get("nll_quantized", 0) / n)
    return {"method": how, "samples": len(holdout), "tokens": totals.get("tokens", 0),
            "perplexity_original": round(ppl_ref, 4), "perplexity_quantized": round(ppl_quant, 4),
            "perplexity_increase_pct": round(100 * (ppl_quant / ppl_ref - 1), 3),
            "mean_kl": round(totals.get("kl", 0) / n, 6), "top1_agreement": round(totals.get("top1_agree", 0) / n, 4)}


def report_with_modelopt(model, holdout: list[list[int]], device: str) -> dict:
    """On a GPU, in the same process: quantizers off for the reference, on (fake quant) for the quantized."""
    from modelopt.torch.quantization.conversion import set_quantizer_by_cfg_context

    def reference(ids):
        with set_quantizer_by_cfg_context(model, [{"quantizer_name": "*", "enable": False}]):
            return model(input_ids=ids, use_cache=False).logits

    return quality_report(reference, lambda ids: model(input_ids=ids, use_cache=False).logits, holdout, device,
                          "ModelOpt fake quantization, in process")


def report_with_emulator(settings: Settings, config, folder: Path, holdout: list[list[int]], device: str) -> dict:
    """Reference NVFP4 emulation of the files in `folder` against the original model."""
    reference = load_model(settings, config, device)
    use_eager_experts(reference)  # the same expert arithmetic on both sides
    emulated = load_model(settings, config, device)
    emulate_checkpoint(emulated, folder)
    return quality_report(lambda ids: reference(input_ids=ids, use_cache=False).logits,
                          lambda ids: emulated(input_ids=ids, use_cache=False).logits, holdout, device,
                          "reference NVFP4 emulator reading the exported files")


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
    print(f"error: perplexity rose {report['perplexity_increase_pct']}%, more than --max_ppl_increase {max_increase}%",
          file=sys.stderr)
    return 1


# --------------------------------------------------------------------------- export fidelity
FIDELITY_SAMPLES = 8          # calibration samples in the capture forward (one padded batch; real rows kept)
FIDELITY_TOKENS = 512         # tokens per sample at most: bounds the capture's activation memory
FIDELITY_ROWS = 256           # input rows kept per linear, on the CPU: bounds the check's memory
FIDELITY_CAP = 0.5            # relative output error above which a linear is broken, whatever the others do
FIDELITY_FLOOR = 0.25         # ... below which it passes, whatever the others do
FIDELITY_MEDIAN_FACTOR = 4.0  # between the two: broken when above this many times the checkpoint's median


class ExportRejected(Exception):
    """The staged export computes something else than the original model: nothing is renamed into place, exit 1."""


def linear_for_exported(model, name: str) -> tuple[str | None, str]:
    """(in-memory module name, source checkpoint weight key) of the exported linear `name`.

    The one place where exported names are mapped back; None for a linear without a module of its
    own in memory (transformers 5's fused MoE experts, which the export writes per expert).
    """
    try:
        model.get_submodule(name)
    except AttributeError:
        return None, f"{name}.weight"
    return name, f"{name}.weight"


def capture_linear_io(model, samples: list[list[int]], device: str, pad_id: int, outputs: bool = False) -> dict:
    """name -> (inputs, outputs or None) of every quantized linear: FIDELITY_ROWS real (unpadded) rows, sampled
    the same way on every call, from one short forward of the 16-bit model (quantizers off; ModelOpt still
    applies pre_quant_scales on disabled quantizers, so the model computes the original function)."""
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


def exported_linear_output(reader: CheckpointReader, name: str, x, algo: str, group: int):
    """What the runtime computes for `x` from the exported tensors: FP4 weight x block scale x global
    scale, the input quantized with the stored input_scale as the kernels do."""
    weight = dequantize_nvfp4(*(reader.tensor(f"{name}.{suffix}").to(x.device) for suffix in
                                ("weight", "weight_scale", "weight_scale_2")), group)
    if algo != "W4A16_NVFP4":
        scale = reader.tensor(f"{name}.input_scale").float().to(x.device)
        x = fake_quant_nvfp4_input(x, scale) if algo == "NVFP4" else fake_quant_fp8_input(x, scale)
    return x @ weight.T


def fidelity_limit(median: float) -> float:
    return min(FIDELITY_CAP, max(FIDELITY_FLOOR, FIDELITY_MEDIAN_FACTOR * median))


def linear_error(reader: CheckpointReader, name: str, original, before: tuple, after: tuple | None, algo: str,
                 group: int, device: str) -> float:
    """||y_runtime - y_original|| / ||y_original|| for one linear on its captured inputs.

    Where the export folded scales (awq_lite: into norms, v_proj and up_proj), the runtime's input and
    output are the original ones times per-channel factors; `after` (the folded 16-bit model's inputs and
    outputs on the same tokens) gives them, and the runtime's output is mapped back before comparing.
    """
    import torch

    x = before[0].to(device).float()
    expected = x @ original.to(device).float().T
    if after is None:
        runtime = exported_linear_output(reader, name, x, algo, group)
    else:
        x_folded, y_folded = after[0].to(device).float(), after[1].to(device).float()
        runtime = exported_linear_output(reader, name, x_folded, algo, group) / channel_ratio(y_folded, expected)
    return (torch.linalg.norm(runtime - expected) / torch.linalg.norm(expected).clamp_min(1e-30)).item()


def check_fidelity(model, folder: Path, source: Path, before: dict, after: dict | None, device: str) -> dict:
    """Per quantized linear, one at a time: its output from the exported tensors against the source
    checkpoint's 16-bit weight on the captured inputs (capture_linear_io; `after` only where the export
    folded scales). Raises ExportRejected when a linear is far outside NVFP4's normal range (fidelity_limit)."""
    from tqdm import tqdm

    reader, original = CheckpointReader(folder), CheckpointReader(source)
    quant = json.loads((folder / "hf_quant_config.json").read_text())["quantization"]
    algo, group = quant["quant_algo"], int(quant["group_size"])
    errors, unchecked = {}, []
    names = sorted(k[: -len(".weight_scale")] for k in reader.location if k.endswith(".weight_scale"))
    for name in tqdm(names, desc="fidelity", unit="linear", file=sys.stderr, disable=not on_main_rank()):
        module_name, source_key = linear_for_exported(model, name)
        if module_name not in before or source_key not in original or (after is not None and module_name not in after):
            unchecked.append(name)
            continue
        errors[name] = round(linear_error(reader, name, original.tensor(source_key), before[module_name],
                                          after[module_name] if after is not None else None, algo, group, device), 5)
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


def source_checkpoint(settings: Settings) -> Path:
    """The folder holding the source model's safetensors: the local dir, or the hub cache it loaded from."""
    local = Path(settings.input_model).expanduser()
    if local.is_dir():
        return local
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(settings.input_model, allow_patterns=["*.safetensors", "*.json"],
                                  token=settings.hf_token))


# --------------------------------------------------------------------------- export
def check_output_dir(output: Path, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise UsageError(f"output path exists and is not a directory: {output}")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise UsageError(f"output dir exists and is not empty: {output} (pass --overwrite to replace it)")
    parent = output.parent
    if not parent.is_dir():
        raise UsageError(f"output's parent folder does not exist: {parent}")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"output's parent folder is not writable: {parent}")


def estimate_checkpoint_bytes(model, quantized: set[str]) -> int:
    """FP4 weights + FP8 scales (1/16 byte per weight) for quantized linears; 2 bytes otherwise."""
    total = 0
    for name, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            total += param.numel() * (0.5625 if name in quantized and pname == "weight" else 2)
    return int(total)


def check_free_disk(folder: Path, needed_bytes: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed_bytes:
        raise UsageError(f"not enough free disk in {folder}: {free / 2**30:.1f} GiB free, about "
                         f"{needed_bytes / 2**30:.1f} GiB needed for the checkpoint; free space or choose "
                         "another --output_model")


def library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for package in ("torch", "transformers", "nvidia-modelopt", "accelerate", "datasets", "safetensors"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = None
    return out


def write_tokenizer_and_extras(model, tokenizer, folder: Path) -> None:
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


MODEL_CARD_NAME = "README.md"
RUNTIME_NOTES = {  # quant_algo -> where it runs (sources in README "Modes and which runtimes load them")
    "NVFP4": "vLLM: native FP4 GEMMs on Blackwell (SM100/103/12x); on Turing to Hopper it runs weight-only through "
             "Marlin. TensorRT-LLM: Blackwell.",
    "W4A16_NVFP4": "vLLM 2026 releases (Marlin, SM >= 75) and recent TensorRT-LLM builds; older ones reject W4A16_NVFP4.",
    "W4A8_NVFP4_FP8": "TensorRT-LLM on Blackwell only; vLLM does not load W4A8_NVFP4_FP8.",
}
KV_NOTES = {
    "FP8": "FP8 KV cache: vLLM picks it up from the checkpoint with the default `--kv-cache-dtype auto`.",
    "NVFP4": "NVFP4 KV cache: vLLM reads it as `nvfp4` (FlashInfer; Blackwell, or SM80-120 with head size != 64); "
             "TensorRT-LLM reads `kv_cache_quant_algo` from hf_quant_config.json.",
}


def model_card(manifest: dict, folder_name: str) -> str:
    """The output dir's README.md: what was quantized, how, how well, and how to serve it."""
    args, calib, validation = manifest["arguments"], manifest["calibration"], manifest["validation"]
    algo, kv = validation["quant_algo"], validation.get("kv_cache_quant_algo")
    lines = [
        "---", f"base_model: {manifest['source_model']}", "library_name: transformers",
        "tags: [nvfp4, modelopt, quantized]", "---", "",
        f"# {folder_name}", "",
        f"`{manifest['source_model']}` quantized to NVFP4 (`{algo}`) with NVIDIA ModelOpt "
        f"{manifest['versions'].get('nvidia-modelopt')} by `{manifest['tool']}`.", "",
        "| | |", "|---|---|",
        f"| mode | {MODES[manifest['mode']][2]} (`{manifest['modelopt_config']}`) |",
        f"| calibration algorithm | `{args['algorithm']}` |",
        f"| KV cache | {kv or '16-bit (not quantized)'} |",
        f"| quantized linears | {validation['quantized_linears']} (group size {validation['group_size']}) |",
        f"| kept in 16 bits | {', '.join(f'`{m}`' for m in manifest['excluded_modules']) or 'none'} |",
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
        lines += ["vLLM:", "", "```python", "from vllm import LLM",
                  f'llm = LLM(model="./{folder_name}", quantization="modelopt_fp4")', "```", "",
                  f"or `vllm serve ./{folder_name} --quantization modelopt_fp4`.", ""]
    lines += ["TensorRT-LLM (PyTorch backend):", "", "```python", "from tensorrt_llm import LLM",
              f'llm = LLM(model="./{folder_name}")  # reads hf_quant_config.json', "```", "",
              f"or `trtllm-serve ./{folder_name}`.", "",
              f"`{MANIFEST_NAME}` records every setting, library version and timing of this run.", ""]
    return "\n".join(lines)


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


def export_checkpoint(model, tokenizer, settings: Settings, manifest: dict, expected: dict,
                      report_fn: Callable[[Path], dict | None] | None = None,
                      capture: Callable[[bool], dict] | None = None, device: str = "cpu") -> dict:
    """Export into a temp dir beside the target, check it, then rename it into place.

    `report_fn(staging)` may return a quality report, written as quality_report.json before the rename.
    `capture(outputs)` (capture_linear_io on a few calibration samples) feeds check_fidelity: before the
    export changes the model, and after awq_lite's scales are folded into other layers.
    """
    from modelopt.torch.export import export_hf_checkpoint

    output = settings.output_model
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        before, after = (capture(False) if capture else None), None
        start = time.perf_counter()
        if settings.algorithm == "awq_lite":
            fold_awq_scales(model)
            after = capture(True) if capture else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            export_hf_checkpoint(model, export_dir=str(staging))
        relabel_folded_awq(staging, settings.mode)
        write_tokenizer_and_extras(model, tokenizer, staging)
        manifest["timings"]["export_s"] = round(time.perf_counter() - start, 2)
        manifest["validation"] = validate_export(staging, expected, settings.mode)
        manifest["excluded_modules"] = manifest["validation"].pop("exclude_modules")
        if capture:
            manifest["fidelity"] = check_fidelity(model, staging, source_checkpoint(settings), before, after, device)
        report = report_fn(staging) if report_fn else None
        if report:
            manifest["quality"] = report
            (staging / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
            (staging / REPORT_NAME).chmod(0o644)
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        (staging / MODEL_CARD_NAME).write_text(model_card(manifest, output.name))
        for name in (MANIFEST_NAME, MODEL_CARD_NAME):
            (staging / name).chmod(0o644)
        staging.chmod(0o755)
        move_into_place(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


# --------------------------------------------------------------------------- reporting
def human_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def on_main_rank() -> bool:
    """Rank 0 under torchrun / accelerate launch (which set RANK), or a plain single process."""
    return os.environ.get("RANK", "0") == "0"


def warn(message: str) -> None:
    if on_main_rank():
        print(f"warning: {message}", file=sys.stderr)


def log(message: str) -> None:
    if on_main_rank():
        print(message, file=sys.stderr, flush=True)


def print_plan(settings: Settings, stats: dict) -> None:
    log(f"calibration plan: {settings.max_samples} samples x <= {settings.max_seq_len} tokens, "
        f"oversample {settings.oversample_ratio}, seed {settings.seed}, min {settings.min_token_length} tokens")
    rows = [(d["name"], d["requested"], d["loaded"], d["skipped_rows"], d["kept"]) for d in stats["per_dataset"]]
    print_table(("dataset", "requested", "loaded", "skipped", "kept"), rows)
    t = stats["tokens"]
    log(f"kept {stats['kept_samples']} samples, {t['total']} tokens (min {t['min']}, mean {t['mean']}, max {t['max']})")


def print_table(header: tuple, rows: list[tuple]) -> None:
    cells = [tuple(str(c) for c in header)] + [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for n, row in enumerate(cells):
        log("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)))
        if n == 0:
            log("  " + "  ".join("-" * w for w in widths))


def print_summary(manifest: dict, output: Path) -> None:
    calib, t = manifest["calibration_run"], manifest["timings"]
    rows = [
        ("output", output),
        ("mode", f"{manifest['mode']} ({manifest['modelopt_config']})"),
        ("algorithm / KV cache", f"{manifest['arguments']['algorithm']} / "
                                 f"{manifest['validation'].get('kv_cache_quant_algo') or '16-bit'}"),
        ("quantized linears", manifest["validation"]["quantized_linears"]),
        ("excluded modules", len(manifest["excluded_modules"])),
        ("calibration samples", manifest["calibration"]["kept_samples"]),
        ("calibration tokens", calib["tokens"]),
        ("batches (padding)", f"{calib['batches']} ({calib['padding_fraction']:.1%})"),
        ("calibration time", f"{calib['seconds']} s"),
        ("tokens/s", calib["tokens_per_s"]),
        ("peak GPU memory", f"{calib['peak_gpu_memory_gib']} GiB" if "peak_gpu_memory_gib" in calib else "n/a (CPU)"),
        ("load / export", f"{t['load_model_s']} s / {t['export_s']} s"),
        ("total", f"{t['total_s']} s"),
    ]
    fidelity = manifest.get("fidelity")
    if fidelity and fidelity["worst"]:
        name, error = next(iter(fidelity["worst"].items()))
        rows.append(("fidelity: worst linear", f"{error} {name} (median {fidelity['median']}, limit {fidelity['limit']})"))
    coverage = calib.get("moe_expert_coverage")
    if coverage:
        rows.append(("MoE experts with no routed token", f"{coverage['unrouted_experts']} "
                                                         f"(--moe_calibration {coverage['moe_calibration']})"))
    log("\nsummary")
    print_table(("item", "value"), rows)


# --------------------------------------------------------------------------- self-test
def build_tiny_tokenizer(folder: Path, corpus: list[str], vocab_size: int = 512):
    """A real BPE tokenizer trained on `corpus`, with a chat template, saved to `folder`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials))
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
        start = time.perf_counter()
        status = run_job(args, tmp_path)
        check_dequantization(Path(args.input_model), Path(args.output_model))
        kept = "" if keep_output else " (temporary; pass --output_model to keep it)"
        log(f"{label} passed in {time.perf_counter() - start:.1f} s: {args.output_model}{kept}")
        return status


def run_self_test(args: argparse.Namespace) -> int:
    return self_test(args, lambda job_args, tmp_path: run(build_settings(job_args, {})))


def check_dequantization(source: Path, exported: Path, max_rel_error: float = 0.25) -> None:
    """Dequantize every exported FP4 weight and compare it with the original: close, not equal."""
    import torch

    original, written = read_checkpoint_tensors(source), read_checkpoint_tensors(exported)
    quant = json.loads((exported / "hf_quant_config.json").read_text())["quantization"]
    for name in [k[: -len(".weight_scale")] for k in written if k.endswith(".weight_scale")]:
        restored = dequantize_nvfp4(written[f"{name}.weight"], written[f"{name}.weight_scale"],
                                    written[f"{name}.weight_scale_2"], int(quant["group_size"]))
        reference = original[f"{name}.weight"].float()
        rel = (torch.linalg.norm(restored - reference) / torch.linalg.norm(reference)).item()
        if not 0 < rel < max_rel_error:
            raise RuntimeError(f"{name}: dequantized weight has relative error {rel:.4f}, expected (0, {max_rel_error})")


# --------------------------------------------------------------------------- list configs
def list_configs() -> int:
    import modelopt.torch.quantization as mtq

    selected = {cfg: f"{flag}: {what}" for cfg, flag, what in MODES.values()}
    names = sorted(n for n in dir(mtq) if n.endswith("_CFG") and "FP4" in n)
    print(f"ModelOpt {library_versions()['nvidia-modelopt']} NVFP4-family configs:")
    for name in names:
        print(f"  {name:<40} {selected.get(name, '')}")
    return 0


# --------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Quantize a Hugging Face causal LM to NVFP4 with NVIDIA ModelOpt.")
    p.add_argument("--input_model", help="local model dir or hub ID (env INPUT_MODEL)")
    p.add_argument("--output_model", help="output dir for the NVFP4 checkpoint (env OUTPUT_MODEL)")
    p.add_argument("--dataset_yaml", help="calibration mix, e.g. Datasets/SWRP_Default.yaml")
    p.add_argument("--max_samples", type=int, help=f"calibration samples (default {CALIBRATION_DEFAULTS['max_samples']})")
    p.add_argument("--max_seq_len", type=int, help=f"tokens per sample (default {CALIBRATION_DEFAULTS['max_seq_len']})")
    p.add_argument("--oversample_ratio", type=float,
                   help=f"load this many times max_samples before filtering (default {CALIBRATION_DEFAULTS['oversample_ratio']})")
    p.add_argument("--seed", type=int, help=f"sample selection seed (default {CALIBRATION_DEFAULTS['seed']})")
    p.add_argument("--min_token_length", type=int,
                   help=f"drop samples shorter than this (default {CALIBRATION_DEFAULTS['min_token_length']})")
    p.add_argument("--batch_size", type=parse_batch_size, default=None, metavar="auto|N",
                   help="samples per calibration forward; auto (default) sizes batches in tokens to the GPU budget")
    p.add_argument("--gpu_memory_budget", type=float, metavar="GiB",
                   help=f"cap for weights + calibration activations (default {AUTO_BUDGET_FRACTION * 100:.0f}%% of the GPU)")
    p.add_argument("--dtype", choices=("auto", "float16", "bfloat16"), default="auto",
                   help="load dtype; auto = the checkpoint's (float32 loads as bfloat16)")
    p.add_argument("--trust_remote_code", action="store_true", help="allow the model's own code from the hub")
    modes = p.add_mutually_exclusive_group()
    modes.add_argument("--w4a8", action="store_true", help="W4A8_NVFP4_FP8_CFG: FP4 weights, FP8 activations")
    modes.add_argument("--weight_only", action="store_true", help="W4A16_NVFP4_CFG: FP4 weights, 16-bit activations")
    p.add_argument("--kv_cache", choices=tuple(KV_CACHE_CONFIGS), default="none",
                   help="quantize the KV cache: fp8 (vLLM, TensorRT-LLM) or nvfp4 (Blackwell runtimes); default none")
    p.add_argument("--algorithm", choices=tuple(ALGORITHMS), default="max",
                   help="ModelOpt calibration algorithm (default max; the others need a CUDA GPU, see README)")
    p.add_argument("--moe_calibration", choices=MOE_CALIBRATION, default="routed",
                   help="mixture-of-experts: calibrate experts on the tokens routed to them (default), or every "
                        "expert on every token (all: slower, no expert left uncalibrated)")
    p.add_argument("--skip_layers", nargs="+", metavar="PATTERN", default=[],
                   help="keep matching modules unquantized (glob on module names, e.g. 'layers.0.*' 'down_proj')")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output dir")
    p.add_argument("--dry_run", action="store_true", help="load tokenizer and data, print the plan, write nothing")
    p.add_argument("--list_configs", action="store_true", help="print ModelOpt's NVFP4 configs and exit")
    p.add_argument("--self_test", action="store_true", help="quantize a tiny built-in model on Datasets/samples")
    p.add_argument("--verify", metavar="DIR", help="check an NVFP4 checkpoint against what vLLM and TensorRT-LLM "
                                                   "load; exit 0 when clean, 1 when not")
    p.add_argument("--eval", action="store_true", help="quality report on held-out samples: perplexity, KL, top-1")
    p.add_argument("--eval_samples", type=int, default=64, help="held-out samples for --eval (default 64)")
    p.add_argument("--max_ppl_increase", type=float, metavar="PCT",
                   help="exit 1 when perplexity rises more than PCT percent (implies --eval)")
    p.add_argument("--reference", metavar="MODEL", help="with --verify DIR --eval: the original model to compare with")
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
    started: float
    holdout: list[list[int]] = dataclasses.field(default_factory=list)

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)

    @property
    def checkpoint_bytes(self) -> int:
        linears = {n for n, m in self.skeleton.named_modules() if type(m).__name__ == "Linear"} - set(self.unquantized)
        return int(estimate_checkpoint_bytes(self.skeleton, linears) * DISK_MARGIN)


def prepare_job(settings: Settings) -> Job | None:
    """Every cheap check and the calibration data, before the weights load; None after a dry run."""
    started = time.perf_counter()
    for spec in settings.datasets:
        check_dataset_source(spec)
    if settings.output_model and not settings.dry_run:
        check_output_dir(settings.output_model, settings.overwrite)
    config = load_model_config(settings)
    tokenizer = load_tokenizer(settings)
    skeleton = empty_model(config, settings.trust_remote_code)
    unquantized = always_unquantized(skeleton) + resolve_skip_layers(skeleton, settings.skip_layers)
    if settings.algorithm == "awq_lite":
        check_awq_foldable(skeleton)
    samples, data_stats, holdout = prepare_calibration_data(settings, tokenizer)
    print_plan(settings, data_stats)
    if settings.dry_run:
        log("dry run: no model weights loaded, nothing written")
        return None
    return Job(config, tokenizer, skeleton, unquantized, samples, data_stats, started, holdout)


def finish_job(model, settings: Settings, job: Job, calibration_run: dict, timings: dict, device: str,
               tool: str, extra: dict | None = None) -> int:
    """Check what was quantized, evaluate if asked, export with the manifest, print the summary.

    Returns the exit status: 1 when --max_ppl_increase is exceeded (the checkpoint is still written).
    """
    expected = quantized_linear_shapes(model)
    skipped_but_quantized = [n for n in expected if any(n == u or n.startswith(u + ".") for u in job.unquantized)]
    if skipped_but_quantized:
        raise RuntimeError(f"modules meant to stay unquantized were quantized: {skipped_but_quantized[:3]}")
    manifest = {
        "tool": tool, "source_model": settings.input_model, "mode": settings.mode,
        "modelopt_config": settings.modelopt_config_name, "arguments": settings.public_dict(),
        "versions": library_versions(), "device": device, "calibration": job.data_stats,
        "calibration_run": calibration_run, "timings": timings, **(extra or {}),
    }
    export_checkpoint(model, job.tokenizer, settings, manifest, expected, evaluation(model, settings, job, device),
                      lambda outputs: capture_linear_io(model, job.samples, device, job.pad_id, outputs), device)
    timings["total_s"] = round(time.perf_counter() - job.started, 2)
    (settings.output_model / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    print_summary(manifest, settings.output_model)
    if "quality" in manifest:
        print_quality(manifest["quality"])
    return quality_gate(manifest.get("quality"), settings.max_ppl_increase)


def evaluation(model, settings: Settings, job: Job, device: str) -> Callable[[Path], dict | None] | None:
    """What --eval runs on the staged export: the emulator reading its files, everywhere.

    ModelOpt's in-process fake quantization is not what the runtimes compute from the export: the
    export gives fused layers (q/k/v, gate/up) one shared global scale, and for W4A8 ModelOpt 0.47 fake
    quantizes weights in 16-element blocks where the export has 32 (measured per linear on an H100).
    On a GPU its numbers are still recorded beside the emulator's, under "modelopt_in_process".
    """
    if not settings.eval or not job.holdout:
        return None
    in_process = None
    if device.startswith("cuda"):
        in_process = report_with_modelopt(model, job.holdout, device)  # before export touches the model

    def report(staging: Path) -> dict:
        result = report_with_emulator(settings, job.config, staging, job.holdout, device)
        if in_process:
            result["modelopt_in_process"] = in_process
        return result

    return report


def run(settings: Settings) -> int:
    """The whole job for validated settings: cheap checks first, the model last."""
    job = prepare_job(settings)
    if job is None:
        return 0
    check_free_disk(settings.output_model.parent, job.checkpoint_bytes)
    device, ranks = pick_device(), current_ranks()
    device_map = gpu_placement(settings, job, ranks.distributed)
    load_start = time.perf_counter()
    model = load_model(settings, job.config, device, device_map)
    timings = {"load_model_s": round(time.perf_counter() - load_start, 2)}
    calibration_run = quantize_model(model, settings, job.unquantized, job.samples, device, job.pad_id)
    status = 0
    if ranks.rank == 0:  # the others wait below, then exit 0
        status = finish_job(model, settings, job, calibration_run, timings, device, "quantize_nvfp4.py")
    if ranks.distributed:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return status


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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", message=".*is not tested with current version of modelopt.*")
    try:
        if args.list_configs:
            return list_configs()
        if args.self_test:
            return run_self_test(args)
        if args.verify:
            status = run_verify(Path(args.verify))
            if args.eval or args.max_ppl_increase is not None:
                status = max(status, evaluate_existing(args, read_env_files(SCRIPT_DIR, Path.cwd())))
            return status
        env = read_env_files(SCRIPT_DIR, Path.cwd())
        settings = build_settings(args, env)
        init_distributed()
        return run(settings)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ExportRejected as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
