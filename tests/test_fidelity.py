"""Issue 14: the fidelity check on every export: each quantized linear computed from the exported tensors
against the original weights; broken scales and folds stop the run with exit 1 and nothing in place."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import quantize_nvfp4 as q
from conftest import ROOT, run_cli

LOCAL_YAML = str(ROOT / "Datasets" / "Local_Example.yaml")
SMALL = ("--dataset_yaml", LOCAL_YAML, "--max_samples", "16", "--max_seq_len", "96")


def quantized_job(tiny_model, out, *flags):
    args = q.build_parser().parse_args(["--input_model", str(tiny_model), "--output_model", str(out), *SMALL, *flags])
    settings = q.build_settings(args, {})
    job = q.prepare_job(settings)
    model = q.load_model(settings, job.config, "cpu")
    return settings, job, model


def export(settings, job, model, monkeypatch, tamper=None):
    """Calibrate and export as the CLI does; `tamper(tensors)` edits the staged safetensors before the checks."""
    calibration_run = q.quantize_model(model, settings, job.unquantized, job.samples, "cpu", job.pad_id)
    if tamper:
        relabel = q.relabel_folded_awq

        def tampered(folder, mode):
            relabel(folder, mode)
            tensors = load_file(str(folder / "model.safetensors"))
            tamper(tensors)
            save_file(tensors, str(folder / "model.safetensors"))
        monkeypatch.setattr(q, "relabel_folded_awq", tampered)
    assert q.finish_job(model, settings, job, calibration_run, {"load_model_s": 0}, "cpu", "test") == 0
    return json.loads((settings.output_model / q.MANIFEST_NAME).read_text())


def test_good_export_is_in_nvfp4s_normal_range(tiny_model, tmp_path, monkeypatch):
    settings, job, model = quantized_job(tiny_model, tmp_path / "out")
    fidelity = export(settings, job, model, monkeypatch)["fidelity"]
    assert fidelity["checked"] == 14 and not fidelity["unchecked"]
    assert 0.05 < fidelity["median"] < 0.2 and max(fidelity["per_linear"].values()) <= fidelity["limit"]
    assert list(fidelity["worst"].values())[0] == max(fidelity["per_linear"].values())
    assert "## Export fidelity" in (tmp_path / "out" / "README.md").read_text()


@pytest.mark.parametrize("tensor, factor", [("weight_scale_2", 4.0), ("input_scale", 1 / 16)])
def test_wrong_scale_is_rejected_and_nothing_is_written(tiny_model, tmp_path, monkeypatch, tensor, factor):
    """A global scale off by a factor: weight_scale_2 x4 scales the weight, input_scale /16 clips the inputs."""
    settings, job, model = quantized_job(tiny_model, tmp_path / "out")
    key = f"model.layers.1.mlp.down_proj.{tensor}"

    def tamper(tensors):
        tensors[key] = tensors[key] * factor
    with pytest.raises(q.ExportRejected, match="model.layers.1.mlp.down_proj"):
        export(settings, job, model, monkeypatch, tamper)
    assert list(tmp_path.iterdir()) == []  # the staged export is gone, and nothing took the output's name


def test_weight_scaled_per_channel_without_its_inverse_is_rejected(tiny_model, tmp_path, monkeypatch):
    """A broken fold: o_proj's weight columns carry a smoothing scale that no layer before it undoes."""
    settings, job, model = quantized_job(tiny_model, tmp_path / "out")
    o_proj = model.model.layers[0].self_attn.o_proj
    scale = torch.exp(torch.randn(o_proj.in_features, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        o_proj.weight.mul_(scale.to(o_proj.weight.dtype))
    with pytest.raises(q.ExportRejected, match="model.layers.0.self_attn.o_proj"):
        export(settings, job, model, monkeypatch)


def test_rule_cap_floor_and_median():
    assert q.fidelity_limit(0.01) == q.FIDELITY_FLOOR
    assert q.fidelity_limit(0.1) == pytest.approx(0.4)
    assert q.fidelity_limit(0.3) == q.FIDELITY_CAP


def test_offload_script_exits_1_on_a_broken_export(tiny_model, tmp_path):
    """End to end in the offload script (weights on disk), which imports the helpers: a sitecustomize breaks
    one exported scale in the staged files; exit 1, one error line, nothing at the output path."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import quantize_nvfp4 as q\n"
        "from safetensors.torch import load_file, save_file\n"
        "relabel = q.relabel_folded_awq\n"
        "def tampered(folder, mode):\n"
        "    relabel(folder, mode)\n"
        "    t = load_file(str(folder / 'model.safetensors'))\n"
        "    t['model.layers.0.self_attn.o_proj.weight_scale_2'] *= 8\n"
        "    save_file(t, str(folder / 'model.safetensors'))\n"
        "q.relabel_folded_awq = tampered\n")
    out = tmp_path / "out"
    result = run_cli("--input_model", str(tiny_model), "--output_model", str(out), *SMALL, "--offload_folder",
                     str(tmp_path / "offload"), "--max_cpu_memory", "600000", env={"PYTHONPATH": str(hook)},
                     script=ROOT / "quantize_nvfp4_offload.py")
    assert result.returncode == 1, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "o_proj" in errors[0] and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
