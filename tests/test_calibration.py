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
    state = q.CalibrationState(pad_id=0, mask=torch.tensor([[1, 1, 0], [1, 0, 0]]))
    x = torch.ones(2, 3, 4)
    (out,) = q.zero_padding(state)(None, (x,))
    assert out[:, :, 0].tolist() == [[1, 1, 0], [1, 0, 0]]
    (flat,) = q.zero_padding(state)(None, (torch.ones(6, 4),))
    assert flat[:, 0].tolist() == [1, 1, 0, 1, 0, 0]
    assert q.zero_padding(state)(None, (torch.ones(5, 4),)) is None  # routed rows: left alone


def test_masked_amax():
    x = torch.tensor([[[1.0, -2.0], [-9.0, 0.0]], [[3.0, 0.5], [7.0, 8.0]]])
    assert q.masked_amax(x, torch.tensor([[1, 0], [1, 0]])).item() == 3.0
    assert q.masked_amax(x, None).item() == 9.0
    assert q.masked_amax(x.reshape(4, 2), torch.tensor([[1, 1], [0, 0]])).item() == 9.0


def test_out_of_memory_halves_and_retries_without_skipping(base_model, monkeypatch):
    normal, _ = calibrated(6, base_model)
    real_run_batch, attempts = q.run_batch, []

    def tight_memory(forward, samples, indices, device, state):
        attempts.append(len(indices))
        if len(indices) > 2:  # "CUDA" fails midway through the model for big batches
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        real_run_batch(forward, samples, indices, device, state)

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

    assert q.calibration_forward(NoLogitsArg())(input_ids=1, attention_mask=2) == (
        "base", ["attention_mask", "input_ids"])


def test_skip_layers_patterns(base_model):
    names = q.resolve_skip_layers(base_model, ["layers.0.mlp.down_proj", "layers.1.self_attn.*_proj"])
    assert names == ["model.layers.0.mlp.down_proj"] + [f"model.layers.1.self_attn.{p}_proj" for p in "qkvo"]
    assert q.resolve_skip_layers(base_model, ["down_proj"]) == ["model.layers.0.mlp.down_proj",
                                                               "model.layers.1.mlp.down_proj"]
    assert q.resolve_skip_layers(base_model, ["layers.0.self_attn.q_proj", "layers.1.mlp.up_proj"]) == [
        "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj", "model.layers.0.self_attn.k_proj",
        "model.layers.0.self_attn.v_proj", "model.layers.1.mlp.gate_proj"]
    with pytest.raises(q.UsageError, match="'down_porj' matches no module; nearest: model.layers.0.mlp.down_proj"):
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
    state, seen = q.CalibrationState(pad_id=0), []
    layers = LayerActivationCollector.get_decoder_layers(model)
    handles = [layer.register_forward_pre_hook(q.mask_from_attention(state), with_kwargs=True) for layer in layers]
    handles += [layer.register_forward_pre_hook(lambda m, a: seen.append(state.mask.clone())) for layer in layers]
    ids, mask = q.padded_batch(SAMPLES, [0, 1, 2], pad_id=0)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    for handle in handles:
        handle.remove()
    assert len(seen) == 2 and all(m.tolist() == mask.bool().tolist() for m in seen)


# --------------------------------------------------------------------------- local_hessian: one pass, then a search
def test_e2m1_rounding_breaks_ties_to_even_as_modelopts_exporter():
    """Every tie and its neighbours, both signs: round_to_e2m1 equals the codes ModelOpt's export writes."""
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    scaled = torch.tensor([0.0, 0.25, 0.26, 0.75, 1.0, 1.25, 1.26, 1.75, 2.5, 2.6, 3.5, 5.0, 5.01, 9.0])
    expected = [0.0, 0.0, 0.5, 1.0, 1.0, 1.0, 1.5, 2.0, 2.0, 3.0, 4.0, 4.0, 6.0, 6.0]
    assert q.round_to_e2m1(scaled).tolist() == expected
    assert q.round_to_e2m1(-scaled).tolist() == [-v for v in expected]
    values = torch.cat([scaled, -scaled[1:]])
    codes = NVFP4QTensor._cast_fp4(values.clone())
    exported = torch.tensor(q.E2M1_VALUES)[codes.long()]
    assert torch.equal(q.round_to_e2m1(values), exported)


def block_losses(weight, global_amax, hessian, block_amax):
    """dwᵀ H dw per block when the blocks are stored with these amaxes, as the export stores them."""
    from modelopt.torch.quantization.tensor_quant import fp8_eager

    blocks = weight.float().reshape(weight.shape[0], -1, 16)
    scale = fp8_eager(block_amax.reshape(blocks.shape[:2]) / 6.0, global_amax / 6.0)[..., None]
    error = blocks - q.round_to_e2m1(blocks / scale) * scale
    return torch.einsum("cnb,nbd,cnd->cn", error, hessian, error)


