"""Nothing of the user's is destroyed, no silently wrong checkpoint, every bad input one `error:` line.

Most cases fail before the model loads, so they run `main` in process (one `error:` line on stderr, exit 2) or
the CLI in a subprocess where the process boundary matters (locks, the working directory).
"""
import errno
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

import quantize_nvfp4 as q
import quantize_nvfp4_offload as offload
from conftest import ROOT, assert_usage_error, run_cli, write_jsonl, write_yaml

LOCAL_YAML = str(ROOT / "Datasets" / "Local_Example.yaml")
SMALL = ("--max_samples", "8", "--max_seq_len", "64")
OFFLOAD_SCRIPT = ROOT / "quantize_nvfp4_offload.py"


def main_error(capsys, argv, main=q.main) -> str:
    """Run a script's main in process; it must exit 2 with exactly one `error:` line, which is returned."""
    assert main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, lines
    return lines[0]


def args(model, out, *extra, yaml=LOCAL_YAML):
    return ["--input_model", str(model), "--output_model", str(out), "--dataset_yaml", str(yaml), *SMALL, *extra]


@pytest.fixture
def model_copy(tiny_model, tmp_path) -> Path:
    """A private copy of the tiny model, to damage or to write next to."""
    return Path(shutil.copytree(tiny_model, tmp_path / "models" / "tiny"))


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# ---------------------------------------------------------------- data loss: --overwrite and the output dir
@pytest.mark.parametrize("where", ["model", "model_parent", "inside_model"])
def test_output_overlapping_the_input_model_is_refused_even_with_overwrite(capsys, model_copy, where):
    out = {"model": model_copy, "model_parent": model_copy.parent, "inside_model": model_copy / "out"}[where]
    before = snapshot(model_copy.parent)
    for extra in ((), ("--overwrite",)):
        line = main_error(capsys, args(model_copy, out, *extra))
        assert "input model" in line and "refused" in line, line
    assert snapshot(model_copy.parent) == before


