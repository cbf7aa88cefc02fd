"""--kv_cache: FP8 and NVFP4 KV-cache scales, written, verified and emulated."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import quantize_nvfp4 as q
from conftest import LOCAL_YAML, run_cli
from test_verify import edit_json, edit_tensors

pytestmark = pytest.mark.slow
ATTN = "model.layers.1.self_attn"


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
    "scheme disagrees": (lambda f: edit_json(f, "config.json",
                                             lambda d: d["quantization_config"].pop("kv_cache_scheme")),
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
