"""--algorithm: ModelOpt configs never mutated, each algorithm's needs refused early, defaults from the table."""
import json

import pytest
import torch

import quantize_nvfp4 as q
from conftest import LOCAL_YAML, ROOT, assert_usage_error, run_cli

ATTN = "model.layers.1.self_attn"


def test_algorithm_configs_never_mutate_modelopt_globals():
    import modelopt.torch.quantization as mtq

    before = json.dumps(mtq.NVFP4_DEFAULT_CFG, default=str)
    mse = q.build_quant_config("nvfp4", [], algorithm="mse")
    assert mse["algorithm"] == {"method": "mse", "fp8_scale_sweep": True}
    weight = next(e for e in mse["quant_cfg"] if e.get("quantizer_name") == "*weight_quantizer")
    assert weight["cfg"]["block_sizes"]["type"] == "static"
    assert q.build_quant_config("nvfp4", [], algorithm="awq_lite")["algorithm"] == {"method": "awq_lite"}
    assert q.build_quant_config("nvfp4", [])["algorithm"] == {"method": "max"}
    assert q.build_quant_config("nvfp4", [], moe_calibration="all")["algorithm"] == \
        {"method": "max", "moe_calib_experts_ratio": 1.0}
    assert json.dumps(mtq.NVFP4_DEFAULT_CFG, default=str) == before


@pytest.mark.parametrize("mode", ["nvfp4", "weight_only"])
def test_gptq_runs_on_static_max_blocks_all_layers_at_once(mode):
    """ModelOpt's GPTQ on the MSE preset's static weight blocks (GPTQ itself sets them by max), not layer by
    layer, with the fused Triton kernel; the mode's inputs, --skip_layers and the KV cache stay."""
    import modelopt.torch.quantization as mtq

    before = json.dumps(mtq.NVFP4_W4A4_WEIGHT_MSE_FP8_SWEEP_CFG, default=str)
    config = q.build_quant_config(mode, ["model.layers.0.mlp"], kv_cache="fp8", algorithm="gptq")
    assert config["algorithm"] == {"method": "gptq", "fused": True, "layerwise": {"enable": False}}
    weight = next(e for e in config["quant_cfg"] if e.get("quantizer_name") == "*weight_quantizer")
    assert weight["cfg"]["block_sizes"] == {-1: 16, "type": "static", "scale_bits": (4, 3)}
    names = [e["quantizer_name"] for e in config["quant_cfg"]]
    assert "model.layers.0.mlp.*" in names and "*[kv]_bmm_quantizer" in names
    assert ("*input_quantizer" in names) == (mode == "nvfp4")
    assert json.dumps(mtq.NVFP4_W4A4_WEIGHT_MSE_FP8_SWEEP_CFG, default=str) == before


def test_modelopt_gptq_report_goes_to_the_manifest(capsys, monkeypatch):
    monkeypatch.setattr(q.CONSOLE, "verbose", True)  # ModelOpt's other lines are shown with --verbose only
    with q.modelopt_report() as errors:
        print("[model.layers.0.self_attn.q_proj] Relative MSE error: 3.32e-03, n_hessian_samples: 65536")
        print("[model.layers.0.mlp.down_proj] Relative MSE error: 1.5e-02 ")
        print("GPTQ time: 1.87s")
    assert errors == {"model.layers.0.self_attn.q_proj": 3.32e-03,
                                           "model.layers.0.mlp.down_proj": 1.5e-02}
    assert capsys.readouterr().out == "GPTQ time: 1.87s\n"