@pytest.mark.slow
def test_output_in_the_working_directory_is_refused(tiny_model, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    result = run_cli(*args(tiny_model, tmp_path, "--overwrite"), cwd=tmp_path)
    assert_usage_error(result, "working directory")
    assert_usage_error(run_cli(*args(tiny_model, ".", "--overwrite"), cwd=tmp_path), "working directory")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_overwrite_refuses_a_dir_this_tool_did_not_write(capsys, tiny_model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    line = main_error(capsys, args(tiny_model, out, "--overwrite"))
    assert "holds files this tool did not write" in line and "with or without --overwrite" in line
    assert (out / "thesis.tex").read_text() == "years of work"


def test_overwrite_allows_an_empty_dir_or_our_checkpoint(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    q.check_output_dir(out, overwrite=True)  # empty
    (out / "model.safetensors").write_text("x")
    (out / q.MANIFEST_NAME).write_text("{}")
    q.check_output_dir(out, overwrite=True)  # ours


# ---------------------------------------------------------------- the lock: two runs on one output
@pytest.mark.slow
def test_second_run_on_a_locked_output_refuses(tiny_model, tmp_path):
    out = tmp_path / "out"
    with q.exclusive_lock(out, "--output_model"):  # another run holds it
        assert (tmp_path / ".out.lock").exists()
        assert_usage_error(run_cli(*args(tiny_model, out)), "in use by another run")
    assert not out.exists() and list(tmp_path.iterdir()) == []  # lock released and removed


def test_lock_is_exclusive_in_process_and_removed_after(tmp_path):
    target = tmp_path / "out"
    with q.exclusive_lock(target, "--output_model"):
        with pytest.raises(q.UsageError, match="in use by another run"):
            with q.exclusive_lock(target, "--output_model"):
                pass
    with q.exclusive_lock(target, "--output_model"):  # free again
        pass
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- crash leftovers beside the output
def test_leftover_temp_dirs_of_a_killed_export_are_removed(capsys, tmp_path):
    out = tmp_path / "out"
    (tmp_path / ".out.tmp-ab12cd_9").mkdir()
    (tmp_path / ".out.tmp-ab12cd_9" / "model.safetensors").write_text("half")
    (tmp_path / ".out.tmp-mine").mkdir()            # not our pattern: kept
    (tmp_path / ".other.tmp-ab12cd34").mkdir()      # another output's: kept
    q.check_output_dir(out, overwrite=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-ab12cd34", ".out.tmp-mine"]
    assert "unfinished export of a run that was killed" in capsys.readouterr().err


@pytest.mark.slow
def test_old_checkpoint_moved_aside_by_a_killed_overwrite_is_restored(tiny_model, tmp_path):
    old = tmp_path / ".out.old-4242"
    old.mkdir()
    (old / q.MANIFEST_NAME).write_text("{}")
    (old / "model.safetensors").write_text("weights")
    result = run_cli(*args(tiny_model, tmp_path / "out"))  # restored first, then (rightly) not replaced
    assert_usage_error(result, "holds a checkpoint this tool wrote", "pass --overwrite")
    assert "restored" in result.stderr and ".out.old-4242" in result.stderr
    assert (tmp_path / "out" / "model.safetensors").read_text() == "weights" and not old.exists()


def test_old_dir_without_manifest_is_not_restored_and_superseded_ones_go(tmp_path):
    out = tmp_path / "out"
    stranger = tmp_path / ".out.old-77"
    stranger.mkdir()
    (stranger / "data").write_text("x")
    q.check_output_dir(out, overwrite=False)
    assert stranger.exists() and not out.exists()  # no manifest: never restored
    out.mkdir()
    (out / "user.txt").write_text("not a checkpoint")
    with pytest.raises(q.UsageError, match="holds files this tool did not write"):
        q.check_output_dir(out, overwrite=False)
    assert stranger.exists()  # the output is not ours: nothing beside it is touched
    (out / "user.txt").unlink()
    (out / q.MANIFEST_NAME).write_text("{}")
    q.check_output_dir(out, overwrite=True)  # a finished checkpoint replaced it: the old copy is superseded
    assert not stranger.exists() and (out / q.MANIFEST_NAME).exists()


def test_old_checkpoint_comes_back_into_an_empty_output_dir(tmp_path):
    out, old = tmp_path / "out", tmp_path / ".out.old-5"
    old.mkdir()
    (old / q.MANIFEST_NAME).write_text("{}")
    out.mkdir()  # the user made the missing dir again before rerunning
    q.check_output_dir(out, overwrite=True)
    assert (out / q.MANIFEST_NAME).exists() and not old.exists()


# ---------------------------------------------------------------- --eval / --max_ppl_increase
def test_quality_gate_without_held_out_samples_is_an_error(capsys, tiny_model, tmp_path):
    line = main_error(capsys, args(tiny_model, tmp_path / "out", "--max_ppl_increase", "5", "--oversample_ratio", "1"))
    assert "no held-out samples possible" in line


def test_eval_with_a_mix_too_short_for_held_out_samples_is_an_error(capsys, tiny_model, tmp_path):
    write_jsonl(tmp_path / "few.jsonl", [{"text": f"sample number {i} " * 10} for i in range(4)])
    yaml = write_yaml(tmp_path / "few.yaml", "datasets:\n  - name: few\n    path: few.jsonl\n")
    line = main_error(capsys, args(tiny_model, tmp_path / "out", "--eval", yaml=yaml))
    assert "no held-out samples left" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_bad_ppl_threshold(capsys, tiny_model, tmp_path, value):
    assert "--max_ppl_increase must be a finite number >= 0" in main_error(
        capsys, args(tiny_model, tmp_path / "out", f"--max_ppl_increase={value}"))


# ---------------------------------------------------------------- numbers
@pytest.mark.parametrize("extra, fragment", [
    (("--oversample_ratio", "nan"), "oversample_ratio must be >= 1 and finite"),
    (("--oversample_ratio", "inf"), "oversample_ratio must be >= 1 and finite"),
    (("--seed=-1",), "seed must be >= 0"),
    (("--eval_samples=-5",), "--eval_samples must be >= 1"),
    (("--eval_samples", "0"), "--eval_samples must be >= 1"),
    (("--gpu_memory_budget", "nan"), "--gpu_memory_budget must be a finite number > 0"),
    (("--gpu_memory_budget", "inf"), "--gpu_memory_budget must be a finite number > 0"),
])
def test_bad_numbers_on_the_command_line(capsys, tiny_model, tmp_path, extra, fragment):
    assert fragment in main_error(capsys, args(tiny_model, tmp_path / "out", *extra))


@pytest.mark.parametrize("text, fragment", [
    ("datasets:\n  - {name: a, path: x.jsonl}\ncalibration:\n  oversample_ratio: .nan\n", "expected a finite number"),
    ("datasets:\n  - {name: a, path: x.jsonl, weight: .inf}\n", "expected a finite number"),
    ("datasets:\n  - {name: a, path: x.jsonl, weight: .nan}\n", "expected a finite number"),
])
def test_yaml_nan_and_inf(capsys, tiny_model, tmp_path, text, fragment):
    write_jsonl(tmp_path / "x.jsonl", [{"text": "hello there"}])
    yaml = write_yaml(tmp_path / "m.yaml", text)
    assert fragment in main_error(capsys, args(tiny_model, tmp_path / "out", yaml=yaml))


# ---------------------------------------------------------------- files
def test_yaml_that_is_not_utf8(capsys, tiny_model, tmp_path):
    yaml = tmp_path / "latin1.yaml"
    yaml.write_bytes("datasets:\n  - {name: caf\u00e9, path: x.jsonl}\n".encode("latin-1"))
    assert "not UTF-8" in main_error(capsys, args(tiny_model, tmp_path / "out", yaml=yaml))


def test_dotenv_that_is_not_utf8(capsys, tiny_model, tmp_path, monkeypatch):
    (tmp_path / ".env").write_bytes("HF_TOKEN=caf\u00e9\n".encode("latin-1"))
    monkeypatch.chdir(tmp_path)
    line = main_error(capsys, args(tiny_model, tmp_path / "out"))
    assert ".env: not UTF-8" in line


def bad_data(tmp_path: Path, case: str) -> tuple[str, str]:
    """(path for the YAML, extra YAML keys) of one broken data source."""
    if case == "empty_jsonl":
        (tmp_path / "d.jsonl").write_text("")
    elif case == "binary":
        (tmp_path / "d.jsonl").write_bytes(bytes(range(256)) * 4)
    elif case == "latin1_txt":
        (tmp_path / "d.txt").write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
        return "d.txt", ""
    elif case == "ragged_csv":
        (tmp_path / "d.csv").write_text("text,label\nhello there,1\nbad,row,extra\n")
        return "d.csv", ""
    elif case == "clashing_schemas":
        (tmp_path / "d").mkdir()
        write_jsonl(tmp_path / "d" / "a.jsonl", [{"text": "a fine sentence"}])
        write_jsonl(tmp_path / "d" / "b.jsonl", [{"text": 5, "extra": [1]}])
        return "d", ""
    elif case == "column_list":
        write_jsonl(tmp_path / "d.jsonl", [{"a": "x", "b": "y"}])
        return "d.jsonl", "    columns: {text: [1, 2]}\n"
    elif case == "empty_path":
        return "''", ""
    return "d.jsonl", ""


@pytest.mark.parametrize("case, fragment", [
    ("empty_jsonl", "the file is empty"),
    ("binary", "not UTF-8"),
    ("latin1_txt", "not UTF-8"),
    ("ragged_csv", "cannot be loaded"),
    ("clashing_schemas", "cannot be loaded"),
    ("column_list", "'columns.text' must be a column name"),
    ("empty_path", "'path' is empty"),
])
def test_bad_data_files(capsys, tiny_model, tmp_path, case, fragment):
    path, extra = bad_data(tmp_path, case)
    yaml = write_yaml(tmp_path / "m.yaml", f"datasets:\n  - name: d\n    path: {path}\n{extra}")
    line = main_error(capsys, args(tiny_model, tmp_path / "out", yaml=yaml))
    assert fragment in line, line
    assert not (tmp_path / "out").exists()


def test_unreadable_data_file(tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello"}])
    real_open = Path.open

    def denied(self, *a, **k):  # root reads any file whatever its mode: simulate the permission error
        if self == data:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_open(self, *a, **k)

    monkeypatch.setattr(Path, "open", denied)
    with pytest.raises(q.UsageError, match="cannot be read: Permission denied"):
        q.check_data_file(data, q.DatasetSpec("d", str(data)))


def test_streaming_parse_errors_are_one_line(tmp_path):
    (tmp_path / "d.csv").write_text("text,label\nhello there,1\nbad,row,extra\n")
    spec = q.DatasetSpec("d", str(tmp_path / "d.csv"), streaming=True)
    with pytest.raises(q.UsageError, match="dataset 'd'.*cannot be loaded: .*Expected 2 fields"):
        q.collect_texts(spec, q.open_dataset(spec, None), 4, 0)


# ---------------------------------------------------------------- models
def damage(model: Path, case: str) -> None:
    shard = model / "model.safetensors"
    if case == "corrupt_header":
        data = bytearray(shard.read_bytes())
        data[8:40] = b"\x00garbage, not a json header\x00\x01\x02"
        shard.write_bytes(bytes(data))
    elif case == "truncated":
        shard.write_bytes(shard.read_bytes()[:-1000])
    elif case == "missing_shard":
        (model / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {"model.norm.weight": "model.safetensors",
                                            "lm_head.weight": "model-00002-of-00002.safetensors"}}))
    elif case == "no_weights":
        shard.unlink()


@pytest.mark.parametrize("case, fragment", [
    ("corrupt_header", "corrupt safetensors header"),
    ("truncated", "truncated"),
    ("missing_shard", "model-00002-of-00002.safetensors: listed in model.safetensors.index.json but missing"),
    ("no_weights", "no weight files"),
])
def test_broken_source_model_is_refused_before_loading(capsys, model_copy, tmp_path, case, fragment):
    damage(model_copy, case)
    line = main_error(capsys, args(model_copy, tmp_path / "out"))
    assert "source model" in line and fragment in line, line


@pytest.mark.parametrize("case", ["corrupt_header", "truncated", "missing_shard", "no_weights"])
def test_verify_reports_broken_files_as_fail_lines(capsys, model_copy, case):
    damage(model_copy, case)
    assert q.main(["--verify", str(model_copy)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("FAIL ") and "[files: whole]" in out and "1 problem(s)" in out


def test_tokenizer_larger_than_the_embeddings(capsys, tiny_model, tmp_path):
    model = tmp_path / "small-vocab"
    shutil.copytree(tiny_model, model)
    q.build_tiny_model(model, vocab_size=100)
    assert "does not belong to this model" in main_error(capsys, args(model, tmp_path / "out"))


@pytest.mark.parametrize("patterns", [["*"], ["layers.*", "lm_head"]])
def test_skip_layers_leaving_nothing_to_quantize(capsys, tiny_model, tmp_path, patterns):
    line = main_error(capsys, args(tiny_model, tmp_path / "out", "--skip_layers", *patterns))
    assert "leaves no linear layer to quantize" in line


@pytest.mark.parametrize("template, fragment", [
    ("{{ 1 / 0 }}", "ZeroDivisionError"),
    ("{{ messages + 1 }}", "TypeError"),
    ("{% for m in messages %}{{ m['content'] }", "TemplateSyntaxError"),
])
def test_broken_chat_templates_are_skipped_counted_and_reported_once(capsys, tiny_model, template, fragment):
    import datasets
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.chat_template = template
    rows = [{"messages": [{"role": "user", "content": f"hi {i}"}]} for i in range(5)] + [{"text": "plain"}]
    spec = q.DatasetSpec("chats", "x", formatter="chat_completion")
    texts, skipped = q.collect_texts(spec, datasets.Dataset.from_list(rows), 10, 0, tokenizer)
    assert texts == [] and skipped == 6
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "failed on 5 conversation(s)" in warnings[0] and fragment in warnings[0]


# ---------------------------------------------------------------- offload script
@pytest.mark.parametrize("where, fragment", [
    ("output", "is the output dir"),
    ("inside_output", "lies inside the output dir"),
    ("output_inside", "contains the output dir"),
    ("model", "is the input model"),
    ("inside_model", "lies inside the input model"),
])
def test_offload_folder_overlapping_output_or_model(capsys, model_copy, tmp_path, where, fragment):
    out = tmp_path / "out"
    folder = {"output": out, "inside_output": out / "off", "output_inside": tmp_path, "model": model_copy,
              "inside_model": model_copy / "off"}[where]
    out.mkdir()
    before = snapshot(model_copy)
    line = main_error(capsys, args(model_copy, out, "--offload_folder", str(folder)), main=offload.main)
    assert fragment in line, line
    assert snapshot(model_copy) == before


@pytest.mark.slow
def test_offload_folder_shared_by_two_runs(tiny_model, tmp_path):
    folder = tmp_path / "offload"
    with q.exclusive_lock(folder, "--offload_folder"):
        result = run_cli(*args(tiny_model, tmp_path / "out", "--offload_folder", str(folder)), script=OFFLOAD_SCRIPT)
    assert_usage_error(result, "--offload_folder", "in use by another run")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for runs without a GPU")
def test_cpu_memory_too_small_for_the_embeddings(capsys, tiny_model, tmp_path):
    line = main_error(capsys, args(tiny_model, tmp_path / "out", "--offload_folder", str(tmp_path / "off"),
                                   "--max_cpu_memory", "1000", "--max_gpu_memory", "1000"), main=offload.main)
    assert "raise --max_cpu_memory to at least" in line and "model.embed_tokens" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_disk_full_during_export_is_one_error_and_leaves_nothing(tiny_model, tmp_path, monkeypatch):
    import modelopt.torch.export as export

    def full_disk(model, export_dir):  # what export_hf_checkpoint raised on a full 480 KiB tmpfs
        from safetensors import SafetensorError

        (Path(export_dir) / "model.safetensors").write_bytes(b"half")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(export, "export_hf_checkpoint", full_disk)
    settings = q.build_settings(q.build_parser().parse_args(args(tiny_model, tmp_path / "out")), {})
    with pytest.raises(q.UsageError, match=r"disk full writing the checkpoint to .* needed"):
        q.run(settings)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("code, headline, remedy", [
    (errno.EFBIG, "file too large", "raise `ulimit -f`"),
    (errno.EDQUOT, "disk quota exceeded", "within your quota"),
    (errno.EROFS, "read-only file system", "remount it writable"),
])
def test_other_write_errors_are_one_line_too(tmp_path, code, headline, remedy):
    """A FAT32 drive or `ulimit -f` (EFBIG), a quota (EDQUOT): as the writer raises it, or wrapped by the resume
    writer's thread, or in safetensors' words."""
    from safetensors import SafetensorError

    failures = [OSError(code, os.strerror(code)),
                SafetensorError(f"Error while serializing: I/O error: {os.strerror(code)} (os error {code})")]
    try:
        raise RuntimeError("writing a resume point failed") from OSError(code, os.strerror(code))
    except RuntimeError as wrapped:
        failures.append(wrapped)
    for failure in failures:
        with pytest.raises(q.UsageError, match=rf"^{headline} writing resume points to .*; .*{re.escape(remedy)}"):
            with q.write_errors_are_usage_errors(tmp_path, 2**30, "resume points"):
                raise failure


@pytest.mark.slow
def test_a_file_size_limit_during_export_is_one_error_and_leaves_nothing(tiny_model, tmp_path):
    """A real `ulimit -f` below the checkpoint's size: safetensors fails with EFBIG (Python ignores SIGXFSZ)."""
    import resource
    import subprocess
    import sys

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    result = subprocess.run([sys.executable, str(ROOT / "quantize_nvfp4.py"), *args(tiny_model, tmp_path / "out")],
                            capture_output=True, text=True, preexec_fn=limit_file_size, timeout=600)
    assert_usage_error(result, "file too large writing the checkpoint", "raise `ulimit -f`")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_commit_leaves_no_temp_file(tmp_path):
    def half_then_fail(handle):
        handle.write(b"half")
        raise OSError(errno.EFBIG, "File too large")

    with pytest.raises(OSError):
        offload.commit_file(tmp_path / "next_inputs.bin", half_then_fail)
    assert list(tmp_path.iterdir()) == []


def test_disk_full_as_each_writer_reports_it(tmp_path, monkeypatch):
    from collections import namedtuple

    from safetensors import SafetensorError

    full = [OSError(errno.ENOSPC, "No space left on device"),  # json, accelerate's numpy memmaps
            SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")]
    for exc in full:
        with pytest.raises(q.UsageError, match="disk full writing offloaded weights to .* about 1.00 GiB needed"):
            with q.write_errors_are_usage_errors(tmp_path, 2**30, "offloaded weights"):
                raise exc
    torch_save = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    with pytest.raises(RuntimeError, match="unexpected pos"):  # a disk with room: not a full disk
        with q.write_errors_are_usage_errors(tmp_path, 2**30, "offloaded weights"):
            raise torch_save
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(q.shutil, "disk_usage", lambda folder: usage(2**30, 2**30, 0))
    with pytest.raises(q.UsageError, match="disk full"):  # torch.save says nothing more on a full disk
        with q.write_errors_are_usage_errors(tmp_path, 2**30, "offloaded weights"):
            raise torch_save
    with pytest.raises(PermissionError):
        with q.write_errors_are_usage_errors(tmp_path, 2**30, "offloaded weights"):
            raise PermissionError(errno.EACCES, "denied")


# ---------------------------------------------------------------- tokenizer, processor, generation files verbatim
class NoGeneration:
    generation_config = None


def fake_source(folder: Path) -> dict:
    folder.mkdir(parents=True)
    contents = {name: f"source bytes of {name}\n\u00e9".encode() for name in q.SOURCE_FILES}
    for name, data in contents.items():
        (folder / name).write_bytes(data)
    return contents


def test_source_files_are_copied_verbatim_over_the_export(tmp_path):
    contents = fake_source(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "generation_config.json").write_text("{}")  # what the export wrote
    settings = q.Settings(**{**SETTINGS_DEFAULTS, "input_model": str(tmp_path / "src")})
    q.write_tokenizer_and_extras(NoGeneration(), None, out, settings)
    assert {name: (out / name).read_bytes() for name in q.SOURCE_FILES} == contents


def test_source_files_of_a_hub_model_come_from_the_hub_cache(tmp_path, monkeypatch):
    import huggingface_hub

    contents = fake_source(tmp_path / "snapshot")
    calls = []

    def snapshot_download(repo_id, allow_patterns, token):
        calls.append((repo_id, sorted(allow_patterns), token))
        return str(tmp_path / "snapshot")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    out = tmp_path / "out"
    out.mkdir()
    settings = q.Settings(**{**SETTINGS_DEFAULTS, "input_model": "org/model", "hf_token": "hf_x"})
    q.write_tokenizer_and_extras(NoGeneration(), None, out, settings)
    assert calls == [("org/model", sorted(q.SOURCE_FILES), "hf_x")]
    assert {name: (out / name).read_bytes() for name in q.SOURCE_FILES} == contents


SETTINGS_DEFAULTS = dict(
    input_model="", output_model=None, dataset_yaml=Path(LOCAL_YAML), datasets=[], max_samples=8, max_seq_len=64,
    oversample_ratio=1.5, seed=0, min_token_length=1, batch_size=None, gpu_memory_budget=None, dtype="auto",
    trust_remote_code=False, mode="nvfp4", skip_layers=[], overwrite=False, dry_run=False)


def test_exported_tokenizer_files_equal_the_source(tiny_model, tmp_path):
    out = tmp_path / "out"
    assert q.main(args(tiny_model, out)) == 0
    copied = [name for name in q.SOURCE_FILES if (tiny_model / name).is_file()]
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= set(copied)
    for name in copied:
        assert (out / name).read_bytes() == (tiny_model / name).read_bytes(), name
    assert json.loads((out / "tokenizer.json").read_text())["truncation"] is None  # no max_seq_len leaked
    assert os.stat(out / "tokenizer.json").st_mode & 0o777 == 0o644
