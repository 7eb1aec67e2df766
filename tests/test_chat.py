"""vist2.chat: the split of a chat into raw prefix, compressed query and raw suffix, and the question's span."""

import pytest

from vist2.build import load_tokenizer
from vist2.chat import chat_prompt, query_ids


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def test_chat_prompt_splits_around_the_last_user_message(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "first"},
            {"role": "assistant", "content": "ok"}, {"role": "user", "content": "Tell me about the sea."}]
    prefix, query, suffix, span = chat_prompt(tok, msgs)
    assert tok.decode(query) == "Tell me about the sea." and span is None
    assert tok.decode(prefix).endswith("<|im_start|>user\n") and "first" in tok.decode(prefix)
    assert tok.decode(suffix) == "<|im_end|>\n<|im_start|>assistant\n"
    # nothing lost, nothing added: the three runs are the template's text
    whole = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert tok.decode(prefix + query + suffix) == whole


def test_question_span_marks_exactly_the_question(tok):
    query, span = query_ids(tok, "The ship left at dawn.", "When did it leave?")
    assert tok.decode(query) == "The ship left at dawn.\nWhen did it leave?"
    assert tok.decode(query[span[0]:span[1]]) == "When did it leave?"
    assert span[1] == len(query)
    only, span = query_ids(tok, "", "Why?")  # no document: the query is the question alone
    assert tok.decode(only) == "Why?" and span == (0, len(only))


def test_a_message_holding_the_marker_is_kept_verbatim(tok):
    text = "odd \x00VIST2_QUERY\x00 text"
    _, query, _, _ = chat_prompt(tok, [{"role": "user", "content": text}])
    assert tok.decode(query) == text


@pytest.mark.parametrize("msgs, match", [
    ([], "non-empty"),
    ([{"role": "user"}], r"messages\[0\]"),
    ([{"role": "system", "content": "x"}], "user message"),
    ([{"role": "user", "content": "a", "question": "q"}, {"role": "user", "content": "b"}], "only the last"),
    ([{"role": "user", "content": "a", "question": ""}], "question"),
])
def test_bad_chats_are_refused(tok, msgs, match):
    with pytest.raises(ValueError, match=match):
        chat_prompt(tok, msgs)


def test_the_engine_keeps_its_name_for_it():
    import vist2.engine

    assert vist2.engine.chat_prompt is chat_prompt
