"""The layout plan: the one place that knows where every token sits.

A sample is an ordered list of segments:

- ``Raw(tokens)``: text that stays text forever (a chat header, a short query tail);
- ``Chunk(tokens, n_visual, kind)``: the text tokens ``c_i`` of one chunk and the
  ``n_visual`` visual tokens ``v_i`` that an image of that text turns into.

``build_sample`` turns segments into per-token records and ``collate`` stacks
samples (several may be packed into one row) into a :class:`Plan` of ``(B, T)``
tensors. Training (dense or FlexAttention masks, labels) and evaluation read the
plan; the inference engine feeds a prompt at the positions of its sample
(``PromptPlan.sample``) and closes generated windows by the same rule
(:func:`vist2.positions.window_slots`).

Each segment's slots (positions, kinds, which text is evicted) come from
:func:`vist2.positions.segment_slots`, the one rule for where a token sits; the chunk kinds
(``interleaved``, ``visual``, ``ocr``, ``open``) are tabled there. Visibility
(``attention.allowed_mask``): a query sees every earlier key of its own sample, except the text
of an evicted chunk, which only that chunk's own tokens see.

Example::

    >>> from vist2.chunking import fixed_chunker
    >>> from vist2.layout import build_sample, collate, olm_segments
    >>> plan = collate([build_sample(olm_segments(list(range(10)), 4, 2, chunker=fixed_chunker(4)))])
    >>> plan.position[0].tolist()
    [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 2, 3, 4, 5]
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import torch

from .chunking import Chunker, Cuts, pays  # noqa: F401 - the layout functions' cut types
from .positions import CHUNK_KINDS, ChunkKind, Kind, segment_slots

IGNORE = -100  # label of positions that carry no loss (the value torch's cross_entropy skips)
PROMPT_ENCODINGS = ("visual", "interleaved")
CHUNK_MODES = CHUNK_KINDS  # the old name


@dataclass(frozen=True)
class Raw:
    tokens: tuple[int, ...]
    loss: bool = False

    def __post_init__(self):
        object.__setattr__(self, "tokens", tuple(int(t) for t in self.tokens))


@dataclass(frozen=True)
class Chunk:
    """``fit_cut``: the fit rule closed this chunk before K tokens (for reports; the layout is the
    same: as at every boundary, the next chunk's first token is predicted from the visual tokens,
    paper §3.1). ``style``: the render style of the chunk's image (``user`` for a prompt's query,
    paper Fig. 7), or one style per token (a query chunk holding part of the question: ``question``
    on those tokens). ``carry``: the bytes of a character split by the text before this chunk, drawn
    first in its image (None: those left by the sample's previous image)."""

    tokens: tuple[int, ...]
    n_visual: int
    kind: ChunkKind = "interleaved"
    loss: bool = False
    fit_cut: bool = False
    style: str | tuple[str, ...] = "plain"
    carry: bytes | None = None

    def __post_init__(self):
        object.__setattr__(self, "tokens", tuple(int(t) for t in self.tokens))
        if not isinstance(self.style, str):
            object.__setattr__(self, "style", tuple(self.style))
            if len(self.style) != len(self.tokens):
                raise ValueError(f"Chunk.style has {len(self.style)} per-token styles for {len(self.tokens)} tokens")
        if self.kind not in CHUNK_KINDS:
            raise ValueError(f"Chunk.kind must be one of {CHUNK_KINDS}, got {self.kind!r}")
        if self.kind == "open":
            if self.n_visual != 0:
                raise ValueError("an open chunk has no visual tokens (n_visual must be 0)")
        elif self.n_visual <= 0:
            raise ValueError(f"a {self.kind} chunk needs n_visual > 0, got {self.n_visual}")


Segment = Raw | Chunk


@dataclass(frozen=True)
class ChunkInfo:
    """One image's worth of visual tokens: which text it shows (empty for an external image)."""

    tokens: tuple[int, ...]
    n_visual: int
    row: int = 0
    sample: int = 0
    style: str | tuple[str, ...] = "plain"  # the render style, or one per token (see Chunk.style)
    carry: bytes | None = None  # bytes drawn before its text (see Chunk.carry)


@dataclass
class Sample:
    """Per-token lists of one sample (positions restart at 0 per sample)."""

    input_ids: list[int] = field(default_factory=list)
    kind: list[int] = field(default_factory=list)
    chunk: list[int] = field(default_factory=list)  # local chunk index, -1 for raw text
    position: list[int] = field(default_factory=list)
    evicted: list[bool] = field(default_factory=list)
    loss: list[bool] = field(default_factory=list)  # this token is a prediction target
    chunks: list[Chunk] = field(default_factory=list)  # the chunks that have an image
    # index of the slot each token predicts (normally the next one; -1: none)
    predicts: list[int] = field(default_factory=list)
    peak: int = 0  # the most cache entries a causal feed of the sample holds at once

    def __len__(self) -> int:
        return len(self.kind)

    def _add(self, ids, kind, chunk, positions, evicted, loss):
        for i, p in zip(ids, positions):
            self.predicts.append(len(self.kind) + 1)
            self.input_ids.append(i)
            self.kind.append(kind)
            self.chunk.append(chunk)
            self.position.append(p)
            self.evicted.append(evicted)
            self.loss.append(loss and kind == Kind.TEXT)


def build_sample(segments: Sequence[Segment]) -> Sample:
    """Lay out one sample: per-token kind, chunk, position, eviction and loss (the slots of each
    segment from :func:`vist2.positions.segment_slots`)."""
    s = Sample()
    base = 0  # position of the next token that stays in the cache
    n_chunks = 0
    for seg in segments:
        if isinstance(seg, Raw):
            slots = segment_slots(None, base, len(seg.tokens))
            idx = -1
        elif isinstance(seg, Chunk):
            slots = segment_slots(seg.kind, base, len(seg.tokens), seg.n_visual)
            idx, n_chunks = n_chunks, n_chunks + 1
            if seg.n_visual:
                s.chunks.append(seg)
        else:
            raise TypeError(f"segments must be Raw or Chunk, got {type(seg).__name__}")
        for kind, positions, evicted in slots.runs:
            ids = seg.tokens if kind == Kind.TEXT else [-1] * len(positions)
            s._add(ids, kind, idx, positions, evicted, seg.loss and kind == Kind.TEXT)
        base, s.peak = slots.end, max(s.peak, slots.peak)
    return s


# ---------------------------------------------------------------------------
# Stage layouts (paper §3.2)
# ---------------------------------------------------------------------------


def _check_sizes(chunk_tokens: int, n_visual: int) -> None:
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be > 0, got {chunk_tokens}")
    if n_visual <= 0:
        raise ValueError(f"n_visual must be > 0, got {n_visual}")


def _cut(tokens, chunker: Chunker, carry: bytes = b"") -> Cuts:
    if not callable(chunker):  # no silent default: text is cut by the fit rule, token counts by fixed_chunker
        raise ValueError(f"chunker must be a Chunker (VIST2Processor.chunker(K), or fixed_chunker(K) for token "
                         f"counts), got {chunker!r}")
    return chunker(tokens, carry)


def caption_segments(n_visual: int, caption: Sequence[int]) -> list[Segment]:
    """PT-1: ``[v, caption]``, causal; loss on the caption."""
    return [Chunk((), n_visual, "visual"), Raw(tuple(caption), loss=True)]


def ocr_segments(chunks: Sequence[Sequence[int]], n_visual: int, prompt: Sequence[int] = ()) -> list[Segment]:
    """PT-2 multi-turn OCR: ``[v1, c1, v2, c2, ...]``, causal; loss on every ``c_i``. With a ``prompt``
    (the model's ``ocr_prompt`` as ids): ``[v1, p, c1, v2, p, c2, ...]``, no loss on ``p``, so that text
    right after a page is a transcription only when ``p`` asks for one (in OLM it is the continuation)."""
    if not prompt:
        return [Chunk(tuple(c), n_visual, "ocr", loss=True) for c in chunks]
    # the page as a visual-only chunk (its image shows c), then the prompt and c as text: causal, as "ocr"
    return [seg for c in chunks
            for seg in (Chunk(tuple(c), n_visual, "visual"), Raw(tuple(prompt)), Raw(tuple(c), loss=True))]


def olm_segments(tokens: Sequence[int], chunk_tokens: int, n_visual: int, loss: bool = True, *,
                 chunker: Chunker, carry: bytes = b"") -> list[Segment]:
    """PT-3 optical language modelling: ``[c1, v1, c2, v2, ..., c_n]`` with the sparse mask.

    Chunks are cut by ``chunker`` (``VIST2Processor.chunker(K)``: the fit rule). The last chunk
    stays open (no visual tokens): nothing after it would read them. A closed chunk that holds no
    more tokens than ``n_visual`` stays text (:func:`pays`). The same layout describes generated
    text, which is why SFT responses use it.
    """
    _check_sizes(chunk_tokens, n_visual)
    cuts = _cut(tokens, chunker, carry)
    parts, fit = list(cuts.closed), list(cuts.fit_cut)
    if cuts.tail or not parts:
        parts.append(cuts.tail)
        fit.append(False)
    segs: list[Segment] = [
        Chunk(tuple(p), n_visual, "interleaved", loss, f, carry=cuts.carry_before(i)) if pays(len(p), n_visual)
        else Raw(tuple(p), loss)
        for i, (p, f) in enumerate(zip(parts[:-1], fit))
    ]
    if parts[-1]:
        segs.append(Chunk(tuple(parts[-1]), 0, "open", loss))
    return segs


def query_parts(tokens: Sequence[int], chunk_tokens: int, n_visual: int, chunker: Chunker,
                carry: bytes = b"") -> tuple[list[tuple[list[int], bool, bool, bytes | None]], bytes]:
    """The paper's tail rule, applied to every piece of a query: its chunks (K tokens, or fewer where the
    fit rule closed them) and its open tail are compressed where that pays (:func:`pays`: more tokens
    than ``n_visual``), else they stay raw text. Returns ``(tokens, compressed, fit_cut, carry)`` per
    piece, and the bytes left after the query (for the response's first image)."""
    _check_sizes(chunk_tokens, n_visual)
    cuts = _cut(tokens, chunker, carry)
    pieces = [(list(c), f, cuts.carry_before(i)) for i, (c, f) in enumerate(zip(cuts.closed, cuts.fit_cut))]
    if cuts.tail:
        pieces.append((list(cuts.tail), False, cuts.carry if cuts.carries is not None else None))
    return [(c, pays(len(c), n_visual), f, cy) for c, f, cy in pieces], cuts.carry_tail


def prompt_segments(
    prefix: Sequence[int],
    query: Sequence[int],
    suffix: Sequence[int],
    chunk_tokens: int,
    n_visual: int,
    prompt_encoding: str,
    chunker: Chunker,
    question: tuple[int, int] | None = None,
    styles: Sequence[str] | None = None,
) -> list[Segment]:
    """A prompt: raw prefix, the query compressed by the tail rule (:func:`query_parts`), raw suffix.

    ``prompt_encoding`` is ``visual`` (only the query's visual tokens enter the
    LLM) or ``interleaved`` (its text runs first and the visual tokens read it).
    Query chunks render in the ``user`` style (grey background, paper Fig. 7);
    ``question = (start, end)`` marks ``query[start:end]`` as the user's question,
    whose tokens render in the ``question`` style (red on grey) in whichever chunks
    they fall; ``styles`` gives one render style per query token instead of ``user``
    (a chat history: ``user`` turns on grey, the assistant's in ``plain``). Chunks are
    cut the same with or without them.
    """
    return prompt_layout(prefix, query, suffix, chunk_tokens, n_visual, prompt_encoding, chunker, question, styles)[0]


def prompt_continuation_segments(context: Sequence[int], continuation: Sequence[int], chunk_tokens: int,
                                 n_visual: int, prompt_encoding: str, chunker: Chunker) -> list[Segment]:
    """The engine's layout of a prompt followed by what is written after it: ``context`` as a user's
    prompt (:func:`vist2.layout.prompt_segments` under ``prompt_encoding``: with ``visual`` only its
    pages' visual tokens enter the LLM, with ``interleaved`` each page's text runs first), then
    ``continuation`` as generation lays it out (its own full chunks compressed, interleaved), loss on
    the continuation only. ``tests/test_eval_prompt_layout.py`` proves the engine equals this layout."""
    return [*prompt_segments([], context, [], chunk_tokens, n_visual, prompt_encoding, chunker),
            *olm_segments(continuation, chunk_tokens, n_visual, loss=True, chunker=chunker)]


def olm_continuation_segments(context: Sequence[int], continuation: Sequence[int], chunk_tokens: int,
                              n_visual: int, chunker: Chunker) -> list[Segment]:
    """OLM layout over context + continuation with the loss on the continuation only.

    Chunks are cut by ``chunker`` (``VIST2Processor.chunker(K)``: the fit rule). The context must be
    whole chunks (a chunk has one loss flag), so the split between context and continuation falls
    on a chunk boundary (:func:`vist2.eval.olm.whole_chunks` gives such a context); ``vist2 eval olm``
    scores this layout and the olm stage's memory samples are laid out by it.
    """
    segs = olm_segments([*context, *continuation], chunk_tokens, n_visual, loss=False, chunker=chunker)
    out, n = [], 0
    for s in segs:
        if 0 < len(context) - n < len(s.tokens):
            raise ValueError(f"the context ({len(context)} tokens) ends inside a chunk: it must be whole chunks")
        out.append(replace(s, loss=True) if n >= len(context) else s)
        n += len(s.tokens)
    return out


def query_styles(chunks: Sequence[Sequence[int]], question: tuple[int, int] | None,
                 styles: Sequence[str] | None = None) -> list[str | tuple[str, ...]]:
    """The render style of each query chunk (consecutive pieces of the query): ``user`` (or ``styles``,
    one per query token), and ``question`` on the tokens of ``query[start:end]``; one string where a
    chunk's tokens share a style and hold none of the question, else one style per token."""
    out: list[str | tuple[str, ...]] = []
    i = 0
    for c in chunks:
        j = i + len(c)
        asked = question is not None and question[0] < j and question[1] > i
        st = tuple("question" if asked and question[0] <= k < question[1]
                   else (styles[k] if styles is not None else "user") for k in range(i, j))
        out.append(st[0] if st and not asked and all(x == st[0] for x in st) else st)
        i = j
    return out


def _check_question(question, n_query: int) -> None:
    if question is None:
        return
    if (not isinstance(question, (tuple, list)) or len(question) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in question)
            or not 0 <= question[0] <= question[1] <= n_query):
        raise ValueError(f"question must be a (start, end) token span of the query with 0 <= start <= end <= "
                         f"{n_query}, got {question!r}")


