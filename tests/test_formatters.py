"""Each formatter: good rows, and missing / None / empty fields skipped, never a crash."""
import pytest

import quantize_nvfp4 as q


@pytest.mark.parametrize("row", [{}, {"text": None}, {"text": ""}, {"text": "   "}, {"text": 5}, {"other": None}])
def test_raw_text_skips_unusable_rows(row):
    assert q.format_raw_text(row, {}) is None


def test_raw_text_detects_common_columns_and_explicit_column():
    assert q.format_raw_text({"id": 3, "story": " Once. "}, {}) == "Once."
    assert q.format_raw_text({"body": "b", "text": "t"}, {}) == "t"
    assert q.format_raw_text({"a": "x", "b": "y"}, {"text": "b"}) == "y"
    assert q.format_raw_text({"weird_name": "only string"}, {}) == "only string"


def test_raw_text_candidate_columns_first_non_empty_wins_without_fallback():
    columns = {"text": ["title", "body"]}
    assert q.format_raw_text({"title": "  ", "body": "b", "text": "t"}, columns) == "b"
    assert q.format_raw_text({"title": "a", "body": "b"}, columns) == "a"
    assert q.format_raw_text({"title": None, "text": "t"}, columns) is None


def test_list_columns_reach_the_formatters(tmp_path):
    (tmp_path / "d.jsonl").write_text("")
    (tmp_path / "m.yaml").write_text("datasets:\n  - path: d.jsonl\n    formatter: prompt_answer\n"
                                     "    columns: [question, response, persona]\n")
    spec = q.load_mix(tmp_path / "m.yaml")[0][0]
    text, _ = q.format_sample(spec, {"question": "q", "response": "r", "persona": "terse", "prompt": "other"})
    assert text == "System: terse\n\nUser: q\n\nAssistant: r"


@pytest.mark.parametrize("row, expected_user, expected_answer", [
    ({"prompt": "p", "response": "r"}, "p", "r"),
    ({"instruction": "i", "input": "extra", "output": "o"}, "i\n\nextra", "o"),
    ({"instruction": "i", "input": "", "output": "o"}, "i", "o"),
    ({"question": "q", "answer": "a"}, "q", "a"),
    ({"prompt": "p", "completion": "c"}, "p", "c"),
])
def test_prompt_answer_pairs(row, expected_user, expected_answer):
    messages = q.format_prompt_answer(row, {})
    assert messages[-2:] == [{"role": "user", "content": expected_user},
                             {"role": "assistant", "content": expected_answer}]


@pytest.mark.parametrize("row", [{}, {"prompt": "p"}, {"prompt": "p", "response": None},
                                 {"prompt": "", "response": "r"}, {"question": None, "answer": "a"}])
def test_prompt_answer_skips(row):
    assert q.format_prompt_answer(row, {}) is None


def test_prompt_answer_columns_and_system():
    row = {"writing_prompt": "w", "story": "s", "sys": "be brief"}
    messages = q.format_prompt_answer(row, {"prompt": "writing_prompt", "answer": "story", "system": "sys"})
    assert messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "w"},
                        {"role": "assistant", "content": "s"}]
    assert q.format_prompt_answer({"prompt": "p", "response": "r", "system": "x"}, {})[0]["role"] == "system"


def test_sharegpt_from_value_and_role_content():
    row = {"conversations": [{"from": "system", "value": "sys"}, {"from": "human", "value": "hi"},
                             {"from": "gpt", "value": "hello"}, {"from": "human", "value": None},
                             {"role": "user", "content": "again"}, {"role": "assistant", "content": "ok"},
                             {"from": None, "value": None, "role": "user", "content": "merged schema"}]}
    roles = [m["role"] for m in q.format_sharegpt(row, {})]
    assert roles == ["system", "user", "assistant", "user", "assistant", "user"]


@pytest.mark.parametrize("row", [{}, {"conversations": None}, {"conversations": []},
                                 {"conversations": "text"}, {"conversations": [None, 3, {"from": "x"}]},
                                 {"conversations": [{"from": "system", "value": "only system"}]}])
def test_sharegpt_skips(row):
    assert q.format_sharegpt(row, {}) is None


def test_chat_completion_string_and_parts():
    row = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image"},
                                                     {"type": "text", "text": "b"}]},
                        {"role": "assistant", "content": "c"}]}
    assert q.format_chat_completion(row, {}) == [{"role": "user", "content": "a\nb"},
                                                 {"role": "assistant", "content": "c"}]
    assert q.format_chat_completion({"messages": [{"role": "user", "content": [{"type": "image"}]}]}, {}) is None
    assert q.format_chat_completion({"chat": [{"role": "user", "content": "x"}]}, {"messages": "chat"})


def test_render_plain_layout_without_template():
    text, templated = q.render_conversation([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    assert text == "User: hi\n\nAssistant: yo" and templated is False


class TemplateTokenizer:
    chat_template = "x"

    def __init__(self, fail=False):
        self.fail = fail

    def apply_chat_template(self, messages, tokenize):
        from jinja2.exceptions import TemplateError

        if self.fail:
            raise TemplateError("roles must alternate")
        return "|".join(m["content"] for m in messages)


def test_render_uses_chat_template_and_reports_template_errors():
    assert q.render_conversation([{"role": "user", "content": "a"}], TemplateTokenizer()) == ("a", True)
    with pytest.raises(q.ChatTemplateFailed, match="TemplateError: roles must alternate"):
        q.render_conversation([{"role": "user", "content": "a"}], TemplateTokenizer(fail=True))


def test_format_sample_with_real_tokenizer_template(tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    spec = q.DatasetSpec(name="c", path="x", formatter="chat_completion")
    text, templated = q.format_sample(spec, {"messages": [{"role": "user", "content": "hi"}]}, tokenizer)
    assert templated and text.startswith("<s><|user|>\nhi</s>")
