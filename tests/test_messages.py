"""Bad input says what is wrong, where, and how to fix it: one `error:` line, exit status 2, nothing written."""
import re
import shutil
import time
from pathlib import Path

import pytest

import quantize_nvfp4 as q
import quantize_nvfp4_offload as qo
from conftest import ROOT, assert_usage_error, run_cli, write_jsonl, write_yaml

LOCAL_YAML = str(ROOT / "Datasets" / "Local_Example.yaml")
CLOSED_PORT = "http://127.0.0.1:9"  # the discard port: nothing listens, the connection is refused at once
STAGE_LINE = re.compile(r"^\[ *\d+\.\d s\] ")  # the console's "[    0.0 s] checks" lines, before the error


def usage_error(capsys, main, argv: list[str]) -> str:
    """The one error line of a run that must stop with exit status 2 (argparse's errors exit, ours return 2); only
    the console's stage lines may come before it."""
    try:
        status = main(argv)
    except SystemExit as exc:
        status = exc.code
    err = capsys.readouterr().err
    assert status == 2, err
    lines = [line for line in err.splitlines() if not STAGE_LINE.match(line)]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "usage:" not in err, err
    return lines[0]


def nothing_written(folder: Path, *before: str) -> None:
    assert sorted(p.name for p in folder.iterdir()) == sorted(before)


# --------------------------------------------------------------------------- 1. options
@pytest.mark.parametrize("main, argv, line", [
    (q.main, ["--batchsize", "4"], "error: unknown option --batchsize (did you mean --batch_size?); see --help"),
    (q.main, ["--batch-sise=4"], "error: unknown option --batch-sise (did you mean --batch_size?); see --help"),
    (q.main, ["--zzzzz"], "error: unknown option --zzzzz; see --help"),
    (q.main, ["stray"], "error: unexpected argument 'stray' (options start with --); see --help"),
    (qo.main, ["--max_gpu_memry", "4GiB"],
     "error: unknown option --max_gpu_memry (did you mean --max_gpu_memory?); see --help"),
])
def test_unknown_option_is_one_line(capsys, main, argv, line):
    assert usage_error(capsys, main, argv) == line


@pytest.mark.parametrize("argv, line", [
    (["--dtype", "fp8"], "error: argument --dtype: invalid choice: 'fp8' (choose from"),
    (["--batch-size", "x"], "error: argument --batch_size: expected 'auto' or a positive integer, got 'x'"),
    (["--input-model"], "error: argument --input_model: expected one argument"),
    (["--w4a8", "--weight-only"], "error: argument --weight_only: not allowed with argument --w4a8"),
])
def test_other_argparse_errors_are_one_line(capsys, argv, line):
    assert usage_error(capsys, q.main, argv).startswith(line)


def test_dashed_spellings_are_aliases():
    dashed = q.build_parser().parse_args(["--input-model", "m", "--batch-size", "4", "--dry-run",
                                          "--dataset-yaml=x.yaml", "--skip-layers", "a", "b", "--max-seq-len=64"])
    plain = q.build_parser().parse_args(["--input_model", "m", "--batch_size", "4", "--dry_run",
                                         "--dataset_yaml=x.yaml", "--skip_layers", "a", "b", "--max_seq_len=64"])
    assert dashed == plain and dashed.batch_size == 4 and dashed.dry_run
    offload = qo.build_parser().parse_args(["--offload-folder", "f", "--max-gpu-memory", "3GiB", "--checkpoint-every=2",
                                            "--clean-offload"])
    assert (offload.offload_folder, offload.checkpoint_every, offload.clean_offload) == ("f", 2, True)
    assert offload.max_gpu_memory == qo.build_parser().parse_args(["--max_gpu_memory", "3GiB"]).max_gpu_memory


def test_help_lists_the_underscore_forms_once():
    text = q.build_parser().format_help()
    assert "--batch_size auto|N" in text and "--input_model INPUT_MODEL" in text
    assert "--batch-size auto|N" not in text and "--input-model" not in text
    assert "--batch-size = --batch_size" in text  # the aliases are said once, at the end


