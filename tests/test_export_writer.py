"""Our safetensors writer (write_safetensors, which export_hf_checkpoint's save_pretrained call uses during our
export): every byte as safetensors' save_file and ModelOpt's own export write them, in every mode."""
import copy
import json
import weakref

import pytest
import torch
from safetensors.torch import _TYPES, save_file

import quantize_nvfp4 as q
from test_calibration import SAMPLES, settings, tiny_fp32_model


def every_dtype() -> dict:
    tensors = {f"t_{name}": torch.arange(6).reshape(2, 3).to(dtype) for name, dtype in _TYPES.items()}
    tensors.update({"scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4, dtype=torch.bfloat16),
                    "b.same_dtype": torch.ones(3, dtype=torch.bfloat16), "ünïcode": torch.ones(5, dtype=torch.uint8)})
    return tensors


@pytest.mark.parametrize("metadata", [None, {}, {"format": "pt"}])
@pytest.mark.parametrize("views", [False, True], ids=["tensors", "with-views"])
def test_write_safetensors_writes_save_files_bytes(tmp_path, metadata, views):
    """Views of one storage that do not overlap (a model converted on load can hand over a tensor's chunks) are
    written, as save_file writes them."""
    tensors = every_dtype()
    if views:
        tensors.update({f"row_{i}": row for i, row in enumerate(torch.arange(12.0).reshape(3, 4).unbind(0))})
    save_file(tensors, str(tmp_path / "theirs.safetensors"), metadata=metadata)
    written = []
    q.write_safetensors(tensors, tmp_path / "ours.safetensors", metadata, written.append)
    ours = (tmp_path / "ours.safetensors").read_bytes()
    assert ours == (tmp_path / "theirs.safetensors").read_bytes()
    assert len(written) == len(tensors) and sum(written) == len(ours) - 8 - int.from_bytes(ours[:8], "little")


def test_every_safetensors_dtype_is_known():
    assert {str(dtype) for dtype in _TYPES.values()} == set(q.SAFETENSORS_DTYPES)
    assert {name for name in _TYPES} == set(q.SAFETENSORS_DTYPES.values())


@pytest.mark.parametrize("tensors, error", [
    ({"strided": torch.ones(4, 4).t()}, ValueError),
    ({"a": (shared := torch.ones(4)), "b": shared}, RuntimeError),
    ({"a": (whole := torch.ones(8))[:5], "b": whole[3:]}, RuntimeError),  # overlapping views
])
def test_write_safetensors_refuses_what_save_file_refuses(tmp_path, tensors, error):
    with pytest.raises(error):
        save_file(tensors, str(tmp_path / "theirs.safetensors"))
    with pytest.raises(error):
        q.write_safetensors(tensors, tmp_path / "ours.safetensors")


def tiny_bf16_model(tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, architectures=["LlamaForCausalLM"],
                         tie_word_embeddings=tied)
    return LlamaForCausalLM(config).to(torch.bfloat16).eval()


def files(folder) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("mode, kv_cache, tied, effective_bits, shard_size", [
    ("nvfp4", "fp8", False, None, "60KB"),  # the default mode, an FP8 KV cache, several shards and their index
    *[pytest.param(*case, marks=pytest.mark.slow) for case in [
        ("weight_only", "none", False, None, "10GB"),
        ("w4a8", "none", False, None, "10GB"),
        ("nvfp4", "none", True, None, "10GB"),
        ("nvfp4", "none", False, 6.5, "10GB"),  # NVFP4 and FP8 linears in one checkpoint
    ]],
])
def test_export_writes_what_export_hf_checkpoint_writes(tmp_path, mode, kv_cache, tied, effective_bits, shard_size):
    """The model calibrated with the mode's default algorithm, exported twice: by export_hf_checkpoint as it is, and
    with its shards written by write_safetensors, as export_checkpoint does."""
    from modelopt.torch.export import export_hf_checkpoint

    model = tiny_bf16_model(tied)
    run = settings(mode=mode)
    run.kv_cache, run.effective_bits, run.algorithm = kv_cache, effective_bits, q.DEFAULT_ALGORITHMS[mode]
    q.quantize_model(model, run, q.always_unquantized(model), SAMPLES, "cpu", pad_id=0)
    twin = copy.deepcopy(model)
    export_hf_checkpoint(model, export_dir=str(tmp_path / "theirs"), max_shard_size=shard_size)
    with q.shards_written_by_write_safetensors(1 << 20) as clock:
        export_hf_checkpoint(twin, export_dir=str(tmp_path / "ours"), max_shard_size=shard_size)
    theirs, ours = files(tmp_path / "theirs"), files(tmp_path / "ours")
    assert clock.seconds > 0 and any(name.endswith(".safetensors") for name in ours)
    assert ("model.safetensors.index.json" in ours) == (shard_size != "10GB")
    assert ours.keys() == theirs.keys()
    quant = json.loads(ours["hf_quant_config.json"])["quantization"]
    assert quant["quant_algo"] == (q.MIXED_PRECISION if effective_bits else q.MODE_QUANT_ALGO[mode])
    assert quant["kv_cache_quant_algo"] == ("FP8" if kv_cache == "fp8" else None)
    assert [name for name in ours if ours[name] != theirs[name]] == []


def test_an_offloaded_export_is_handed_the_shared_inputs_modelopt_finds(monkeypatch):
    """ModelOpt's export groups the linears fed the same input with a dummy forward; for an offloaded model it is
    handed the groups capture_linear_io's forward recorded instead: the same modules, named the same, in the same
    order, without that forward. Where a linear it would hook is missing, its own forward runs."""
    import modelopt.torch.export.unified_export_hf as exporter
    import modelopt.torch.quantization.utils.core_utils as core_utils

    model = tiny_fp32_model()
    q.quantize_model(model, settings(), q.always_unquantized(model), SAMPLES, "cpu", pad_id=0)

    def dummy_forward():
        model(torch.ones([1, 2], dtype=torch.long))

    def named(found):
        return [[m.name for m in group] for group in found[0].values()]

    original = exporter.collect_shared_input_modules
    theirs = named(exporter.collect_shared_input_modules(model, dummy_forward, collect_layernorms=True))
    assert ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
            "model.layers.0.self_attn.v_proj"] in theirs
    with q.shared_input_groups(model) as groups:
        q.capture_linear_io(model, SAMPLES, "cpu", 0)
    assert groups == []  # not offloaded: nothing to hand over
    monkeypatch.setattr(core_utils, "has_accelerate_offload", lambda model: True)
    inputs = []
    watch = model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(
        lambda module, args: inputs.append(weakref.ref(args[0])))
    with q.shared_input_groups(model) as groups:
        q.capture_linear_io(model, SAMPLES, "cpu", 0)
        assert inputs[0]() is None  # held weakly: freed once the forward is done with it
    watch.remove()
    for module in model.modules():
        module.__dict__.pop("name", None)

    def no_forward():
        raise AssertionError("the dummy forward ran")
    with q.export_knowing_shared_inputs(model, groups):
        assert named(exporter.collect_shared_input_modules(model, no_forward, collect_layernorms=True)) == theirs
    with q.export_knowing_shared_inputs(model, groups[1:]), pytest.raises(AssertionError, match="dummy forward ran"):
        exporter.collect_shared_input_modules(model, no_forward, collect_layernorms=True)
    assert exporter.collect_shared_input_modules is original
