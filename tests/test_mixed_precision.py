"""--effective_bits: the per-linear format choice, its MIXED_PRECISION export as ModelOpt writes it, and that
--verify, the fidelity check and --eval's emulator read every format."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import quantize_nvfp4 as q
from conftest import ROOT, assert_usage_error, quantize_cli, run_cli

LOCAL_YAML = str(ROOT / "Datasets" / "Local_Example.yaml")
BUDGET = 6.5  # on the tiny Llama: some linear groups FP8, some NVFP4 (at every budget FP8 upgrades beat 16-bit ones
# per bit until all are FP8, so the 16-bit linear in the file is one the user skipped)
SKIPPED = "model.layers.1.self_attn.o_proj"


def group(name, weights, nvfp4, fp8):
    return q.LinearGroup((name,), weights, {"NVFP4": nvfp4, "FP8": fp8, None: 0.0})


def average_bits(groups):
    return sum(g.weights * q.WEIGHT_BITS[g.algo] for g in groups) / sum(g.weights for g in groups)


def test_bits_are_counted_per_stored_weight():
    assert (q.WEIGHT_BITS["NVFP4"], q.WEIGHT_BITS["W4A16_NVFP4"], q.WEIGHT_BITS["FP8"], q.WEIGHT_BITS[None]) == \
        (4.5, 4.5, 8.0, 16.0)


def test_choice_stays_within_the_budget_and_upgrades_the_sensitive_first():
    groups = [group("a", 100, 10.0, 1.0), group("b", 100, 1.0, 0.1), group("c", 100, 0.1, 0.01)]
    q.choose_formats(groups, 4.5)
    assert [g.algo for g in groups] == ["NVFP4"] * 3
    q.choose_formats(groups, 5.7)  # room for one FP8 upgrade (3.5 bits on a third of the weights)
    assert [g.algo for g in groups] == ["FP8", "NVFP4", "NVFP4"] and average_bits(groups) <= 5.7
    for budget in (6.0, 8.0, 11.0, 16.0):
        groups = [group("a", 100, 10.0, 1.0), group("b", 300, 1.0, 0.1), group("c", 50, 0.1, 0.01)]
        q.choose_formats(groups, budget)
        assert average_bits(groups) <= budget + 1e-9
    assert [g.algo for g in groups] == [None] * 3


def test_fused_linears_form_one_group():
    names = [f"model.layers.0.self_attn.{p}_proj" for p in "qkvo"] + \
        [f"model.layers.0.mlp.{p}_proj" for p in ("gate", "up", "down")]
    groups = q.linear_groups(names)
    assert sorted(groups) == sorted([
        ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"),
        ("model.layers.0.self_attn.o_proj",), ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"),
        ("model.layers.0.mlp.down_proj",)])


def test_output_loss_score_is_the_squared_gradient_weighted_output_change():
    """The hook adds, per format, Σ (dLoss/dY · (Y_format - Y))² once Y's gradient arrives; nothing without
    autograd (the first, checkpointed pass)."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 8)
    x, weights = torch.randn(4, 5, 32), torch.randn(4, 5, 8)
    gemms = {"half": lambda x: torch.nn.functional.linear(x, linear.weight.detach() / 2),
             "same": lambda x: torch.nn.functional.linear(x, linear.weight.detach())}
    scores = torch.zeros(2, dtype=torch.float64)
    handle = linear.register_forward_hook(q.output_loss_hook(gemms, scores))
    with torch.no_grad():
        linear(x)
    assert scores.tolist() == [0.0, 0.0]
    (linear(x) * weights).sum().backward()
    handle.remove()
    change = torch.nn.functional.linear(x, linear.weight.detach() / 2) - torch.nn.functional.linear(
        x, linear.weight.detach())
    assert scores[0].item() == pytest.approx((weights * change).square().sum().item(), rel=1e-5)
    assert scores[1].item() == pytest.approx(0.0, abs=1e-8)


