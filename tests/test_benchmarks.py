"""The algorithm benchmark's data split and the docs tables it generates."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from benchmarks import bench_algorithms as bench
from conftest import ROOT

RESULTS = sorted(p for p in (ROOT / "benchmarks" / "results").glob("*.json")  # this benchmark's, not the others'
                 if "variants" in json.loads(p.read_text()))


def test_calibration_and_heldout_files_are_disjoint():
    files = bench.stdlib_files()
    calibration, heldout = set(files[bench.CALIBRATION_FILES]), set(files[bench.HELDOUT_FILES])
    assert calibration and heldout and not calibration & heldout


def test_docs_tables_are_rendered_from_the_committed_results():
    """Every generated block in docs/ equals what `bench_algorithms.py --render` writes from its results file."""
    assert RESULTS
    for path in RESULTS:
        for doc, text in bench.rendered_blocks(path).items():
            block = bench.generated_block(ROOT / "docs" / doc, path.stem)
            assert block is None or block == text, f"docs/{doc} ({path.name}): run --render {path.relative_to(ROOT)}"
        assert any(bench.generated_block(ROOT / "docs" / doc, path.stem) for doc in ("algorithms.md", "benchmarks.md"))


def test_quality_table_compares_each_mode_with_its_max(tmp_path: Path):
    row = {"calibration_s": 10.0, "scale_search_s": None, "perplexity_original": 8.0, "mean_kl": 0.2,
           "top1_agreement": 0.8, "fidelity_worst": 0.2, "fidelity_median": 0.1}
    results = {"variants": [{**row, "variant": "max", "perplexity_increase_pct": 40.0},
                            {**row, "variant": "weight_only max", "perplexity_increase_pct": 20.0},
                            {**row, "variant": "weight_only local_hessian", "perplexity_increase_pct": 10.0,
                             "mean_kl": 0.1, "scale_search_s": 5.0},
                            {"variant": "gptq", "error": "skipped: --budget_s spent"}]}
    lines = bench.quality_table(results).splitlines()
    assert lines[4].startswith("| `--weight_only --algorithm local_hessian`")
    assert lines[4].rstrip(" |").split(" | ")[1:] == ["10.0 (5.0)", "10.00%", "0.100", "0.800", "0.50", "0.50"]
    assert "Not measured: gptq (skipped: --budget_s spent)." in lines[-1]


def test_end_to_end_section_and_readme_sentence_are_rendered_from_the_committed_results():
    """docs/benchmarks.md's end-to-end section and README's sentence on the 8B run equal what
    `bench_cli.py --render` writes from the one committed results file."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_cli

    [path] = sorted((ROOT / "benchmarks" / "results").glob("cli_*.json"))
    results, name = json.loads(path.read_text()), str(path.relative_to(ROOT))
    assert bench_cli.render(results, name) in (ROOT / "docs" / "benchmarks.md").read_text(), f"run --render {name}"
    assert bench_cli.readme_claim(results) in (ROOT / "README.md").read_text(), f"run --render {name}"


def test_parallel_variants_keep_their_order(monkeypatch, tmp_path: Path):
    """--parallel runs variants at once; the rows come back in the order asked, each from its own run."""
    import random
    import time

    def run_variant(name, flags, model, mixes, work, args, timeout):
        time.sleep(random.Random(name).random() / 20)
        return {"variant": name, "flags": " ".join(flags)}

    monkeypatch.setattr(bench, "run_variant", run_variant)
    names = ["max", "local_hessian", "gptq", "weight_only max", "offload max"]
    args = type("Args", (), {"parallel": 3})()
    rows = bench.run_variants(names, tmp_path, (tmp_path, tmp_path), tmp_path, args, time.perf_counter() + 60)
    assert [r["variant"] for r in rows] == names
    assert [r["flags"] for r in rows] == [" ".join(bench.VARIANTS[n]) for n in names]


def test_offload_sizes_in_docs_come_from_the_scripts_size_functions():
    """docs/offload.md's sizes table equals what `offload_sizes.py --render` computes now."""
    from benchmarks import offload_sizes

    assert offload_sizes.rendered_block() == offload_sizes.block(offload_sizes.table()), \
        "run python benchmarks/offload_sizes.py --render"
