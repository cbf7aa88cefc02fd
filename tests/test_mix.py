"""YAML mix validation and settings precedence."""
import argparse
from pathlib import Path

import pytest

import quantize_nvfp4 as q
from conftest import write_yaml


def entry_yaml(extra: str = "", formatter: str = "raw_text") -> str:
    return f"datasets:\n  - name: a\n    path: data.jsonl\n    formatter: {formatter}\n{extra}"


@pytest.fixture
def data_dir(tmp_path):
    (tmp_path / "data.jsonl").write_text('{"text": "hello"}\n')
    return tmp_path


def test_valid_mix_resolves_relative_paths_and_defaults(data_dir):
    specs, calibration = q.load_mix(write_yaml(data_dir / "m.yaml", entry_yaml()))
    assert specs[0].path == str((data_dir / "data.jsonl").resolve())
    assert (specs[0].split, specs[0].weight, specs[0].streaming) == ("train", 1.0, False)
    assert calibration == {}


@pytest.mark.parametrize("extra, fragment", [
    ("    colour: red\n", "unknown key 'colour'"),
    ("    weight: 0\n", "'weight' must be > 0"),
    ("    weight: -1\n", "'weight' must be > 0"),
    ("    weight: heavy\n", "'weight': expected int or float"),
    ("    streaming: 'yes'\n", "'streaming': expected bool"),
    ("    columns: {prompt: q}\n", "'columns' key 'prompt' does not apply to formatter 'raw_text'"),
])
def test_bad_entries_name_file_entry_and_allowed_values(data_dir, extra, fragment):
    path = write_yaml(data_dir / "m.yaml", entry_yaml(extra))
    with pytest.raises(q.UsageError) as err:
        q.load_mix(path)
    assert fragment in str(err.value) and str(path) in str(err.value) and "datasets[0] (a)" in str(err.value)


def test_unknown_formatter_lists_allowed(data_dir):
    with pytest.raises(q.UsageError, match="unknown formatter 'alpaca'; allowed: raw_text, prompt_answer, "
                                           "sharegpt, chat_completion"):
        q.load_mix(write_yaml(data_dir / "m.yaml", entry_yaml(formatter="alpaca")))


@pytest.mark.parametrize("text, fragment", [
    ("datasets: [\n", "malformed YAML"),
    ("- a\n- b\n", "top level must be a mapping"),
    ("datasets: []\n", "non-empty list"),
    ("dataset:\n  - name: a\n", "unknown top-level key 'dataset'"),
    ("datasets:\n  - path: x.jsonl\n", "missing required key 'name'"),
    ("datasets:\n  - name: a\n", "missing required key 'path'"),
    ("datasets:\n  - name: a\n    path: x\n  - name: a\n    path: y\n", "'a' is used twice"),
    ("calibration:\n  max_sample: 3\ndatasets:\n  - name: a\n    path: x\n", "unknown key 'max_sample'"),
    ("calibration:\n  max_samples: many\ndatasets:\n  - name: a\n    path: x\n", "calibration.max_samples"),
])
def test_bad_documents(tmp_path, text, fragment):
    with pytest.raises(q.UsageError, match=fragment):
        q.load_mix(write_yaml(tmp_path / "m.yaml", text))


def test_missing_yaml(tmp_path):
    with pytest.raises(q.UsageError, match="dataset YAML not found"):
        q.load_mix(tmp_path / "nope.yaml")


def args_for(yaml_path, **overrides):
    args = q.build_parser().parse_args(["--input_model", "m", "--output_model", "o", "--dataset_yaml", str(yaml_path)])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def test_precedence_cli_over_yaml_over_defaults(data_dir):
    path = write_yaml(data_dir / "m.yaml", "calibration:\n  max_samples: 7\n  seed: 3\n" + entry_yaml())
    settings = q.build_settings(args_for(path, seed=11), {})
    assert (settings.max_samples, settings.seed) == (7, 11)
    assert settings.max_seq_len == q.CALIBRATION_DEFAULTS["max_seq_len"]
    assert settings.oversample_ratio == q.CALIBRATION_DEFAULTS["oversample_ratio"]


def test_environment_supplies_models_and_token_is_not_public(data_dir):
    path = write_yaml(data_dir / "m.yaml", entry_yaml())
    args = q.build_parser().parse_args(["--dataset_yaml", str(path)])
    env = {"INPUT_MODEL": "org/model", "OUTPUT_MODEL": str(data_dir / "out"), "HF_TOKEN": "hf_secret"}
    settings = q.build_settings(args, env)
    assert settings.input_model == "org/model" and settings.output_model == data_dir / "out"
    assert settings.hf_token == "hf_secret"
    assert "hf_secret" not in repr(settings) and "hf_secret" not in str(settings.public_dict())


def test_env_files_cwd_wins_over_script_dir_and_real_env_wins(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / ".env").write_text("INPUT_MODEL=from_a\nOUTPUT_MODEL=out_a\n")
    (tmp_path / "b" / ".env").write_text("INPUT_MODEL=from_b\n")
    monkeypatch.delenv("INPUT_MODEL", raising=False)
    monkeypatch.setenv("OUTPUT_MODEL", "real")
    env = q.read_env_files(tmp_path / "a", tmp_path / "b")
    assert env["INPUT_MODEL"] == "from_b" and env["OUTPUT_MODEL"] == "real"


@pytest.mark.parametrize("override, fragment", [
    ({"max_samples": 0}, "max_samples must be >= 1"),
    ({"oversample_ratio": 0.5}, "oversample_ratio must be >= 1"),
    ({"min_token_length": 5000}, "exceeds max_seq_len"),
])
def test_bad_numbers(data_dir, override, fragment):
    path = write_yaml(data_dir / "m.yaml", entry_yaml())
    with pytest.raises(q.UsageError, match=fragment):
        q.build_settings(args_for(path, **override), {})


def test_modes_and_batch_size_parsing(data_dir):
    path = write_yaml(data_dir / "m.yaml", entry_yaml())
    assert q.build_settings(args_for(path), {}).mode == "nvfp4"
    assert q.build_settings(args_for(path, w4a8=True), {}).modelopt_config_name == "W4A8_NVFP4_FP8_CFG"
    assert q.build_settings(args_for(path, weight_only=True), {}).modelopt_config_name == "W4A16_NVFP4_CFG"
    assert q.parse_batch_size("auto") is None and q.parse_batch_size("4") == 4
    with pytest.raises(argparse.ArgumentTypeError):
        q.parse_batch_size("0")


def test_shipped_yamls_are_valid():
    root = Path(q.__file__).parent / "Datasets"
    for path in sorted(root.glob("*.yaml")):
        specs, _ = q.load_mix(path)
        assert specs, path
    local, _ = q.load_mix(root / "Local_Example.yaml")
    assert all(Path(s.path).exists() for s in local)
    assert {s.formatter for s in local} == set(q.FORMATTERS)
