"""quantize_nvfp4_offload.py on CPU: a tiny model split across CPU and disk, layer-by-layer calibration."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import quantize_nvfp4 as q
import quantize_nvfp4_offload as offload
from conftest import ROOT, assert_usage_error, run_cli

OFFLOAD_SCRIPT = ROOT / "quantize_nvfp4_offload.py"
# --batch_size 4: several padded batches, so the layer-by-layer replay has to exclude padding too
DATA = ("--dataset_yaml", str(q.SAMPLES_YAML), "--max_samples", "24", "--max_seq_len", "192", "--batch_size", "4")
# On a GPU machine the embeddings go to the GPU, a layer to RAM, the rest to disk; a resume point after every layer
CPU_CAP = ("--max_gpu_memory", "200000", "--max_cpu_memory", "600000", "--checkpoint_every", "1")


@pytest.fixture(scope="module")
def four_layer_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama-4")
    tokenizer = q.build_tiny_tokenizer(folder, q.sample_corpus())
    q.build_tiny_model(folder, vocab_size=len(tokenizer), layers=4)
    return folder


@pytest.fixture(scope="module")
def in_memory_checkpoint(four_layer_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("in-memory") / "out"
    result = run_cli("--input_model", str(four_layer_model), "--output_model", str(out), *DATA)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def offload_cli(model, out, folder, *extra, env=None):
    return run_cli("--input_model", str(model), "--output_model", str(out), "--offload_folder", str(folder),
                   *DATA, *CPU_CAP, *extra, script=OFFLOAD_SCRIPT, env=env)


def assert_identical(a: Path, b: Path):
    ta, tb = q.read_checkpoint_tensors(a), q.read_checkpoint_tensors(b)
    assert ta.keys() == tb.keys()
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, different[:5]


def test_offloaded_checkpoint_is_identical_to_in_memory(four_layer_model, in_memory_checkpoint, tmp_path):
    result = offload_cli(four_layer_model, tmp_path / "out", tmp_path / "offload")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "offload plan" in result.stderr and "disk" in result.stderr
    assert_identical(in_memory_checkpoint, tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "nvfp4_manifest.json").read_text())
    assert manifest["tool"] == "quantize_nvfp4_offload.py"
    assert manifest["offload"]["layers_per_device"]["disk"] >= 2
    assert manifest["calibration_run"]["batches"] == 6 and manifest["calibration_run"]["padding_fraction"] > 0
    assert not (tmp_path / "offload" / offload.LAYERWISE_DIR).exists()  # per-layer checkpoints gone once exported


def test_killed_run_resumes_from_its_checkpoints(four_layer_model, in_memory_checkpoint, tmp_path):
    folder, out = tmp_path / "offload", tmp_path / "out"
    killed = offload_cli(four_layer_model, out, folder, "--clean_offload", env={offload.FAIL_AFTER_ENV: "1"})
    assert killed.returncode != 0 and "simulated failure after layer 1" in killed.stderr
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["offload"]  # nothing half-written
    assert offload.committed_layer(folder / offload.LAYERWISE_DIR) == 1  # and --clean_offload kept the progress
    caches = sorted(p.parent.name for p in folder.rglob(f"{offload.INPUTS_FILE}.bin"))
    assert caches == ["layer_0001"]  # older layers' activation caches were pruned as calibration moved on

    assert_usage_error(offload_cli(four_layer_model, out, folder), "pass --resume")
    assert_usage_error(offload_cli(four_layer_model, out, folder, "--resume", "--seed", "7"),
                       "different job", "calibration_tokens_sha256")

    resumed = offload_cli(four_layer_model, out, folder, "--resume", "--clean_offload")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "layers 0-1 are already calibrated; continuing from layer 2" in resumed.stderr
    assert json.loads((out / "nvfp4_manifest.json").read_text())["calibration_run"]["resumed_after_layer"] == 1
    assert_identical(in_memory_checkpoint, out)
    assert not folder.exists()  # cleaned after success


def test_offload_folder_required(four_layer_model, tmp_path):
    result = run_cli("--input_model", str(four_layer_model), "--output_model", str(tmp_path / "o"), *DATA,
                     script=OFFLOAD_SCRIPT)
    assert_usage_error(result, "--offload_folder")


def test_offload_self_test():
    result = run_cli("--self_test", script=OFFLOAD_SCRIPT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "offload self-test passed" in result.stderr


def test_parse_memory():
    assert offload.parse_memory("6GiB") == 6 * 2**30 and offload.parse_memory("1024") == 1024
    for bad in ("lots", "-5GB", "0"):
        with pytest.raises(Exception, match="size like|positive"):
            offload.parse_memory(bad)


def test_lookup_device():
    device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": "cpu", "model.layers.2": "disk",
                  "lm_head": "cpu"}
    assert offload.lookup_device(device_map, "model.layers.1.mlp.up_proj.weight") == "cpu"
    assert offload.device_label(offload.lookup_device(device_map, "model.layers.0.self_attn")) == "cuda:0"
    assert offload.lookup_device({"": "disk"}, "anything.at.all") == "disk"


def test_disk_check_refuses_to_start(tmp_path):
    placement = offload.Placement({}, {"disk": 10**18}, {"disk": 4}, 0)
    job = SimpleNamespace(checkpoint_bytes=1)
    settings = SimpleNamespace(output_model=tmp_path / "out")
    folder = offload.OffloadSettings(tmp_path / "off", None, None, False, False)
    with pytest.raises(q.UsageError, match="not enough free disk for --offload_folder"):
        offload.check_offload_disk(placement, job, settings, folder)
    offload.check_offload_disk(offload.Placement({}, {"disk": 1}, {"disk": 4}, 0), job, settings, folder)
