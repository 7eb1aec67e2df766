"""Chat prompts as token ids: which part of a chat is the compressed query, and where its question is.

A chat turn becomes three runs of ids: the raw prefix, the query (compressed into images like any
long prompt) and the raw suffix. Two rules (``history``):

- ``raw``: the query is the last user message; the template's text before it (system prompt, every
  earlier turn) stays raw text, and so grows with the chat;
- ``compressed``: the query is the whole chat from the start of the template's text through the end
  of the last user message, styled by role per token (``user`` on grey for user and system turns,
  ``plain`` for the assistant's own words, paper Fig. 7); only the template's text after it stays
  raw (the turn's closing tokens and the generation prompt). Every earlier turn is then memory, and
  a new turn leaves the chunks before it unchanged (the engine's memory cache reuses them).

Training (SFT) and the engine both split chats here, so a model is fed at inference exactly the
split it was trained on.

    >>> from vist2.chat import chat_prompt
    >>> prefix, query, suffix, span = chat_prompt(tok, [{"role": "user", "content": "Hi"}])  # doctest: +SKIP
    >>> tok.decode(prefix), tok.decode(query), tok.decode(suffix)                            # doctest: +SKIP
    ('<|im_start|>user\\n', 'Hi', '<|im_end|>\\n<|im_start|>assistant\\n')
    >>> p = chat_prompt(tok, [{"role": "user", "content": "Hi"}], history="compressed")     # doctest: +SKIP
    >>> tok.decode(p.query), p.styles[0]                                                    # doctest: +SKIP
    ('<|im_start|>user\\nHi', 'user')
"""

from __future__ import annotations

from typing import NamedTuple

QUESTION_SEP = "\n"  # between a user message's document (its content) and its question
HISTORIES = ("raw", "compressed")
# the render style of a compressed history's tokens by the role of their turn: the model's own words
# plain, everything it was given (user, system, tool output) on grey (paper Fig. 7)
ROLE_STYLES = {"assistant": "plain"}
DEFAULT_ROLE_STYLE = "user"


class _Parts(NamedTuple):
    prefix: list[int]
    query: list[int]
    suffix: list[int]
    question: tuple[int, int] | None


class ChatPrompt(_Parts):
    """``(prefix, query, suffix, question)``, unpacked as four as always; ``styles``: one render style per
    query token (a compressed history), or None (the query renders ``user``)."""

    styles: tuple[str, ...] | None

    def __new__(cls, prefix, query, suffix, question, styles=None):
        self = super().__new__(cls, prefix, query, suffix, question)
        self.styles = None if styles is None else tuple(styles)
        return self


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


def chat_prompt(tokenizer, messages: list[dict], history: str = "raw") -> ChatPrompt:
    """Split a chat prompt into (raw prefix, compressed query, raw suffix, the question's span in the
    query); ``history`` says where the query begins (see the module docstring): ``raw``, the last user
    message; ``compressed``, the start of the template's text (``.styles`` then gives every query
    token the style of its turn's role; the template's text between contents takes the role of the
    turn it opens).

    The last user message may carry a ``question`` field beside its ``content`` (the document):
    the query then ends ``content + "\\n" + question`` (:func:`query_ids`) and the span marks the
    question's tokens (drawn red, paper Fig. 7); without it the span is None and the whole
    query is the document.
    """
    if history not in HISTORIES:
        raise ValueError(f"history must be one of {HISTORIES}, got {history!r}")
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
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"] if s else []  # noqa: E731
    query, span = query_ids(tokenizer, messages[last]["content"], messages[last].get("question"))
    if history == "compressed":
        return _compressed_history(tokenizer, messages, msgs, last, marker, query, span, enc)
    msgs[last]["content"] = marker
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    if text.count(marker) != 1:
        raise ValueError("the tokenizer's chat template does not keep the user message verbatim")
    before, after = text.split(marker)
    return ChatPrompt(enc(before), query, enc(after), span)


def _compressed_history(tokenizer, messages, msgs, last, marker, last_query, span, enc) -> ChatPrompt:
    """The query from the template's start through the last user message: the template's pieces and
    the contents before that message, each tokenized on its own (every token belongs to one turn and
    takes its role's style), then the last user message's query (:func:`query_ids`)."""
    real = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    marks = [f"{marker}{i}{marker}" for i in range(last + 1)]
    for m, mark in zip(msgs, marks):
        m["content"] = mark
    rest = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    heads = []  # the template's text before each content
    for mark in marks:
        if rest.count(mark) != 1:
            raise ValueError("history='compressed' needs a chat template that keeps every message verbatim")
        head, rest = rest.split(mark)
        heads.append(head)
    if "".join(h + m["content"] for h, m in zip(heads, messages)) + rest != real:
        # e.g. a template that rewrites earlier turns (drops an assistant's <think> block)
        raise ValueError("history='compressed' needs a chat template that keeps every message verbatim")
    query, styles = [], []
    for i, (head, m) in enumerate(zip(heads, messages)):
        style = ROLE_STYLES.get(m["role"], DEFAULT_ROLE_STYLE)
        ids = enc(head) + (enc(m["content"]) if i < last else [])
        query += ids
        styles += [style] * len(ids)
    if span is not None:
        span = (span[0] + len(query), span[1] + len(query))
    styles += [DEFAULT_ROLE_STYLE] * len(last_query)  # the last user message (its question: by the span)
    return ChatPrompt([], query + last_query, enc(rest), span, styles)


def prompt_parts(tokenizer, prompt: str | None = None, messages: list[dict] | None = None,
                 question: str | None = None, history: str = "raw") -> ChatPrompt:
    """(raw prefix, compressed query, raw suffix, question span; ``.styles``) of a plain prompt or of chat
    ``messages`` (:func:`chat_prompt`, split by ``history``). With a plain prompt the whole prompt is the
    query, and ``question`` is appended to it as in a user message: ``prompt + "\\n" + question``
    (:func:`query_ids`)."""
    if history not in HISTORIES:
        raise ValueError(f"history must be one of {HISTORIES}, got {history!r}")
    if messages is not None:
        if question is not None:
            raise ValueError("with messages, give the question as the last user message's 'question' field")
        parts = chat_prompt(tokenizer, messages, history)
    else:
        if prompt is None:
            raise ValueError("give a prompt or messages")
        query, span = query_ids(tokenizer, prompt, question)
        parts = ChatPrompt([], query, [], span)
    if not any(parts[:3]):
        raise ValueError("the prompt is empty")
    return parts
