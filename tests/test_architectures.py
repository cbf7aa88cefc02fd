"""The architecture families people quantize, as tiny random models: each one quantized with --eval (the
emulator must apply every quantized tensor of the files), checked by --verify, and compared with its
source checkpoint on disk; plus the models refused before any weight loads."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import quantize_nvfp4 as q
from conftest import ROOT, assert_usage_error, run_cli
from tiny_architectures import ARCHITECTURES, build_config, save_tiny_architecture

LOCAL_YAML = str(ROOT / "Datasets" / "Local_Example.yaml")
TINY_RUN = ("--dataset_yaml", LOCAL_YAML, "--max_samples", "8", "--max_seq_len", "64")
VISION_PARTS = ("vision", "visual", "multi_modal_projector")


def quantize(source: Path, out: Path, *extra: str):
    result = run_cli("--input_model", str(source), "--output_model", str(out), *TINY_RUN, *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def assert_matches_source(source: Path, out: Path) -> dict:
    """Every source tensor is in the output under its on-disk name, FP4 with scales or unchanged (a norm that
    smooth_hessian rescaled: the same shape and dtype; --eval measures the function); or, for a fused expert stack
    the runtime loads per expert, as FP4 per-expert linears."""
    from transformers import AutoConfig

    original, written = q.read_checkpoint_tensors(source), q.read_checkpoint_tensors(out)
    config = AutoConfig.from_pretrained(str(out))
    for key, tensor in original.items():
        split = q.expert_stack_linears(key, list(tensor.shape), config.get_text_config().hidden_size,
                                       config.architectures[0])
        if split is not None and key not in written:
            assert all(written[f"{m}.weight"].dtype == torch.uint8 for m in split), key
            continue
        module = key[: -len(".weight")]
        if f"{module}.weight_scale" in written or f"{key}_weight_scale" in written:
            assert written[key].dtype == torch.uint8, key
        elif key.rsplit(".", 2)[-2] in q.SMOOTHED_READERS and not torch.equal(written[key], tensor):
            assert (written[key].dtype, written[key].shape) == (tensor.dtype, tensor.shape), key
        else:
            assert torch.equal(written[key], tensor), key
    return written


@pytest.mark.slow
@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_architecture_quantizes_verifies_and_evaluates(architecture, tiny_model, tmp_path):
    source = save_tiny_architecture(architecture, tmp_path / "source", tiny_model)
    out = tmp_path / "out"
    quantize(source, out, "--eval", "--eval_samples", "4")
    written = assert_matches_source(source, out)
    report = json.loads((out / q.REPORT_NAME).read_text())
    scales = [k for k in written if k.endswith("weight_scale")]
    assert scales and report["quantized_tensors_emulated"] == len(scales)
    assert report["tokens"] > 0 and report["mean_kl"] > 0  # the emulated model differs from the original
    assert json.loads((out / "config.json").read_text())["architectures"] == [architecture]
    summary, problems = q.verify_checkpoint(out)
    assert problems == [] and summary["quantized_linears"] > 0
    excluded = json.loads((out / "hf_quant_config.json").read_text())["quantization"]["exclude_modules"]
    vision = sorted({k.rpartition(".")[0] for k in written
                     if any(p in k.split(".")[0] + k.split(".")[1] for p in VISION_PARTS)
                     and k.endswith(".weight") and written[k].dim() == 2})
    for module in vision:  # vision towers and projectors stay in 16 bits, excluded for both runtimes
        assert q.vllm_excludes(module, excluded) and q.trtllm_excludes(module, excluded), module


@pytest.mark.slow
def test_vision_language_model_keeps_processor_and_vision_weights(tiny_model, tmp_path):
    source = save_tiny_architecture("Gemma3ForConditionalGeneration", tmp_path / "source", tiny_model)
    (source / "preprocessor_config.json").write_text('{"image_processor_type": "Gemma3ImageProcessor"}\n')
    out = tmp_path / "out"
    quantize(source, out)
    written = assert_matches_source(source, out)
    assert any(k.startswith("vision_tower.") for k in written)
    assert not [k for k in written if k.startswith("vision_tower.") and k.endswith("weight_scale")]
    assert (out / "preprocessor_config.json").read_bytes() == (source / "preprocessor_config.json").read_bytes()


@pytest.mark.slow
def test_a_broken_name_mapping_is_caught_by_the_emulator(tiny_model, tmp_path):
    """Renaming one exported linear (as a wrong name mapping would) must stop the report, not shrink it."""
    source = save_tiny_architecture("MixtralForCausalLM", tmp_path / "source", tiny_model)
    out = tmp_path / "out"
    quantize(source, out)
    tensors = load_file(str(out / "model.safetensors"))
    renamed = {k.replace("experts.0.w1.", "experts.0.gate_proj."): v for k, v in tensors.items()}
    save_file(renamed, str(out / "model.safetensors"), metadata={"format": "pt"})
    model = q.load_model(q.build_settings(q.build_parser().parse_args(
        ["--input_model", str(source), "--output_model", str(tmp_path / "x"), *TINY_RUN]), {}), build_config(
        "MixtralForCausalLM"), "cpu")
    with pytest.raises(RuntimeError, match="only 8 of 32 quantized tensors"):
        q.emulate_checkpoint(model, out)


@pytest.mark.slow
def test_unloaded_checkpoint_tensors_are_carried_and_excluded(tiny_model, tmp_path):
    """DeepSeek-V3's multi-token-prediction layer (model.layers.61.*) is not loaded by transformers: it is
    copied as it is, excluded from quantization, and --verify accepts it."""
    source = save_tiny_architecture("DeepseekV3ForCausalLM", tmp_path / "source", tiny_model)
    tensors = load_file(str(source / "model.safetensors"))
    mtp = {"model.layers.61.eh_proj.weight": torch.randn(64, 128).to(torch.bfloat16),
           "model.layers.61.enorm.weight": torch.ones(64, dtype=torch.bfloat16)}
    save_file({**tensors, **mtp}, str(source / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    quantize(source, out)
    written = assert_matches_source(source, out)
    assert all(torch.equal(written[k], v) for k, v in mtp.items())
    quant_config = json.loads((out / "hf_quant_config.json").read_text())
    assert "model.layers.61.*" in quant_config["quantization"]["exclude_modules"]
    assert "model.layers.61.*" in json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    assert q.verify_checkpoint(out)[1] == []
    manifest = json.loads((out / q.MANIFEST_NAME).read_text())
    assert manifest["carried_unloaded"]["tensors"] == 2
    assert "not loaded by transformers" in (out / "README.md").read_text()


def test_module_never_reached_by_calibration_stays_16_bit(tiny_model):
    """A wrapped linear whose weight is used outside its own forward (as fused kernels of some hybrid
    blocks do) gets no input scale: it is kept in 16 bits and reported, not a failed run."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.bfloat16)
    mlp = model.model.layers[1].mlp
    mlp.forward = lambda x: torch.nn.functional.linear(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x),
                                                       mlp.down_proj.weight)
    args = q.build_parser().parse_args(["--input_model", str(tiny_model), "--output_model", "unused", *TINY_RUN])
    samples = [list(range(4, 40)), list(range(5, 30))]
    stats = q.quantize_model(model, q.build_settings(args, {}), q.always_unquantized(model), samples, "cpu", pad_id=0)
    assert stats["kept_16_bit_unreached"] == ["model.layers.1.mlp.down_proj"]
    assert "model.layers.1.mlp.down_proj" not in q.quantized_linear_shapes(model)
    assert "model.layers.1.mlp.up_proj" in q.quantized_linear_shapes(model)


@pytest.mark.slow
@pytest.mark.parametrize("config, fragment", [
    ({"model_type": "bert", "architectures": ["BertForMaskedLM"]}, "BertForMaskedLM is not supported"),
    ({"model_type": "t5", "architectures": ["T5ForConditionalGeneration"]}, "encoder-decoder"),
    ({"model_type": "llama", "architectures": ["FooForCausalLM"]}, "FooForCausalLM is not supported"),
])
def test_unsupported_architecture_is_refused_before_loading(tiny_model, tmp_path, config, fragment):
    import shutil

    import transformers

    folder = tmp_path / "model"
    folder.mkdir()
    full = transformers.AutoConfig.for_model(config["model_type"], vocab_size=512, **{
        k: v for k, v in config.items() if k != "model_type"})
    full.save_pretrained(str(folder))
    for f in tiny_model.glob("tokenizer*"):
        shutil.copy(f, folder / f.name)
    result = run_cli("--input_model", str(folder), "--output_model", str(tmp_path / "out"), *TINY_RUN)
    assert_usage_error(result, fragment, "vision-language models")
    assert not (tmp_path / "out").exists()
