"""Generation with global context compression.

The engine speaks token ids; a :class:`~vist2.processing.VIST2Processor` at its
edge turns chunk tokens into pixels and generated ids into text. Per sequence:

1. **prefill** — the prompt is laid out by :func:`vist2.layout.prompt_segments`
   (query chunks compressed, the tail rule, raw prefix/suffix) and fed one
   segment at a time, so peak memory is the visual memory plus one chunk;
2. **decode** — one token at a time; in ``gcc`` mode the text window is closed when it holds
   K tokens, or when a sampled token's text would no longer fit the image (the processor's
   running fit state decides; the token then begins the next window). The closed window is
   rendered, read by the vision tower and aligner, and its β visual tokens run through the
   LLM attending to the cache; their K/V replace the window. Chunks are cut exactly where
   ``VIST2Processor.chunk_ids`` cuts them in training.

Modes share this one code path: ``gcc`` (prompt and output compressed, the
paper), ``pcc`` (prompt only, the Glyph-style baseline) and ``none`` (a plain LLM).

Example::

    >>> from vist2.engine import Engine, SamplingParams
    >>> engine = Engine.from_pretrained("runs/tiny")                       # doctest: +SKIP
    >>> out = engine.generate_text(["Once upon a time"], SamplingParams(max_new_tokens=200))  # doctest: +SKIP
    >>> out[0].text, out[0].stats.kv_tokens, out[0].stats.kv_tokens_uncompressed   # doctest: +SKIP
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Iterator, Sequence

import torch

from ..layout import Chunk, Raw, Segment, prompt_segments
from ..modeling import VIST2ForCausalLM
from ..processing import VIST2Processor
from ..runtime import eos_ids, kv_geometry, load_checkpoint
from .cache import CompressedKVCache
from .sampling import Sampler, SamplingParams
from ..text import StreamDecoder

MODES = ("gcc", "pcc", "none")


@dataclass
class Request:
    """A prompt as ids: ``prefix`` and ``suffix`` stay raw, ``query`` is compressed by the tail rule.
    ``question = (start, end)``: ``query[start:end]`` is the user's question, drawn in red (paper Fig. 7)."""

    query: list[int]
    prefix: list[int] = field(default_factory=list)
    suffix: list[int] = field(default_factory=list)
    params: SamplingParams = field(default_factory=SamplingParams)
    mode: str = "gcc"
    question: tuple[int, int] | None = None

    @property
    def prompt_ids(self) -> list[int]:
        return [*self.prefix, *self.query, *self.suffix]


@dataclass
class Stats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    chunks_compressed: int = 0  # prompt and generated chunks turned into visual tokens
    visual_tokens: int = 0  # visual tokens in the cache now
    kv_tokens: int = 0  # cache entries held now
    kv_tokens_peak: int = 0
    kv_tokens_uncompressed: int = 0  # what a plain LLM would hold for the same tokens
    kv_bytes: int = 0
    kv_bytes_peak: int = 0
    ttft_s: float = 0.0
    tokens_per_s: float = 0.0
    finish_reason: str = ""  # stop | length | eos | error (this request failed; the others carry on)
    error: str = ""  # what failed, with finish_reason "error"

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Event:
    """One step's news for one request: new text (never half a character), and whether it is done."""

    request_id: int
    delta: str
    token_id: int | None
    done: bool
    stats: Stats | None = None
    result: "Result | None" = None  # on the last event of Engine.stream()


@dataclass
class Result:
    request_id: int
    text: str
    token_ids: list[int]
    stats: Stats
    memory: list[str]  # the text of every chunk held as an image, in cache order
    logits: list[torch.Tensor] | None = None  # the distribution each token was drawn from (record_logits)


class _Seq:
    """Mutable per-request state while it occupies a cache row."""

    def __init__(self, rid: int, req: Request, row: int, processor: VIST2Processor, eos: Sequence[int]):
        p = req.params
        stop_ids = tuple(p.stop_token_ids) + (() if p.ignore_eos else tuple(eos))
        self.rid, self.req, self.row = rid, req, row
        self.sampler = Sampler(p)
        self.stop_ids = set(stop_ids)
        self.decoder = StreamDecoder(processor.tokenizer, stop=p.stop)
        self.history = list(req.prompt_ids)
        self.generated: list[int] = []
        self.window: list[int] = []  # generated text tokens not yet compressed (gcc)
        self.window_start = 0
        self.carry = b""  # bytes of a character split by a chunk boundary, shown in the next image
        self.fit = None  # the open window's fit state (gcc), from the processor
        self.memory: list[str] = []
        self.logits: torch.Tensor | None = None
        self.recorded: list[torch.Tensor] = []
        self.stats = Stats(prompt_tokens=len(req.prompt_ids))
        self.t_start = time.perf_counter()
        self.t_first = 0.0
        self.done = False


