"""benchmarks/bench_cli.py --tiny: every run as a user runs it, in fresh processes, and the rendered section."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_bench_cli_runs_tiny_end_to_end_and_renders_its_table(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_cli.py"), "--tiny", "--work",
                             str(tmp_path / "work"), "--json", str(out)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    runs = report["runs"]
    assert list(runs) == ["default", "max", "plain", "offload", "forward"]
    assert all(run["returncode"] == 0 and run["wall_s"] > 0 and run["calibration_s"] > 0 for run in runs.values())
    assert runs["default"]["hessian_s"] is not None and runs["max"]["hessian_s"] is None
    assert runs["plain"]["padded_tokens"] >= runs["default"]["tokens"]
    assert set(report["targets"]) == {"default calibration / max calibration", "plain wall / default wall",
                                      "offload wall / default wall"}
    import bench_cli

    section = bench_cli.render(report, "results.json")
    assert section.startswith(bench_cli.SECTION) and "| start-up and imports |" in section
    assert report["workload"]["warm_up_forward_s"] > 0 and "then the bf16 forward of the batches" in section
    assert ("which leaves" in section or "more than that by" in section) \
        and f"{runs['forward']['calibration_s']} s." in section  # what the 1.6x target leaves
    assert section.count("\n| ") >= 2 + 5 + 2 + len(runs["default"]["phases_s"]) + 1  # + export_hf_checkpoint's row
    assert "of which ModelOpt's `export_hf_checkpoint`" in section and "timed inside its script" in section
    assert runs["default"]["export_shards_s"] >= 0 and "| of which writing the safetensors shards |" in section
    assert list(report["imports"]["by_package_s"]) == ["quantize_nvfp4", "torch", "transformers", "modelopt"]
    assert report["imports"]["wall_s"] > report["imports"]["imports_s"] > 0


def test_the_render_says_which_warm_up_a_results_file_had():
    import bench_cli

    assert bench_cli.warm_up_text({}).startswith("one untimed `--self_test` process")
    assert "then the bf16 forward of the batches" in bench_cli.warm_up_text({"warm_up_forward_s": 30.0})
