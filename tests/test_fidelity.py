"""The fidelity check on every export: each quantized linear computed from the exported tensors
against the original weights; broken scales and folds stop the run with exit 1 and nothing in place."""
import json
import os
import subprocess
import sys

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


@pytest.mark.slow
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


# --------------------------------------------------------------------------- awq_lite's folded scales
def fake_awq_lite(model, captured, sigma=0.7):
    """awq_lite's end state without its CUDA-only search: random per-channel smoothing scales, one per input
    shared by the layers reading it (as the export needs), applied the way awq_lite applies its best scales."""
    from modelopt.torch.quantization.model_calib import apply_pre_quant_scale_and_smooth

    generator, shared = torch.Generator().manual_seed(1), {}
    for name, (x, _) in captured.items():
        module = model.get_submodule(name)
        parent, leaf = name.rsplit(".", 1)
        key = parent + (".qkv" if leaf in ("q_proj", "k_proj", "v_proj") else ".gate_up" if leaf in
                        ("gate_proj", "up_proj") else "." + leaf)
        scale = shared.setdefault(key, torch.exp(sigma * torch.randn(module.in_features, generator=generator)))
        module.input_quantizer._amax_for_smoothing = x.float().abs().amax(0).to(module.weight.dtype)
        apply_pre_quant_scale_and_smooth(module, scale)


def in_process_logits(model, names):
    """ModelOpt's fake-quantized forward, emulated on the CPU: each quantized linear's input times its
    pre_quant_scale, quantized with its input amax; its weight quantized with its weight amax."""
    from modelopt.torch.quantization.conversion import set_quantizer_by_cfg_context

    def quantized(module, args, output):
        iq, wq = module.input_quantizer, module.weight_quantizer
        x = args[0] * iq.pre_quant_scale if iq.pre_quant_scale is not None else args[0]
        x = q.fake_quant_nvfp4_input(x.float(), iq.amax.float() / (6 * 448))
        w = q.fake_quant_nvfp4_input(module.weight.float(), wq.amax.float() / (6 * 448))
        return torch.nn.functional.linear(x, w).to(output.dtype)

    def forward(ids):
        handles = [model.get_submodule(n).register_forward_hook(quantized) for n in names]
        with set_quantizer_by_cfg_context(model, [{"quantizer_name": "*", "enable": False}]):
            logits = model(input_ids=ids, use_cache=False).logits
        for handle in handles:
            handle.remove()
        return logits
    return forward


def awq_export(tiny_model, out):
    """A calibrated tiny Llama (GQA) in awq_lite's state; returns what export needs and the in-process quality."""
    settings, job, model = quantized_job(tiny_model, out)
    calibration_run = q.quantize_model(model, settings, job.unquantized, job.samples, "cpu", job.pad_id)
    fake_awq_lite(model, q.capture_linear_io(model, job.samples, "cpu", job.pad_id))
    settings.algorithm = "awq_lite"  # the search itself needs CUDA: its result is faked above
    reference = q.load_model(settings, job.config, "cpu")
    in_process = q.quality_report(lambda ids: reference(input_ids=ids, use_cache=False).logits,
                                  in_process_logits(model, list(q.quantized_linear_shapes(model))),
                                  job.samples[:8], "cpu", "in process")
    return settings, job, model, calibration_run, in_process


@pytest.mark.slow
def test_awq_lite_export_computes_what_was_calibrated(tiny_model, tmp_path):
    """The exported awq_lite checkpoint (scales folded into norms, v_proj and up_proj) scores like ModelOpt's
    in-process model. A report that kept the original norms would see the folded linears without their scales
    (5x the KL, top-1 agreement 0.05 here)."""
    settings, job, model, calibration_run, in_process = awq_export(tiny_model, tmp_path / "out")
    assert q.finish_job(model, settings, job, calibration_run, {"load_model_s": 0}, "cpu", "test") == 0
    manifest = json.loads((tmp_path / "out" / q.MANIFEST_NAME).read_text())
    assert manifest["validation"]["quant_algo"] == "NVFP4" and manifest["fidelity"]["checked"] == 14
    assert max(manifest["fidelity"]["per_linear"].values()) <= manifest["fidelity"]["limit"]
    exported = q.report_with_emulator(settings, job.config, tmp_path / "out", job.samples[:8], "cpu")
    assert exported["mean_kl"] < 1.5 * in_process["mean_kl"], (exported, in_process)
    assert exported["top1_agreement"] > 0.8 * in_process["top1_agreement"], (exported, in_process)


@pytest.mark.slow
def test_awq_lite_broken_fold_is_rejected(tiny_model, tmp_path, monkeypatch):
    """A fold that drops the input scales instead of moving them into the norms is caught by the fidelity check."""
    import modelopt.torch.export.unified_export_hf as unified

    def drop_scales(norm, modules):
        for module in modules:
            if hasattr(module.input_quantizer, "_pre_quant_scale"):
                delattr(module.input_quantizer, "_pre_quant_scale")
                module.fused_with_prequant = True
    monkeypatch.setattr(unified, "fuse_prequant_layernorm", drop_scales)
    settings, job, model, calibration_run, _ = awq_export(tiny_model, tmp_path / "out")
    with pytest.raises(q.ExportRejected, match="compute far from the original"):
        q.finish_job(model, settings, job, calibration_run, {"load_model_s": 0}, "cpu", "test")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_algorithm_benchmark_runs_tiny_on_cpu(tmp_path):
    """benchmarks/bench_algorithms.py --tiny: the built-in model, max in both scripts, the JSON summary with the
    fidelity distribution; both judged from their files on the held-out rows, the offload script's quality equals the
    main script's (the checkpoints are identical on the CPU); no default is chosen without ModelOpt's in-process
    numbers (GPU only)."""
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_algorithms.py"), "--tiny", "--work",
                             str(tmp_path / "work"), "--out", str(out)], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "TQDM_DISABLE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(out.read_text())
    row, offloaded = summary["variants"]
    assert (row["variant"] == "max" and row["quant_algo"] == "NVFP4"
            and 0 < row["fidelity_median"] <= row["fidelity_worst"])
    assert offloaded["variant"] == "offload max" and sum(offloaded["layers_per_device"].values()) == 2
    for key in ("perplexity_original", "perplexity_quantized", "mean_kl", "top1_agreement", "fidelity_worst"):
        assert offloaded[key] == row[key], key
    assert set(row["fidelity_distribution"]["median_by_projection"]) == {"q_proj", "k_proj", "v_proj", "o_proj",
                                                                         "gate_proj", "up_proj", "down_proj"}
    assert summary["default_choice"]["note"].startswith("no ModelOpt in-process") and "default choice" in result.stdout
