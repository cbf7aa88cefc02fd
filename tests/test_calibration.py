"""Calibration on CPU: amax independent of batching, skip patterns, configs never mutated."""
import copy

import pytest
import torch

import quantize_nvfp4 as q


def tiny_fp32_model(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, architectures=["LlamaForCausalLM"])
    return LlamaForCausalLM(config).eval()


def settings(batch_size=None, mode="nvfp4"):
    return q.Settings(input_model="tiny", output_model=None, dataset_yaml=None, datasets=[], max_samples=12,
                      max_seq_len=64, oversample_ratio=1.0, seed=0, min_token_length=1, batch_size=batch_size,
                      gpu_memory_budget=None, dtype="float32", trust_remote_code=False, mode=mode, skip_layers=[],
                      overwrite=False, dry_run=False)


SAMPLES = [torch.randint(4, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist()
           for n in (64, 7, 33, 12, 50, 3, 64, 21, 9, 40, 17, 28)]


def amax_by_quantizer(model) -> dict:
    from modelopt.torch.quantization.nn import TensorQuantizer

    return {n: m.amax.detach().clone() for n, m in model.named_modules()
            if isinstance(m, TensorQuantizer) and m.is_enabled and m.amax is not None}


def calibrated(batch_size, base, mode="nvfp4"):
    model = copy.deepcopy(base)
    stats = q.quantize_model(model, settings(batch_size, mode), q.always_unquantized(model), SAMPLES, "cpu", pad_id=0)
    return amax_by_quantizer(model), stats


@pytest.fixture(scope="module")
def base_model():
    """Pad id 0 never occurs in SAMPLES; its embedding is one outlier channel, which RMSNorm keeps large."""
    model = tiny_fp32_model()
    with torch.no_grad():
        model.model.embed_tokens.weight[0] = 0
        model.model.embed_tokens.weight[0, 5] = 1.0
    return model


@pytest.mark.parametrize("mode", ["nvfp4", "w4a8"])
def test_amax_is_the_same_for_any_batch_size(base_model, mode):
    one, one_stats = calibrated(1, base_model, mode)
    assert one_stats["batches"] == len(SAMPLES) and one_stats["padding_fraction"] == 0
    assert any("input_quantizer" in n for n in one)
    for batch_size in (4, None):
        other, stats = calibrated(batch_size, base_model, mode)
        assert stats["padding_fraction"] > 0
        assert other.keys() == one.keys()
        for name in one:
            torch.testing.assert_close(other[name], one[name], rtol=1e-5, atol=1e-6, msg=name)


def test_without_padding_exclusion_batching_would_change_amax(base_model, monkeypatch):
    """Guards the masking: padded rows do reach the amax when the mask is ignored."""
    one, _ = calibrated(1, base_model)
    unmasked = q.masked_amax
    monkeypatch.setattr(q, "masked_amax", lambda x, mask, layout="rows": unmasked(x, None))
    padded, _ = calibrated(4, base_model)
    assert any(not torch.allclose(padded[n], one[n]) for n in one if "input_quantizer" in n)


@pytest.mark.parametrize("mode", ["nvfp4", "w4a8", "weight_only"])
def test_amax_equals_modelopt_own_calibration(base_model, mode):
    """Our sync-free collection gives exactly what ModelOpt's MaxCalibrator gives on the same tokens."""
    import modelopt.torch.quantization as mtq

    reference = copy.deepcopy(base_model)

    def plain_loop(model):
        with torch.no_grad():
            for sample in SAMPLES:
                model(input_ids=torch.tensor([sample]), use_cache=False)

    mtq.quantize(reference, q.build_quant_config(mode, q.always_unquantized(reference)), plain_loop)
    expected = amax_by_quantizer(reference)
    ours, _ = calibrated(5, base_model, mode)
    assert ours.keys() == expected.keys() and len(ours) > 0
    for name in expected:
        assert torch.equal(ours[name], expected[name]), name


def test_zero_padding_hook_zeroes_padded_rows():
    holder = {"mask": torch.tensor([[1, 1, 0], [1, 0, 0]])}
    x = torch.ones(2, 3, 4)
    (out,) = q.zero_padding(holder)(None, (x,))
    assert out[:, :, 0].tolist() == [[1, 1, 0], [1, 0, 0]]
    (flat,) = q.zero_padding(holder)(None, (torch.ones(6, 4),))
    assert flat[:, 0].tolist() == [1, 1, 0, 1, 0, 0]
    assert q.zero_padding(holder)(None, (torch.ones(5, 4),)) is None  # routed rows: left alone


def test_masked_amax():
    x = torch.tensor([[[1.0, -2.0], [-9.0, 0.0]], [[3.0, 0.5], [7.0, 8.0]]])
    assert q.masked_amax(x, torch.tensor([[1, 0], [1, 0]])).item() == 3.0
    assert q.masked_amax(x, None).item() == 9.0
    assert q.masked_amax(x.reshape(4, 2), torch.tensor([[1, 1], [0, 0]])).item() == 9.0


def test_out_of_memory_halves_and_retries_without_skipping(base_model, monkeypatch):
    normal, _ = calibrated(6, base_model)
    real_run_batch, attempts = q.run_batch, []

    def tight_memory(forward, samples, indices, device, holder):
        attempts.append(len(indices))
        if len(indices) > 2:  # "CUDA" fails midway through the model for big batches
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        real_run_batch(forward, samples, indices, device, holder)

    monkeypatch.setattr(q, "run_batch", tight_memory)
    retried, stats = calibrated(6, base_model)
    assert stats["oom_retries"] >= 1 and max(attempts) == 6 and stats["tokens"] == sum(map(len, SAMPLES))
    assert stats["oom_retries"] < stats["batches"]  # later batches were split up front, not failed again
    for name in normal:
        torch.testing.assert_close(retried[name], normal[name], rtol=1e-5, atol=1e-6, msg=name)


def test_out_of_memory_on_one_sample_is_a_clear_error(base_model, monkeypatch):
    def no_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(q, "run_batch", no_memory)
    with pytest.raises(q.UsageError, match="out of memory on a single 64-token sample"):
        calibrated(1, base_model)


def test_calibration_stats(base_model):
    _, stats = calibrated(4, base_model)
    assert stats["tokens"] == sum(len(s) for s in SAMPLES)
    assert stats["batches"] == 3 and stats["oom_retries"] == 0
    assert stats["tokens_per_s"] > 0 and "peak_gpu_memory_gib" not in stats


def test_calibration_forward_skips_logits_and_cache(base_model):
    seen = {}
    model = copy.deepcopy(base_model)
    model.register_forward_hook(lambda m, a, kw, out: seen.update(kw), with_kwargs=True)
    q.calibration_forward(model)(input_ids=torch.tensor([[5, 6, 7]]), attention_mask=torch.ones(1, 3, dtype=torch.long))
    assert seen["use_cache"] is False and seen["logits_to_keep"] == 1


def test_calibration_forward_falls_back_to_base_model():
    class NoLogitsArg:  # a model class whose forward takes neither logits_to_keep nor num_logits_to_keep
        base_model_prefix = "model"

        def model(self, **kwargs):
            return "base", sorted(kwargs)

        def forward(self, input_ids, attention_mask=None):
            raise AssertionError("the full model should not be called")

    assert q.calibration_forward(NoLogitsArg())(input_ids=1, attention_mask=2) == ("base", ["attention_mask", "input_ids"])


def test_skip_layers_patterns(base_model):
    names = q.resolve_skip_layers(base_model, ["layers.0.mlp.down_proj", "layers.1.self_attn.*_proj"])
    assert names == ["model.layers.0.mlp.down_proj"] + [f"model.layers.1.self_attn.{p}_proj" for p in "qkvo"]
    assert q.resolve_skip_layers(base_model, ["down_proj"]) == ["model.layers.0.mlp.down_proj",
                                                               "model.layers.1.mlp.down_proj"]
    assert q.resolve_skip_layers(base_model, ["layers.0.self_attn.q_proj", "layers.1.mlp.up_proj"]) == [
        "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj", "model.layers.0.self_attn.k_proj",
        "model.layers.0.self_attn.v_proj", "model.layers.1.mlp.gate_proj"]
    with pytest.raises(q.UsageError, match="pattern 'down_porj' matches no module"):
        q.resolve_skip_layers(base_model, ["down_porj"])


def test_embeddings_and_lm_head_always_unquantized(base_model):
    assert q.always_unquantized(base_model) == ["model.embed_tokens", "lm_head"]


def test_build_quant_config_never_mutates_modelopt_globals():
    import modelopt.torch.quantization as mtq

    before = copy.deepcopy(mtq.NVFP4_DEFAULT_CFG)
    config = q.build_quant_config("nvfp4", ["model.layers.0.mlp.down_proj"])
    assert config["quant_cfg"][-1] == {"quantizer_name": "model.layers.0.mlp.down_proj.*", "enable": False}
    assert mtq.NVFP4_DEFAULT_CFG == before


def test_skipped_modules_stay_unquantized(base_model):
    model = copy.deepcopy(base_model)
    skip = q.always_unquantized(model) + q.resolve_skip_layers(model, ["layers.1.mlp.*"])
    q.quantize_model(model, settings(4), skip, SAMPLES, "cpu", pad_id=0)
    quantized = q.quantized_linear_shapes(model)
    assert "model.layers.0.mlp.down_proj" in quantized and "model.layers.1.self_attn.q_proj" in quantized
    assert not any(n.startswith("model.layers.1.mlp") or n == "lm_head" for n in quantized)


def test_free_disk_check(tmp_path):
    q.check_free_disk(tmp_path, 1)
    with pytest.raises(q.UsageError, match="not enough free disk"):
        q.check_free_disk(tmp_path, 10**18)


def test_dequantize_matches_modelopt():
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    weight = torch.randn(32, 64)
    packed, scale, scale_2 = NVFP4QTensor.quantize(weight, 16)
    ours = q.dequantize_nvfp4(packed._quantized_data, scale, scale_2, 16)
    theirs = packed.dequantize(dtype=torch.float32, scale=scale, double_scale=scale_2, block_sizes={-1: 16})
    torch.testing.assert_close(ours, theirs)
    assert 0.02 < (torch.linalg.norm(ours - weight) / torch.linalg.norm(weight)).item() < 0.2


def test_token_mask_forms():
    pad = torch.tensor([[1, 1, 0], [1, 0, 0]])
    causal = torch.tril(torch.ones(3, 3, dtype=torch.bool))
    four_d = (causal[None, None] & pad[:, None, None, :].bool())  # what transformers builds for sdpa
    assert q.token_mask(four_d, (2, 3), None).tolist() == pad.bool().tolist()
    as_float = torch.where(four_d, 0.0, torch.finfo(torch.float32).min)
    assert q.token_mask(as_float, (2, 3), None).tolist() == pad.bool().tolist()
    window = four_d & ~torch.tril(torch.ones(3, 3, dtype=torch.bool), diagonal=-2)[None, None]  # sliding window 2
    assert q.token_mask(window, (2, 3), None).tolist() == pad.bool().tolist()
    assert q.token_mask(pad, (2, 3), None) is pad
    assert q.token_mask(None, (2, 3), pad) is None
    assert q.token_mask(object(), (2, 3), pad) is pad  # unknown form (flex BlockMask): keep what we had


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_decoder_layer_hook_recovers_the_padding_mask(attn):
    from modelopt.torch.quantization.utils.layerwise_calib import LayerActivationCollector

    model = tiny_fp32_model()
    model.config._attn_implementation = attn
    holder, seen = {}, []
    layers = LayerActivationCollector.get_decoder_layers(model)
    handles = [layer.register_forward_pre_hook(q.mask_from_attention(holder), with_kwargs=True) for layer in layers]
    handles += [layer.register_forward_pre_hook(lambda m, a: seen.append(holder["mask"].clone())) for layer in layers]
    ids, mask = q.padded_batch(SAMPLES, [0, 1, 2], pad_id=0)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    for handle in handles:
        handle.remove()
    assert len(seen) == 2 and all(m.tolist() == mask.bool().tolist() for m in seen)