# --------------------------------------------------------------------------- 2. the hub
@pytest.fixture
def online(monkeypatch):
    """The hub libraries' offline switches off, and the probe's per-process answer forgotten."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    q.hub_unreachable.cache_clear()
    yield monkeypatch
    q.hub_unreachable.cache_clear()


def hub_yaml(folder: Path) -> str:
    return str(write_yaml(folder / "hub.yaml", "datasets:\n  - path: no-such-org/no-such-dataset\n"))


def test_unreachable_hub_dataset_fails_in_seconds(capsys, online, tiny_model, tmp_path):
    online.setenv("HF_ENDPOINT", CLOSED_PORT)
    started = time.perf_counter()
    line = usage_error(capsys, q.main, ["--input_model", str(tiny_model), "--output_model", str(tmp_path / "out"),
                                        "--dataset_yaml", hub_yaml(tmp_path)])
    assert time.perf_counter() - started < 15
    assert line == (f"error: cannot reach the Hugging Face hub ({CLOSED_PORT}: Connection refused) to fetch dataset "
                    "'no-such-org/no-such-dataset': check the network or proxy; for a gated or private repo set "
                    "HF_TOKEN; offline, set HF_HUB_OFFLINE=1 with the dataset in the local cache (HF_HOME)")
    nothing_written(tmp_path, "hub.yaml")


def test_unreachable_hub_model_fails_in_seconds(capsys, online, tmp_path):
    online.setenv("HF_ENDPOINT", CLOSED_PORT)
    started = time.perf_counter()
    line = usage_error(capsys, q.main, ["--input_model", "no-such-org/no-such-model", "--output_model",
                                        str(tmp_path / "out"), "--dataset_yaml", LOCAL_YAML])
    assert time.perf_counter() - started < 15
    assert line.startswith(f"error: cannot reach the Hugging Face hub ({CLOSED_PORT}: Connection refused) to fetch "
                           "model 'no-such-org/no-such-model': check the network or proxy;")
    assert line.endswith("offline, set HF_HUB_OFFLINE=1 with the model in the local cache (HF_HOME)")
    nothing_written(tmp_path)


def test_unreachable_hub_with_the_dataset_cached_says_set_offline(online, tmp_path):
    import datasets

    online.setenv("HF_ENDPOINT", CLOSED_PORT)
    online.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path)
    (tmp_path / "org___my_data" / "default" / "0.0.0" / "abc123").mkdir(parents=True)
    with pytest.raises(q.UsageError) as caught:
        q.check_dataset_source(q.DatasetSpec("d", "org/MyData"))
    assert str(caught.value) == (f"cannot reach the Hugging Face hub ({CLOSED_PORT}: Connection refused) to fetch "
                                 f"dataset 'org/MyData'; it is in the local cache ({tmp_path / 'org___my_data'}): "
                                 "set HF_HUB_OFFLINE=1 to use that copy")


def test_offline_and_not_cached(online, tmp_path):
    import datasets

    online.setenv("HF_HUB_OFFLINE", "1")
    online.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path)
    with pytest.raises(q.UsageError, match=r"^dataset 'org/name' is not in the local Hugging Face cache \(.+\) and "
                                           r"HF_HUB_OFFLINE is set: unset it to download the dataset, or pass a local "
                                           r"path$"):
        q.check_dataset_source(q.DatasetSpec("d", "org/name"))
    with pytest.raises(q.UsageError, match="^model 'org/no-such-model' is not in the local Hugging Face cache"):
        q.check_hub_model("org/no-such-model")


def test_probe_runs_once_per_process(online):
    started = time.perf_counter()
    first = q.hub_unreachable(CLOSED_PORT)
    assert first == "Connection refused" and q.hub_unreachable(CLOSED_PORT) == first
    assert q.hub_unreachable.cache_info().hits == 1 and time.perf_counter() - started < 5


@pytest.mark.slow
def test_default_hub_unreachable_from_here(tiny_model, tmp_path):
    """The real hub, as this machine sees it: without a network the error comes in seconds, not ~25 s of retries."""
    q.hub_unreachable.cache_clear()
    if q.hub_unreachable(q.hub_endpoint()) is None:
        pytest.skip("the hub is reachable from this machine")
    started = time.perf_counter()
    result = run_cli("--input_model", str(tiny_model), "--output_model", str(tmp_path / "out"),
                     "--dataset_yaml", hub_yaml(tmp_path), env={"HF_HUB_OFFLINE": "", "HF_DATASETS_OFFLINE": ""})
    elapsed = time.perf_counter() - started
    assert_usage_error(result, "cannot reach the Hugging Face hub (https://huggingface.co: ",
                       "to fetch dataset 'no-such-org/no-such-dataset': check the network or proxy")
    assert elapsed < 15, elapsed
    nothing_written(tmp_path, "hub.yaml")


# --------------------------------------------------------------------------- 3. dataset path typos
def test_local_looking_path_typo_names_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the working directory is searched too: keep it free of `mydata`
    (tmp_path / "mix" / "mydata").mkdir(parents=True)
    write_jsonl(tmp_path / "mix" / "mydata" / "train.jsonl", [{"text": "a"}])
    yaml_path = write_yaml(tmp_path / "mix" / "m.yaml", "datasets:\n  - name: mine\n    path: mydata/train\n")
    with pytest.raises(q.UsageError) as caught:
        q.load_mix(yaml_path)
    assert str(caught.value) == (f"{yaml_path}: datasets[0] (mine): no file matches mydata/train "
                                 "(did you mean mydata/train.jsonl?)")


def test_path_typo_without_a_near_file(tmp_path):
    """A relative path: where it was looked for, the YAML's folder named in full; an absolute one: nothing more."""
    yaml_path = write_yaml(tmp_path / "m.yaml", "datasets:\n  - path: ./nowhere/data.jsonl\n")
    with pytest.raises(q.UsageError) as caught:
        q.load_mix(yaml_path)
    assert str(caught.value).endswith("datasets[0] (./nowhere/data.jsonl): no file matches ./nowhere/data.jsonl "
                                      f"(relative paths are resolved against the YAML's folder {tmp_path.resolve()}, "
                                      "then the working directory)")
    missing = tmp_path / "nowhere" / "data.jsonl"
    with pytest.raises(q.UsageError) as caught:
        q.load_mix(write_yaml(tmp_path / "m.yaml", f"datasets:\n  - path: {missing}\n"))
    assert str(caught.value).endswith(f"no file matches {missing}")


