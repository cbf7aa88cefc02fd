"""What the user meant by the mix: a column the YAML names must exist, and every dataset must contribute.

A missing column or a dataset that yields nothing would calibrate on another mix than the one asked for; both stop
the run before the weights load (and in --dry_run), naming the YAML, the entry and what did not match.
"""
import pytest

import quantize_nvfp4 as q
from conftest import write_jsonl, write_yaml
from test_sampling import settings_for

STORY = "a long enough sentence about the sea and its boats " * 3


@pytest.fixture
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def mix(tmp_path, entry: str, rows: list[dict], streaming: bool = False):
    write_jsonl(tmp_path / "docs.jsonl", rows)
    stream = "    streaming: true\n" if streaming else ""
    return write_yaml(tmp_path / "mix.yaml", "calibration: {max_samples: 4, max_seq_len: 64}\n"
                      f"datasets:\n  - name: docs\n    path: docs.jsonl\n{stream}{entry}")


def refusal(tmp_path, tiny_model, tokenizer, entry, rows, streaming=False) -> str:
    yaml_path = mix(tmp_path, entry, rows, streaming)
    with pytest.raises(q.UsageError) as raised:
        q.prepare_calibration_data(settings_for(yaml_path, tiny_model), tokenizer)
    message = str(raised.value)
    assert message.startswith(f"{yaml_path}: datasets[0] (docs): "), message
    return message


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("entry, field", [
    ("    text_column: content_text\n", "'text_column' names column 'content_text'"),
    ("    columns: [content_text]\n", "'columns.text' names column 'content_text'"),
    ("    columns: {text: [a, b]}\n", "'columns.text' names column 'a' or 'b'"),
    ("    formatter: prompt_answer\n    columns: [question, reply]\n", "'columns.prompt' names column 'question'"),
    ("    formatter: prompt_answer\n    columns: {prompt: body, answer: reply}\n",
     "'columns.answer' names column 'reply'"),
    ("    formatter: sharegpt\n    columns: [turns]\n", "'columns.conversations' names column 'turns'"),
    ("    columns: {text: meta.body}\n", "'columns.text' names column 'meta.body'"),
])
def test_a_named_column_the_dataset_lacks_is_refused(tmp_path, tiny_model, tokenizer, entry, field, streaming):
    message = refusal(tmp_path, tiny_model, tokenizer, entry, [{"body": STORY, "meta": {"body": STORY}}] * 6,
                      streaming)
    assert field in message and "its columns: body, meta" in message, message


def test_a_candidate_list_is_satisfied_by_any_existing_column(tmp_path, tiny_model, tokenizer):
    yaml_path = mix(tmp_path, "    columns: {text: [content_text, body]}\n", [{"body": STORY}] * 6)
    samples, stats, _ = q.prepare_calibration_data(settings_for(yaml_path, tiny_model), tokenizer)
    assert len(samples) == 4 and stats["per_dataset"][0]["kept"] == 4


@pytest.mark.parametrize("entry, rows, why", [
    ("    formatter: sharegpt\n", [{"conversations": "not a list", "body": STORY}] * 5,
     "none of its 5 rows read has a list of turns"),
    ("    formatter: chat_completion\n", [{"messages": [{"role": "user"}]}] * 5,
     "none of its 5 rows read has a list of turns"),
    ("    formatter: prompt_answer\n", [{"body": STORY}] * 5, "none of its 5 rows read has a non-empty pair of"),
    ("", [{"text": "short"}] * 5, "of 5 rows read, 0 lack a non-empty string column and the other 5 are shorter "
                                  "than min_token_length (16 tokens)"),
    ("    columns: [body]\n", [{"body": None}] * 5, "none of its 5 rows read has a non-empty string in 'body'"),
])
def test_a_dataset_that_contributes_nothing_is_refused(tmp_path, tiny_model, tokenizer, entry, rows, why):
    message = refusal(tmp_path, tiny_model, tokenizer, entry, rows)
    assert f"contributes no calibration sample: {why}" in message and "fix the entry or remove it" in message, message


def test_a_partial_shortfall_warns_and_the_summary_marks_it(tmp_path, tiny_model, tokenizer, capsys):
    yaml_path = mix(tmp_path, "", [{"text": STORY}] * 3)
    samples, stats, _ = q.prepare_calibration_data(settings_for(yaml_path, tiny_model), tokenizer)
    assert len(samples) == 3 and "only 3 of 4 calibration samples" in capsys.readouterr().err
    assert q.calibration_samples_cell(stats).startswith("3 of 4 asked for (SHORT")
    assert q.calibration_samples_cell({**stats, "kept_samples": 4}) == "4"


def test_dry_run_makes_the_column_check(tmp_path, tiny_model, capsys):
    yaml_path = mix(tmp_path, "    text_column: content_text\n", [{"body": STORY}] * 6)
    assert q.main(["--input_model", str(tiny_model), "--dataset_yaml", str(yaml_path), "--dry_run"]) == 2
    assert "'text_column' names column 'content_text'" in capsys.readouterr().err
