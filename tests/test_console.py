"""The console: one stage line per phase, other libraries quiet unless --verbose, progress without carriage
returns off a terminal, and error lines that start their own line."""
import io
import os
import re
import subprocess
import sys

import pytest

import quantize_nvfp4 as q
import quantize_nvfp4_offload as qo
from conftest import ROOT

NOISE = ("Inserted", "Registered <class", "Generating train split", "deprecated", "\r")
MAIN_STAGES = (q.STAGE_CHECKS, q.STAGE_DATA, q.STAGE_LOAD, q.STAGE_CALIBRATION, q.STAGE_SEARCH, q.STAGE_EXPORT,
               q.STAGE_VALIDATION)
OFFLOAD_STAGES = (q.STAGE_CHECKS, q.STAGE_DATA, qo.STAGE_PLACEMENT, q.STAGE_LOAD, qo.STAGE_LAYER_CALIBRATION,
                  q.STAGE_EXPORT, q.STAGE_VALIDATION)


def self_test(script: str, *extra: str) -> subprocess.CompletedProcess:
    """The script's self-test with stdout and stderr on pipes, and no switch of ours or the user's that quiets
    the libraries beforehand (the script must do it)."""
    quieting = set(q.QUIET_ENVIRONMENT) | {"TQDM_DISABLE"}
    env = {k: v for k, v in os.environ.items() if k not in quieting} | {"HF_HUB_OFFLINE": "1",
                                                                         "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(ROOT / script), "--self_test", *extra], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def stages(text: str) -> list[str]:
    return [m["name"] for m in re.finditer(r"^\[\s*\d+\.\d s\] (?P<name>.+)$", text, re.MULTILINE)]


@pytest.mark.slow
@pytest.mark.parametrize("script, expected", [("quantize_nvfp4.py", MAIN_STAGES),
                                              ("quantize_nvfp4_offload.py", OFFLOAD_STAGES)])
def test_self_test_console_shows_stages_and_nothing_else(script, expected):
    result = self_test(script)
    for noise in NOISE:
        assert noise not in result.stdout + result.stderr, noise
    assert stages(result.stderr) == list(expected), result.stderr
    assert "summary" in result.stderr


@pytest.mark.slow
def test_verbose_lets_modelopt_print():
    result = self_test("quantize_nvfp4.py", "--verbose")
    assert "Inserted" in result.stdout
    assert q.STAGE_CALIBRATION in stages(result.stderr)


@pytest.fixture
def clock(monkeypatch):
    """time.monotonic, moved by hand."""
    now = [1000.0]
    monkeypatch.setattr(q.time, "monotonic", lambda: now[0])
    return now


def test_progress_off_a_terminal_is_rate_limited_plain_lines(capsys, clock):
    bar = q.Progress(total=512, desc="calibrate", unit="sample")
    for _ in range(1, 513):
        clock[0] += 0.1  # 51.2 s in all: a line at 10, 20, 30, 40 and 50 s
        bar.update(1)
    bar.close()
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert len(lines) == 6, err  # and a last one at the final count
    assert re.fullmatch(r"calibrate: 100/512 samples \(20%\), 10\.0 s", lines[0]), lines[0]
    assert re.fullmatch(r"calibrate: 512/512 samples \(100%\), 51\.2 s", lines[-1]), lines[-1]


def test_progress_off_a_terminal_says_nothing_for_a_short_loop(capsys, clock):
    for _ in q.Progress(range(50), desc="fidelity", unit="linear"):
        clock[0] += 0.1
    assert capsys.readouterr().err == ""


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def use_terminal(monkeypatch) -> Terminal:
    """stderr as a terminal (in the test's call: pytest puts its own stderr back after the fixtures), and a
    console of its own (main() sets the shared one up)."""
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setattr(q, "CONSOLE", q.Console())
    return terminal


def test_an_error_while_a_bar_is_open_starts_its_own_line(monkeypatch):
    terminal = use_terminal(monkeypatch)

    def run(settings):
        bar = q.Progress(total=10, desc="calibrate", unit="token")
        bar.update(3)
        raise q.UsageError("out of something")

    monkeypatch.setattr(q, "build_settings", lambda args, env: None)
    monkeypatch.setattr(q, "init_distributed", lambda: None)
    monkeypatch.setattr(q, "run", run)
    monkeypatch.setattr(q, "quiet_libraries", lambda: None)
    assert q.main(["--input_model", "m", "--output_model", "out"]) == q.EXIT_USAGE
    text = terminal.getvalue()
    assert "calibrate" in text  # the bar was drawn
    before, after = text.split("error: out of something", 1)
    assert before.endswith(("\r", "\n")), repr(before[-80:])
    assert after == "\n" and not q.CONSOLE.bars


def test_the_quality_gate_error_starts_its_own_line(monkeypatch):
    terminal = use_terminal(monkeypatch)
    bar = q.Progress(total=10, desc="evaluate", unit="sample")
    bar.update(1)
    assert q.quality_gate({"perplexity_increase_pct": 9.0}, 5.0) == 1
    before, _ = terminal.getvalue().split("error: perplexity rose 9.0%", 1)
    assert before.endswith(("\r", "\n")), repr(before[-80:])


def test_stage_line_format(capsys, monkeypatch):
    monkeypatch.setattr(q.CONSOLE, "started", q.time.perf_counter() - 12.34)
    q.stage(q.STAGE_EXPORT)
    assert re.fullmatch(r"\[   12\.\d s\] export\n", capsys.readouterr().err)


@pytest.mark.parametrize("script", [q, qo])
def test_ctrl_c_is_one_line_and_exit_130(script, monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(script, "run_self_test", interrupted)
    assert script.main(["--self_test"]) == q.EXIT_INTERRUPTED == 130
    err = capsys.readouterr().err
    assert err.startswith("error: interrupted: the output dir was not written") and err.count("\n") == 1, err


def test_verify_of_a_missing_folder_says_so(tmp_path, capsys):
    assert q.main(["--verify", str(tmp_path / "nothere")]) == q.EXIT_USAGE
    assert capsys.readouterr().err.strip() == f"error: --verify: {tmp_path / 'nothere'} does not exist"


def test_summary_splits_the_calibration_time_where_a_search_ran():
    """The search's seconds are the phase table's, so that the summary and the table below it agree."""
    plain = {"seconds": 5.0, "forward_seconds": 4.5}
    searched = {**plain, "scale_search": {"linears": 7, "seconds": 0.4}}
    phases = {q.STAGE_CALIBRATION: 4.1, q.PHASE_HESSIANS: 0.4, q.STAGE_SEARCH: 0.5}
    assert q.calibration_time_cell(plain, phases) == "5.0 s"
    assert q.calibration_time_cell(searched, phases) == "5.0 s, of which scale search 0.5 s"


def test_progress_lines_name_their_unit_in_the_plural(monkeypatch, capsys):
    monkeypatch.setattr(q, "PROGRESS_INTERVAL_S", 0)
    for _ in q.Progress(range(2), desc="evaluate", unit="batch"):
        pass
    assert "evaluate: 1/2 batches (50%)" in capsys.readouterr().err


def test_offload_script_refuses_the_main_scripts_batch_budget(tmp_path, capsys):
    argv = ["--input_model", "m", "--output_model", str(tmp_path / "o"), "--dataset_yaml", "y.yaml",
            "--offload_folder", str(tmp_path / "f"), "--gpu_memory_budget", "10"]
    assert qo.main(argv) == q.EXIT_USAGE
    assert "this script's GPU cap is --max_gpu_memory" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "f").exists()


def test_unused_plugin_packages_read_as_absent(monkeypatch):
    """A skipped package fails to import and find_spec answers None (transformers' availability check); one
    imported already is kept. `wave` stands for an installed package (the standard library's, which no test
    imports)."""
    import importlib.util
    import types

    imported = types.ModuleType("imported_plugin_package")
    monkeypatch.setattr(q, "UNUSED_PLUGIN_PACKAGES", (imported.__name__, "wave"))
    monkeypatch.setitem(sys.modules, imported.__name__, imported)
    assert "wave" not in sys.modules and importlib.util.find_spec("wave") is not None
    try:
        q.skip_unused_plugins()
        assert sys.modules[imported.__name__] is imported
        assert importlib.util.find_spec("wave") is None
        with pytest.raises(ImportError):
            import wave  # noqa: F401
    finally:
        sys.modules.pop("wave", None)


@pytest.mark.slow
def test_modelopt_keeps_the_plugins_a_run_uses():
    """With the unused plugins skipped, ModelOpt still loads its Hugging Face quantization plugins: fails if a
    package a run needs (transformers, accelerate) is ever added to UNUSED_PLUGIN_PACKAGES."""
    code = ("import sys, quantize_nvfp4 as q; q.skip_unused_plugins(); import modelopt.torch.quantization; "
            "print(sorted(m for m in sys.modules if m.startswith('modelopt.torch.quantization.plugins.')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            check=True)
    for plugin in ("huggingface", "transformers", "accelerate"):
        assert f"'modelopt.torch.quantization.plugins.{plugin}'" in result.stdout


def test_a_model_with_its_own_code_keeps_every_plugin_package(monkeypatch):
    """--trust_remote_code: the model's own code may import one of the packages, so none is marked absent."""
    calls = []
    monkeypatch.setattr(q, "skip_unused_plugins", lambda: calls.append(1))
    q.import_libraries(dry_settings(trust_remote_code=True))
    assert calls == []
    q.import_libraries(dry_settings(trust_remote_code=False))
    assert calls == [1]


def dry_settings(**changes):
    """What import_libraries reads of a dry run's Settings."""
    import types

    return types.SimpleNamespace(dry_run=True, **changes)