def random_sweep_case(device="cpu", rows=48, inputs=64):
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(rows, inputs, generator=generator) * 0.02
    weight[0, :3] *= 40  # an outlier row: max's scales are poor for its blocks
    x = torch.randn(512, inputs, generator=generator) * torch.linspace(0.1, 3, inputs)  # uneven input channels
    blocks = x.reshape(512, -1, 16)
    hessian = torch.einsum("tbi,tbj->bij", blocks, blocks) / 512
    return weight.to(device), weight.abs().max().to(device), hessian.to(device)


def max_amax(weight):
    return weight.float().reshape(weight.shape[0], -1, 16).abs().amax(-1)


def test_hessian_search_is_never_worse_than_max_scales_and_often_better():
    weight, global_amax, hessian = random_sweep_case()
    searched = q.hessian_sweep_reference(weight, global_amax, hessian, max_amax(weight))
    chosen, baseline = (block_losses(weight, global_amax, hessian, a) for a in (searched, max_amax(weight)))
    assert (chosen <= baseline * (1 + 1e-6)).all()
    assert (chosen < baseline * 0.99).float().mean() > 0.3


def test_the_window_is_the_candidates_around_each_blocks_max_scale_and_the_full_sweep_when_wide():
    """HESSIAN_WINDOW's steps around the first candidate reaching the block's max amax; all 126 when it is wide."""
    weight, global_amax, hessian = random_sweep_case()
    amaxes, _ = q.sweep_candidates(global_amax, "cpu")
    starts, width = q.window_starts(max_amax(weight), amaxes)
    own = torch.searchsorted(amaxes, max_amax(weight))
    assert width == sum(q.HESSIAN_WINDOW) + 1 and (starts >= 0).all() and (starts + width <= 126).all()
    inside = (own - q.HESSIAN_WINDOW[0] >= 0) & (own + q.HESSIAN_WINDOW[1] < 126)
    assert inside.any() and torch.equal(starts[inside], (own - q.HESSIAN_WINDOW[0])[inside].int())
    windowed = q.hessian_sweep_reference(weight, global_amax, hessian, max_amax(weight))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(q, "HESSIAN_WINDOW", (126, 126))
        wide_starts, wide = q.window_starts(max_amax(weight), amaxes)
        assert wide == 126 and not wide_starts.any()
        full = q.hessian_sweep_reference(weight, global_amax, hessian, max_amax(weight))
    losses = [block_losses(weight, global_amax, hessian, a) for a in (windowed, full)]
    assert (losses[1] <= losses[0] * (1 + 1e-6)).all() and (windowed == full).float().mean() > 0.99


def test_a_block_calibration_never_excited_gets_the_least_weight_error_not_the_smallest_scale():
    weight, global_amax, hessian = random_sweep_case()
    hessian[1] = 0  # input features 16-31 were zero in every calibration token
    blocks = max_amax(weight)
    undamped = q.hessian_sweep_reference(weight, global_amax, hessian, blocks).reshape(weight.shape[0], -1)
    searched = q.hessian_sweep_reference(weight, global_amax, q.damped(hessian), blocks).reshape(weight.shape[0], -1)
    least_error = q.hessian_sweep_reference(weight, global_amax, torch.eye(16).expand(4, 16, 16), blocks).reshape(
        weight.shape[0], -1)
    amaxes, _ = q.sweep_candidates(global_amax, "cpu")
    lowest = amaxes[q.window_starts(blocks, amaxes)[0].long()].reshape(weight.shape[0], -1)
    assert torch.equal(undamped[:, 1], lowest[:, 1])  # every scale tied at 0: the window's smallest won
    assert torch.equal(searched[:, 1], least_error[:, 1])
    assert (searched[:, [0, 2, 3]] == undamped[:, [0, 2, 3]]).float().mean() > 0.99  # the others barely move


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernel needs CUDA")
@pytest.mark.parametrize("window", [q.HESSIAN_WINDOW, (126, 126)])
def test_hessian_search_kernel_equals_the_reference(window):
    """The same choice in every block, but for near-ties that the two summation orders break differently."""
    weight, global_amax, hessian = random_sweep_case("cuda", rows=300, inputs=512)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(q, "HESSIAN_WINDOW", window)
        for dtype in (torch.float32, torch.bfloat16):
            w = weight.to(dtype)
            kernel = q.hessian_sweep_kernel(w, global_amax, hessian, max_amax(w))
            reference = q.hessian_sweep_reference(w, global_amax, hessian, max_amax(w))
            assert (kernel == reference).float().mean() > 0.99
            torch.testing.assert_close(block_losses(w, global_amax, hessian, kernel),
                                       block_losses(w, global_amax, hessian, reference), rtol=1e-5, atol=1e-12)


