"""Chat prompts as token ids: which part of a chat is the compressed query, and where its question is.

A chat turn becomes three runs of ids: the raw prefix, the query (compressed into images like any
long prompt) and the raw suffix. Two rules (``history``):

- ``raw``: the query is the last user message; the template's text before it (system prompt, every
  earlier turn) stays raw text, and so grows with the chat;
- ``compressed``: the query is the whole chat from the start of the template's text through the end
  of the last user message, styled by role per token (``user`` on grey for user and system turns,
  ``plain`` for the assistant's own words, paper Fig. 7); only the template's text after it stays
  raw (the turn's closing tokens and the generation prompt). Every earlier turn is then memory, and
  a new turn leaves the chunks before it unchanged (the engine's encoder cache reuses them).

Control tokens come from the chat template alone: message contents (and plain prompts) are tokenized
as plain text, a special token's string in them (``<|im_end|>``) split into ordinary tokens, so typed
text cannot open a turn of another role. The template's own text keeps its special tokens.

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

import secrets
from typing import NamedTuple

QUESTION_SEP = "\n"  # between a user message's document (its content) and its question
HISTORIES = ("raw", "compressed")
# A server's cap on a chat's messages, checked before any tokenizing: a long conversation, and 0.2 s of
# preparing (the template renders it, each piece is tokenized) on the nano tokenizer on a loaded CPU core
# (bench/notes/serve.md).
DEFAULT_MAX_CHAT_MESSAGES = 1024
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


def plain_ids(tokenizer, text: str, special_tokens: bool = False) -> list[int]:
    """``text`` as token ids, read as plain text: a special token's string in it (``<|im_end|>``) is split
    into ordinary tokens (``special_tokens=True`` reads it as the control token instead)."""
    if not text:
        return []
    return tokenizer(text, add_special_tokens=False, split_special_tokens=not special_tokens)["input_ids"]


def _template_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """The chat template's own text as ids, its special tokens kept (one batch call)."""
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def _plain_batch(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"] if texts else []


def query_ids(tokenizer, document: str, question: str | None,
              special_tokens: bool = False) -> tuple[list[int], tuple[int, int] | None]:
    """The query's ids and the question's (start, end) span in them (None without a question).

    The query is ``document + "\\n" + question`` (just the question when the document is empty), the
    question tokenized on its own so its tokens are exactly the question's. Both are plain text
    (:func:`plain_ids`) unless ``special_tokens``.
    """
    enc = lambda s: plain_ids(tokenizer, s, special_tokens)  # noqa: E731
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
    marker = f"\x00{secrets.token_hex(8)}\x00"
    while any(marker in m["content"] for m in messages):  # a message may contain anything: redraw (never, in practice)
        marker = f"\x00{secrets.token_hex(8)}\x00"
    msgs = [{k: v for k, v in m.items() if k != "question"} for m in messages]
    query, span = query_ids(tokenizer, messages[last]["content"], messages[last].get("question"))
    pieces = _template_pieces(tokenizer, msgs, marker)
    if history == "compressed":
        if pieces is None:  # e.g. a template that rewrites earlier turns (drops an assistant's <think> block)
            raise ValueError("history='compressed' needs a chat template that keeps every message verbatim")
        return _compressed_history(tokenizer, messages, pieces, last, query, span)
    if pieces is None:
        return _raw_rewritten(tokenizer, messages, msgs, last, marker, query, span)
    heads, rest = pieces
    head_ids = _template_ids(tokenizer, heads + [rest])
    content_ids = _plain_batch(tokenizer, [m["content"] for m in messages])
    prefix = [t for i in range(last) for t in head_ids[i] + content_ids[i]] + head_ids[last]
    suffix = [t for i in range(last + 1, len(messages)) for t in head_ids[i] + content_ids[i]] + head_ids[-1]
    return ChatPrompt(prefix, query, suffix, span)


def _template_pieces(tokenizer, msgs: list[dict], marker: str) -> tuple[list[str], str] | None:
    """The template's text before each message's content, and after the last one; None when the template
    does not keep every message verbatim (the contents put back would not give its real text).

    One pass over the text: a chat of n messages costs time linear in its length, not n times it."""
    real = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    marks = [f"{marker}{i}{marker}" for i in range(len(msgs))]
    text = tokenizer.apply_chat_template([{**m, "content": mark} for m, mark in zip(msgs, marks)],
                                         tokenize=False, add_generation_prompt=True)
    heads, pos = [], 0
    for mark in marks:
        at = text.find(mark, pos)
        if at < 0:
            return None
        heads.append(text[pos:at])
        pos = at + len(mark)
    rest = text[pos:]
    if marker in rest or any(marker in h for h in heads):  # a content shown twice (or out of order)
        return None
    # joined as they go, so the check costs one pass too (no message's content is scanned twice)
    if sum(len(h) + len(m["content"]) for h, m in zip(heads, msgs)) + len(rest) != len(real):
        return None
    at = 0
    for h, m in zip(heads, msgs):
        for piece in (h, m["content"]):
            if not real.startswith(piece, at):
                return None
            at += len(piece)
    return (heads, rest) if real.startswith(rest, at) else None


def special_strings(tokenizer) -> list[str]:
    """The strings of the tokenizer's special (control) tokens."""
    return [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]


def _raw_rewritten(tokenizer, messages, msgs, last, marker, query, span) -> ChatPrompt:
    """The raw split under a template that rewrites earlier turns (drops an assistant's ``<think>`` block):
    the text around the last user message is tokenized whole, so no earlier content may spell a control
    token (it would be read as one)."""
    specials = special_strings(tokenizer)
    for i, m in enumerate(messages):
        if i != last and any(sp in m["content"] for sp in specials):
            raise ValueError(f"messages[{i}] contains a control token's text; this chat template rewrites "
                             "earlier turns, so it cannot be kept as plain text")
    msgs[last]["content"] = marker
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    if text.count(marker) != 1:
        raise ValueError("the tokenizer's chat template does not keep the user message verbatim")
    before, after = text.split(marker)
    before_ids, after_ids = _template_ids(tokenizer, [before, after])
    return ChatPrompt(before_ids, query, after_ids, span)


def _compressed_history(tokenizer, messages, pieces, last, last_query, span) -> ChatPrompt:
    """The query from the template's start through the last user message: the template's pieces (their
    control tokens kept) and the contents before that message (plain text), each tokenized on its own
    (every token belongs to one turn and takes its role's style), then the last user message's query
    (:func:`query_ids`); what follows it is the raw suffix."""
    heads, rest = pieces
    head_ids = _template_ids(tokenizer, heads + [rest])
    content_ids = _plain_batch(tokenizer, [m["content"] for m in messages])
    query, styles = [], []
    for i in range(last + 1):
        ids = head_ids[i] + (content_ids[i] if i < last else [])
        query += ids
        styles += [ROLE_STYLES.get(messages[i]["role"], DEFAULT_ROLE_STYLE)] * len(ids)
    if span is not None:
        span = (span[0] + len(query), span[1] + len(query))
    styles += [DEFAULT_ROLE_STYLE] * len(last_query)  # the last user message (its question: by the span)
    suffix = [t for i in range(last + 1, len(messages)) for t in head_ids[i] + content_ids[i]] + head_ids[-1]
    return ChatPrompt([], query + last_query, suffix, span, styles)


def prompt_parts(tokenizer, prompt: str | None = None, messages: list[dict] | None = None,
                 question: str | None = None, history: str = "raw", special_tokens: bool = False) -> ChatPrompt:
    """(raw prefix, compressed query, raw suffix, question span; ``.styles``) of a plain prompt or of chat
    ``messages`` (:func:`chat_prompt`, split by ``history``). With a plain prompt the whole prompt is the
    query, and ``question`` is appended to it as in a user message: ``prompt + "\\n" + question``
    (:func:`query_ids`); ``special_tokens=True`` reads control tokens' strings in a plain prompt as the
    control tokens (a raw completion that writes its own template). A chat's contents are always plain."""
    if history not in HISTORIES:
        raise ValueError(f"history must be one of {HISTORIES}, got {history!r}")
    if messages is not None:
        if question is not None:
            raise ValueError("with messages, give the question as the last user message's 'question' field")
        parts = chat_prompt(tokenizer, messages, history)
    else:
        if prompt is None:
            raise ValueError("give a prompt or messages")
        query, span = query_ids(tokenizer, prompt, question, special_tokens)
        parts = ChatPrompt([], query, [], span)
    if not any(parts[:3]):
        raise ValueError("the prompt is empty")
    return parts
