"""Issue 8: --kv_cache, --algorithm, mixture-of-experts coverage, and the model card."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import quantize_nvfp4 as q
from conftest import ROOT, assert_usage_error, run_cli, write_jsonl, write_yaml
from test_verify import edit_json, edit_tensors

LOCAL_YAML = str(ROOT / "Datasets" / "Local_Example.yaml")
ATTN = "model.layers.1.self_attn"


def quantize(model, out, *flags, samples="16", seq_len="96"):
    result = run_cli("--input_model", str(model), "--output_model", str(out), "--dataset_yaml", LOCAL_YAML,
                     "--max_samples", samples, "--max_seq_len", seq_len, *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def kv_runs(tiny_model, tmp_path_factory):
    """FP8 KV cache with auto batching and with one sample per forward (padding vs none), and NVFP4 KV."""
    root = tmp_path_factory.mktemp("kv")
    return {"fp8": quantize(tiny_model, root / "fp8", "--kv_cache", "fp8", "--eval", "--eval_samples", "8"),
            "fp8_bs1": quantize(tiny_model, root / "fp8_bs1", "--kv_cache", "fp8", "--batch_size", "1"),
            "nvfp4": quantize(tiny_model, root / "nvfp4", "--kv_cache", "nvfp4")}


# --------------------------------------------------------------------------- KV cache
@pytest.mark.parametrize("run, algo, scheme", [("fp8", "FP8", {"dynamic": False, "num_bits": 8, "type": "float"}),
                                               ("nvfp4", "NVFP4", "NVFP4")])
def test_kv_cache_checkpoint(kv_runs, run, algo, scheme):
    out = kv_runs[run]
    assert json.loads((out / "hf_quant_config.json").read_text())["quantization"]["kv_cache_quant_algo"] == algo
    assert json.loads((out / "config.json").read_text())["quantization_config"]["kv_cache_scheme"] == scheme
    tensors = load_file(str(out / "model.safetensors"))
    for layer in range(2):
        for key in (f"model.layers.{layer}.self_attn.k_proj.k_scale", f"model.layers.{layer}.self_attn.v_proj.v_scale"):
            assert tensors[key].dtype == torch.float32 and tensors[key].numel() == 1 and tensors[key] > 0, key
    summary, problems = q.verify_checkpoint(out)
    assert problems == [] and summary["kv_cache_quant_algo"] == algo
    assert run_cli("--verify", str(out)).stdout.count(f"KV cache {algo}") == 1


def test_kv_scales_ignore_padding(kv_runs):
    """Keys and values are [B, heads, T, D]: padded positions are masked, so batching changes nothing."""
    batched, single = (load_file(str(kv_runs[r] / "model.safetensors")) for r in ("fp8", "fp8_bs1"))
    assert batched.keys() == single.keys()
    for key in batched:
        assert torch.equal(batched[key], single[key]), key


def test_kv_scale_is_the_key_amax_over_448(kv_runs, tiny_model):
    """k_scale is what vLLM multiplies FP8 keys by: max |k| over the calibration tokens / 448."""
    manifest = json.loads((kv_runs["fp8"] / q.MANIFEST_NAME).read_text())
    k_scale = load_file(str(kv_runs["fp8"] / "model.safetensors"))[f"{ATTN}.k_proj.k_scale"]
    settings = q.build_settings(q.build_parser().parse_args(
        ["--input_model", str(tiny_model), "--dataset_yaml", LOCAL_YAML, "--max_samples", "16", "--max_seq_len", "96",
         "--dry_run"]), {})
    samples, _, _ = q.prepare_calibration_data(settings, q.load_tokenizer(settings))
    assert sum(len(s) for s in samples) == manifest["calibration_run"]["tokens"]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.bfloat16)
    seen, captured = [], []

    def capture(module, query, key, value, attention_mask, **kwargs):
        captured.append(key.abs().amax().float())
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    from transformers import AttentionInterface
    AttentionInterface.register("capture_keys", capture)
    model.set_attn_implementation("capture_keys")
    with torch.no_grad():
        for sample in samples:
            captured.clear()
            model(input_ids=torch.tensor([sample]), use_cache=False)
            seen.append(captured[1])  # layer 1's keys
    assert torch.allclose(k_scale, torch.stack(seen).max() / 448, rtol=1e-2)


def test_kv_emulation_changes_the_logits(kv_runs, tiny_model):
    """The quality report quantizes keys and values with the stored scales."""
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([list(range(4, 60))])
    logits = []
    for kv in (True, False):
        model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.bfloat16)
        q.emulate_checkpoint(model, kv_runs["nvfp4"])
        if not kv:
            model.set_attn_implementation("sdpa")
        with torch.no_grad():
            logits.append(model(input_ids=ids, use_cache=False).logits.float())
    assert not torch.equal(logits[0], logits[1])
    report = json.loads((kv_runs["fp8"] / q.REPORT_NAME).read_text())
    assert report["mean_kl"] > 0


KV_BREAKAGES = {
    "missing k_scale": (lambda f: edit_tensors(f, lambda t: t.pop(f"{ATTN}.k_proj.k_scale")),
                        f"{ATTN}.k_proj.k_scale: missing with kv_cache_quant_algo FP8 [kv cache: scales]"),
    "zero v_scale": (lambda f: edit_tensors(f, lambda t: t.update({f"{ATTN}.v_proj.v_scale": torch.tensor(0.0)})),
                     f"{ATTN}.v_proj.v_scale: scale must be positive"),
    "per-head k_scale": (lambda f: edit_tensors(f, lambda t: t.update({f"{ATTN}.k_proj.k_scale": torch.ones(2)})),
                         f"{ATTN}.k_proj.k_scale: expected an F32 scalar, got F32 [2]"),
    "scheme disagrees": (lambda f: edit_json(f, "config.json", lambda d: d["quantization_config"].pop("kv_cache_scheme")),
                         "config.json: kv_cache_scheme None does not say FP8"),
    "unknown algo": (lambda f: edit_json(f, "hf_quant_config.json",
                                         lambda d: d["quantization"].update(kv_cache_quant_algo="INT4")),
                     "kv_cache_quant_algo 'INT4' is not one of"),
}


@pytest.mark.parametrize("breakage", list(KV_BREAKAGES))
def test_verify_catches_kv_breakage(kv_runs, tmp_path, breakage):
    folder = tmp_path / "ckpt"
    shutil.copytree(kv_runs["fp8"], folder)
    breaker, expected = KV_BREAKAGES[breakage]
    breaker(folder)
    _, problems = q.verify_checkpoint(folder)
    assert any(expected in p for p in problems), problems


def test_kv_cache_stays_on_in_skipped_layers():
    config = q.build_quant_config("nvfp4", ["model.layers.0"], kv_cache="fp8")
    names = [e["quantizer_name"] for e in config["quant_cfg"]]
    assert names.index("*[kv]_bmm_quantizer") > names.index("model.layers.0.*")


# --------------------------------------------------------------------------- algorithms
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
    holder = {}
    with q.modelopt_report(holder):
        print("[model.layers.0.self_attn.q_proj] Relative MSE error: 3.32e-03, n_hessian_samples: 65536")
        print("[model.layers.0.mlp.down_proj] Relative MSE error: 1.5e-02 ")
        print("GPTQ time: 1.87s")
    assert holder["gptq_relative_mse"] == {"model.layers.0.self_attn.q_proj": 3.32e-03,
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
        seen, holder = [], {"pad_id": 3, "zero_linear_padding": zero_linear_padding}
        q.install_calibration_hooks(model, holder)
        hook = linear.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))  # after ours
        try:
            with torch.no_grad():
                q.run_batch(q.calibration_forward(model), [[5, 6, 7, 8], [9, 10]], [0, 1], "cpu", holder)
        finally:
            q.remove_calibration_hooks(holder)
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


def test_algorithm_refused_with_w4a8_and_offload(tiny_model, tmp_path):
    result = run_cli("--input_model", str(tiny_model), "--output_model", str(tmp_path / "out"), "--dataset_yaml",
                     LOCAL_YAML, "--w4a8", "--algorithm", "awq_clip")
    assert_usage_error(result, "--algorithm awq_clip is not available with --w4a8")
    for algorithm in ("awq_lite", "mse"):  # the offload script's layer loop: max, our searches and GPTQ
        result = run_cli("--input_model", str(tiny_model), "--output_model", str(tmp_path / "out"), "--dataset_yaml",
                         LOCAL_YAML, "--offload_folder", str(tmp_path / "off"), "--algorithm", algorithm,
                         script=ROOT / "quantize_nvfp4_offload.py")
        assert_usage_error(result, f"--algorithm {algorithm}: this script's layer loop calibrates with max, "
                                   "local_hessian, four_over_six, gptq")


def test_algorithm_facts_come_from_the_table(monkeypatch):
    """Defaults, --help, the CUDA refusal and the offload script's choices all derive from ALGORITHMS."""
    import quantize_nvfp4_offload as offload

    assert q.DEFAULT_ALGORITHMS == {"nvfp4": "local_hessian", "w4a8": "max", "weight_only": "max"}
    assert offload.LAYER_LOOP_ALGORITHMS == [n for n, a in q.ALGORITHMS.items() if a.layer_loop]
    text = q.algorithm_help()
    for name, algorithm in q.ALGORITHMS.items():
        assert f"{name} ({algorithm.summary}" in text
    assert "local_hessian (block scales searched to minimize each block's output error; default for W4A4)" in text
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