def four_over_six_errors(weight, global_amax, block_amax):
    """Each block's squared rounding error when stored with these amaxes under four_over_six's FP8 scales."""
    from modelopt.torch.quantization.tensor_quant import fp8_eager

    blocks = weight.float().reshape(weight.shape[0], -1, 16)
    scale = fp8_eager(block_amax.reshape(blocks.shape[:2]) / 6.0, global_amax * 448.0 / 256.0 / 6.0)[..., None]
    quantized = torch.where(scale > 0, q.round_to_e2m1(blocks / scale) * scale, 0.0)
    return (blocks - quantized).square().sum(-1)


def test_four_over_six_keeps_each_blocks_better_of_6_and_4():
    weight, global_amax, _ = random_sweep_case()
    weight[1, :16] = 0  # an all-zero block: a tie, which keeps 6
    searched = q.four_over_six_search(weight, max_amax(weight), global_amax).reshape(max_amax(weight).shape)
    on_six, on_four = max_amax(weight), max_amax(weight) * 1.5
    assert ((searched == on_six) | (searched == on_four)).all()
    assert (searched == on_six).float().mean() > 0.1 and (searched == on_four).float().mean() > 0.1
    chosen, six, four = (four_over_six_errors(weight, global_amax, a) for a in (searched, on_six, on_four))
    assert torch.equal(chosen, torch.minimum(six, four)) and searched[1, 0] == 0


def test_block_hessians_leave_out_padding_and_are_shared_by_linears_fed_the_same_input(base_model):
    """The hooks' sums equal Σ x_b x_bᵀ over the real rows of q_proj's input; k_proj and v_proj share them."""
    import modelopt.torch.quantization as mtq

    model = copy.deepcopy(base_model)
    config = q.build_quant_config("nvfp4", q.always_unquantized(model), algorithm="local_hessian")
    state, seen = q.CalibrationState(pad_id=0, hessians={}), []

    def one_padded_batch(m):
        m.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda _, a: seen.append(a[0].detach().clone()))
        q.install_calibration_hooks(m, state)
        q.run_batch(q.calibration_forward(m), SAMPLES, [0, 1, 2], "cpu", state)
    with torch.no_grad():
        mtq.quantize(model, config, one_padded_batch)
    q.remove_calibration_hooks(state)
    mask = q.padded_batch(SAMPLES, [0, 1, 2], 0)[1].bool()
    real = seen[0][mask].reshape(-1, 4, 16)
    total, count = state.hessians["model.layers.0.self_attn.q_proj"]
    assert count.item() == mask.sum().item() == 64 + 7 + 33
    torch.testing.assert_close(total, torch.einsum("tbi,tbj->bij", real, real), rtol=1e-5, atol=1e-5)
    sums = state.hessians
    assert sums["model.layers.0.self_attn.k_proj"] is sums["model.layers.0.self_attn.q_proj"]
    assert sums["model.layers.0.mlp.up_proj"] is sums["model.layers.0.mlp.gate_proj"]
    assert sums["model.layers.0.mlp.down_proj"] is not sums["model.layers.0.mlp.gate_proj"]