def test_gptq_hessians_see_no_padding(tiny_model):
    """With zero_linear_padding every quantized linear's input has its padded rows zeroed, so the Hessian
    ModelOpt's GPTQ sums over input rows is the same whatever the batching (real rows are untouched)."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()
    linear = model.model.layers[0].mlp.down_proj
    linear.weight_quantizer = SimpleNamespace(is_enabled=True)  # what the hook looks for: a quantized linear

    def down_proj_input(zero_linear_padding: bool):
        seen, state = [], q.CalibrationState(pad_id=3, zero_linear_padding=zero_linear_padding)
        q.install_calibration_hooks(model, state)
        hook = linear.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))  # after ours
        try:
            with torch.no_grad():
                q.run_batch(q.calibration_forward(model), [[5, 6, 7, 8], [9, 10]], [0, 1], "cpu", state)
        finally:
            q.remove_calibration_hooks(state)
            hook.remove()
        return seen[0]

    plain, zeroed = down_proj_input(False), down_proj_input(True)
    assert plain[1, 2:].abs().sum() > 0 and zeroed[1, 2:].abs().sum() == 0
    assert torch.equal(plain[0], zeroed[0]) and torch.equal(plain[1, :2], zeroed[1, :2])


@pytest.mark.parametrize("algorithm, preset", [("local_hessian", "NVFP4_W4A4_WEIGHT_LOCAL_HESSIAN_CFG"),
                                               ("four_over_six", "NVFP4_FOUR_OVER_SIX_CFG")])
@pytest.mark.parametrize("mode", ["nvfp4", "weight_only"])
def test_preset_algorithms_take_modelopts_algorithm_and_weight_blocks(algorithm, preset, mode):
    """ModelOpt's own preset, merged into the mode's config: its static weight blocks (four_over_six: with the 256
    normalization) under max, our search running after; the mode's inputs (none for weight-only), --skip_layers and
    the KV cache stay."""
    import modelopt.torch.quantization as mtq

    before = json.dumps(getattr(mtq, preset), default=str)
    config = q.build_quant_config(mode, ["model.layers.0.mlp"], kv_cache="fp8", algorithm=algorithm)
    assert config["algorithm"] == {"method": "max"}
    weight = next(e for e in config["quant_cfg"] if e.get("quantizer_name") == "*weight_quantizer")
    preset_weight = next(e for e in getattr(mtq, preset)["quant_cfg"] if e.get("quantizer_name") == "*weight_quantizer")
    assert weight["cfg"]["block_sizes"] == preset_weight["cfg"]["block_sizes"]
    names = [e["quantizer_name"] for e in config["quant_cfg"]]
    assert "model.layers.0.mlp.*" in names and "*[kv]_bmm_quantizer" in names
    assert ("*input_quantizer" in names) == (mode == "nvfp4")
    assert json.dumps(getattr(mtq, preset), default=str) == before


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
@pytest.mark.parametrize("algorithm", ["awq_lite", "awq_clip", "mse", "gptq"])
def test_gpu_only_algorithms_fail_early_on_cpu(tiny_model, tmp_path, algorithm):
    result = run_cli("--input_model", str(tiny_model), "--output_model", str(tmp_path / "out"), "--dataset_yaml",
                     LOCAL_YAML, "--algorithm", algorithm)
    assert_usage_error(result, f"--algorithm {algorithm} needs a CUDA GPU")
    assert not (tmp_path / "out").exists()
    if algorithm == "gptq":  # the offload script's layer loop runs it too, on the same kernels
        result = run_cli("--input_model", str(tiny_model), "--output_model", str(tmp_path / "out"), "--dataset_yaml",
                         LOCAL_YAML, "--algorithm", algorithm, "--offload_folder", str(tmp_path / "off"),
                         script=ROOT / "quantize_nvfp4_offload.py")
        assert_usage_error(result, "--algorithm gptq needs a CUDA GPU")
        assert not (tmp_path / "out").exists() and not (tmp_path / "off").exists()


@pytest.mark.slow
def test_algorithm_refused_with_w4a8_and_offload(tiny_model, tmp_path):
    result = run_cli("--input_model", str(tiny_model), "--output_model", str(tmp_path / "out"), "--dataset_yaml",
                     LOCAL_YAML, "--w4a8", "--algorithm", "awq_clip")
    assert_usage_error(result, "--algorithm awq_clip is not available with --w4a8")
    for algorithm in ("awq_lite", "mse"):  # the offload script's layer loop: max, our searches and GPTQ
        result = run_cli("--input_model", str(tiny_model), "--output_model", str(tmp_path / "out"), "--dataset_yaml",
                         LOCAL_YAML, "--offload_folder", str(tmp_path / "off"), "--algorithm", algorithm,
                         script=ROOT / "quantize_nvfp4_offload.py")
        assert_usage_error(result, f"--algorithm {algorithm}: this script's layer loop calibrates with max, "
                                   "local_hessian, smooth_hessian, four_over_six, gptq")


def test_algorithm_facts_come_from_the_table(monkeypatch):
    """Defaults, --help, the CUDA refusal and the offload script's choices all derive from ALGORITHMS."""
    import quantize_nvfp4_offload as offload

    assert q.DEFAULT_ALGORITHMS == {"nvfp4": "smooth_hessian", "w4a8": "max", "weight_only": "local_hessian"}
    assert offload.LAYER_LOOP_ALGORITHMS == [n for n, a in q.ALGORITHMS.items() if a.layer_loop]
    text = q.algorithm_help()
    for name, algorithm in q.ALGORITHMS.items():
        assert f"{name} ({algorithm.summary}" in text
    assert "local_hessian (block scales searched to minimize each block's output error; default for --weight_only)" \
        in text
    assert "smooth_hessian (local_hessian after each norm-fed input's channel ranges move into the norm; default " \
        "for W4A4)" in text
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name, algorithm in q.ALGORITHMS.items():
        if algorithm.cuda:
            with pytest.raises(q.UsageError, match=f"use --algorithm {' or '.join(q.cpu_algorithms())}"):
                q.check_algorithm(name, "nvfp4")
        else:
            q.check_algorithm(name, "nvfp4")
    with pytest.raises(q.UsageError, match="not available with --w4a8: use --algorithm max, or the default"):
        q.check_algorithm("local_hessian", "w4a8")
    offered = ", ".join(offload.LAYER_LOOP_ALGORITHMS)
    for name, algorithm in q.ALGORITHMS.items():
        args = offload.build_parser().parse_args(["--offload_folder", str(ROOT / "off"), "--algorithm", name])
        if algorithm.layer_loop:
            offload.build_offload_settings(args)
        else:
            with pytest.raises(q.UsageError, match=f"layer loop calibrates with {offered} "):
                offload.build_offload_settings(args)


