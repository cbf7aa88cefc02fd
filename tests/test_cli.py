"""End-to-end runs of quantize_nvfp4.py on a tiny model: files written, tensor by tensor, and every error."""
import json
import stat
from pathlib import Path

import pytest
import torch

import quantize_nvfp4 as q
from conftest import ROOT, assert_phases_add_up, assert_usage_error, run_cli, timed_run, write_jsonl, write_yaml

pytestmark = pytest.mark.slow
LOCAL_YAML = str(ROOT / "Datasets" / "Local_Example.yaml")
SMALL = ("--max_samples", "24", "--max_seq_len", "128")
SECRET = "hf_do_not_leak_1234567890"


def quantize(tiny_model, out: Path, *extra: str, env=None):
    result = run_cli("--input_model", str(tiny_model), "--output_model", str(out), "--dataset_yaml", LOCAL_YAML,
                     *SMALL, *extra, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def default_run(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("default") / "tiny-nvfp4"
    result = quantize(tiny_model, out, env={"HF_TOKEN": SECRET})
    return out, result


def check_tensors(source: Path, out: Path, group_size: int, input_scale: bool, skipped=()):
    original, written = q.read_checkpoint_tensors(source), q.read_checkpoint_tensors(out)
    quantized = [n[: -len(".weight")] for n, t in original.items()
                 if n.endswith("proj.weight") and n[: -len(".weight")] not in skipped]
    assert quantized, "no quantizable linear found"
    for name in quantized:
        weight = written[f"{name}.weight"]
        out_f, in_f = original[f"{name}.weight"].shape
        assert weight.dtype == torch.uint8 and list(weight.shape) == [out_f, in_f // 2]
        assert written[f"{name}.weight_scale"].dtype == torch.float8_e4m3fn
        assert list(written[f"{name}.weight_scale"].shape) == [out_f, in_f // group_size]
        assert written[f"{name}.weight_scale_2"].shape == () and written[f"{name}.weight_scale_2"] > 0
        assert (f"{name}.input_scale" in written) == input_scale
        if input_scale:
            assert written[f"{name}.input_scale"].dtype == torch.float32 and written[f"{name}.input_scale"] > 0
        restored = q.dequantize_nvfp4(weight, written[f"{name}.weight_scale"], written[f"{name}.weight_scale_2"],
                                      group_size)
        smoothing = q.smoothed_input_scales(name, original.get, written.get)  # smooth_hessian's fold, else 1
        reference = original[f"{name}.weight"].float() * (1 if smoothing is None else smoothing)
        rel = (torch.linalg.norm(restored - reference) / torch.linalg.norm(reference)).item()
        assert 0.02 < rel < 0.2, f"{name}: relative error {rel}"
    for name, tensor in original.items():  # everything else is carried over bit for bit, but smoothed norms
        if name.rsplit(".", 2)[-2] in q.SMOOTHED_READERS and not torch.equal(written[name], tensor):
            assert (written[name].dtype, written[name].shape) == (tensor.dtype, tensor.shape), name
        elif not any(name == f"{m}.weight" for m in quantized):
            assert torch.equal(written[name], tensor), name
    return quantized


def test_default_run_writes_a_valid_w4a4_checkpoint(default_run, tiny_model):
    out, _ = default_run
    quant = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    assert quant["quant_algo"] == "NVFP4" and quant["group_size"] == 16
    assert {"lm_head", "model.embed_tokens"} <= set(quant["exclude_modules"])
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_algo"] == "NVFP4"
    quantized = check_tensors(tiny_model, out, 16, input_scale=True)
    assert len(quantized) == 14  # 2 layers x (q, k, v, o, gate, up, down)


def test_default_run_files_modes_and_no_leftovers(default_run, tiny_model):
    out, _ = default_run
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "hf_quant_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", "nvfp4_manifest.json"} <= names
    for path in out.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temp dir or lock left beside it
    for name in q.SOURCE_FILES:  # as the source has them, byte for byte: no calibration truncation
        assert (out / name).exists() == (tiny_model / name).exists(), name
        assert not (out / name).exists() or (out / name).read_bytes() == (tiny_model / name).read_bytes(), name
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out)("a test sentence")["input_ids"]


def test_manifest(default_run, tiny_model):
    out, _ = default_run
    manifest = json.loads((out / "nvfp4_manifest.json").read_text())
    assert manifest["source_model"] == str(tiny_model)
    assert (manifest["mode"], manifest["modelopt_config"]) == ("nvfp4", "NVFP4_DEFAULT_CFG")
    assert manifest["versions"]["nvidia-modelopt"] and manifest["versions"]["torch"]
    assert manifest["arguments"]["max_samples"] == 24 and "hf_token" not in manifest["arguments"]
    calib = manifest["calibration"]
    assert calib["target_samples"] == 24 and calib["kept_samples"] == 24
    assert calib["requested_samples"] == 36 == sum(d["requested"] for d in calib["per_dataset"])
    assert {d["name"] for d in calib["per_dataset"]} == {s.name for s in q.load_mix(Path(LOCAL_YAML))[0]}
    assert set(calib["tokens"]) == {"total", "min", "mean", "max"} and calib["tokens"]["max"] <= 128
    assert manifest["calibration_run"]["tokens"] == calib["tokens"]["total"]
    assert {"load_model_s", "export_s", "wall_s"} <= set(manifest["timings"])
    assert "lm_head" in manifest["excluded_modules"]


def test_phases_add_up_to_the_wall_time(tiny_model, tmp_path):
    out = tmp_path / "out"
    result, wall = timed_run(quantize, tiny_model, out, "--eval", "--eval_samples", "8")
    phases = (q.STAGE_CHECKS, q.STAGE_DATA, q.STAGE_LOAD, q.STAGE_CALIBRATION, q.PHASE_HESSIANS, q.STAGE_SEARCH,
              q.STAGE_EXPORT, q.STAGE_VALIDATION, q.STAGE_QUALITY)
    assert_phases_add_up(json.loads((out / q.MANIFEST_NAME).read_text()), wall, phases)
    assert "time per phase" in result.stderr


def test_token_is_never_printed_or_written(default_run):
    out, result = default_run
    assert SECRET not in result.stdout + result.stderr
    for path in out.iterdir():
        assert SECRET.encode() not in path.read_bytes(), path


def test_summary_table_printed(default_run):
    _, result = default_run
    assert "summary" in result.stderr and "tokens/s" in result.stderr and "calibration plan" in result.stderr


@pytest.mark.parametrize("flag, algo, group_size, input_scale", [
    ("--w4a8", "W4A8_NVFP4_FP8", 32, True),
    ("--weight_only", "W4A16_NVFP4", 16, False),
])
def test_other_modes_with_skip_layers(tiny_model, tmp_path, flag, algo, group_size, input_scale):
    out = tmp_path / "out"
    quantize(tiny_model, out, flag, "--skip_layers", "layers.1.mlp.down_proj", "layers.0.self_attn.o_*")
    quant = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    assert (quant["quant_algo"], quant["group_size"]) == (algo, group_size)
    skipped = ("model.layers.1.mlp.down_proj", "model.layers.0.self_attn.o_proj")
    assert set(skipped) <= set(quant["exclude_modules"])
    check_tensors(tiny_model, out, group_size, input_scale, skipped=skipped)


def test_overwrite_replaces_existing_output(tiny_model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    (out / q.MANIFEST_NAME).write_text("{}")  # a checkpoint this tool wrote: the only kind --overwrite replaces
    assert_usage_error(run_cli("--input_model", str(tiny_model), "--output_model", str(out),
                               "--dataset_yaml", LOCAL_YAML), "holds a checkpoint this tool wrote", "pass --overwrite")
    assert (out / "stale.txt").exists()
    quantize(tiny_model, out, "--overwrite")
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_dry_run_writes_nothing(tiny_model, tmp_path):
    out = tmp_path / "out"
    result = run_cli("--input_model", str(tiny_model), "--output_model", str(out), "--dataset_yaml", LOCAL_YAML,
                     *SMALL, "--dry_run")
    assert result.returncode == 0, result.stderr
    assert "calibration plan" in result.stderr and "dry run" in result.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_dotenv_in_working_dir_supplies_models(tiny_model, tmp_path):
    (tmp_path / ".env").write_text(f"INPUT_MODEL={tiny_model}\nOUTPUT_MODEL={tmp_path / 'out'}\n")
    result = run_cli("--dataset_yaml", LOCAL_YAML, *SMALL, "--dry_run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "kept 24 samples" in result.stderr


def test_list_configs():
    result = run_cli("--list_configs")
    assert result.returncode == 0, result.stderr
    used, _, others = result.stdout.partition("\nOther ")
    lines = {line.split()[0]: line for line in used.splitlines()[1:]}
    assert "(default)" in lines["NVFP4_DEFAULT_CFG"] and "--w4a8" in lines["W4A8_NVFP4_FP8_CFG"]
    assert "--weight_only" in lines["W4A16_NVFP4_CFG"] and "--kv_cache fp8" in lines["FP8_KV_CFG"]
    assert "--algorithm local_hessian" in lines["NVFP4_W4A4_WEIGHT_LOCAL_HESSIAN_CFG"]
    assert "--effective_bits" in lines["FP8_DEFAULT_CFG"]
    assert "NVFP4_AWQ_LITE_CFG" in others.split() and "NVFP4_AWQ_LITE_CFG" not in lines


# The seed README's example mix, as users have it: `columns:` as a list, calibration.min_token_length 32.
SEED_README_YAML = """\
# Dataset configuration for NVFP4 calibration
datasets:
  - name: ultrachat        # Human-readable name (optional)
    path: HuggingFaceH4/ultrachat_200k
    split: train_sft
    weight: 0.4            # Sampling weight (normalized automatically)
    text_column: text      # Column containing text (auto-detected if not specified)
    streaming: false       # Set true for very large datasets

  - name: writing_prompts
    path: Gryphe/Opus-WritingPrompts
    split: train
    weight: 0.3
    formatter: sharegpt    # Use ShareGPT conversation format
    columns: [conversations]

calibration:
  max_samples: 512         # Target samples for calibration (after filtering)
  max_seq_len: 2048        # Maximum sequence length for tokenization
  seed: 42                 # Random seed for reproducibility
  min_token_length: 32     # Filter samples shorter than this (default: 32)
  oversample_ratio: 1.5    # Request 50% more samples, trim after filtering
"""


def sentence(i: int, topic: str) -> str:
    return (f"Entry {i} about {topic}: the keeper of the old lighthouse wrote that {i * 7} ships passed the "
            f"northern reef before the storm, and that the lamp burned until dawn while the sea kept its "
            f"promise to nobody at all, not even to the gulls.")


def test_seed_readme_yaml_runs_as_written(tiny_model, tmp_path):
    write_jsonl(tmp_path / "ultrachat.jsonl", [{"text": sentence(i, "chat")} for i in range(500)])
    conversations = [{"conversations": [{"from": "human", "value": sentence(i, "a prompt")},
                                        {"from": "gpt", "value": sentence(i, "a story")}]} for i in range(400)]
    (tmp_path / "writing_prompts.json").write_text(json.dumps(conversations), encoding="utf-8")
    mix = SEED_README_YAML.replace("HuggingFaceH4/ultrachat_200k", "ultrachat.jsonl") \
        .replace("Gryphe/Opus-WritingPrompts", "writing_prompts.json")
    out = tmp_path / "out"
    result = run_cli("--input_model", str(tiny_model), "--output_model", str(out),
                     "--dataset_yaml", str(write_yaml(tmp_path / "mix.yaml", mix)))
    assert result.returncode == 0, result.stderr[-3000:]
    calib = json.loads((out / "nvfp4_manifest.json").read_text())["calibration"]
    # 768 requested = 512 x 1.5, split 0.4 : 0.3 by largest remainder (438.86 -> 439, 329.14 -> 329)
    assert [(d["name"], d["requested"], d["loaded"]) for d in calib["per_dataset"]] == \
        [("ultrachat", 439, 439), ("writing_prompts", 329, 329)]
    assert calib["kept_samples"] == 512 == sum(d["kept"] for d in calib["per_dataset"])
    assert all(d["kept"] > 0 for d in calib["per_dataset"])


def test_self_test(tmp_path):
    result = run_cli("--self_test", "--output_model", str(tmp_path / "st"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "self-test passed" in result.stderr
    assert (tmp_path / "st" / "nvfp4_manifest.json").exists()


# ---------------------------------------------------------------- errors: exit 2, one line, nothing written
@pytest.fixture
def bad_inputs(tmp_path):
    write_jsonl(tmp_path / "empty.jsonl", [{"text": ""}, {"text": None}, {"x": 1}])
    write_jsonl(tmp_path / "ok.jsonl", [{"text": "a sentence " * 20}] * 4)
    return {
        "missing": tmp_path / "missing.yaml",
        "malformed": write_yaml(tmp_path / "malformed.yaml", "datasets: [\n  - name: a\n"),
        "formatter": write_yaml(tmp_path / "f.yaml",
                                "datasets:\n  - name: a\n    path: ok.jsonl\n    formatter: alpaca\n"),
        "key": write_yaml(tmp_path / "k.yaml", "datasets:\n  - name: a\n    path: ok.jsonl\n    colour: red\n"),
        "path": write_yaml(tmp_path / "p.yaml", "datasets:\n  - name: a\n    path: ./nowhere/data.jsonl\n"),
        "empty": write_yaml(tmp_path / "e.yaml", "datasets:\n  - name: a\n    path: empty.jsonl\n"),
        "ok": write_yaml(tmp_path / "ok.yaml", "datasets:\n  - name: a\n    path: ok.jsonl\n"),
    }


@pytest.mark.parametrize("case, fragments", [
    ("missing", ["dataset YAML not found"]),
    ("malformed", ["malformed YAML"]),
    ("formatter", ["unknown formatter 'alpaca'", "allowed: raw_text"]),
    ("key", ["unknown key 'colour'", "datasets[0] (a)"]),
    ("path", ["datasets[0] (a)", "no file matches ./nowhere/data.jsonl"]),
    ("empty", ["datasets[0] (a)", "contributes no calibration sample"]),
])
def test_bad_calibration_input(tiny_model, tmp_path, bad_inputs, case, fragments):
    out = tmp_path / "out"
    result = run_cli("--input_model", str(tiny_model), "--output_model", str(out),
                     "--dataset_yaml", str(bad_inputs[case]))
    assert_usage_error(result, *fragments)
    assert not out.exists()


def test_model_not_found(tmp_path, bad_inputs):
    for model in (str(tmp_path / "no-such-model"), "./relative/missing"):
        result = run_cli("--input_model", model, "--output_model", str(tmp_path / "out"),
                         "--dataset_yaml", str(bad_inputs["ok"]))
        assert_usage_error(result, "model not found")
    assert not (tmp_path / "out").exists()


def test_bad_skip_pattern(tiny_model, tmp_path, bad_inputs):
    result = run_cli("--input_model", str(tiny_model), "--output_model", str(tmp_path / "out"),
                     "--dataset_yaml", str(bad_inputs["ok"]), "--skip_layers", "down_porj")
    assert_usage_error(result, "'down_porj' matches no module")


def test_missing_arguments(tmp_path, bad_inputs):
    assert_usage_error(run_cli("--output_model", str(tmp_path / "o"), "--dataset_yaml", str(bad_inputs["ok"])),
                       "no input model")
    assert_usage_error(run_cli("--input_model", "x", "--output_model", str(tmp_path / "o")), "no calibration mix")


def test_failed_export_leaves_nothing(tiny_model, tmp_path, monkeypatch):
    def broken_validation(*args, **kwargs):
        raise RuntimeError("validation exploded")

    monkeypatch.setattr(q, "validate_export", broken_validation)
    args = q.build_parser().parse_args(["--input_model", str(tiny_model), "--output_model", str(tmp_path / "out"),
                                        "--dataset_yaml", LOCAL_YAML, *SMALL])
    with pytest.raises(RuntimeError, match="validation exploded"):
        q.run(q.build_settings(args, {}))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("script", ["quantize_nvfp4.py", "quantize_nvfp4_offload.py"])
def test_help(script):
    result = run_cli("--help", script=ROOT / script)
    assert result.returncode == 0 and "--input_model" in result.stdout, result.stderr[-2000:]
    assert "--eval " in result.stdout and "--max_ppl_increase" in result.stdout
    assert ("--verify" in result.stdout) == (script == "quantize_nvfp4.py")  # checking a checkpoint is the main's
