"""--verify: each rule the runtimes' loaders rely on, broken on purpose, is caught and named."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import quantize_nvfp4 as q
from conftest import ROOT, run_cli

LOCAL_YAML = str(ROOT / "Datasets" / "Local_Example.yaml")


@pytest.fixture(scope="module")
def clean_checkpoint(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("verify") / "ckpt"
    result = run_cli("--input_model", str(tiny_model), "--output_model", str(out), "--dataset_yaml", LOCAL_YAML,
                     "--max_samples", "16", "--max_seq_len", "96")
    assert result.returncode == 0, result.stderr[-2000:]
    return out


def edit_tensors(folder, change):
    tensors = load_file(str(folder / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(folder / "model.safetensors"))


def edit_json(folder, name, change):
    doc = json.loads((folder / name).read_text())
    change(doc)
    (folder / name).write_text(json.dumps(doc))


def exclude(doc_hf, doc_cfg, change):
    change(doc_hf["quantization"]["exclude_modules"])
    change(doc_cfg["quantization_config"]["ignore"])


UP = "model.layers.0.mlp.up_proj"
ATTN = "model.layers.1.self_attn"


def drop_lm_head_exclusion(folder):
    edit_json(folder, "hf_quant_config.json", lambda d: d["quantization"]["exclude_modules"].remove("lm_head"))
    edit_json(folder, "config.json", lambda d: d["quantization_config"]["ignore"].remove("lm_head"))


def exclude_quantized(folder):
    edit_json(folder, "hf_quant_config.json", lambda d: d["quantization"]["exclude_modules"].append(f"{UP}"))
    edit_json(folder, "config.json", lambda d: d["quantization_config"]["ignore"].append(f"{UP}"))


def unquantize_q_proj(folder):
    def change(t):
        for suffix in ("weight_scale", "weight_scale_2", "input_scale"):
            del t[f"{ATTN}.q_proj.{suffix}"]
        t[f"{ATTN}.q_proj.weight"] = torch.zeros(128, 128, dtype=torch.bfloat16)
    edit_tensors(folder, change)
    edit_json(folder, "hf_quant_config.json", lambda d: d["quantization"]["exclude_modules"].append(f"{ATTN}.q_proj"))
    edit_json(folder, "config.json", lambda d: d["quantization_config"]["ignore"].append(f"{ATTN}.q_proj"))


def shard_with_broken_index(folder):
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    keys = list(load_file(str(folder / "model-00001-of-00002.safetensors")))
    weight_map = {k: "model-00001-of-00002.safetensors" for k in keys}
    weight_map[keys[0]] = "model-00002-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


BREAKAGES = {
    "dropped tensor": (lambda f: edit_tensors(f, lambda t: t.pop(f"{UP}.weight_scale_2")),
                       f"{UP}.weight_scale_2: missing [tensors: quantized linear needs weight_scale_2]"),
    "wrong dtype": (lambda f: edit_tensors(
                        f, lambda t: t.update({f"{UP}.weight_scale": t[f"{UP}.weight_scale"].float()})),
                    f"{UP}.weight_scale: expected F8_E4M3 [256, 8], got F32 [256, 8] [tensors: dtype and shape]"),
    "wrong shape": (lambda f: edit_tensors(f, lambda t: t.update({f"{UP}.weight": t[f"{UP}.weight"][:, :32].clone()})),
                    f"{UP}.weight: expected U8 [256, 64], got U8 [256, 32]"),
    "NaN scale": (lambda f: edit_tensors(f, lambda t: t.update({f"{UP}.input_scale": torch.tensor(float("nan"))})),
                  f"{UP}.input_scale: non-finite values [scales: finite]"),
    "zero global scale": (lambda f: edit_tensors(f, lambda t: t.update({f"{UP}.weight_scale_2": torch.tensor(0.0)})),
                          f"{UP}.weight_scale_2: scale must be positive"),
    "lm_head not excluded": (drop_lm_head_exclusion, "lm_head: left in 16 bits but not matched by exclude_modules"),
    "quantized but excluded": (exclude_quantized, f"{UP}: quantized but matched by exclude_modules"),
    "configs disagree": (lambda f: edit_json(
                             f, "config.json", lambda d: d["quantization_config"].update(quant_algo="W4A16_NVFP4")),
                         "config.json: quant_algo 'W4A16_NVFP4' but hf_quant_config.json says 'NVFP4' "
                         "[config: agreement]"),
    "wrong group size": (lambda f: edit_json(
                             f, "hf_quant_config.json", lambda d: d["quantization"].update(group_size=32)),
                         "group_size 32 for NVFP4, expected 16 [config: group_size]"),
    "missing config key": (lambda f: edit_json(
                               f, "hf_quant_config.json", lambda d: d["quantization"].pop("kv_cache_quant_algo")),
                           "missing key quantization.kv_cache_quant_algo"),
    "leftover quantizer state": (lambda f: edit_tensors(
                                     f, lambda t: t.update({f"{UP}.input_quantizer._amax": torch.tensor(1.0)})),
                                 f"{UP}.input_quantizer._amax: unexpected tensor [tensors: no extra]"),
    "fused scales differ": (lambda f: edit_tensors(f, lambda t: t.update(
                                {f"{ATTN}.k_proj.weight_scale_2": t[f"{ATTN}.k_proj.weight_scale_2"] * 2})),
                            f"{ATTN}.{{q_proj,k_proj,v_proj}}.weight_scale_2: differ"),
    "fused group partly quantized": (unquantize_q_proj, f"{ATTN}: q_proj/k_proj/v_proj are partly quantized"),
    "no tokenizer": (lambda f: [(f / n).unlink() for n in ("tokenizer.json", "tokenizer_config.json")],
                     "no tokenizer files"),
    "incomplete index": (shard_with_broken_index, "[index: complete]"),
}


def test_clean_checkpoint_verifies(clean_checkpoint):
    summary, problems = q.verify_checkpoint(clean_checkpoint)
    assert problems == []
    assert summary["quantized_linears"] == 14 and summary["unquantized_linears"] == 1  # lm_head


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_each_broken_rule_is_named(clean_checkpoint, tmp_path, breakage):
    folder = tmp_path / "ckpt"
    shutil.copytree(clean_checkpoint, folder)
    breaker, expected = BREAKAGES[breakage]
    breaker(folder)
    _, problems = q.verify_checkpoint(folder)
    assert any(expected in p for p in problems), problems


@pytest.mark.slow
def test_verify_cli_exit_codes(clean_checkpoint, tmp_path):
    ok = run_cli("--verify", str(clean_checkpoint))
    assert ok.returncode == 0 and "OK against the config (NVFP4, group 16, 14 quantized /" in ok.stdout, ok.stderr
    folder = tmp_path / "ckpt"
    shutil.copytree(clean_checkpoint, folder)
    BREAKAGES["NaN scale"][0](folder)
    bad = run_cli("--verify", str(folder))
    assert bad.returncode == 1 and "FAIL model.layers.0.mlp.up_proj.input_scale: non-finite" in bad.stdout
    missing = run_cli("--verify", str(tmp_path / "nothing"))
    assert missing.returncode == 2 and "nothing does not exist" in missing.stderr
    (tmp_path / "empty").mkdir()
    empty = run_cli("--verify", str(tmp_path / "empty"))
    assert empty.returncode == 2 and "not a checkpoint dir (no config.json)" in empty.stderr


@pytest.mark.parametrize("name, patterns, vllm, trtllm", [
    ("lm_head", ["lm_head"], True, True),
    ("model.layers.1.mlp.down_proj", ["model.layers.1.*"], True, True),
    ("model.layers.1.mlp.down_proj", ["model.layers.1*"], True, True),
    ("model.layers.10.mlp.down_proj", ["model.layers.1.*"], False, False),
    ("model.layers.0.mlp.gate", ["mlp.gate"], True, False),  # vLLM's legacy substring match; TRT-LLM is stricter
    ("model.visual.blocks.0.attn.qkv", ["model.visual*"], True, True),
])
def test_runtime_exclusion_matchers(name, patterns, vllm, trtllm):
    assert q.vllm_excludes(name, patterns) is vllm
    assert q.trtllm_excludes(name, patterns) is trtllm


@pytest.mark.slow
def test_verify_against_the_source_checkpoint(clean_checkpoint, tiny_model, tmp_path):
    """With --reference every tensor of the source must be in the checkpoint, under its on-disk name."""
    ok = run_cli("--verify", str(clean_checkpoint), "--reference", str(tiny_model))
    assert ok.returncode == 0 and "OK against the source checkpoint" in ok.stdout, ok.stdout + ok.stderr[-2000:]
    folder = tmp_path / "ckpt"
    shutil.copytree(clean_checkpoint, folder)
    edit_tensors(folder, lambda t: t.update({"model.norm.weight": torch.ones(4, dtype=torch.bfloat16)}))
    summary, problems = q.verify_checkpoint(folder, source=tiny_model)
    assert summary["checked_against"] == "source checkpoint"
    assert any("model.norm.weight: shape [4], the original has [128]" in p for p in problems), problems


def test_export_check_wants_exactly_the_modules_modelopt_quantized(clean_checkpoint):
    """After an export: a module written as NVFP4 that ModelOpt left in 16 bits (say a --skip_layers one) is a
    problem."""
    written = sorted(k[: -len(".weight_scale")] for k in q.CheckpointReader(clean_checkpoint).location
                     if k.endswith(".weight_scale"))
    assert q.verify_checkpoint(clean_checkpoint, quantized_in_memory=written)[1] == []
    problems = q.verify_checkpoint(clean_checkpoint, quantized_in_memory=written[1:])[1]
    assert problems == [f"{written[0]}: written as NVFP4 but not quantized in memory [tensors: exactly the quantized "
                        "modules]"]