def prompt_layout(prefix, query, suffix, chunk_tokens, n_visual, prompt_encoding, chunker, question=None,
                  styles=None) -> tuple[list[Segment], bytes]:
    """:func:`prompt_segments` and the bytes of a character split at the query's very end (drawn first
    by the response's first image; none after a suffix, whose own text comes between)."""
    if prompt_encoding not in PROMPT_ENCODINGS:
        raise ValueError(f"prompt_encoding must be one of {PROMPT_ENCODINGS}, got {prompt_encoding!r}")
    _check_question(question, len(query))
    if styles is not None and len(styles) != len(query):
        raise ValueError(f"styles must give one render style per query token ({len(query)}), got {len(styles)}")
    pieces, carry = query_parts(query, chunk_tokens, n_visual, chunker)
    segs: list[Segment] = [Raw(tuple(prefix))] if len(prefix) else []
    for (c, compressed, f, cy), st in zip(pieces, query_styles([p[0] for p in pieces], question, styles)):
        segs.append(Chunk(tuple(c), n_visual, prompt_encoding, fit_cut=f, style=st, carry=cy) if compressed
                    else Raw(tuple(c)))
    if len(suffix):
        segs.append(Raw(tuple(suffix)))
        carry = b""
    return segs, carry


def sft_segments(
    prefix: Sequence[int],
    query: Sequence[int],
    suffix: Sequence[int],
    response: Sequence[int],
    chunk_tokens: int,
    n_visual: int,
    prompt_encoding: str,
    chunker: Chunker,
    question: tuple[int, int] | None = None,
    styles: Sequence[str] | None = None,
) -> list[Segment]:
    """SFT: the prompt (see :func:`prompt_segments`, ``question`` and ``styles`` included), then the
    response as OLM with loss (its first image also draws a character split at the query's end, as in
    generation: :func:`prompt_layout`)."""
    segs, carry = prompt_layout(prefix, query, suffix, chunk_tokens, n_visual, prompt_encoding, chunker, question,
                                styles)
    return segs + olm_segments(response, chunk_tokens, n_visual, loss=True, chunker=chunker, carry=carry)


