"""Shared fixtures: a tiny Llama + BPE tokenizer built once per session, and a CLI runner."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import quantize_nvfp4 as q  # noqa: E402

SCRIPT = ROOT / "quantize_nvfp4.py"
LOCAL_YAML = str(ROOT / "Datasets" / "Local_Example.yaml")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A random bf16 Llama whose tokenizer is trained on the shipped sample texts."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = q.build_tiny_tokenizer(folder, q.sample_corpus())
    q.build_tiny_model(folder, vocab_size=len(tokenizer))
    return folder


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, script: Path = SCRIPT,
            timeout: int = 600) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    full_env.pop("INPUT_MODEL", None)
    full_env.pop("OUTPUT_MODEL", None)
    full_env.update(env or {})
    return subprocess.run([sys.executable, str(script), *args], cwd=cwd or ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def assert_usage_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit 2, one line on stderr starting with 'error:', no traceback."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def timed_run(run, *args, **kwargs) -> tuple[subprocess.CompletedProcess, float]:
    """A CLI run and its wall time seen from outside, process start and exit included."""
    start = time.perf_counter()
    result = run(*args, **kwargs)
    return result, time.perf_counter() - start


def assert_phases_add_up(manifest: dict, process_wall: float, phases: Iterable[str]) -> None:
    """Every phase measured, in the run's order, from the process's start: their sum is the manifest's wall time,
    which is the process's less what comes after the manifest (the rename, the summary, the exit): well under the
    2-3 s the interpreter's own teardown would take (exit_without_teardown)."""
    timings = manifest["timings"]
    written = timings["phases_s"]
    assert list(written)[0] == q.STAGE_STARTUP and set(phases) <= set(written), written
    assert all(seconds >= 0 for seconds in written.values()), written
    assert abs(sum(written.values()) - timings["wall_s"]) < 1.0
    assert timings["wall_s"] <= process_wall + 0.1 and process_wall - timings["wall_s"] < 1.5, (process_wall, timings)


def quantize_cli(model, out, *flags, samples="16", seq_len="96"):
    """quantize_nvfp4.py on the shipped offline mix; it must succeed."""
    result = run_cli("--input_model", str(model), "--output_model", str(out), "--dataset_yaml", LOCAL_YAML,
                     "--max_samples", samples, "--max_seq_len", seq_len, *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def kv_runs(tiny_model, tmp_path_factory):
    """FP8 KV cache with auto batching and with one sample per forward (padding vs none), and NVFP4 KV."""
    root = tmp_path_factory.mktemp("kv")
    return {"fp8": quantize_cli(tiny_model, root / "fp8", "--kv_cache", "fp8", "--eval", "--eval_samples", "8"),
            "fp8_bs1": quantize_cli(tiny_model, root / "fp8_bs1", "--kv_cache", "fp8", "--batch_size", "1"),
            "nvfp4": quantize_cli(tiny_model, root / "nvfp4", "--kv_cache", "nvfp4")}


@pytest.fixture(scope="session")
def moe_model(tmp_path_factory):
    """A random Qwen3-MoE, 8 experts, top-2: its experts are fused 3-D tensors in transformers 5."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    folder = tmp_path_factory.mktemp("tiny-moe")
    tokenizer = q.build_tiny_tokenizer(folder, q.sample_corpus())
    torch.manual_seed(0)
    config = Qwen3MoeConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                            num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[],
                            architectures=["Qwen3MoeForCausalLM"], tie_word_embeddings=False, bos_token_id=1,
                            eos_token_id=2, pad_token_id=3)
    Qwen3MoeForCausalLM(config).to(torch.bfloat16).save_pretrained(str(folder))
    return folder


@pytest.fixture(autouse=True)
def unused_plugins_restored():
    """A run in this process marks ModelOpt's unused plugin packages as absent (skip_unused_plugins); the marks
    are taken off after each test, so one test's run leaves no package unimportable for the next."""
    yield
    for name in q.UNUSED_PLUGIN_PACKAGES:
        if name in sys.modules and sys.modules[name] is None:
            del sys.modules[name]
