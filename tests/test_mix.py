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
    ("    colour: red\n", "allowed: name, path, split"),
    ("    wieght: 2\n", "unknown key 'wieght' (did you mean 'weight'?)"),
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
    ("dataset:\n  - name: a\n", r"top level: unknown key 'dataset' \(did you mean 'datasets'\?\)"),
    ("datasets:\n  - name: a\n    path: null\n", "missing required key 'path'"),
    ("datasets:\n  - name: a\n", "missing required key 'path'"),
    ("datasets:\n  - name: a\n    path: x\n  - name: a\n    path: y\n", "'a' is used twice"),
    ("calibration:\n  max_sample: 3\ndatasets:\n  - name: a\n    path: x\n",
     r"calibration: unknown key 'max_sample' \(did you mean 'max_samples'\?\)"),
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
    assert q.parse_auto_or_count("auto") == "auto" and q.parse_auto_or_count("4") == 4
    with pytest.raises(argparse.ArgumentTypeError):
        q.parse_auto_or_count("0")


@pytest.mark.parametrize("formatter, columns, expected", [
    ("raw_text", "[body]", {"text": ["body"]}),
    ("raw_text", "[title, body]", {"text": ["title", "body"]}),
    ("prompt_answer", "[prompt, response]", {"prompt": "prompt", "answer": "response"}),
    ("prompt_answer", "[instruction, output]", {"prompt": "instruction", "answer": "output"}),
    ("prompt_answer", "[question, response]", {"prompt": "question", "answer": "response"}),
    ("prompt_answer", "[q, a, sys, extra]", {"prompt": "q", "answer": "a", "system": "sys", "input": "extra"}),
    ("sharegpt", "[conversations]", {"conversations": "conversations"}),
    ("chat_completion", "[messages]", {"messages": "messages"}),
    ("prompt_answer", "{prompt: q, answer: a}", {"prompt": "q", "answer": "a"}),
    ("raw_text", "{text: [title, body]}", {"text": ["title", "body"]}),
])
def test_columns_list_is_normalized_to_the_mapping(data_dir, formatter, columns, expected):
    specs, _ = q.load_mix(write_yaml(data_dir / "m.yaml", entry_yaml(f"    columns: {columns}\n", formatter)))
    assert specs[0].columns == expected


@pytest.mark.parametrize("formatter, columns, allowed", [
    ("prompt_answer", "[a, b, c, d, e]", "[prompt, answer] optionally followed by system, input"),
    ("prompt_answer", "[question]", "[prompt, answer] optionally followed by system, input"),
    ("sharegpt", "[conversations, extra]", "[conversations]"),
    ("chat_completion", "[messages, 3]", "[messages]"),
    ("raw_text", "[]", "[text, ...]"),
    ("raw_text", "[text, null]", "[text, ...]"),
    ("sharegpt", "[[conversations]]", "[conversations]"),
    ("prompt_answer", "{prompt: 5}", "[prompt, answer] optionally followed by system, input"),
])
def test_bad_columns_list_names_file_entry_and_allowed_form(data_dir, formatter, columns, allowed):
    path = write_yaml(data_dir / "m.yaml", entry_yaml(f"    columns: {columns}\n", formatter))
    with pytest.raises(q.UsageError) as err:
        q.load_mix(path)
    message = str(err.value)
    assert str(path) in message and "datasets[0] (a)" in message and allowed in message, message
    assert "\n" not in message


def test_name_is_optional_and_defaults_to_the_path(data_dir):
    text = "datasets:\n  - path: data.jsonl\n  - name: second\n    path: data.jsonl\n"
    specs, _ = q.load_mix(write_yaml(data_dir / "m.yaml", text))
    assert [s.name for s in specs] == ["data.jsonl", "second"]


def test_clashing_default_names_ask_for_a_name(data_dir):
    path = write_yaml(data_dir / "m.yaml", "datasets:\n  - path: data.jsonl\n  - path: data.jsonl\n    split: x\n")
    with pytest.raises(q.UsageError, match=r"datasets\[0\] and datasets\[1\] are both named 'data.jsonl' .*"
                                           r"give each a distinct 'name:'"):
        q.load_mix(path)


@pytest.mark.parametrize("yaml_value, cli_value, expected", [
    (None, None, None), ("4", None, 4), ("auto", None, None), ("4", "auto", None), ("auto", "2", 2), ("4", "2", 2),
])
def test_batch_size_cli_over_yaml_over_default(data_dir, yaml_value, cli_value, expected):
    block = f"calibration:\n  batch_size: {yaml_value}\n" if yaml_value else ""
    path = write_yaml(data_dir / "m.yaml", block + entry_yaml())
    flags = ["--batch_size", cli_value] if cli_value else []
    args = q.build_parser().parse_args(["--input_model", "m", "--output_model", "o", "--dataset_yaml", str(path),
                                        *flags])
    settings = q.build_settings(args, {})
    assert settings.batch_size == expected
    assert settings.public_dict()["batch_size"] == (expected or "auto")


@pytest.mark.parametrize("value", ["0", "-1", "big", "true", "1.5"])
def test_bad_yaml_batch_size(data_dir, value):
    path = write_yaml(data_dir / "m.yaml", f"calibration:\n  batch_size: {value}\n" + entry_yaml())
    with pytest.raises(q.UsageError, match=f"{path}: calibration.batch_size: expected 'auto' or a positive integer"):
        q.load_mix(path)


def test_shipped_yamls_are_valid():
    root = Path(q.__file__).parent / "Datasets"
    for path in sorted(root.glob("*.yaml")):
        specs, _ = q.load_mix(path)
        assert specs, path
    local, _ = q.load_mix(root / "Local_Example.yaml")
    assert all(Path(s.path).exists() for s in local)
    assert {s.formatter for s in local} == set(q.FORMATTERS)