# ---------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------


@dataclass
class Plan:
    """A batch of laid-out rows; every field is ``(B, T)``.

    ``input_ids`` holds -1 at visual and padding slots (the model fills visual
    slots from images); ``labels[t]`` is the token that position ``t``
    predicts, or ``IGNORE``. ``chunks`` lists the images in the order their
    visual slots appear (row-major), which is the order the model expects them.
    """

    input_ids: torch.Tensor
    kind: torch.Tensor
    chunk: torch.Tensor  # unique per row across packed samples; -1 for raw text and padding
    sample: torch.Tensor  # -1 for padding
    position: torch.Tensor
    evicted: torch.Tensor
    loss: torch.Tensor
    labels: torch.Tensor
    chunks: list[ChunkInfo]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.kind.shape)  # type: ignore[return-value]

    @property
    def n_visual_slots(self) -> int:
        return int((self.kind == Kind.VISUAL).sum())

    def to(self, device) -> "Plan":
        tensors = {n: getattr(self, n).to(device) for n in _TENSOR_FIELDS}
        return Plan(**tensors, chunks=self.chunks)

    def summary(self) -> str:
        """A short human-readable description: counts and a one-line picture per row."""
        lines = []
        B, T = self.shape
        for b in range(B):
            k = self.kind[b]
            n_text, n_vis = int((k == Kind.TEXT).sum()), int((k == Kind.VISUAL).sum())
            kept = n_text - int(self.evicted[b].sum()) + n_vis
            lines.append(
                f"row {b}: {T} slots = {n_text} text + {n_vis} visual + {T - n_text - n_vis} pad; "
                f"{int(self.sample[b].max()) + 1} sample(s); {int((self.labels[b] != IGNORE).sum())} loss targets; "
                f"a cache would keep {kept} of {n_text + n_vis} entries"
            )
            lines.append("  " + _picture(self, b))
        return "\n".join(lines)