def test_the_benchmarks_candidate_sums_share_the_products_hook():
    """bench_mixed's scoring_hook (every candidate sum at once) adds, as its first sum, exactly the product's score."""
    from benchmarks import bench_mixed

    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 8)
    x, weights = torch.randn(4, 5, 32), torch.randn(4, 5, 8)
    gemms = {"half": lambda x: torch.nn.functional.linear(x, linear.weight.detach() / 2)}
    product, candidates = torch.zeros(1, dtype=torch.float64), torch.zeros(1, 3, dtype=torch.float64)
    handles = [linear.register_forward_hook(q.output_loss_hook(gemms, product)),
               linear.register_forward_hook(bench_mixed.scoring_hook(gemms, candidates))]
    (linear(x) * weights).sum().backward()
    for handle in handles:
        handle.remove()
    change = -torch.nn.functional.linear(x, linear.weight.detach() / 2)
    assert candidates[0, 0].item() == product[0].item() > 0
    assert candidates[0, 1].item() == pytest.approx((weights * change).sum(-1).square().sum().item(), rel=1e-5)
    assert candidates[0, 2].item() == pytest.approx((weights * change).sum().item(), rel=1e-5)


@pytest.mark.slow
def test_scores_rank_formats_and_leave_the_model_as_it_was(tiny_model):
    """On the calibrated tiny Llama: FP8 scores below NVFP4 on every linear, and scoring leaves every quantizer on,
    each parameter's requires_grad as it was, and the model in eval mode."""
    import modelopt.torch.quantization as mtq
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()
    args = q.build_parser().parse_args(["--input_model", str(tiny_model), "--output_model", "/nonexistent/x",
                                        "--dataset_yaml", LOCAL_YAML])
    settings = q.build_settings(args, {})
    samples = [list(range(4, 60)), list(range(10, 40))] * 4
    q.quantize_model(model, settings, q.always_unquantized(model), samples, "cpu", 0)
    modules = dict(model.named_modules())
    names = [n for n in q.quantized_linear_shapes(model) if q.block_searchable(modules[n])]
    enabled = [m for m in model.modules() if isinstance(m, mtq.nn.TensorQuantizer) and m.is_enabled]
    grads = [p.requires_grad for p in model.parameters()]
    scores, _ = q.whole_model_scores(model, q.linear_groups(names), samples, 0)
    assert set(scores) == set(names)
    assert all(0 <= s["FP8"] < s["NVFP4"] for s in scores.values()), scores
    assert all(m.is_enabled for m in enabled) and [p.requires_grad for p in model.parameters()] == grads
    assert not any(m.training for m in model.modules())


@pytest.mark.parametrize("bits, mode, algorithm, kv, fragment", [
    (4.0, "nvfp4", "local_hessian", "none", "between 4.5"),
    (16.5, "nvfp4", "local_hessian", "none", "between 4.5"),
    (float("nan"), "nvfp4", "local_hessian", "none", "between 4.5"),
    (6.0, "weight_only", "local_hessian", "none", "not with --weight_only"),
    (6.0, "w4a8", "max", "none", "vLLM does not load"),
    (6.0, "nvfp4", "max", "none", "--algorithm local_hessian"),
    (6.0, "nvfp4", "local_hessian", "nvfp4", "--kv_cache fp8 or none"),
])
def test_refused_combinations(bits, mode, algorithm, kv, fragment):
    with pytest.raises(q.UsageError, match=fragment.replace("-", r"\-")):
        q.check_effective_bits(bits, mode, algorithm, kv)
    q.check_effective_bits(6.0, "nvfp4", "local_hessian", "fp8")
    q.check_effective_bits(6.0, "nvfp4", "smooth_hessian", "fp8")