def test_hub_id_without_a_local_folder_stays_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    yaml_path = write_yaml(tmp_path / "m.yaml", "datasets:\n  - path: org/name\n")
    assert q.load_mix(yaml_path)[0][0].path == "org/name"
    (tmp_path / "org").mkdir()  # now `org/name` looks like a folder of ours that is missing
    with pytest.raises(q.UsageError, match="no file matches org/name"):
        q.load_mix(yaml_path)


def test_path_typo_from_the_cli(capsys, tiny_model, tmp_path):
    (tmp_path / "mydata").mkdir()
    write_jsonl(tmp_path / "mydata" / "train.jsonl", [{"text": "a"}])
    yaml_path = write_yaml(tmp_path / "m.yaml", "datasets:\n  - path: mydata/trian.jsonl\n")
    line = usage_error(capsys, q.main, ["--input_model", str(tiny_model), "--output_model", str(tmp_path / "out"),
                                        "--dataset_yaml", str(yaml_path)])
    assert line.endswith("no file matches mydata/trian.jsonl (did you mean mydata/train.jsonl?)")
    nothing_written(tmp_path, "mydata", "m.yaml")


# --------------------------------------------------------------------------- 4. a YAML path that is a folder
def test_yaml_path_is_a_directory(capsys, tiny_model, tmp_path):
    for name in ("a.yaml", "b.yaml", "c.yaml", "d.yaml"):
        write_yaml(tmp_path / name, "datasets: []\n")
    line = usage_error(capsys, q.main, ["--input_model", str(tiny_model), "--output_model", str(tmp_path / "out"),
                                        "--dataset_yaml", str(tmp_path)])
    assert line == (f"error: --dataset_yaml {tmp_path} is a directory; pass a YAML file such as {tmp_path / 'a.yaml'} "
                    f"or {tmp_path / 'b.yaml'} or {tmp_path / 'c.yaml'}")
    nothing_written(tmp_path, "a.yaml", "b.yaml", "c.yaml", "d.yaml")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(q.UsageError, match=f"is a directory with no .yaml file in it; pass a YAML file such as "
                                           f"{q.SAMPLES_YAML}"):
        q.load_mix(empty)


# --------------------------------------------------------------------------- 5. a missing tokenizer
def test_missing_tokenizer_names_the_folder_and_files(capsys, tiny_model, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens_map.json"))
    line = usage_error(capsys, q.main, ["--input_model", str(model), "--output_model", str(tmp_path / "out"),
                                        "--dataset_yaml", LOCAL_YAML])
    assert line == (f"error: no tokenizer in {model}: expected tokenizer.json (or tokenizer.model / vocab.json + "
                    "merges.txt) with tokenizer_config.json; copy them from the base model")
    nothing_written(tmp_path, "model")


# --------------------------------------------------------------------------- 6. --skip_layers typos
@pytest.fixture(scope="module")
def skeleton(tiny_model):
    from transformers import AutoConfig

    return q.empty_model(AutoConfig.from_pretrained(tiny_model), False)


@pytest.mark.parametrize("pattern, nearest", [
    ("layer.0.*", "model.layers.0.mlp, model.layers.0.self_attn, model.layers.0.input_layernorm"),
    ("down_porj", "model.layers.0.mlp.down_proj, model.layers.1.mlp.down_proj, model.layers.0.self_attn.o_proj"),
    ("model.layer.1.mlp", "model.layers.1.mlp, model.layers.0.mlp, model.layers.1"),
])
def test_skip_layers_typo_shows_the_nearest_modules(skeleton, pattern, nearest):
    with pytest.raises(q.UsageError) as caught:
        q.resolve_skip_layers(skeleton, [pattern])
    assert str(caught.value) == (f"--skip_layers '{pattern}' matches no module; nearest: {nearest} "
                                 "(module names look like model.layers.0.self_attn.q_proj)")


def test_skip_layers_nothing_near(capsys, tiny_model, tmp_path):
    line = usage_error(capsys, q.main, ["--input_model", str(tiny_model), "--output_model", str(tmp_path / "out"),
                                        "--dataset_yaml", LOCAL_YAML, "--skip_layers", "xyzzy"])
    assert line == ("error: --skip_layers 'xyzzy' matches no module "
                    "(module names look like model.layers.0.self_attn.q_proj)")
    nothing_written(tmp_path)