_TENSOR_FIELDS = ("input_ids", "kind", "chunk", "sample", "position", "evicted", "loss", "labels")


def _picture(plan: Plan, b: int, width: int = 96) -> str:
    """Runs of the row as ``c0[1024] v0[256] c1[40] ...`` (c: text of a chunk, r: raw text)."""
    out, prev, n = [], None, 0
    for kind, chunk in zip(plan.kind[b].tolist(), plan.chunk[b].tolist()):
        tag = {Kind.PAD: "pad", Kind.VISUAL: f"v{chunk}", Kind.TEXT: f"c{chunk}" if chunk >= 0 else "r"}[Kind(kind)]
        if tag != prev and prev is not None:
            out.append(f"{prev}[{n}]")
            n = 0
        prev, n = tag, n + 1
    if prev is not None:
        out.append(f"{prev}[{n}]")
    text = " ".join(out)
    return text if len(text) <= width else text[: width - 4] + " ..."


def collate(rows: Sequence[Sample | Sequence[Sample]], pad_to: int | None = None) -> Plan:
    """Stack rows into a :class:`Plan`; a row is one sample or several packed together.

    Rows are right-padded to the longest row, or to ``pad_to``.
    """
    rows = [[r] if isinstance(r, Sample) else list(r) for r in rows]
    lengths = [sum(len(s) for s in r) for r in rows]
    T = max(lengths, default=0)
    if pad_to is not None:
        if pad_to < T:
            raise ValueError(f"pad_to={pad_to} is shorter than the longest row ({T} tokens)")
        T = pad_to
    B = len(rows)
    out = {
        "input_ids": torch.full((B, T), -1, dtype=torch.long),
        "kind": torch.full((B, T), int(Kind.PAD), dtype=torch.int8),
        "chunk": torch.full((B, T), -1, dtype=torch.int32),
        "sample": torch.full((B, T), -1, dtype=torch.int32),
        "position": torch.zeros((B, T), dtype=torch.long),
        "evicted": torch.zeros((B, T), dtype=torch.bool),
        "loss": torch.zeros((B, T), dtype=torch.bool),
    }
    chunks: list[ChunkInfo] = []
    for b, row in enumerate(rows):
        t, chunk_base = 0, 0
        for si, s in enumerate(row):
            n = len(s)
            sl = slice(t, t + n)
            out["input_ids"][b, sl] = torch.tensor(s.input_ids, dtype=torch.long)
            out["kind"][b, sl] = torch.tensor(s.kind, dtype=torch.int8)
            local = torch.tensor(s.chunk, dtype=torch.int32)
            out["chunk"][b, sl] = torch.where(local >= 0, local + chunk_base, local)
            out["sample"][b, sl] = si
            out["position"][b, sl] = torch.tensor(s.position, dtype=torch.long)
            out["evicted"][b, sl] = torch.tensor(s.evicted, dtype=torch.bool)
            out["loss"][b, sl] = torch.tensor(s.loss, dtype=torch.bool)
            chunks += [ChunkInfo(c.tokens, c.n_visual, b, si, c.style, c.carry) for c in s.chunks]
            chunk_base += max(s.chunk, default=-1) + 1
            t += n
    # position t predicts the slot Sample.predicts names (normally t + 1), if that slot is a loss target
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    for b, row in enumerate(rows):
        t = 0
        for s in row:
            n = len(s)
            if n:
                tgt = torch.tensor(s.predicts, dtype=torch.long)
                ok = (tgt >= 0) & (tgt < n)
                idx = t + tgt.clamp(0, n - 1)
                ok &= out["loss"][b, idx]
                labels[b, t : t + n] = torch.where(ok, out["input_ids"][b, idx], IGNORE)
            t += n
    return Plan(**out, labels=labels, chunks=chunks)
