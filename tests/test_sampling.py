"""Oversampling plan, filtering, trimming, determinism, and batching."""
import json

import pytest

import quantize_nvfp4 as q
from conftest import write_jsonl, write_yaml


@pytest.mark.parametrize("weights, total", [([1, 1, 1], 10), ([3, 1], 7), ([0.2, 0.3, 0.5], 768), ([1], 5),
                                            ([1, 2, 3, 4, 5, 6, 7], 100)])
def test_split_requests_sums_exactly(weights, total):
    counts = q.split_requests(weights, total)
    assert sum(counts) == total
    exact = [total * w / sum(weights) for w in weights]
    assert all(abs(c - e) < 1 for c, e in zip(counts, exact))


def test_split_requests_largest_remainder():
    assert q.split_requests([1, 1, 1], 10) == [4, 3, 3]
    assert q.split_requests([0.5, 0.3, 0.2], 9) == [4, 3, 2]  # 4.5 2.7 1.8: remainders .8 and .7 get the 2 left


def test_plan_requests_oversamples():
    specs = [q.DatasetSpec(name="a", path="x", weight=3), q.DatasetSpec(name="b", path="y", weight=1)]
    assert q.plan_requests(specs, 100, 1.5) == {"a": 113, "b": 37}


def test_select_samples_filters_trims_and_is_deterministic():
    tokenized = {"a": [[1] * n for n in (1, 5, 9, 20, 30)], "b": [[2] * n for n in (2, 8, 40)]}
    samples, kept = q.select_samples(tokenized, min_tokens=5, max_samples=4, seed=7)
    assert len(samples) == 4 and all(len(s) >= 5 for s in samples)
    assert sum(kept.values()) == 4
    assert q.select_samples(tokenized, 5, 4, 7) == (samples, kept)


def test_group_batches_by_count():
    assert q.group_batches([10, 50, 30, 20, 40], 2, 0) == [[1, 4], [2, 3], [0]]


def test_group_batches_by_tokens_respects_budget_and_covers_everything():
    lengths = [10, 50, 30, 20, 40]
    by_tokens = q.group_batches(lengths, None, 100)
    assert sorted(i for b in by_tokens for i in b) == list(range(5))
    for batch in by_tokens:
        assert len(batch) * max(lengths[i] for i in batch) <= 100
        assert [lengths[i] for i in batch] == sorted((lengths[i] for i in batch), reverse=True)
    assert q.group_batches([500], None, 100) == [[0]]  # a sample longer than the budget still runs alone


def test_group_batches_minimises_padding_plus_overhead():
    """Two length clusters: greedy filling would pad the short ones to 2048; the search splits them."""
    lengths = [2048] * 4 + [200] * 60
    batches = q.group_batches(lengths, None, 16384)
    assert [len(b) for b in batches] == [4, 60]
    assert q.padding_fraction(lengths, batches) == 0
    greedy_first_batch = 16384 // 2048  # the 4 long samples + 4 short ones padded to 2048
    assert len(batches[0]) < greedy_first_batch
    many = [random_len for random_len in range(2000, 0, -7)]
    cuts = q.group_batches(many, None, 16384)
    assert q.padding_fraction(many, cuts) < 0.08
    total_cost = sum(len(b) * max(many[i] for i in b) + q.BATCH_OVERHEAD_TOKENS for b in cuts)
    single = [[i] for i in range(len(many))]
    assert total_cost < sum(many) + q.BATCH_OVERHEAD_TOKENS * len(single)


def test_padded_batch_right_pads_with_mask():
    ids, mask = q.padded_batch([[5, 6, 7], [8]], [0, 1], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert q.padding_fraction([3, 1], [[0, 1]]) == pytest.approx(2 / 6)


def make_mix(tmp_path, rows_a=40, rows_b=40, extra_calibration=""):
    write_jsonl(tmp_path / "a.jsonl", [{"text": f"story number {i} " + "word " * (10 + i)} for i in range(rows_a)])
    write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"question {i}", "response": "answer " * (5 + i)}
                                       for i in range(rows_b)])
    return write_yaml(tmp_path / "mix.yaml", f"""calibration:
  max_samples: 20
  max_seq_len: 64
  min_token_length: 8
{extra_calibration}datasets:
  - name: a
    path: a.jsonl
    weight: 3
  - name: b
    path: b.jsonl
    formatter: prompt_answer
""")


