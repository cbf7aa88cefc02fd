"""The name and layout rules of fused on-disk expert stacks and renamed models, without a model run."""
import json

import pytest

import quantize_nvfp4 as q
from tiny_architectures import build_config


@pytest.mark.parametrize("key, shape, architecture, first, linear", [
    ("model.layers.0.block_sparse_moe.input_linear.weight", [4, 128, 64], "GraniteMoeHybridForCausalLM",
     "model.layers.0.block_sparse_moe.experts.0.gate_proj", (64, 64)),
    ("model.layers.0.block_sparse_moe.output_linear.weight", [4, 64, 32], "GraniteMoeHybridForCausalLM",
     "model.layers.0.block_sparse_moe.experts.0.down_proj", (64, 32)),
    ("model.language_model.layers.1.mlp.experts.gate_up_proj", [4, 64, 192], "Qwen3VLMoeForConditionalGeneration",
     "model.language_model.layers.1.mlp.experts.0.gate_proj", (96, 64)),
    ("model.language_model.layers.1.mlp.experts.down_proj", [4, 96, 64], "Qwen3VLMoeForConditionalGeneration",
     "model.language_model.layers.1.mlp.experts.0.down_proj", (64, 96)),
    ("model.language_model.layers.1.mlp.experts.gate_up_proj", [4, 192, 64], "Qwen3VLMoeForConditionalGeneration",
     "model.language_model.layers.1.mlp.experts.0.gate_proj", (96, 64)),  # as transformers' save_pretrained keeps it
])
def test_fused_stack_is_expected_per_expert(key, shape, architecture, first, linear):
    split = q.expert_stack_linears(key, shape, 64, architecture)
    assert len(split) == shape[0] * (2 if "gate" in first else 1)
    assert split[first] == linear
    assert all(shape_ == linear for shape_ in split.values())


@pytest.mark.parametrize("key, architecture", [
    ("model.layers.0.block_sparse_moe.input_linear.weight", "GraniteMoeForCausalLM"),  # vLLM maps w1/w3/w2 there
    ("model.layers.0.mlp.experts.gate_up_proj", "GptOssForCausalLM"),  # exported as a 3-D stack
    ("model.layers.0.self_attn.q_proj.weight", "Qwen3VLMoeForConditionalGeneration"),
])
def test_other_tensors_are_no_split_stacks(key, architecture):
    assert q.expert_stack_linears(key, [4, 128, 64], 64, architecture) is None


def test_export_names_of_a_backbone_model_carry_no_sentinel():
    to_disk = q.export_names(q.empty_model(build_config("NemotronHForCausalLM"), trust_remote_code=False))
    assert to_disk("model.layers.0.mixer.in_proj") == "backbone.layers.0.mixer.in_proj"
    assert to_disk("model.layers.3.mixer.experts.0.up_proj") == "backbone.layers.3.mixer.experts.0.up_proj"
    assert to_disk("lm_head") == "lm_head"


def test_export_names_follow_the_weight_key():
    """GraniteMoeHybrid's router weight is `router.layer.weight` on disk: its module maps there."""
    to_disk = q.export_names(q.empty_model(build_config("GraniteMoeHybridForCausalLM"), trust_remote_code=False))
    assert to_disk("model.layers.0.block_sparse_moe.router") == "model.layers.0.block_sparse_moe.router.layer"
    assert to_disk("model.layers.0.block_sparse_moe.experts.1.gate_proj") == \
        "model.layers.0.block_sparse_moe.experts.1.gate_proj"


def test_name_sentinels_are_stripped_from_both_configs(tmp_path):
    left = ["lm_head.\x00backbone.pt_name_sentinel", "backbone.layers.0.mixer.\x00backbone.pt_name_sentinel*",
            "backbone.layers.*.mixer.experts.\x00backbone.pt_name_sentinel.*", "backbone.norm_f"]
    (tmp_path / "hf_quant_config.json").write_text(json.dumps({"quantization": {"exclude_modules": left}}))
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"ignore": left}}))
    q.strip_name_sentinels(tmp_path)
    want = ["lm_head", "backbone.layers.0.mixer*", "backbone.layers.*.mixer.experts.*", "backbone.norm_f"]
    assert json.loads((tmp_path / "hf_quant_config.json").read_text())["quantization"]["exclude_modules"] == want
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["ignore"] == want


def test_verify_names_a_pattern_holding_a_sentinel(tmp_path):
    quant = {"quant_algo": "NVFP4", "kv_cache_quant_algo": None, "group_size": 16,
             "exclude_modules": ["lm_head.\x00backbone.pt_name_sentinel"]}
    (tmp_path / "hf_quant_config.json").write_text(json.dumps({"quantization": quant}))
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {
        "quant_method": "modelopt", "quant_algo": "NVFP4", "ignore": quant["exclude_modules"]}}))
    assert any("control character" in p for p in q.check_quant_configs(tmp_path)[1])
