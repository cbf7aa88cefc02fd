"""--dry_run makes every check the real run makes before the weights load, says what it checked, writes nothing.

Each refusal is run twice in process, dry and real: both must exit 2 with the same `error:` line.
"""
from pathlib import Path

import pytest
import torch

import quantize_nvfp4 as q
import quantize_nvfp4_offload as offload
from conftest import ROOT

LOCAL_YAML = str(ROOT / "Datasets" / "Local_Example.yaml")
SMALL = ("--max_samples", "8", "--max_seq_len", "64")


def args(model, out, *extra):
    return ["--input_model", str(model), "--output_model", str(out), "--dataset_yaml", LOCAL_YAML, *SMALL, *extra]


def error_line(capsys, argv, main=q.main) -> str:
    assert main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, lines
    return lines[0]


def assert_dry_run_refuses_as_the_real_run(capsys, argv, fragment, main=q.main) -> None:
    dry, real = error_line(capsys, [*argv, "--dry_run"], main), error_line(capsys, argv, main)
    assert dry == real and fragment in dry, (dry, real)


def listing(folder: Path) -> list:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_output_that_is_the_input_model(capsys, tiny_model):
    assert_dry_run_refuses_as_the_real_run(capsys, args(tiny_model, tiny_model), "is the input model")


def test_a_peft_adapter_folder_is_refused_with_how_to_merge_it(capsys, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"base_model_name_or_path": "base", "peft_type": "LORA"}')
    for main in (q.main, offload.main):
        argv = args(adapter, tmp_path / "out", *(("--offload_folder", str(tmp_path / "off")) if main is offload.main
                                                  else ()))
        assert_dry_run_refuses_as_the_real_run(capsys, argv, "is a PEFT adapter", main)
    assert q.main(["--verify", str(adapter)]) == q.EXIT_USAGE
    assert "is a PEFT adapter" in capsys.readouterr().err
    assert listing(tmp_path) == ["adapter", "adapter/adapter_config.json"]


def test_output_dir_holding_the_users_files(capsys, tiny_model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for extra in ((), ("--overwrite",)):  # --overwrite is not offered where it would not work
        assert_dry_run_refuses_as_the_real_run(capsys, args(tiny_model, out, *extra), "did not write")
    assert listing(tmp_path) == ["out", "out/notes.txt"]


def test_output_dir_holding_our_checkpoint_suggests_overwrite(capsys, tiny_model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / q.MANIFEST_NAME).write_text("{}")
    assert_dry_run_refuses_as_the_real_run(capsys, args(tiny_model, out), "pass --overwrite")
    assert q.main(args(tiny_model, out, "--overwrite", "--dry_run")) == 0
    assert listing(tmp_path) == ["out", f"out/{q.MANIFEST_NAME}"]


def test_output_locked_by_another_run(capsys, tiny_model, tmp_path):
    out = tmp_path / "out"
    with q.exclusive_lock(out, "--output_model"):
        line = error_line(capsys, [*args(tiny_model, out), "--dry_run"])
        assert "in use by another run" in line
        assert line == error_line(capsys, args(tiny_model, out))
    assert listing(tmp_path) == []


def test_offload_folder_locked_by_another_run(capsys, tiny_model, tmp_path):
    folder = tmp_path / "offload"
    argv = [*args(tiny_model, tmp_path / "out"), "--offload_folder", str(folder)]
    with q.exclusive_lock(folder, "--offload_folder"):
        assert_dry_run_refuses_as_the_real_run(capsys, argv, "in use by another run", offload.main)


def test_free_disk_is_checked(capsys, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(q.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 1000})())
    assert_dry_run_refuses_as_the_real_run(capsys, args(tiny_model, tmp_path / "out"), "not enough free disk")


def test_skip_layers_and_algorithm_are_checked(capsys, tiny_model, tmp_path):
    out = tmp_path / "out"
    assert_dry_run_refuses_as_the_real_run(capsys, args(tiny_model, out, "--skip_layers", "nothing.like.this"),
                                           "--skip_layers")
    if not torch.cuda.is_available():
        assert_dry_run_refuses_as_the_real_run(capsys, args(tiny_model, out, "--algorithm", "mse"), "CUDA")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU run's placement rule")
def test_offload_cpu_cap_too_small_for_the_model(capsys, tiny_model, tmp_path):
    argv = [*args(tiny_model, tmp_path / "out"), "--offload_folder", str(tmp_path / "offload"),
            "--max_cpu_memory", "100KB"]  # the embeddings alone are 128 KiB
    assert_dry_run_refuses_as_the_real_run(capsys, argv, "--max_cpu_memory", offload.main)
    assert listing(tmp_path) == []


def test_dry_run_says_what_it_checked_and_writes_nothing(capsys, tiny_model, tmp_path):
    assert q.main([*args(tiny_model, tmp_path / "out"), "--dry_run"]) == 0
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("dry run passed: checked ") and "output dir and its lock" in last
    assert "free disk" in last and "nothing written" in last
    assert listing(tmp_path) == []


def test_dry_run_names_mixed_precision_and_the_self_test_dry_run_writes_nothing(capsys, tiny_model, tmp_path):
    assert q.main([*args(tiny_model, tmp_path / "out"), "--effective_bits", "5", "--dry_run"]) == 0
    assert "--effective_bits 5.0 (each linear group NVFP4, FP8 or 16-bit" in capsys.readouterr().err
    assert q.main(["--self_test", "--dry_run", "--output_model", str(tmp_path / "st")]) == 0
    assert "dry run passed" in capsys.readouterr().err and listing(tmp_path) == []


def test_offload_dry_run_prints_the_placement_and_writes_nothing(capsys, tiny_model, tmp_path):
    argv = [*args(tiny_model, tmp_path / "out"), "--offload_folder", str(tmp_path / "offload"),
            "--max_cpu_memory", "600000", "--dry_run"]
    assert offload.main(argv) == 0
    err = capsys.readouterr().err
    assert "offload plan (weights):" in err and "disk" in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("dry run passed: checked ") and "placement" in last and "offload folder" in last
    assert listing(tmp_path) == []


def test_offload_dry_run_leaves_a_finished_runs_resume_points(capsys, tiny_model, tmp_path):
    """The real run clears resume points that hold no unfinished layer; a dry run only reads them."""
    folder = tmp_path / "offload"
    (folder / offload.LAYERWISE_DIR).mkdir(parents=True)
    (folder / offload.JOB_FILE).write_text("{}")
    argv = [*args(tiny_model, tmp_path / "out"), "--offload_folder", str(folder), "--max_cpu_memory", "600000"]
    assert offload.main([*argv, "--dry_run"]) == 0
    assert (folder / offload.LAYERWISE_DIR).is_dir()
