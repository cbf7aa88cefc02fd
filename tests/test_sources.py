"""Every supported dataset source, through local paths (the hub path goes through the same call)."""
import csv

import pytest

import quantize_nvfp4 as q
from conftest import write_jsonl

ROWS = [{"text": f"row {i}"} for i in range(6)]


def texts(spec):
    return sorted(row["text"] for row in q.open_dataset(spec, None))


def spec(path, **kw):
    return q.DatasetSpec(name="s", path=str(path), **kw)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet", ".txt", ".arrow"])
def test_local_files(tmp_path, suffix):
    import datasets

    path = tmp_path / f"data{suffix}"
    if suffix in (".jsonl", ".json"):
        write_jsonl(path, ROWS)
    elif suffix == ".csv":
        with path.open("w", newline="") as f:
            csv.DictWriter(f, ["text"]).writeheader()
            csv.DictWriter(f, ["text"]).writerows(ROWS)
    elif suffix == ".txt":
        path.write_text("".join(r["text"] + "\n" for r in ROWS))
    elif suffix == ".parquet":
        datasets.Dataset.from_list(ROWS).to_parquet(str(path))
    else:
        saved = tmp_path / "saved"
        datasets.Dataset.from_list(ROWS).save_to_disk(str(saved))
        next(saved.glob("*.arrow")).rename(path)
    assert texts(spec(path)) == sorted(r["text"] for r in ROWS)


def test_folder_of_files_and_streaming(tmp_path):
    write_jsonl(tmp_path / "one.jsonl", ROWS[:3])
    write_jsonl(tmp_path / "two.jsonl", ROWS[3:])
    assert texts(spec(tmp_path)) == sorted(r["text"] for r in ROWS)
    assert texts(spec(tmp_path, streaming=True)) == sorted(r["text"] for r in ROWS)


def test_folder_mixing_types_is_an_error(tmp_path):
    write_jsonl(tmp_path / "one.jsonl", ROWS)
    (tmp_path / "two.csv").write_text("text\nx\n")
    with pytest.raises(q.UsageError, match="mixes file types"):
        q.open_dataset(spec(tmp_path), None)


def test_save_to_disk_dataset_and_dict(tmp_path):
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS),
                          "test": datasets.Dataset.from_list(ROWS[:1])}).save_to_disk(str(tmp_path / "dd"))
    assert texts(spec(tmp_path / "ds")) == sorted(r["text"] for r in ROWS)
    assert texts(spec(tmp_path / "dd", split="test")) == ["row 0"]
    with pytest.raises(q.UsageError, match="split 'validation' not in"):
        q.open_dataset(spec(tmp_path / "dd", split="validation"), None)


def test_missing_local_path_fails_early(tmp_path, monkeypatch):
    import datasets

    with pytest.raises(q.UsageError, match="path not found"):
        q.check_dataset_source(spec(tmp_path / "missing.jsonl"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path)
    with pytest.raises(q.UsageError, match="^dataset 'org/dataset' is not in the local Hugging Face cache"):
        q.check_dataset_source(spec("org/dataset"))  # a hub ID goes to the hub check, not the local one


def test_collect_texts_is_seeded(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"text": f"t{i}"} for i in range(50)])
    s = spec(tmp_path / "d.jsonl")
    first, _ = q.collect_texts(s, q.open_dataset(s, None), 10, seed=1)
    again, _ = q.collect_texts(s, q.open_dataset(s, None), 10, seed=1)
    other, _ = q.collect_texts(s, q.open_dataset(s, None), 10, seed=2)
    assert first == again and first != other and len(first) == 10
