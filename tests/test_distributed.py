"""Data-parallel calibration on CPU: 2 processes over gloo, launched with torchrun as the README says."""
import os
import socket
import subprocess
import sys

import pytest
import torch

import quantize_nvfp4 as q
from conftest import ROOT, SCRIPT, run_cli

pytestmark = pytest.mark.slow
FAULTS = ROOT / "tests" / "faults.py"

DATA = ("--dataset_yaml", str(ROOT / "Datasets" / "Local_Example.yaml"), "--max_samples", "32", "--max_seq_len", "192",
        "--batch_size", "4")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args, fail_rank=None):
    """The script under torchrun, two processes; with `fail_rank`, that rank fails during calibration."""
    full_env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    script = [str(SCRIPT)] if fail_rank is None else [str(FAULTS), "--fail_rank", str(fail_rank), str(SCRIPT)]
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *script, *args],
                          capture_output=True, text=True, env=full_env, timeout=300)


@pytest.mark.parametrize("flags", [(), ("--effective_bits", "6")], ids=["nvfp4", "mixed"])
def test_two_processes_write_the_same_checkpoint_as_one(tiny_model, tmp_path, flags):
    one = run_cli("--input_model", str(tiny_model), "--output_model", str(tmp_path / "one"), *DATA, *flags)
    assert one.returncode == 0, one.stderr[-2000:]
    two = torchrun("--input_model", str(tiny_model), "--output_model", str(tmp_path / "two"), *DATA, *flags)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "data parallel: 2 processes" in two.stderr
    assert two.stderr.count("\nsummary\n") == 1  # rank 0 alone reports and exports
    a, b = q.read_checkpoint_tensors(tmp_path / "one"), q.read_checkpoint_tensors(tmp_path / "two")
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    import json

    run = json.loads((tmp_path / "two" / "nvfp4_manifest.json").read_text())["calibration_run"]
    assert run["processes"] == 2 and run["tokens"] == json.loads(
        (tmp_path / "one" / "nvfp4_manifest.json").read_text())["calibration_run"]["tokens"]


def test_a_failing_rank_fails_the_job_without_hanging(tiny_model, tmp_path):
    result = torchrun("--input_model", str(tiny_model), "--output_model", str(tmp_path / "out"), *DATA,
                      fail_rank=1)
    assert result.returncode != 0
    assert "simulated failure on rank 1" in result.stderr
    assert not (tmp_path / "out").exists()


def test_rank_share_is_complete_disjoint_and_balanced():
    lengths = [100 + 37 * i % 900 for i in range(40)]
    batches = q.group_batches(lengths, 3, 0)
    shares = [q.rank_share(batches, lengths, r, 3) for r in range(3)]
    assert sorted(i for share in shares for b in share for i in b) == list(range(40))
    loads = [sum(q.padded_tokens(lengths, b) for b in share) for share in shares]
    assert max(loads) - min(loads) <= max(q.padded_tokens(lengths, b) for b in batches)
    with pytest.raises(q.UsageError, match="2 calibration batches for 3 processes"):
        q.rank_share(batches[:2], lengths, 0, 3)


def test_placement_for():
    gib = 2**30
    assert q.placement_for(10 * gib, [80 * gib, 80 * gib]) == "single"
    assert q.placement_for(100 * gib, [80 * gib, 80 * gib]) == "balanced"
    assert q.placement_for(10 * gib, []) == "single"  # CPU
    with pytest.raises(q.UsageError, match="use quantize_nvfp4_offload.py"):
        q.placement_for(200 * gib, [80 * gib, 80 * gib])
    with pytest.raises(q.UsageError, match="use quantize_nvfp4_offload.py"):
        q.placement_for(100 * gib, [80 * gib])


def test_offload_script_refuses_several_processes(tiny_model, tmp_path):
    result = run_cli("--input_model", str(tiny_model), "--output_model", str(tmp_path / "o"), *DATA,
                     "--offload_folder", str(tmp_path / "off"), script=ROOT / "quantize_nvfp4_offload.py",
                     env={"WORLD_SIZE": "2"})
    assert result.returncode == 2 and "runs as one process" in result.stderr
