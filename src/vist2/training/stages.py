"""Stage builders: one record -> laid-out samples (``layout.Sample``), by the paper's four layouts.

Every position, mask and chunk boundary comes from :mod:`vist2.layout`; a
builder only decides *which* tokens form a sample:

=========  =================================================  ===========================
stage      sample                                             loss
=========  =================================================  ===========================
lm         ``[t1 ... tn <eos>]`` plain text, no images;        every token (a random
           ``lm_repeats``: spans planted twice in it           string's first copy not)
caption    ``caption_segments``: ``[v, caption <eos>]``        the caption
ocr        ``ocr_segments``: ``[v1 c1 ... vn cn]``, n from    every ``c_i``
           the curriculum (easy 1, medium 2-4, hard > 4)
olm        ``olm_segments`` over a window of a document       every text token
           + ``recall_samples``: a passage, then a repeat     the repeat
           of a span of it; ``chunk_start_samples``: whole    the first tokens after
           chunks, then the first tokens after them;          the context;
           ``prompt_samples``: whole chunks as the engine     the tokens after the
           lays out a prompt, then what follows it;           prompt; the value
           ``needle_samples``: ``eval niah``'s prompts
           over the window's text; ``copy_samples``: a     the repeat
           span, then the same span, raw text
sft        ``sft_segments`` (``chat_prompt`` split, the       the response, ``<think>``
           query compressed by the tail rule)                 kept
=========  =================================================  ===========================

    >>> from vist2.training.stages import StageBuilder          # doctest: +SKIP
    >>> b = StageBuilder(cfg, processor.tokenizer, chunk_tokens=64, n_visual=16, prompt_encoding="visual",
    ...                  processor=processor)  # doctest: +SKIP
    >>> items, reason = b.items({"text": "In the beginning ..."}, random.Random(0), progress=0.0)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from itertools import accumulate
from typing import Any

from ..chunking import FitChunker, fixed_chunker
from ..layout import Raw, Sample, build_sample, caption_segments, ocr_segments, olm_continuation_segments, \
    olm_segments, prompt_continuation_segments, prompt_segments, sft_segments
from ..needle import build_sample as needle_sample, needle_prompt
from .config import CurriculumPhase, TrainConfig, ocr_images_per_row

log = logging.getLogger(__name__)


@dataclass
class Item:
    """One laid-out sample, plus the external image of a caption sample."""

    sample: Sample
    image: Any = None

    def __len__(self) -> int:
        return len(self.sample)


def images_for(curriculum: list[CurriculumPhase], progress: float, rng: random.Random) -> int:
    """Images per OCR sample at ``progress`` (0..1 of the run): drawn uniformly from the phase's range."""
    for phase in curriculum:
        if progress < phase.until:
            return rng.randint(phase.min_images, phase.max_images)
    last = curriculum[-1]
    return rng.randint(last.min_images, last.max_images)


@lru_cache(maxsize=64)
def olm_text_budget(max_length: int, chunk_tokens: int, n_visual: int) -> int:
    """Most text tokens whose OLM layout fits ``max_length`` slots when chunks hold K tokens (asked of the
    layout, not re-derived; the fit rule's shorter chunks shrink a window further, ``_olm_windows``)."""
    every_k = fixed_chunker(chunk_tokens)

    def slots(n: int) -> int:
        return len(build_sample(olm_segments(range(n), chunk_tokens, n_visual, chunker=every_k)))

    lo, hi = 0, max_length  # slots(n) >= n, so the answer is at most max_length
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if slots(mid) <= max_length else (lo, mid - 1)
    return lo


def shuffle_words(text: str, rng: random.Random, break_every: int = 16) -> str:
    """The words of ``text`` in random order, joined by single spaces, with a line break after about
    one word in ``break_every`` (half of them a blank line): a page of shuffled words still holds the
    line-break marks real text draws, so a reader learns them too.

        >>> shuffle_words("a b c d", random.Random(0), break_every=0).split() != "a b c d".split()
        True
    """
    words = text.split()
    rng.shuffle(words)
    if not break_every:
        return " ".join(words)
    seps = [("\n" if rng.random() < 0.5 else "\n\n") if rng.random() < 1 / break_every else " "
            for _ in words[1:]]
    return "".join(w + s for w, s in zip(words, seps + [""]))