@pytest.mark.parametrize("flags, expected", [([], "local_hessian"), (["--w4a8"], "max"), (["--weight_only"], "max"),
                                             (["--algorithm", "max"], "max")])
def test_default_algorithm_is_local_hessian_for_w4a4_and_max_otherwise(flags, expected):
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


# --------------------------------------------------------------------------- mixture of experts
@pytest.fixture(scope="module")
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


@pytest.fixture(scope="module")
def moe_data(tmp_path_factory):
    """Three short texts: a few dozen tokens, top-2 of 8 experts, so some experts get none."""
    folder = tmp_path_factory.mktemp("moe-data")
    write_jsonl(folder / "few.jsonl", [{"text": "the cat sat on the mat and looked at the door " * 2},
                                       {"text": "a story about a dragon who counted the stars " * 2},
                                       {"text": "notes on the weather: rain, then sun, then rain " * 2}])
    return write_yaml(folder / "few.yaml", f"datasets:\n  - name: few\n    path: {folder / 'few.jsonl'}\n")


@pytest.fixture(scope="module")
def moe_runs(moe_model, moe_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("moe-out")
    runs = {}
    for name, flags in {"auto": ["--eval", "--eval_samples", "1"], "bs1": ["--batch_size", "1"],
                        "all": ["--moe_calibration", "all"], "short": ["--max_samples", "1", "--max_seq_len", "4"]}.items():
        result = run_cli("--input_model", str(moe_model), "--output_model", str(root / name), "--dataset_yaml",
                         str(moe_data), "--max_samples", "2", "--max_seq_len", "24", "--min_token_length", "4",
                         "--oversample_ratio", "1.5", *flags)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = root / name
    return runs


def test_moe_checkpoint_writes_every_expert_and_verifies(moe_runs):
    out = moe_runs["auto"]
    tensors = load_file(str(out / "model.safetensors"))
    for layer in range(2):
        for expert in range(8):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                prefix = f"model.layers.{layer}.mlp.experts.{expert}.{proj}"
                assert tensors[f"{prefix}.weight"].dtype == torch.uint8
                assert torch.isfinite(tensors[f"{prefix}.input_scale"]) and tensors[f"{prefix}.input_scale"] > 0
                assert tensors[f"{prefix}.weight_scale_2"] > 0
    summary, problems = q.verify_checkpoint(out)
    assert problems == [] and summary["quantized_linears"] == 2 * (4 + 8 * 3)


@pytest.mark.parametrize("run", ["auto", "short"])
def test_moe_coverage_in_manifest(moe_runs, run):
    manifest = json.loads((moe_runs[run] / q.MANIFEST_NAME).read_text())
    coverage = manifest["calibration_run"]["moe_expert_coverage"]
    assert coverage["moe_blocks"] == 2 and coverage["moe_calibration"] == "routed"
    real_tokens = manifest["calibration_run"]["tokens"]
    for name, layer in coverage["layers"].items():
        assert layer["experts"] == 8 and layer["top_k"] == 2
        assert sum(layer["tokens_per_expert"]) == 2 * real_tokens, name  # padding is not counted
        assert layer["unrouted_experts"] == [i for i, n in enumerate(layer["tokens_per_expert"]) if n == 0]
    assert "## Mixture-of-experts coverage" in (moe_runs[run] / "README.md").read_text()
    if run == "short":  # 4 tokens x top-2 of 8 experts: some experts get none, and their scales are still set
        assert coverage["unrouted_experts"] > 0
        assert q.verify_checkpoint(moe_runs[run])[1] == []


def test_moe_calibration_ignores_padding(moe_runs):
    """Padded rows reach no expert: one sample per forward gives the same checkpoint as batches."""
    batched, single = (load_file(str(moe_runs[r] / "model.safetensors")) for r in ("auto", "bs1"))
    for key in batched:
        assert torch.equal(batched[key], single[key]), key


def test_moe_all_experts_calibration(moe_runs):
    manifest = json.loads((moe_runs["all"] / q.MANIFEST_NAME).read_text())
    assert manifest["calibration_run"]["moe_expert_coverage"]["moe_calibration"] == "all"
    assert q.verify_checkpoint(moe_runs["all"])[1] == []
    routed = load_file(str(moe_runs["auto"] / "model.safetensors"))
    every = load_file(str(moe_runs["all"] / "model.safetensors"))
    key = "model.layers.0.mlp.experts.0.down_proj.input_scale"  # all tokens through all experts: a wider range
    assert every[key] >= routed[key]


def test_moe_quality_report_emulates_experts(moe_runs):
    report = json.loads((moe_runs["auto"] / q.REPORT_NAME).read_text())
    assert report["mean_kl"] > 0 and report["top1_agreement"] > 0


def test_uncalibrated_quantizer_stops_the_export(tiny_model):
    """A quantizer that saw no data (an amax of zero) is reported by name, and nothing is exported."""
    import modelopt.torch.quantization as mtq
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.bfloat16)
    mtq.quantize(model, q.build_quant_config("nvfp4", q.always_unquantized(model)),
                 lambda m: m(input_ids=torch.tensor([list(range(4, 40))]), use_cache=False))
    assert q.uncalibrated_quantizers(model) == []
    model.model.layers[1].mlp.down_proj.input_quantizer.amax = torch.tensor(0.0)
    assert q.uncalibrated_quantizers(model) == ["model.layers.1.mlp.down_proj.input_quantizer"]
    with pytest.raises(q.UsageError, match="1 quantizers got no usable calibration data"):
        q.check_calibrated(model)


# --------------------------------------------------------------------------- model card
def test_model_card(kv_runs, tiny_model):
    card = (kv_runs["fp8"] / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n")  # a local source names no hub model page
    manifest = json.loads((kv_runs["fp8"] / q.MANIFEST_NAME).read_text())
    assert manifest["source_model"] == str(Path(tiny_model).resolve())
    hub_card = q.model_card({**manifest, "source_model": "org/base-model"}, "fp8")
    assert hub_card.startswith("---\nbase_model: org/base-model\nlibrary_name: transformers\n")
    for fragment in ("| calibration algorithm | `local_hessian` |", "| KV cache | FP8 |", "| local_stories |",
                     "## Quality", "perplexity increase", 'quantization="modelopt_fp4"', "trtllm-serve ./fp8",
                     "`--kv-cache-dtype auto`"):
        assert fragment in card, fragment
    plain = (kv_runs["nvfp4"] / "README.md").read_text()
    assert "Not measured (run with `--eval`" in plain and "| KV cache | NVFP4 |" in plain
