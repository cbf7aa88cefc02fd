"""Shared fixtures: a tiny Llama + BPE tokenizer built once per session, and a CLI runner."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import quantize_nvfp4 as q  # noqa: E402

SCRIPT = ROOT / "quantize_nvfp4.py"


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