class Engine:
    """Runs requests on one model with a compressed KV cache; several requests share it as cache rows.

    Args:
        model: a VIST2ForCausalLM (eval mode is set here).
        processor: its tokenizer + renderer.
        max_batch: cache rows (requests decoded together).
        max_cache_tokens: KV entries a row may hold (the memory limit); a prompt that needs more
            is refused, a generation that reaches it stops with finish_reason ``length``.
        record_logits: keep the distribution behind every sampled token (tests, evaluation).
        prefill_step: raw prompt text is fed in pieces of at most this many tokens (bounds activations).
        max_prefills_per_step: requests admitted (prefilled) per :meth:`step`; a burst of arrivals
            then interleaves with the running rows' decoding instead of stalling it.
    """

    _evict = True  # switched off only by the control test that proves the invariant tests can fail

    def __init__(self, model: VIST2ForCausalLM, processor: VIST2Processor, max_batch: int = 8,
                 max_cache_tokens: int | None = None, record_logits: bool = False, prefill_step: int = 2048,
                 max_prefills_per_step: int = 1):
        if max_batch <= 0:
            raise ValueError(f"max_batch must be > 0, got {max_batch}")
        self.model = model.eval()
        self.processor = processor
        cfg = model.config
        self.K, self.beta = cfg.chunk_tokens, cfg.n_visual
        self.prompt_encoding = cfg.prompt_encoding
        self.max_batch = max_batch
        self.max_cache_tokens = max_cache_tokens or cfg.text_config.max_position_embeddings
        self.record_logits = record_logits
        self.prefill_step = max(1, prefill_step)
        self.max_prefills_per_step = max(1, max_prefills_per_step)
        self.eos = eos_ids(cfg.text_config, processor.tokenizer)
        self._cache: CompressedKVCache | None = None
        self._waiting: deque[tuple[int, Request]] = deque()
        self._running: dict[int, _Seq] = {}  # row -> seq
        self._finished: dict[int, Result] = {}  # until collected by generate() / result()
        self._next_id = 0
        self._n_tokens = len(processor.tokenizer)

    @classmethod
    def from_pretrained(cls, folder, dtype: torch.dtype | None = None, device: str | None = None, **kwargs) -> "Engine":
        model, processor = load_checkpoint(folder, device, dtype or torch.float32)
        return cls(model, processor, **kwargs)

    # -- requests ---------------------------------------------------------------------

    def request(self, prompt: str | None = None, *, messages: list[dict] | None = None,
                params: SamplingParams | None = None, mode: str = "gcc", question: str | None = None) -> Request:
        """Tokenize a plain prompt, or chat ``messages`` (the last user turn is the compressed query;
        its optional ``question`` field is the question, see :func:`chat_prompt`). With a plain prompt,
        ``question`` is appended to it the same way: ``prompt + "\n" + question``."""
        params = (params or SamplingParams()).validate()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        tok = self.processor.tokenizer
        if messages is not None:
            if question is not None:
                raise ValueError("with messages, give the question as the last user message's 'question' field")
            prefix, query, suffix, span = chat_prompt(tok, messages)
        else:
            if prompt is None:
                raise ValueError("give a prompt or messages")
            (query, span), prefix, suffix = query_ids(tok, prompt, question), [], []
        if not (prefix or query or suffix):
            raise ValueError("the prompt is empty")
        return Request(query=query, prefix=prefix, suffix=suffix, params=params, mode=mode, question=span)

    def add(self, request: Request) -> int:
        """Queue a request; returns its id. Raises ValueError if its prompt cannot fit the memory limit."""
        request.params.validate()
        if request.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {request.mode!r}")
        if not request.prompt_ids:
            raise ValueError("the prompt is empty")
        need = self._prompt_footprint(request)
        if need > self.max_cache_tokens:
            raise ValueError(
                f"the prompt needs {need} KV entries ({len(request.prompt_ids)} tokens, mode {request.mode}), "
                f"over the memory limit max_cache_tokens={self.max_cache_tokens}"
            )
        rid = self._next_id
        self._next_id += 1
        self._waiting.append((rid, request))
        return rid

    def _segments(self, req: Request) -> list[Segment]:
        if req.mode == "none":
            return [Raw(tuple(req.prompt_ids))]
        return prompt_segments(req.prefix, req.query, req.suffix, self.K, self.beta, self.prompt_encoding,
                               chunker=self.processor.chunker(self.K), question=req.question)

    def _prompt_footprint(self, req: Request) -> int:
        """Cache entries the prompt needs at its peak (a compressed chunk briefly holds text + visual)."""
        kept, peak = 0, 0
        for seg in self._segments(req):
            if isinstance(seg, Raw):
                kept += len(seg.tokens)
            elif seg.mode == "interleaved":
                peak = max(peak, kept + len(seg.tokens) + seg.n_visual)
                kept += seg.n_visual
            else:
                kept += seg.n_visual
            peak = max(peak, kept)
        return peak + 1  # room for the first generated token

    # -- running ------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return bool(self._waiting or self._running)

    def step(self) -> list[Event]:
        """Admit waiting requests into free rows (prefill, at most ``max_prefills_per_step``), then one
        decode step for every running row."""
        events: list[Event] = []
        self._ensure_cache()
        admitted = 0
        while self._waiting and len(self._running) < self.max_batch and admitted < self.max_prefills_per_step:
            admitted += 1
            rid, req = self._waiting.popleft()
            row = min(set(range(self.max_batch)) - set(self._running))
            try:
                seq = _Seq(rid, req, row, self.processor, self.eos)
            except Exception as e:  # noqa: BLE001 - e.g. its sampler refused its params: fail this request only
                stats = Stats(prompt_tokens=len(req.prompt_ids), finish_reason="error",
                              error=f"{type(e).__name__}: {e}")
                self._finished[rid] = Result(rid, "", [], stats, [], None)
                events.append(Event(rid, "", None, True, stats))
                continue
            self._running[row] = seq
            self._prefill(seq)
        if not self._running:
            return events
        # sample one token per row from its current distribution
        feed: list[_Seq] = []
        for seq in list(self._running.values()):
            try:
                tok = self._sample(seq)
            except Exception as e:  # noqa: BLE001 - one row's sampling failing must not end the other rows
                seq.stats.error = f"{type(e).__name__}: {e}"
                self._finish(seq, "error")
                events.append(Event(seq.rid, "", None, True, seq.stats))
                continue
            # an end-of-sequence token ends the text; it is not part of it
            delta = "" if tok in seq.stop_ids else seq.decoder.push(tok)
            reason = self._finish_reason(seq, tok)
            if reason:
                delta += seq.decoder.finish() if reason != "stop" else ""
                self._finish(seq, reason)
                events.append(Event(seq.rid, delta, tok, True, seq.stats))
            else:
                events.append(Event(seq.rid, delta, tok, False))
                feed.append(seq)
        if feed:
            self._decode(feed)
        return events

    def abort(self, request_id: int) -> bool:
        """Drop a request (waiting or running), freeing its row. Returns whether it was found."""
        for i, (rid, _) in enumerate(self._waiting):
            if rid == request_id:
                del self._waiting[i]
                return True
        for row, seq in list(self._running.items()):
            if seq.rid == request_id:
                self._running.pop(row)
                self._cache.length[row] = 0
                return True
        return False

    def stream(self, requests: Sequence[Request]) -> Iterator[Event]:
        """Run requests to completion, yielding events as they happen."""
        ids = [self.add(r) for r in requests]
        pending = set(ids)
        while pending:
            for ev in self.step():
                if ev.request_id in pending:
                    if ev.done:
                        pending.discard(ev.request_id)
                        ev.result = self._finished.pop(ev.request_id, None)
                    yield ev

    def generate(self, requests: Sequence[Request]) -> list[Result]:
        """Run requests to completion; results in request order."""
        ids = [self.add(r) for r in requests]
        while any(i not in self._finished for i in ids):
            self.step()
        return [self._finished.pop(i) for i in ids]

    def result(self, request_id: int) -> Result | None:
        """The result of a finished request (handed out once)."""
        return self._finished.pop(request_id, None)

    def generate_text(self, prompts: Sequence[str], params: SamplingParams | None = None,
                      mode: str = "gcc") -> list[Result]:
        return self.generate([self.request(p, params=params, mode=mode) for p in prompts])

    # -- internals ------------------------------------------------------------------------

    def _ensure_cache(self) -> None:
        if self._cache is not None:
            return
        tc = self.model.config.text_config
        p = next(self.model.parameters())
        g = kv_geometry(tc)
        self._cache = CompressedKVCache(g.layers, self.max_batch, g.kv_heads, g.head_dim,
                                        min(self.max_cache_tokens, 2 * (self.K + self.beta)), p.dtype, p.device,
                                        limit=self.max_cache_tokens)

    @torch.no_grad()
    def _forward(self, seqs: list[_Seq], embeds_BTD: torch.Tensor, positions_BT: torch.Tensor,
                 write_BT: torch.Tensor) -> torch.Tensor:
        """Run new tokens of some rows through the LLM; returns the last token's logits ``(b, V)``."""
        cache = self._cache
        rows = torch.tensor([s.row for s in seqs])
        allowed = cache.prepare(rows, write_BT)
        mask = torch.where(allowed, 0.0, torch.finfo(embeds_BTD.dtype).min).to(embeds_BTD.dtype)[:, None]
        out = self.model.model.language_model(
            inputs_embeds=embeds_BTD, position_ids=positions_BT.to(embeds_BTD.device), attention_mask=mask,
            past_key_values=cache, use_cache=True,
        )
        logits = self.model.lm_head(out.last_hidden_state[:, -1]).float()
        logits[:, self._n_tokens :] = float("-inf")  # padded vocabulary rows the tokenizer cannot decode
        return logits

    def _embed_text(self, ids_BT: torch.Tensor) -> torch.Tensor:
        dev = self.model.device
        return self.model.model.get_input_embeddings()(ids_BT.to(dev))

    def _feed_text(self, seqs: list[_Seq], ids: list[list[int]]) -> None:
        """Append text tokens (the same count per row): position = cache index."""
        n = len(ids[0])
        start = torch.stack([self._cache.length[s.row] for s in seqs])  # (b,)
        write = start[:, None] + torch.arange(n)[None]
        self._check_room(seqs, write)
        logits = self._forward(seqs, self._embed_text(torch.tensor(ids)), write, write)
        for s, lg in zip(seqs, logits):
            self._cache.length[s.row] += n
            s.logits = lg

    def _feed_visual(self, seqs: list[_Seq], texts: list[str], n_text: list[int],
                     styles: list[str] | None = None) -> None:
        """Compress: render each row's chunk text, run its beta visual tokens through the LLM.

        A row with ``n_text > 0`` has that chunk's text at the end of its cache (interleaved): the
        visual tokens are written after it, attend to it, then move to where it began.
        """
        cache = self._cache
        pixels = self.processor.pixels_from_texts(texts, styles).to(self.model.device, self.model.dtype)
        visual = self.model.model.encode_images(pixels)  # (b, beta, D)
        end = torch.stack([cache.length[s.row] for s in seqs])
        base = end - torch.tensor(n_text)  # where the chunk's text began = the visual tokens' position
        j = torch.arange(self.beta)[None]
        write = end[:, None] + j
        self._check_room(seqs, write)
        logits = self._forward(seqs, visual, base[:, None] + j, write)
        for s, lg, b, e, n, text in zip(seqs, logits, base.tolist(), end.tolist(), n_text, texts):
            if not self._evict:  # test control only: keep the text and the visual tokens
                cache.length[s.row] = e + self.beta
            else:
                if n:
                    cache.move(s.row, e, b, self.beta)
                cache.length[s.row] = b + self.beta
            s.logits = lg
            s.stats.kv_tokens_peak = max(s.stats.kv_tokens_peak, e + self.beta)  # text and visual, briefly
            s.memory.append(text)
            s.stats.chunks_compressed += 1
            s.stats.visual_tokens += self.beta

    def _check_room(self, seqs: list[_Seq], write: torch.Tensor) -> None:
        if int(write.max()) >= self.max_cache_tokens:
            # only generation can get here: prompts were checked when they were added
            raise _CacheFull()

    def _chunk_text(self, seq: _Seq, ids: Sequence[int]) -> str:
        text, seq.carry = self.processor.chunk_text(seq.carry, ids)
        return text

    def _prefill(self, seq: _Seq) -> None:
        for seg in self._segments(seq.req):
            if isinstance(seg, Raw):
                toks = list(seg.tokens)
                step = self.prefill_step
                for i in range(0, len(toks), step):  # bounded activations for long raw prompts (mode none)
                    self._feed_text([seq], [toks[i : i + step]])
            elif isinstance(seg, Chunk):
                style = self.processor.char_styles(seq.carry, seg.tokens, seg.style)  # before the carry moves
                text = self._chunk_text(seq, seg.tokens)
                if seg.mode == "interleaved":
                    self._feed_text([seq], [list(seg.tokens)])
                    self._feed_visual([seq], [text], [len(seg.tokens)], [style])
                else:
                    self._feed_visual([seq], [text], [0], [style])
        seq.window_start = int(self._cache.length[seq.row])
        seq.fit = self.processor.chunk_fit(self.K, seq.carry)
        self._update_kv_stats(seq)

    def _decode(self, seqs: list[_Seq]) -> None:
        # the fit rule: a token whose text would not fit the open window's image closes the window
        # first (it was sampled with the window's text in sight, as the layout's fit_cut says)
        overflow = [s for s in seqs if s.req.mode == "gcc" and s.window and not s.fit.push(s.generated[-1])]
        if overflow and not self._compress(overflow):
            seqs = [s for s in seqs if s not in overflow]
            if not seqs:
                return
        for s in overflow:
            assert s.fit.push(s.generated[-1])  # it begins the new window (or raises if it never fits)
        for s in seqs:
            if s.req.mode == "gcc" and not s.window and s not in overflow:
                s.fit.push(s.generated[-1])
        try:
            self._feed_text(seqs, [[s.generated[-1]] for s in seqs])
        except _CacheFull:
            for s in seqs:  # the memory limit is reached: these rows cannot continue
                self._finish(s, "length")
            return
        for s in seqs:
            s.window.append(s.generated[-1])
            self._update_kv_stats(s)
        full = [s for s in seqs if s.req.mode == "gcc" and s.fit.full]  # K tokens: closed right away
        if full:
            self._compress(full)

    def _compress(self, seqs: list[_Seq]) -> bool:
        """Close the open windows of these rows: render, feed their visual tokens. False if the
        memory limit was reached (the rows are finished)."""
        texts = [self._chunk_text(s, s.window) for s in seqs]
        try:
            self._feed_visual(seqs, texts, [len(s.window) for s in seqs])
        except _CacheFull:
            for s in seqs:
                self._finish(s, "length")
            return False
        for s in seqs:
            assert s.carry == s.fit.carry  # the fit state saw exactly the bytes the image shows
            s.window = []
            s.fit = self.processor.chunk_fit(self.K, s.carry)
            s.window_start = int(self._cache.length[s.row])
            self._update_kv_stats(s)
        return True

    def _sample(self, seq: _Seq) -> int:
        if self.record_logits:
            seq.recorded.append(seq.logits.detach().cpu().clone())
        tok = seq.sampler(seq.logits, seq.history)
        if not seq.generated:
            seq.t_first = time.perf_counter()
            seq.stats.ttft_s = seq.t_first - seq.t_start
        seq.generated.append(tok)
        seq.history.append(tok)
        seq.stats.generated_tokens += 1
        # what a plain LLM would hold at this moment: every token fed so far (the newest is not fed yet)
        seq.stats.kv_tokens_uncompressed = seq.stats.prompt_tokens + seq.stats.generated_tokens - 1
        return tok

    def _finish_reason(self, seq: _Seq, tok: int) -> str:
        if seq.decoder.stopped:
            return "stop"
        if tok in seq.stop_ids:
            return "eos"
        if len(seq.generated) >= seq.req.params.max_new_tokens:
            return "length"
        return ""

    def _update_kv_stats(self, seq: _Seq) -> None:
        st, n = seq.stats, int(self._cache.length[seq.row])
        st.kv_tokens = n
        st.kv_tokens_peak = max(st.kv_tokens_peak, n)
        st.kv_bytes = n * self._cache.bytes_per_token
        st.kv_bytes_peak = st.kv_tokens_peak * self._cache.bytes_per_token

    def _finish(self, seq: _Seq, reason: str) -> None:
        seq.done = True
        seq.stats.finish_reason = reason
        elapsed = time.perf_counter() - seq.t_first if seq.t_first else 0.0
        if elapsed > 0 and seq.stats.generated_tokens > 1:
            seq.stats.tokens_per_s = (seq.stats.generated_tokens - 1) / elapsed
        self._running.pop(seq.row, None)
        self._cache.length[seq.row] = 0
        self._finished[seq.rid] = Result(
            seq.rid, seq.decoder.text, list(seq.generated), seq.stats, list(seq.memory),
            seq.recorded if self.record_logits else None,
        )


class _CacheFull(Exception):
    pass


QUESTION_SEP = "\n"  # between a user message's document (its content) and its question


def query_ids(tokenizer, document: str, question: str | None) -> tuple[list[int], tuple[int, int] | None]:
    """The query's ids and the question's (start, end) span in them (None without a question).

    The query is ``document + "\n" + question`` (just the question when the document is empty), the
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
    the query is then ``content + "\n" + question`` (:func:`query_ids`) and the span marks the
    question's tokens (drawn red, paper Fig. 7); without it the span is None and the whole
    query is the document. Training (SFT) and the engine both split chats here.
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
