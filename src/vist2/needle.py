"""RULER's needle-in-a-haystack samples (Hsieh et al. 2024, as lm-eval ships the task): the haystack, the
needles, the question and the answer's start, and the prompt a user sends for them.

Both ``vist2 eval niah`` (:mod:`vist2.eval.niah`, the sweep and its score) and the olm stage's
``needle_samples`` (:mod:`vist2.training.stages`) draw their samples here, so what is trained on and
what is measured have one shape.

    >>> from vist2.needle import random_value
    >>> import random
    >>> len(random_value("numbers", random.Random(0), ([], [])))
    7
"""

from __future__ import annotations

import random
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .chat import ChatPrompt, prompt_parts
from .modes import MODES

VALUE_TYPES = ("numbers", "words", "uuids")
PROMPT_FORMATS = ("auto", "chat", "plain")
# RULER's NIAH strings (lm-eval's tasks/ruler), plural (build_sample makes RULER's singular). Its sample
# generator is not reused: it takes no depth, draws from the global random state, downloads on import
NEEDLE = "One of the special magic {type_v} for {key} is: {value}."
HEAD = ("Some special magic {type_v} are hidden within the following text. Make sure to memorize it. "
        "I will quiz you about the {type_v} afterwards.")
QUESTION = "What are all the special magic {type_v} for {query} mentioned in the provided text?"
ANSWER_PREFIX = "The special magic {type_v} for {query} mentioned in the provided text are"
REPEAT = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")


@dataclass
class NeedleSample:
    """One prompt of the grid: the haystack text with its needles, RULER's question and answer prefix."""

    length: int  # the cell's context length (the prompt's tokens are at most this)
    depth: float  # the asked depth of the queried needles, in % of the context
    index: int
    context: str  # haystack and needles
    question: str
    answer_prefix: str
    keys: list[str]  # every key in the haystack (the queried ones first)
    queries: list[str]
    answers: list[str]  # the values of the queried keys
    needle_at: int  # character offset of the first queried needle in ``context``
    needle_chars: int  # characters of the queried needles, with the separators between them
    haystack_sentences: int
    head: str  # RULER's opening lines

    @property
    def document(self) -> str:
        """The user's text: RULER's opening lines, then the context."""
        return self.head + "\n" + self.context

    @property
    def depth_actual(self) -> float:
        """Where the queried needles stand: % of the context's other characters before them."""
        return 100.0 * self.needle_at / max(len(self.context) - self.needle_chars, 1)


# -- samples --------------------------------------------------------------------------------


def word_lists() -> tuple[list[str], list[str]]:
    try:
        from wonderwords import RandomWord
    except ImportError as e:
        raise ValueError("needle keys are RULER's adjective-noun words: pip install wonderwords "
                         "(in the eval extra: pip install -e \".[eval]\")") from e
    r = RandomWord()
    return sorted(r.filter(include_categories=["adjective"])), sorted(r.filter(include_categories=["noun"]))


def random_value(kind: str, rng: random.Random, words: tuple[list[str], list[str]]) -> str:
    """A needle value as RULER draws it: a 7-digit number, an adjective-noun word or a UUID4."""
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "words":
        return f"{rng.choice(words[0])}-{rng.choice(words[1])}"
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"--value-type must be one of {', '.join(VALUE_TYPES)}, got {kind!r}")


def haystack_sentences(path: str | Path | None) -> list[str]:
    """RULER's repeated lines (None) or a text file's sentences (whitespace folded, cut after . ! or ?).
    ``ValueError`` for a missing or empty file."""
    if path is None:
        return list(REPEAT)
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--haystack {path}: no such file")
    text = re.sub(r"\s+", " ", path.read_text(encoding="utf-8")).strip()
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", text) if s]
    if not sentences:
        raise ValueError(f"--haystack {path}: the file holds no text")
    return sentences


def _join(pieces: list[str], repeat: bool) -> str:
    # RULER's repeat haystack puts its five-sentence unit on a line of its own
    if not repeat:
        return " ".join(pieces)
    return "".join(p + ("\n" if p == REPEAT[-1] else " ") for p in pieces).rstrip()


def _place(n: int, depth: float, others: list[float], needles: list[str], distractors: list[str],
           sentences: list[str], start: int) -> tuple[list[str], int]:
    """The haystack's first ``n`` sentences (cycled from ``start``) with the queried needles at
    ``depth`` % (a sentence boundary) and each distractor at its own fraction; the index of the first
    queried needle among the pieces."""
    hay = [sentences[(start + i) % len(sentences)] for i in range(n)]
    inserts = [(round(depth / 100 * n), 0, needles)] + [(round(u * n), 1, [d]) for u, d in zip(others, distractors)]
    pieces, at, i = [], -1, 0
    for pos, kind, items in sorted(inserts, key=lambda x: (x[0], x[1])):
        pieces += hay[i:pos]
        i = pos
        if kind == 0:
            at = len(pieces)
        pieces += items
    return pieces + hay[i:], at