def special_id(tokenizer, token: str) -> int:
    """The id of a special token, else the tokenizer's EOS (tokenizers without a chat format)."""
    tid = tokenizer.convert_tokens_to_ids(token)
    if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid is not None and tid >= 0:
        return tid
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer has neither {token!r} nor an EOS token")
    return tokenizer.eos_token_id


def plant_repeats(text: list[int], spans: list[tuple[tuple[int, ...], bool]], newline: tuple[int, ...],
                  rng: random.Random) -> list[Raw]:
    """``text`` (every token a target) with each span planted twice at random places, a line break before
    each copy: an induction signal at every distance the text allows (bench/notes/nano.md, round 9). The
    second copy is a target, the first only when its flag says it is predictable; the line breaks never.

        >>> [(s.tokens, s.loss) for s in plant_repeats([1, 2], [((5, 6), False)], (0,), random.Random(5))]
        [((1,), True), ((0,), False), ((5, 6), False), ((2,), True), ((0,), False), ((5, 6), True)]
    """
    cuts = []  # (where in the text, the order drawn, segment)
    for span, first_loss in spans:
        a, b = sorted(rng.randint(0, len(text)) for _ in range(2))
        cuts += [(a, len(cuts), (Raw(newline), Raw(span, loss=first_loss))),
                 (b, len(cuts) + 1, (Raw(newline), Raw(span, loss=True)))]
    out, at = [], 0
    for where, _, segs in sorted(cuts, key=lambda c: c[:2]):
        if where > at:
            out.append(Raw(tuple(text[at:where]), loss=True))
        out.extend(segs)
        at = where
    if at < len(text):
        out.append(Raw(tuple(text[at:]), loss=True))
    return out


