"""Auxiliary lookback loss: after a page, the LLM must name the characters the page ended with.

Measured on the nano models (bench/notes/nano.md, round 6), 69-76 % of what 256 tokens of
text context are worth to an 8-token continuation is in the context's last four tokens; after a
page boundary those live only in the page's last visual tokens. The models read pages well when
asked to transcribe them (MT-OCR) but do not pull a page's *end* into the text that continues it:
the continuation's next-token loss is the only signal for that, a few targets in every K.

This loss asks for it directly. At every slot that predicts one of the first ``span`` tokens of a
chunk that follows a compressed chunk (the page's last visual token predicts the first, then the
chunk's own text tokens), a head reads the LLM's hidden state after ``layer`` layers and names each
of the ``tokens`` tokens before the predicted one that lie on the previous page. The rest of the
LLM can then use them: they are in the residual stream half-way up. One linear map per distance
``d`` (``hidden x hidden``, identity at the start) feeds the model's own LM head (its weight
detached, so the loss does not move the next-token head), so the head's size does not grow with
the vocabulary. Like the page and character heads it is not part of the model: it has its own
AdamW at the stage's learning rate and is dropped when training ends. The layout (which slot
predicts what, which chunk is a page) is read off the plan, as everything else. In round 6 it
taught the nano LLM the reading (its head right 87-97 % of the time) but not its use: retention fell.
The text-twin loss (:mod:`vist2.training.twin_loss`) is the one that moved it.

    >>> aux = LookbackLoss.build(cfg, model)        # None when lookback_weight is 0  # doctest: +SKIP
    >>> out = model(plan=plan, pixel_values=pixels)  # the hook records layer ``layer``'s output  # doctest: +SKIP
    >>> loss = out.loss + aux.loss(plan, progress)                                  # doctest: +SKIP
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..layout import IGNORE, Plan, page_continuations


def lookback_targets(plan: Plan, span: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(row, slot, target)``: ``row`` and ``slot`` ``(N,)``, ``target`` ``(N, tokens)``: the ids of the ``tokens`` tokens before the one ``slot`` predicts (distance 1
    first), ``IGNORE`` where that token is not on the previous page (in the current chunk, or before
    the page's first token). Queries: the slots that predict the first ``span`` tokens of each chunk
    (or raw text) right after an interleaved (compressed) chunk of the same sample.

    >>> from vist2.chunking import fixed_chunker
    >>> from vist2.layout import build_sample, collate, olm_segments
    >>> plan = collate([build_sample(olm_segments(list(range(10, 20)), 4, 2, chunker=fixed_chunker(4)))])
    >>> row, slot, tgt = lookback_targets(plan, span=2, tokens=2)
    >>> slot.tolist(), tgt.tolist()
    ([5, 6, 11, 12], [[13, 12], [-100, 13], [17, 16], [-100, 17]])
    """
    ids = plan.input_ids.cpu()
    rows, slots, targets = [], [], []
    for b, start, end, queries in page_continuations(plan, span):
        page = ids[b, start:end].tolist()
        for n, q in enumerate(queries):  # q predicts the n-th token after the page
            rows.append(b)
            slots.append(q)
            targets.append([page[len(page) - d + n] if d > n and d - n <= len(page) else IGNORE
                            for d in range(1, tokens + 1)])
    if not rows:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty, torch.zeros((0, tokens), dtype=torch.long)
    return torch.tensor(rows), torch.tensor(slots), torch.tensor(targets)


class LookbackLoss:
    """The auxiliary lookback loss of one training run (see the module docstring)."""

    def __init__(self, model, weight: float, until: float, lr: float, span: int, tokens: int, layer: int | None):
        core = getattr(model, "model", model)
        layers = core.language_model.layers
        self.layer = len(layers) // 2 if layer is None else layer
        if not 1 <= self.layer <= len(layers):
            raise ValueError(f"lookback_layer must be in [1, {len(layers)}] (the LLM's layers), got {self.layer}")
        self.weight, self.until, self.span, self.tokens = float(weight), float(until), int(span), int(tokens)
        self.lm_head = model.get_output_embeddings()
        hidden = self.lm_head.weight.shape[1]
        device = self.lm_head.weight.device
        self.maps = nn.ModuleList(nn.Linear(hidden, hidden, bias=False) for _ in range(self.tokens)).to(device)
        with torch.no_grad():
            for m in self.maps:
                m.weight.copy_(torch.eye(hidden))
        self.optimizer = torch.optim.AdamW(self.maps.parameters(), lr=lr, weight_decay=0.0)
        self._out: torch.Tensor | None = None
        self._hook = layers[self.layer - 1].register_forward_hook(self._record)
        self.last: float | None = None
        self.last_acc: float | None = None

    @classmethod
    def build(cls, cfg, model) -> "LookbackLoss | None":
        if not cfg.lookback_weight:
            return None
        return cls(model, cfg.lookback_weight, cfg.lookback_until, cfg.learning_rate, cfg.lookback_span,
                   cfg.lookback_tokens, cfg.lookback_layer)

    def _record(self, module, inputs, output) -> None:
        h = output[0] if isinstance(output, tuple) else output
        self._out = h if module.training else None

    def loss(self, plan: Plan, progress: float) -> torch.Tensor | float:
        """Weighted loss for the forward pass just run (0.0 past ``until`` or with no page boundary)."""
        h, self._out = self._out, None
        if h is None or progress >= self.until:
            return 0.0
        row, slot, target = lookback_targets(plan, self.span, self.tokens)
        if not len(row):
            return 0.0
        q = h[row.to(h.device), slot.to(h.device)].float()  # (N, hidden)
        target = target.to(h.device)
        w = self.lm_head.weight.detach().float()
        total, count, right = 0.0, 0, 0
        for d, m in enumerate(self.maps):
            y = target[:, d]
            keep = y != IGNORE
            if not keep.any():
                continue
            logits = F.linear(m(q[keep]), w)
            total = total + F.cross_entropy(logits, y[keep], reduction="sum")
            count += int(keep.sum())
            right += int((logits.argmax(-1) == y[keep]).sum())
        if not count:
            return 0.0
        loss = total / count
        self.last, self.last_acc = float(loss.detach()), right / count
        return self.weight * loss

    def for_batch(self, batch, progress: float) -> torch.Tensor | float:
        return self.loss(batch.plan, progress)

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def close(self) -> None:
        self._hook.remove()

    def log_values(self) -> dict:
        out = {} if self.last is None else {"train/lookback_loss": self.last}
        if self.last_acc is not None:
            out["train/lookback_acc"] = self.last_acc
        return out
