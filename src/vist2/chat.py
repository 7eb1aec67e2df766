"""Chat prompts as token ids: which part of a chat is the compressed query, and where its question is.

A chat turn becomes three runs of ids: the template's text before the last user message (kept
raw), the message itself (the query, compressed into images like any long prompt), and the
template's text after it (raw). Training (SFT) and the engine both split chats here, so a model
is fed at inference exactly the split it was trained on.

    >>> from vist2.chat import chat_prompt
    >>> prefix, query, suffix, span = chat_prompt(tok, [{"role": "user", "content": "Hi"}])  # doctest: +SKIP
    >>> tok.decode(prefix), tok.decode(query), tok.decode(suffix)                            # doctest: +SKIP
    ('<|im_start|>user\\n', 'Hi', '<|im_end|>\\n<|im_start|>assistant\\n')
"""

from __future__ import annotations

QUESTION_SEP = "\n"  # between a user message's document (its content) and its question


def query_ids(tokenizer, document: str, question: str | None) -> tuple[list[int], tuple[int, int] | None]:
    """The query's ids and the question's (start, end) span in them (None without a question).

    The query is ``document + "\\n" + question`` (just the question when the document is empty), the
    question tokenized on its own so its tokens are exactly the question's.
    """
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"] if s else []  # noqa: E731
    if question is None:
        return enc(document), None
    if not isinstance(question, str) or not question:
        raise ValueError(f"question must be a non-empty string, got {question!r}")
    doc = enc(document + QUESTION_SEP) if document else []
    q = enc(question)
    return doc + q, (len(doc), len(doc) + len(q))


def chat_prompt(tokenizer, messages: list[dict]) -> tuple[list[int], list[int], list[int], tuple[int, int] | None]:
    """Split a chat prompt into (raw prefix, the last user message = compressed query, raw suffix,
    the question's span in the query).

    The last user message may carry a ``question`` field beside its ``content`` (the document):
    the query is then ``content + "\\n" + question`` (:func:`query_ids`) and the span marks the
    question's tokens (drawn red, paper Fig. 7); without it the span is None and the whole
    query is the document.
    """
    if not messages or not isinstance(messages, list):
        raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and string 'content'")
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if not users:
        raise ValueError("messages need at least one user message")
    last = users[-1]
    for i, m in enumerate(messages):
        if m.get("question") is not None and i != last:
            raise ValueError(f"messages[{i}]: only the last user message may carry a 'question'")
    marker = "\x00VIST2_QUERY\x00"
    while any(marker in m["content"] or marker in (m.get("question") or "") for m in messages):
        marker += "\x00"  # a message may contain anything, even the marker
    msgs = [{k: v for k, v in m.items() if k != "question"} for m in messages]
    msgs[last]["content"] = marker
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    if text.count(marker) != 1:
        raise ValueError("the tokenizer's chat template does not keep the user message verbatim")
    before, after = text.split(marker)
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    query, span = query_ids(tokenizer, messages[last]["content"], messages[last].get("question"))
    return enc(before), query, enc(after), span


def prompt_parts(tokenizer, prompt: str | None = None, messages: list[dict] | None = None,
                 question: str | None = None) -> tuple[list[int], list[int], list[int], tuple[int, int] | None]:
    """(raw prefix, compressed query, raw suffix, question span) of a plain prompt or of chat ``messages``
    (:func:`chat_prompt`). With a plain prompt the whole prompt is the query, and ``question`` is
    appended to it as in a user message: ``prompt + "\\n" + question`` (:func:`query_ids`)."""
    if messages is not None:
        if question is not None:
            raise ValueError("with messages, give the question as the last user message's 'question' field")
        parts = chat_prompt(tokenizer, messages)
    else:
        if prompt is None:
            raise ValueError("give a prompt or messages")
        query, span = query_ids(tokenizer, prompt, question)
        parts = [], query, [], span
    if not any(parts[:3]):
        raise ValueError("the prompt is empty")
    return parts