class StageBuilder:
    """Turns records into :class:`Item` s for one stage. Chunks are cut by ``processor``'s fit rule
    (``VIST2Processor.chunker``), as generation cuts them."""

    def __init__(self, cfg: TrainConfig, tokenizer, chunk_tokens: int, n_visual: int, prompt_encoding: str,
                 processor=None):
        self.cfg, self.tok = cfg, tokenizer
        self.K, self.n_visual = chunk_tokens, n_visual
        self.processor = processor
        self.prompt_encoding = cfg.prompt_encoding or prompt_encoding
        self.doc_end = special_id(tokenizer, "<|endoftext|>")  # ends an OLM document / a caption
        self.turn_end = special_id(tokenizer, "<|im_end|>")  # ends an assistant reply (what generation stops on)
        M = cfg.max_length
        self.ocr_prompt = self.encode(cfg.ocr_prompt) if cfg.ocr_prompt else []  # between a page and its text
        if cfg.stage == "caption" and M <= n_visual + 1:
            raise ValueError(f"max_length={M} leaves no room for a caption after {n_visual} visual tokens")
        if cfg.stage == "ocr":
            self.ocr_tokens = cfg.ocr_tokens_per_image or chunk_tokens
            # the curriculum fits, or fails
            self.ocr_max_images = ocr_images_per_row(cfg, chunk_tokens, n_visual, len(self.ocr_prompt))
        elif cfg.ocr_mix:  # olm / sft keep reading: single-image MT-OCR samples of K tokens
            self.ocr_tokens, self.ocr_max_images = chunk_tokens, 1
            if M < chunk_tokens + n_visual + len(self.ocr_prompt) + int(cfg.ocr_stop):
                raise ValueError(f"ocr_mix: max_length={M} cannot hold one OCR image of {n_visual} visual + "
                                 f"{len(self.ocr_prompt)} prompt + {chunk_tokens} text tokens")
        if cfg.stage == "olm":
            self.olm_window = olm_text_budget(M, chunk_tokens, n_visual)
        if cfg.stage == "sft":
            from ..chat import chat_prompt  # the exact split the engine uses at inference

            self._chat_prompt = chat_prompt

    def chunker(self, chunk_tokens: int | None = None) -> FitChunker:
        if self.processor is None:
            raise ValueError("StageBuilder(processor=...) is needed to cut chunks: the fit rule is the processor's")
        return self.processor.chunker(chunk_tokens or self.K)

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def items(self, record: dict, rng: random.Random, progress: float) -> tuple[list[Item], str | None]:
        """Samples of one record, or ([], reason) when the record yields none."""
        out, why = getattr(self, f"_{self.cfg.stage}")(record, rng, progress)
        if self.cfg.ocr_mix:  # each page of the record's text is also an OCR sample with this chance
            text = record.get("text") or "\n".join(m["content"] for m in record.get("messages", ()))
            out = list(out)
            for it in self._ocr({"text": text}, rng, progress)[0]:
                if rng.random() < self.cfg.ocr_mix:  # spread among the stage's own samples: a long record
                    out.insert(rng.randrange(len(out) + 1), it)  # never makes a run of OCR-only steps
        return out, (None if out else why)

    def _lm(self, rec, rng, progress):
        ids = self.encode(rec["text"]) + [self.doc_end]
        M, mean = self.cfg.max_length, self.cfg.lm_repeats
        if not mean:  # plain causal LM: consecutive windows of max_length tokens, no chunks, no images
            out = [Item(build_sample([Raw(tuple(ids[i : i + M]), loss=True)]))
                   for i in range(0, len(ids), M) if len(ids[i : i + M]) >= 2]
            return out, (None if out else "too_short")
        # with planted repeats: consecutive text windows, shorter by what is planted in them (at most half)
        nl, out, i = tuple(self.encode("\n")), [], 0
        while len(ids) - i >= 2:
            k = int(mean) + (rng.random() < mean % 1)
            cap = min(self.cfg.copy_tokens, M // (4 * max(k, 1)) - len(nl))
            lengths = [rng.randint(8, cap) for _ in range(k)] if cap >= 8 else []
            W = M - 2 * sum(n + len(nl) for n in lengths)
            text = ids[i : i + W]
            spans = []
            for n in lengths:
                if rng.random() < 0.5 and len(text) > n:  # the window's own text: predictable the first time
                    o = rng.randrange(len(text) - n + 1)
                    spans.append((tuple(text[o : o + n]), True))
                else:  # random numbers and words: only the first copy tells them
                    spans.append((tuple(self._random_span(ids[i : i + 4 * M], n, rng)), False))
            if len(text) >= 2 or spans:
                out.append(Item(build_sample(plant_repeats(text, spans, nl, rng))))
            i += W
        return out, (None if out else "too_short")

    def _caption(self, rec, rng, progress):
        ids = self.encode(rec["caption"])[: self.cfg.max_length - self.n_visual - 1] + [self.doc_end]
        return [Item(build_sample(caption_segments(self.n_visual, ids)), image=rec["image"])], None

    def _ocr(self, rec, rng, progress):
        text = rec["text"]
        if self.cfg.ocr_text == "shuffled":  # no sentence prior: only the image tells the next word
            text = shuffle_words(text, rng)
        ids = self.encode(text)
        cuts = self.chunker(self.ocr_tokens)(ids, b"")
        chunks = cuts.closed + ([cuts.tail] if cuts.tail else [])
        out, i = [], 0
        while i < len(chunks):
            n = min(images_for(self.cfg.curriculum, progress, rng), self.ocr_max_images)
            stop = [Raw((self.turn_end,), loss=True)] if self.cfg.ocr_stop else []
            out.append(Item(build_sample(ocr_segments(chunks[i : i + n], self.n_visual, self.ocr_prompt) + stop)))
            i += n
        return out, (None if out else "empty_text")

    def _olm(self, rec, rng, progress):
        ids = self.encode(rec["text"]) + [self.doc_end]
        out = self._olm_windows(ids)
        if any((self.cfg.recall_samples, self.cfg.chunk_start_samples, self.cfg.prompt_samples, self.cfg.needle_samples,
                self.cfg.copy_samples)):
            mixed = []
            for it, start in out:
                mixed.append(it)
                text = ids[start:-1]  # the window's text onwards, without the document end
                for make, mean in ((self._recall, self.cfg.recall_samples),
                                   (self._chunk_start, self.cfg.chunk_start_samples),
                                   (self._prompt, self.cfg.prompt_samples),
                                   (self._needle, self.cfg.needle_samples),
                                   (self._copy, self.cfg.copy_samples)):
                    for _ in range(int(mean) + (rng.random() < mean % 1)):
                        if (extra := make(text, rng)) is not None:
                            mixed.append(extra)
            return mixed, (None if mixed else "too_short")
        return [it for it, _ in out], (None if out else "too_short")

    def _whole(self, ids: list[int], n_chunks: int) -> int:
        """Tokens of ``ids`` in at most ``n_chunks`` whole chunks from its start, cut by the fit rule
        (the next token is looked at too: a chunk is closed by its own tokens and the next)."""
        closed = self.chunker()(ids[: n_chunks * self.K + 1], b"").closed[:n_chunks]
        return sum(len(c) for c in closed)

    def _scored_after(self, context: list[int], target: list[int]) -> Item | None:
        """``context`` compressed (whole chunks, no loss), then ``target`` with the loss: the layout
        of ``vist2 eval olm`` (:func:`vist2.layout.olm_continuation_segments`). None when the fit rule cuts
        context + target elsewhere, or the sample does not fit a row."""
        try:
            segs = olm_continuation_segments(context, target, self.K, self.n_visual, self.chunker())
        except ValueError:
            return None
        s = build_sample(segs)
        return Item(s) if len(s) <= self.cfg.max_length else None

    def _recall(self, ids: list[int], rng: random.Random) -> Item | None:
        """A passage of 1..4 whole chunks and a repeat of one of its spans (8..K tokens, from a page
        start half the time, else anywhere): the repeat's tokens are in the passage's pages, which
        the repeat cannot see as text."""
        fits = (self.cfg.max_length - self.K) // (self.K + self.n_visual)  # passage chunks + a K-token repeat
        p = self._whole(ids, rng.randint(1, max(1, min(4, fits))))
        if p < 2:
            return None
        starts = list(accumulate([0] + [len(c) for c in self.chunker()(ids[: p + 1], b"").closed]))[:-1]
        o = rng.choice(starts) if rng.random() < 0.5 else rng.randrange(p - 1)
        m = rng.randint(min(8, p - o), min(self.K, p - o))
        return self._scored_after(ids[:p], ids[o : o + m])

    def _chunk_start(self, ids: list[int], rng: random.Random) -> Item | None:
        """1..4 whole chunks of context, then only the first ``chunk_start_tokens`` tokens after
        them, the ones the end of the last page predicts."""
        T = self.cfg.chunk_start_tokens
        fits = (self.cfg.max_length - T) // (self.K + self.n_visual)
        p = self._whole(ids, rng.randint(1, max(1, min(4, fits))))
        if p == 0 or p >= len(ids):
            return None
        return self._scored_after(ids[:p], ids[p : p + T])

    def _prompt(self, ids: list[int], rng: random.Random) -> Item | None:
        """1..4 whole chunks as a user's prompt (the engine's layout under the stage's prompt encoding:
        with ``visual`` only the pages' visual tokens), then the next ``prompt_sample_tokens`` tokens as
        generation lays them out, with the loss: what a compressed prompt is followed by at inference."""
        T = self.cfg.prompt_sample_tokens
        fits = (self.cfg.max_length - T) // (self.K + self.n_visual)
        p = self._whole(ids, rng.randint(1, max(1, min(4, fits))))
        if p == 0 or p >= len(ids):
            return None
        segs = prompt_continuation_segments(ids[:p], ids[p : p + T], self.K, self.n_visual, self.prompt_encoding,
                                            self.chunker())
        s = build_sample(segs)
        return Item(s) if len(s) <= self.cfg.max_length else None

    def _needle(self, ids: list[int], rng: random.Random) -> Item | None:
        """A needle in a haystack as ``vist2 eval niah`` asks it (:func:`vist2.needle.build_sample`:
        RULER's needle, question and answer start, a chat or a plain prompt), of 256..1,024 tokens at a
        random depth, but the haystack is the window's own text and the keys pairs of its words; laid out
        as the engine lays out the prompt (:func:`vist2.needle.needle_prompt`), the loss on the value and
        the stop alone."""
        sentences = re.split(r"(?<=[.!?;:])\s+", " ".join(self.tok.decode(ids[: 4 * self.cfg.max_length]).split()))
        words = sorted({w.lower() for w in " ".join(sentences).split() if w.isalpha() and len(w) > 2})
        if len(sentences) < 2 or len(words) < 2:
            return None
        fmt = rng.choice(("chat", "plain"))
        try:
            sample = needle_sample(self.tok, rng.randint(256, 1024), 100 * rng.random(), 0, seed=rng.getrandbits(48),
                                   haystack=sentences, prompt_format=fmt, words=(words, words))
        except ValueError:  # the prompt without a haystack is already longer than the draw
            return None
        req = needle_prompt(self.tok, sample, fmt)
        segs = prompt_segments(req.prefix, req.query, req.suffix, self.K, self.n_visual, self.prompt_encoding,
                               self.chunker(), req.question, req.styles)
        answer = self.encode(f" {sample.answers[0]}.") + [self.turn_end]
        s = build_sample([*segs, *olm_segments(answer, self.K, self.n_visual, loss=True, chunker=self.chunker())])
        return Item(s) if len(s) <= self.cfg.max_length else None

    def _copy(self, ids: list[int], rng: random.Random) -> Item | None:
        """A span of raw text, a line break and the same span again, the loss on the repeat alone: the
        repeat is best predicted by looking back (an induction signal, from text; no pages). Half the time
        the span is the window's own text (8..``copy_tokens`` tokens), else random 7-digit numbers and words
        of the window, which only the first copy can tell."""
        nl = self.encode("\n")
        n = rng.randint(8, max(8, min(self.cfg.copy_tokens, (self.cfg.max_length - len(nl)) // 2)))
        if rng.random() < 0.5:
            if len(ids) < n + 1:
                return None
            o = rng.randrange(len(ids) - n + 1)
            span = ids[o : o + n]
        else:
            span = self._random_span(ids[: 4 * self.cfg.max_length], n, rng)
        s = build_sample([Raw(tuple(span + nl), loss=False), Raw(tuple(span), loss=True)])
        return Item(s) if len(s) <= self.cfg.max_length else None

    def _random_span(self, ids: list[int], n: int, rng: random.Random) -> list[int]:
        """``n`` tokens of random 7-digit numbers and words of ``ids``' text (a string no prior predicts)."""
        words = [w for w in self.tok.decode(ids).split() if w.isalpha()] or ["a"]
        text = ""
        while len(self.encode(text)) < n:
            text += f" {rng.randint(10**6, 10**7 - 1)}" if rng.random() < 0.5 else f" {rng.choice(words)}"
        return self.encode(text)[:n]

    def _olm_windows(self, ids: list[int]) -> list[tuple[Item, int]]:
        """The document's consecutive OLM windows, each with the index of its first token."""
        W, M, fit = self.olm_window, self.cfg.max_length, self.chunker()
        # a long document becomes consecutive windows, each a sample of its own (positions restart);
        # chunks the fit rule closes early add images, so a window shrinks until its layout fits
        out, i = [], 0
        while len(ids) - i >= 2:  # one token has nothing to predict
            w = W
            while True:
                s = build_sample(olm_segments(ids[i : i + w], self.K, self.n_visual, chunker=fit))
                if len(s) <= M:
                    break
                w -= len(s) - M
            out.append((Item(s), i))
            i += w
        return out

    def _sft(self, rec, rng, progress):
        msgs = rec["messages"]
        try:
            chat = self._chat_prompt(self.tok, msgs[:-1], history=self.cfg.chat_history)
        except ValueError:
            return [], "bad_chat"
        prefix, query, suffix, question = chat
        response = self.encode(msgs[-1]["content"]) + [self.turn_end]  # <think>...</think> stays in the reply
        s = build_sample(sft_segments(prefix, query, suffix, response, self.K, self.n_visual, self.prompt_encoding,
                                      self.chunker(), question, chat.styles))
        if len(s) > self.cfg.max_length:
            return [], "too_long"
        return [Item(s)], None


def pack(items, max_length: int, pack: bool = True):
    """Group items into rows of at most ``max_length`` slots, in order (greedy, deterministic).

    Yields lists of items; the caller collates a row's samples side by side, and
    the plan keeps them apart (sample ids: attention never crosses samples).
    """
    row, used = [], 0
    for it in items:
        n = len(it)
        if n > max_length:
            raise ValueError(f"a sample of {n} slots is longer than max_length={max_length}")
        if row and (not pack or used + n > max_length):
            yield row
            row, used = [], 0
        row.append(it)
        used += n
    if row:
        yield row
