"""Mixture-of-experts models: every expert written and verified, routing coverage, padding left out."""
import json

import pytest
import torch
from safetensors.torch import load_file

import quantize_nvfp4 as q
from conftest import run_cli, write_jsonl, write_yaml

pytestmark = pytest.mark.slow
ATTN = "model.layers.1.self_attn"


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
    variants = {
        "auto": ["--eval", "--eval_samples", "1"],
        "bs1": ["--batch_size", "1"],
        "all": ["--moe_calibration", "all"],
        "short": ["--max_samples", "1", "--max_seq_len", "4"],
    }
    for name, flags in variants.items():
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