def masked_copy_hessian(x, mask):
    """The Hessian sums as first written: an fp32 copy of every row, padding multiplied to zero, the count summed
    in x's dtype."""
    rows, row_mask = x.reshape(-1, x.shape[-1]).float(), q.mask_for_rows(x, mask)
    count = row_mask.sum() if row_mask is not None else x.numel() // x.shape[-1]
    if row_mask is not None:
        rows = rows * row_mask.reshape(-1, 1)
    blocks = rows.view(rows.shape[0], -1, 16)
    return torch.einsum("tbi,tbj->bij", blocks, blocks), count


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_hessian_sums_the_real_rows_as_the_masked_copy_did_and_counts_exactly(dtype):
    """Within fp32 summation order; 257 real rows: a bf16 sum of the mask would have said 256."""
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 120, 64, generator=generator) * torch.linspace(0.1, 3, 64)).to(dtype)
    mask = torch.zeros(3, 120, dtype=torch.long)
    mask[0, :120], mask[1, :100], mask[2, :37] = 1, 1, 1
    hessian, count = q.block_hessian(x, mask)
    expected, _ = masked_copy_hessian(x, mask)
    assert count.dtype == torch.int64 and count.item() == 257
    torch.testing.assert_close(hessian, expected, rtol=1e-5, atol=1e-4)
    unmasked, all_rows = q.block_hessian(x, None)
    assert all_rows == 360
    torch.testing.assert_close(unmasked, masked_copy_hessian(x, None)[0], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_local_hessian_block_scales_are_bit_for_bit_those_of_the_masked_copy(base_model, dtype):
    """Checkpoints unchanged: the scales the search picks from today's sums equal those from the first sums. Only
    the summation order differs (the count divides every block's Hessian alike and cancels in the argmin), so a
    block whose two best scales tie to the last bit could in principle flip; none does on this model."""
    run_settings = settings(batch_size=4)
    run_settings.algorithm = "local_hessian"
    scales = []
    for hessian in (q.block_hessian, masked_copy_hessian):
        model = copy.deepcopy(base_model).to(dtype)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(q, "block_hessian", hessian)
            q.quantize_model(model, run_settings, q.always_unquantized(model), SAMPLES, "cpu", pad_id=0)
        scales.append({n: a for n, a in amax_by_quantizer(model).items() if "weight_quantizer" in n})
    assert len(scales[0]) == 14 and all(torch.equal(scales[0][n], scales[1][n]) for n in scales[0])


@pytest.mark.parametrize("algorithm", ["local_hessian", "four_over_six"])
def test_weight_block_maxima_collected_once_are_those_of_every_batch(base_model, algorithm):
    """The searches' weight quantizers look at their weight in the first batch only: every scale is unchanged."""
    run_settings = settings(batch_size=4)
    run_settings.algorithm = algorithm
    scales = []
    for collect in (q.collect_weights_once, lambda model: None):
        model = copy.deepcopy(base_model)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(q, "collect_weights_once", collect)
            q.quantize_model(model, run_settings, q.always_unquantized(model), SAMPLES, "cpu", pad_id=0)
        scales.append(amax_by_quantizer(model))
    assert scales[0].keys() == scales[1].keys()
    assert all(torch.equal(scales[0][n], scales[1][n]) for n in scales[0])


def test_searchable_weight_quantizers_collect_once(base_model):
    model = copy.deepcopy(base_model)
    config = q.build_quant_config("nvfp4", q.always_unquantized(model), algorithm="local_hessian")
    import modelopt.torch.quantization as mtq

    seen = []
    with torch.no_grad():
        mtq.quantize(model, config, lambda m: q.collect_weights_once(m) or seen.append(sorted(
            type(mod.weight_quantizer._calibrator).__name__ for mod in m.modules() if q.block_searchable(mod))))
    assert seen == [["CollectOnceMaxCalibrator"] * 14]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernel needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("masked", [True, False])
def test_block_hessian_kernel_equals_the_reference(dtype, masked):
    """block_hessian_kernel against the index-select reference, on a batch whose rows are no multiple of a tile."""
    generator = torch.Generator().manual_seed(1)
    x = (torch.randn(5, 701, 512, generator=generator) * torch.linspace(0.1, 3, 512)).to(dtype).cuda()
    mask = (torch.arange(701)[None, :] < torch.tensor([701, 650, 3, 0, 400])[:, None]).long().cuda() if masked \
        else None
    hessian, count = q.block_hessian(x, mask)
    rows, row_mask = q.real_rows(x, mask)
    expected = q.block_hessian_reference(rows, row_mask)
    assert int(count) == (1754 if masked else 3505)
    torch.testing.assert_close(hessian, expected, rtol=1e-5, atol=1e-3)


def test_local_hessian_sets_every_linears_block_scales_from_one_pass(base_model):
    """One calibration pass; every quantized linear searched; inputs' scales exactly max's."""
    run_settings = settings(batch_size=4)
    run_settings.algorithm = "local_hessian"
    model = copy.deepcopy(base_model)
    passes = []
    original = q.calibrate_batches
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(q, "calibrate_batches", lambda *a: passes.append(1) or original(*a))
        stats = q.quantize_model(model, run_settings, q.always_unquantized(model), SAMPLES, "cpu", pad_id=0)
    assert len(passes) == 1 and stats["scale_search"]["linears"] == 14
    max_amax, _ = calibrated(4, base_model)
    searched = amax_by_quantizer(model)
    inputs = [n for n in max_amax if "input_quantizer" in n]
    assert inputs and all(torch.equal(max_amax[n], searched[n]) for n in inputs)
    weights = [n for n in searched if "weight_quantizer" in n]
    assert all(searched[n].numel() > 1 for n in weights)  # static per-block scales, not max's dynamic ones