@pytest.mark.parametrize("flags, expected", [([], "smooth_hessian"), (["--w4a8"], "max"),
                                             (["--weight_only"], "local_hessian"), (["--algorithm", "max"], "max")])
def test_default_algorithm_per_mode(flags, expected):
    args = q.build_parser().parse_args(["--input_model", "m", "--output_model", "o", "--dataset_yaml",
                                        LOCAL_YAML, *flags])
    assert q.build_settings(args, {}).algorithm == expected


@pytest.mark.parametrize("algorithm", ["awq_lite", "gptq"])
def test_weight_changing_algorithms_refuse_moe(moe_model, tiny_model, algorithm):
    from transformers import AutoConfig

    skeleton = q.empty_model(AutoConfig.from_pretrained(str(moe_model)), False)
    with pytest.raises(q.UsageError, match=f"--algorithm {algorithm}: mixture-of-experts models are not supported"):
        q.check_algorithm_fits(skeleton, algorithm)
    q.check_algorithm_fits(q.empty_model(AutoConfig.from_pretrained(str(tiny_model)), False), algorithm)


# ---------------------------------------------------------------- smooth_hessian
def smooth_run(model, algorithm="smooth_hessian"):
    from test_calibration import SAMPLES, settings

    run = settings()
    run.algorithm = algorithm
    return q.quantize_model(model, run, q.always_unquantized(model), SAMPLES, "cpu", pad_id=0)


def test_smoothing_keeps_the_function_and_equals_smoothing_before_calibration():
    """The scales fold into the norms and the readers' columns (the 16-bit model computes the same function), and
    what the max pass measured is transformed exactly: the quantizers equal those of calibrating, with
    local_hessian, a copy smoothed first by the same weights (a rare near-tie block scale may differ: the Hessian
    sums round differently)."""
    import copy

    from modelopt.torch.quantization.conversion import set_quantizer_by_cfg_context

    from test_calibration import SAMPLES, amax_by_quantizer, tiny_fp32_model

    base = tiny_fp32_model()
    smoothed, first = copy.deepcopy(base), copy.deepcopy(base)
    stats = smooth_run(smoothed)
    assert stats["smoothing"]["norms"] == stats["smoothing"]["of"] == 4 and not stats["smoothing"]["left"]
    norm = "model.layers.0.input_layernorm.weight"
    assert not torch.equal(smoothed.get_parameter(norm), base.get_parameter(norm))
    ids = torch.tensor([SAMPLES[0]])
    with torch.no_grad(), set_quantizer_by_cfg_context(smoothed, [{"quantizer_name": "*", "enable": False}]):
        torch.testing.assert_close(smoothed(ids).logits, base(ids).logits, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        for name, param in first.named_parameters():
            param.copy_(smoothed.get_parameter(name))
    smooth_run(first, "local_hessian")
    got, expected = amax_by_quantizer(smoothed), amax_by_quantizer(first)
    assert got.keys() == expected.keys()
    inputs = [n for n in got if n.endswith("input_quantizer")]
    for name in inputs:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=0)
    blocks = [n for n in got if n.endswith("weight_quantizer")]
    same = sum(int((got[n] == expected[n]).sum()) for n in blocks)
    assert same >= 0.98 * sum(got[n].numel() for n in blocks)


def test_a_norm_whose_output_feeds_another_linear_is_left_alone(monkeypatch):
    """Folding into a norm rescales every consumer of its output: where a linear outside the group reads it (here
    v_proj, left out of the group on purpose), the group keeps its weights, and the manifest says why."""
    import copy

    from test_calibration import tiny_fp32_model

    monkeypatch.setitem(q.SMOOTHED_READERS, "input_layernorm", ("self_attn.q_proj", "self_attn.k_proj"))
    base = tiny_fp32_model()
    model = copy.deepcopy(base)
    stats = smooth_run(model)["smoothing"]
    assert stats["norms"] == 2 and stats["of"] == 4
    assert set(stats["left"]) == {f"model.layers.{i}.input_layernorm" for i in (0, 1)}
    assert "another linear" in stats["left"]["model.layers.0.input_layernorm"]
    assert torch.equal(model.model.layers[0].input_layernorm.weight, base.model.layers[0].input_layernorm.weight)
    assert not torch.equal(model.model.layers[0].post_attention_layernorm.weight,
                           base.model.layers[0].post_attention_layernorm.weight)


def test_a_model_without_foldable_norms_is_searched_as_local_hessian(monkeypatch, capsys):
    import copy

    from test_calibration import amax_by_quantizer, tiny_fp32_model

    monkeypatch.setattr(q, "SMOOTHABLE_NORMS", ())
    base = tiny_fp32_model()
    smoothed, plain = copy.deepcopy(base), copy.deepcopy(base)
    assert smooth_run(smoothed)["smoothing"]["of"] == 0
    assert "no norm it folds scales into" in capsys.readouterr().err
    smooth_run(plain, "local_hessian")
    got, expected = amax_by_quantizer(smoothed), amax_by_quantizer(plain)
    assert all(torch.equal(got[n], expected[n]) for n in expected)