@pytest.fixture(scope="module")
def mixed_checkpoint(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("mixed") / "ckpt"
    return quantize_cli(tiny_model, out, "--effective_bits", str(BUDGET), "--skip_layers", "layers.1.self_attn.o_proj",
                        "--eval", "--eval_samples", "8")


def quant_configs(folder):
    hf = json.loads((folder / "hf_quant_config.json").read_text())["quantization"]
    return hf, json.loads((folder / "config.json").read_text())["quantization_config"]


@pytest.mark.slow
def test_export_is_modelopts_mixed_precision_format(mixed_checkpoint, tiny_model):
    hf, inline = quant_configs(mixed_checkpoint)
    manifest = json.loads((mixed_checkpoint / q.MANIFEST_NAME).read_text())
    chosen = manifest["calibration_run"]["mixed_precision"]["per_linear"]
    assert set(chosen.values()) == {"NVFP4", "FP8"} and SKIPPED not in chosen, chosen
    assert hf["quant_algo"] == inline["quant_algo"] == "MIXED_PRECISION"
    assert hf["quantized_layers"] == inline["quantized_layers"] == {
        name: {"quant_algo": "NVFP4", "group_size": 16} if algo == "NVFP4" else {"quant_algo": "FP8"}
        for name, algo in chosen.items() if algo != "16-bit"}
    written = load_file(str(mixed_checkpoint / "model.safetensors"))
    dtypes = {"NVFP4": {"weight": torch.uint8, "weight_scale": torch.float8_e4m3fn, "weight_scale_2": torch.float32,
                        "input_scale": torch.float32},
              "FP8": {"weight": torch.float8_e4m3fn, "weight_scale": torch.float32, "input_scale": torch.float32},
              "16-bit": {"weight": torch.bfloat16}}
    for name, algo in [*chosen.items(), (SKIPPED, "16-bit")]:
        assert {k.rpartition(".")[2]: t.dtype for k, t in written.items() if k.rpartition(".")[0] == name} == \
            dtypes[algo], name


@pytest.mark.slow
def test_budget_is_kept_and_fused_groups_share_a_format(mixed_checkpoint):
    written = load_file(str(mixed_checkpoint / "model.safetensors"))
    manifest = json.loads((mixed_checkpoint / q.MANIFEST_NAME).read_text())
    record = manifest["calibration_run"]["mixed_precision"]
    chosen = record["per_linear"]
    counts = {}
    for name, algo in chosen.items():
        counts[name] = written[f"{name}.weight"].numel() * (2 if algo == "NVFP4" else 1)  # two FP4 values a byte
    bits = {"NVFP4": 4.5, "FP8": 8.0, "16-bit": 16.0}
    average = sum(counts[n] * bits[a] for n, a in chosen.items()) / sum(counts.values())
    assert average == pytest.approx(record["effective_bits"], abs=1e-3) and average <= BUDGET
    for parent in {n.rpartition(".")[0] for n in chosen}:
        for fused in q.FUSED_GROUPS:
            formats = {chosen[f"{parent}.{m}"] for m in fused if f"{parent}.{m}" in chosen}
            assert len(formats) <= 1, (parent, fused, formats)


@pytest.mark.slow
def test_verify_fidelity_and_eval_read_every_format(mixed_checkpoint, tmp_path):
    ok = run_cli("--verify", str(mixed_checkpoint))
    assert ok.returncode == 0 and "OK against the config (MIXED_PRECISION, " in ok.stdout, ok.stdout
    manifest = json.loads((mixed_checkpoint / q.MANIFEST_NAME).read_text())
    chosen = manifest["calibration_run"]["mixed_precision"]["per_linear"]
    quantized = [n for n, a in chosen.items() if a != "16-bit"]
    assert manifest["fidelity"]["checked"] == len(quantized) and manifest["fidelity"]["median"] < 0.2
    assert manifest["quality"]["perplexity_increase_pct"] < 5
    card = (mixed_checkpoint / "README.md").read_text()
    assert "| effective bits |" in card and 'quantization="modelopt_mixed"' in card


@pytest.mark.slow
def test_self_test_dequantization_reads_every_format(mixed_checkpoint, tiny_model, tmp_path):
    """--self_test --effective_bits ends in check_dequantization: FP8 weights with their one scale, FP4 in blocks."""
    q.check_dequantization(tiny_model, mixed_checkpoint)

    def triple_fp8_scales(tensors):  # an FP8 layer's one float32 scale; NVFP4's block scales are FP8
        tensors.update({k: v * 3 for k, v in tensors.items()
                        if k.endswith(".weight_scale") and v.dtype == torch.float32})

    with pytest.raises(RuntimeError, match="dequantized weight has relative error"):
        q.check_dequantization(tiny_model, tampered(mixed_checkpoint, tmp_path / "a", triple_fp8_scales))
    unlisted = tampered(mixed_checkpoint, tmp_path / "b", change_layers=lambda layers: layers.popitem())
    with pytest.raises(RuntimeError, match="written quantized, but its format in hf_quant_config.json is None"):
        q.check_dequantization(tiny_model, unlisted)


def tampered(source, tmp_path, change_tensors=None, change_layers=None):
    folder = tmp_path / "tampered"
    shutil.copytree(source, folder)
    if change_tensors:
        tensors = load_file(str(folder / "model.safetensors"))
        change_tensors(tensors)
        save_file(tensors, str(folder / "model.safetensors"))
    if change_layers:
        for name, section in (("hf_quant_config.json", "quantization"), ("config.json", "quantization_config")):
            doc = json.loads((folder / name).read_text())
            change_layers(doc[section]["quantized_layers"])
            (folder / name).write_text(json.dumps(doc))
    return folder


@pytest.mark.slow
def test_verify_fails_on_tampered_mixed_checkpoints(mixed_checkpoint, tmp_path):
    manifest = json.loads((mixed_checkpoint / q.MANIFEST_NAME).read_text())
    chosen = manifest["calibration_run"]["mixed_precision"]["per_linear"]
    fp8 = next(n for n, a in chosen.items() if a == "FP8")
    fused = next(n for n, a in chosen.items() if a != "16-bit" and n.endswith(("q_proj", "gate_proj")))
    other = {"quant_algo": "NVFP4", "group_size": 16} if chosen[fused] == "FP8" else {"quant_algo": "FP8"}
    sixteen = SKIPPED
    cases = {
        "an FP8 layer labelled NVFP4": (None, lambda m: m.update({fp8: {"quant_algo": "NVFP4", "group_size": 16}}),
                                        "[tensors: dtype and shape]"),
        "one of a fused group in another format": (
            None, lambda m: m.update({fused: other}), "[fused: one format]"),
        "a 16-bit linear listed": (None, lambda m: m.update({sixteen: {"quant_algo": "FP8"}}),
                                   "[exclude: consistent]"),
        "a quantized linear unlisted": (None, lambda m: m.pop(fp8), "[config: quantized_layers]"),
        "an unserved format": (None, lambda m: m.update({fp8: {"quant_algo": "INT8"}}), "[config: quant_algo]"),
        "FP8 input scale lost": (lambda t: t.pop(f"{fp8}.input_scale"), None, "[tensors: quantized linear needs"),
        "FP8 scale not positive": (lambda t: t[f"{fp8}.weight_scale"].zero_(), None, "[scales: positive]"),
    }
    for case, (tensors, layers, expected) in cases.items():
        folder = tampered(mixed_checkpoint, tmp_path / case.replace(" ", "_"), tensors, layers)
        problems = q.verify_checkpoint(folder)[1]
        assert any(expected in p for p in problems), (case, problems)


@pytest.mark.slow
def test_refusals_before_the_model_loads(tiny_model, moe_model, tmp_path):
    common = ("--dataset_yaml", LOCAL_YAML, "--output_model", str(tmp_path / "out"), "--dry_run")
    assert_usage_error(run_cli("--input_model", str(tiny_model), *common, "--effective_bits", "4"), "between 4.5")
    assert_usage_error(run_cli("--input_model", str(moe_model), *common, "--effective_bits", "6"),
                       "mixture-of-experts")
    offload = ("--offload_folder", str(tmp_path / "off"))  # the offload script refuses the same, as early
    script = ROOT / "quantize_nvfp4_offload.py"
    assert_usage_error(run_cli("--input_model", str(tiny_model), *common, *offload, "--effective_bits", "4",
                               script=script), "between 4.5")
    assert_usage_error(run_cli("--input_model", str(moe_model), *common, *offload, "--effective_bits", "6",
                               script=script), "mixture-of-experts")
    assert not (tmp_path / "off").exists()


@pytest.mark.slow
def test_one_format_left_is_written_as_that_format(tiny_model, tmp_path):
    """Where the choice leaves one format (on this model and data, every linear FP8 at 8 bits once one down_proj is
    skipped), ModelOpt writes that format's plain checkpoint, which --verify checks as such; with an FP8 KV cache."""
    out = quantize_cli(tiny_model, tmp_path / "fp8", "--effective_bits", "8", "--kv_cache", "fp8", "--skip_layers",
                       "layers.1.mlp.down_proj")
    hf, inline = quant_configs(out)
    assert (hf["quant_algo"], inline["quant_algo"], hf["kv_cache_quant_algo"]) == ("FP8", "FP8", "FP8")
    ok = run_cli("--verify", str(out))
    assert ok.returncode == 0 and "OK against the config (FP8, group none: per-tensor scales, KV cache FP8" in ok.stdout
    assert 'quantization="modelopt"' in (out / "README.md").read_text()


def test_docs_tables_are_rendered_from_the_committed_results():
    """docs/algorithms.md's mixed-precision tables equal what `bench_mixed.py --render` writes from the results."""
    from benchmarks import bench_algorithms, bench_mixed

    paths = sorted((ROOT / "benchmarks" / "results").glob("mixed*.json"))
    assert paths
    for path in paths:
        block = bench_algorithms.generated_block(ROOT / "docs" / "algorithms.md", path.stem)
        assert block == bench_mixed.rendered(path), f"run benchmarks/bench_mixed.py --render {path.name}"