def settings_for(yaml_path, tiny_model, **overrides):
    args = q.build_parser().parse_args(["--input_model", str(tiny_model), "--output_model", "o",
                                        "--dataset_yaml", str(yaml_path)])
    for key, value in overrides.items():
        setattr(args, key, value)
    return q.build_settings(args, {})


@pytest.fixture
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def test_prepare_is_deterministic_and_counts_add_up(tmp_path, tiny_model, tokenizer):
    settings = settings_for(make_mix(tmp_path), tiny_model)
    samples, stats, _ = q.prepare_calibration_data(settings, tokenizer)
    again, _, _ = q.prepare_calibration_data(settings, tokenizer)
    assert samples == again and len(samples) == 20
    per = {d["name"]: d for d in stats["per_dataset"]}
    assert per["a"]["requested"] + per["b"]["requested"] == stats["requested_samples"] == 30
    assert per["a"]["requested"] == 23 and per["b"]["requested"] == 7
    assert per["a"]["kept"] + per["b"]["kept"] == 20
    assert stats["tokens"]["max"] <= 64 and stats["tokens"]["min"] >= 8
    other_seed = settings_for(make_mix(tmp_path), tiny_model, seed=1)
    assert q.prepare_calibration_data(other_seed, tokenizer)[0] != samples


def test_per_dataset_counts_say_where_every_row_went(tmp_path, tiny_model, tokenizer, capsys):
    """Too short, kept, held out for --eval: each dataset's rows, the oversampling's surplus the rest; the plan's
    table shows the held-out column with --eval."""
    settings = settings_for(make_mix(tmp_path), tiny_model, eval=True, eval_samples=6)
    samples, stats, holdout = q.prepare_calibration_data(settings, tokenizer)
    per = stats["per_dataset"]
    assert sum(d["kept"] for d in per) == len(samples) and sum(d["held_out"] for d in per) == len(holdout) == 6
    assert all(d["too_short"] + d["kept"] + d["held_out"] + d["unused"] == d["loaded"] for d in per)
    assert all(d["unused"] >= 0 for d in per) and any(d["unused"] > 0 for d in per)  # the 1.5x oversampling's surplus
    q.print_plan(settings, stats)
    header = next(line for line in capsys.readouterr().err.splitlines() if line.strip().startswith("dataset "))
    assert header.split()[-4:] == ["kept", "held", "out", "unused"] and "too short" in header


def test_shortfall_warns_with_per_dataset_counts(tmp_path, tiny_model, tokenizer, capsys):
    settings = settings_for(make_mix(tmp_path, rows_a=3, rows_b=2), tiny_model)
    samples, stats, _ = q.prepare_calibration_data(settings, tokenizer)
    assert len(samples) == 5 and stats["kept_samples"] == 5
    err = capsys.readouterr().err
    assert "only 5 of 20 calibration samples" in err and "a: requested 23, loaded 3, kept 3" in err


def test_no_samples_left_is_a_usage_error(tmp_path, tiny_model, tokenizer):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "hi"}, {"text": None}, {"other": 1}])
    path = write_yaml(tmp_path / "m.yaml", "datasets:\n  - name: a\n    path: a.jsonl\n")
    with pytest.raises(q.UsageError, match=r"datasets\[0\] \(a\): contributes no calibration sample: of 3 rows "
                                           r"read, 2 lack a non-empty string column and the other 1 are shorter"):
        q.prepare_calibration_data(settings_for(path, tiny_model), tokenizer)


def test_skipped_rows_are_counted(tmp_path, tiny_model, tokenizer):
    rows = [{"text": "a reasonably long sentence about boats " * 3}, {"text": None}, {"text": ""}] * 4
    write_jsonl(tmp_path / "a.jsonl", rows)
    path = write_yaml(tmp_path / "m.yaml", "calibration: {max_samples: 4}\ndatasets:\n  - name: a\n    path: a.jsonl\n")
    _, stats, _ = q.prepare_calibration_data(settings_for(path, tiny_model), tokenizer)
    assert stats["per_dataset"][0]["loaded"] == 4 and stats["per_dataset"][0]["skipped_rows"] == 8


def test_stats_are_json_serializable(tmp_path, tiny_model, tokenizer):
    _, stats, _ = q.prepare_calibration_data(settings_for(make_mix(tmp_path), tiny_model), tokenizer)
    json.dumps(stats)
