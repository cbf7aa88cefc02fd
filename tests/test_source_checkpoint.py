"""A source checkpoint that lost a tensor, carries a foreign one or holds NaN stops before calibration."""
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ROOT, assert_usage_error, run_cli

LOCAL_YAML = str(ROOT / "Datasets" / "Local_Example.yaml")


def broken_copy(tiny_model, folder, change):
    shutil.copytree(tiny_model, folder)
    tensors = load_file(str(folder / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("change, fragments", [
    (lambda t: t.pop("model.layers.1.mlp.down_proj.weight"),
     ["1 weights are not in the checkpoint", "model.layers.1.mlp.down_proj.weight", "download the model again"]),
    (lambda t: t.update({"model.layers.9.mlp.down_proj.weight": torch.zeros(4, 4, dtype=torch.bfloat16)}),
     ["1 weights are in the checkpoint but not in this model class", "model.layers.9.mlp.down_proj.weight"]),
    (lambda t: t["model.layers.0.self_attn.q_proj.weight"].view(-1)[7:9].fill_(float("nan")),
     ["1 weight tensors hold NaN or infinite values", "model.layers.0.self_attn.q_proj.weight"]),
])
def test_broken_source_stops_before_calibration(tiny_model, tmp_path, change, fragments):
    source = broken_copy(tiny_model, tmp_path / "source", change)
    result = run_cli("--input_model", str(source), "--output_model", str(tmp_path / "out"), "--dataset_yaml",
                     LOCAL_YAML, "--max_samples", "8", "--max_seq_len", "64")
    assert_usage_error(result, *fragments)
    assert "calibrate" not in result.stderr and not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source"]