def check_task(depths: Sequence[float], keys: int = 1, values: int = 1, queries: int = 1,
               modes: Sequence[str] = ()) -> None:
    """``ValueError`` naming the flag: a depth outside [0, 100], queries over keys, an unknown mode."""
    if not all(0 <= d <= 100 for d in depths):
        raise ValueError(f"--depths are percentages in [0, 100], got {', '.join(f'{d:g}' for d in depths)}")
    if min(keys, values, queries) < 1 or queries > keys:
        raise ValueError(f"need 1 <= --queries <= --keys and --values >= 1, got keys={keys}, values={values}, "
                         f"queries={queries}")
    if any(m not in MODES for m in modes):
        raise ValueError(f"--modes: a comma-separated subset of {', '.join(MODES)}, got {','.join(modes)!r}")


def build_sample(tokenizer, length: int, depth: float, index: int, *, seed: int = 0, value_type: str = "numbers",
                 keys: int = 1, values: int = 1, queries: int = 1, haystack: list[str] | None = None,
                 prompt_format: str = "plain", words=None) -> NeedleSample:
    """The sample ``index`` of cell (``length``, ``depth``): keys, values and distractor places are
    drawn from ``seed`` and the cell alone (the same for every mode and every model), then the
    haystack holds as many sentences as keep the prompt (``prompt_format``) within ``length`` tokens."""
    check_task([depth], keys, values, queries)
    words = words or word_lists()
    sentences = haystack or list(REPEAT)
    repeat = sentences == list(REPEAT)
    rng = random.Random(f"niah:{seed}:{length}:{depth:g}:{index}")
    key_names: list[str] = []
    while len(key_names) < keys:  # distinct keys: a distractor must not answer the question
        k = random_value("words", rng, words)
        key_names += [k] if k not in key_names else []
    vals = [[random_value(value_type, rng, words) for _ in range(values)] for _ in key_names]
    needles = [NEEDLE.format(type_v=value_type, key=k, value=v) for k, vs in zip(key_names, vals) for v in vs]
    asked, rest = needles[: queries * values], needles[queries * values :]
    rng.shuffle(asked)
    others = [rng.random() for _ in rest]
    start = 0 if repeat else rng.randrange(len(sentences))
    one = queries * values == 1
    type_v = value_type[:-1] if one else value_type
    q = key_names[:queries]
    query = ", ".join(q[:-1]) + ", and " + q[-1] if len(q) > 1 else q[0]
    head = HEAD.format(type_v=type_v)
    question = QUESTION.format(type_v=type_v, query=query)
    prefix = ANSWER_PREFIX.format(type_v=type_v, query=query)
    if one:  # RULER's singular: "A special magic number is hidden", "What is the", "... text is"
        head = head.replace("Some", "A").replace("are", "is")
        question, prefix = question.replace("are all", "is"), prefix[: -len("are")] + "is"

    def make(n: int) -> NeedleSample:
        pieces, at = _place(n, depth, others, asked, rest, sentences, start)
        text = _join(pieces, repeat)
        offset = len(_join(pieces[:at], repeat)) + (1 if at else 0)
        chars = len(_join(asked, repeat)) + (1 if 0 < at < len(pieces) - len(asked) else 0)
        return NeedleSample(length, depth, index, text, question, prefix, key_names, q,
                            [v for vs in vals[:queries] for v in vs], offset, chars, n, head)

    def tokens(n: int) -> int:
        return sum(len(p) for p in needle_prompt(tokenizer, make(n), prompt_format)[:3])

    if tokens(0) > length:
        raise ValueError(f"--lengths {length}: the prompt without any haystack already takes {tokens(0)} tokens")
    lo, hi = 0, 1
    while tokens(hi) <= length:  # grow, then bisect: the most sentences that fit
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if tokens(mid) <= length else (lo, mid)
    return make(lo)


def needle_prompt(tokenizer, sample: NeedleSample, prompt_format: str) -> ChatPrompt:
    """The prompt's parts as a user sends a sample: the document with its question (the question span
    drawn red when compressed), then the answer's start as raw text at the end of the suffix.
    ``chat``: the document and question are the user's message and the answer's start opens the
    assistant's turn; ``plain``: ``document + "\\n" + question + " " + answer prefix``."""
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    if prompt_format == "chat":
        parts = prompt_parts(tokenizer, messages=[{"role": "user", "content": sample.document,
                                                   "question": sample.question}])
        suffix = [*parts.suffix, *enc(sample.answer_prefix)]
    else:
        parts = prompt_parts(tokenizer, sample.document, question=sample.question)
        suffix = [*parts.suffix, *enc(" " + sample.answer_prefix)]
    return ChatPrompt(parts.prefix, parts.query, suffix, parts.question, parts.styles)
