"""Auxiliary text-twin loss: after a page, the LLM should be in the state it would be in had it read
the text.

A lookback loss (a head naming a page's last tokens; round 6, removed since) showed the nano LLM can
fetch a page's last characters at the slots that continue it (97 % at the page's last visual slot) and still predict the
next token no better than from one raw character (bench/notes/nano.md, round 6): what it fetches is
not in the form its later layers use for text. This loss asks for that form. For every OLM sample
of the batch (a sample with compressed chunks) the same tokens are laid out as plain text, its
*twin*, and run through the same model without gradients: the teacher. At the slots that predict
the first ``span`` tokens after each page (the page's last visual slot, then the next chunk's own
text slots), each LLM layer's output is pulled towards the twin's at the slot that predicts the same
token: the mean squared error over the layers, each divided by the teacher's variance there. The
layout of both is read off plans; nothing but the model is trained by it (it has no head).

    >>> aux = TwinLoss.build(cfg, model)               # None when twin_weight is 0  # doctest: +SKIP
    >>> out = model(plan=plan, pixel_values=pixels)     # the hooks record each layer's output  # doctest: +SKIP
    >>> loss = out.loss + aux.loss(plan, progress)       # runs the twins, no gradient  # doctest: +SKIP
"""

from __future__ import annotations

import torch

from ...layout import Kind, Plan, Raw, build_sample, collate


def page_continuations(plan: Plan, span: int) -> list[tuple[int, int, int, list[int]]]:
    """Where text continues after a page: ``(row, start, end, slots)`` for every interleaved
    (compressed) chunk followed by text of the same sample. ``start:end`` are the chunk's text slots
    (its page's text); ``slots`` are the slots that predict the first ``span`` tokens after it (a slot
    predicts the next one: the page's last visual slot, then the continuing text's own slots), up to
    the next page's text. Where the twin loss acts: where a continuation must read a page.

    >>> from vist2.chunking import fixed_chunker
    >>> from vist2.layout import olm_segments
    >>> plan = collate([build_sample(olm_segments(list(range(10)), 4, 2, chunker=fixed_chunker(4)))])
    >>> page_continuations(plan, span=3)
    [(0, 0, 4, [5, 6, 7]), (0, 6, 10, [11, 12])]
    """
    out = []
    B, T = plan.shape
    for b in range(B):
        k, c, s, ev = (x[b].tolist() for x in (plan.kind, plan.chunk, plan.sample, plan.evicted))
        t = 0
        while t < T:
            if not (k[t] == Kind.TEXT and ev[t]):  # an interleaved chunk: its evicted text, then its visual slots
                t += 1
                continue
            ch, start = c[t], t
            while t < T and k[t] == Kind.TEXT and ev[t] and c[t] == ch:
                t += 1
            end = t
            while t < T and k[t] == Kind.VISUAL and c[t] == ch:
                t += 1
            if t == end:
                continue
            slots, nxt = [], t
            while len(slots) < span and nxt < T and k[nxt] == Kind.TEXT and s[nxt] == s[t - 1]:
                if ev[nxt] and slots and c[nxt] != c[nxt - 1]:  # the next page's text: a new boundary
                    break
                slots.append(nxt - 1)
                nxt += 1
            if slots:
                out.append((b, start, end, slots))
    return out


def twin_pairs(plan: Plan, span: int, page_slot: bool = True) -> tuple[Plan | None, torch.Tensor, torch.Tensor]:
    """``(twins, student, teacher)``: the plan of the text twins (one per sample of ``plan`` that has a
    compressed chunk, packed in the same rows), and ``(N, 2)`` ``(row, slot)`` index pairs: the
    student's slot that predicts one of the first ``span`` tokens after a page, and the twin's slot
    that predicts the same token. ``page_slot``: include the page's last visual slot (it predicts the
    first token after the page). ``twins`` is None when no sample has a page.

    >>> from vist2.chunking import fixed_chunker
    >>> from vist2.layout import olm_segments
    >>> plan = collate([build_sample(olm_segments(list(range(10, 20)), 4, 2, chunker=fixed_chunker(4)))])
    >>> twins, student, teacher = twin_pairs(plan, span=2)
    >>> twins.input_ids[0].tolist(), student[:, 1].tolist(), teacher[:, 1].tolist()
    ([10, 11, 12, 13, 14, 15, 16, 17, 18, 19], [5, 6, 11, 12], [3, 4, 7, 8])
    """
    kind, sample = plan.kind.cpu(), plan.sample.cpu()
    twin_rows: list[list] = [[] for _ in range(plan.shape[0])]
    where: dict[tuple[int, int], tuple[int, int]] = {}  # (row, sample) -> (twin row offset, first text slot)
    student, teacher = [], []
    for b, _, _, slots in page_continuations(plan, span):
        for q in slots:
            if not page_slot and kind[b, q] == Kind.VISUAL:
                continue
            s = int(sample[b, q])
            if (b, s) not in where:
                text = ((sample[b] == s) & (kind[b] == Kind.TEXT)).nonzero().flatten()
                offset = sum(len(t) for t in twin_rows[b])
                twin_rows[b].append(build_sample([Raw(tuple(plan.input_ids[b, text].tolist()))]))
                where[(b, s)] = (offset, int(text[0]))
            offset, first = where[(b, s)]
            # the predicted token's index among the sample's text tokens; the twin predicts it one slot before
            u = int(((sample[b, first : q + 2] == s) & (kind[b, first : q + 2] == Kind.TEXT)).sum()) - 1
            student.append((b, q))
            teacher.append((b, offset + u - 1))
    if not student:
        empty = torch.zeros((0, 2), dtype=torch.long)
        return None, empty, empty
    return collate(twin_rows), torch.tensor(student), torch.tensor(teacher)


class TwinLoss:
    """The auxiliary text-twin loss of one training run (see the module docstring)."""

    def __init__(self, model, weight: float, until: float, span: int, page_slot: bool):
        self.core = getattr(model, "model", model)
        self.weight, self.until, self.span, self.page_slot = float(weight), float(until), int(span), page_slot
        self._mode: str | None = "student"
        self._outs: dict[str, list] = {"student": [], "teacher": []}
        self._hooks = [layer.register_forward_hook(self._record) for layer in self.core.language_model.layers]
        self.last: float | None = None

    @classmethod
    def build(cls, cfg, model, processor=None) -> "TwinLoss | None":
        if not cfg.twin_weight:
            return None
        return cls(model, cfg.twin_weight, cfg.twin_until, cfg.twin_span, cfg.twin_page_slot)

    def _record(self, module, inputs, output) -> None:
        if module.training and self._mode is not None:
            self._outs[self._mode].append(output[0] if isinstance(output, tuple) else output)

    def loss(self, plan: Plan, progress: float) -> torch.Tensor | float:
        """Weighted loss for the forward pass just run (0.0 past ``until`` or with no page boundary)."""
        student_h, self._outs = self._outs["student"], {"student": [], "teacher": []}
        if not student_h or progress >= self.until:
            return 0.0
        twins, student, teacher = twin_pairs(plan, self.span, self.page_slot)
        if twins is None:
            return 0.0
        self._mode = "teacher"
        try:
            with torch.no_grad():
                self.core(plan=twins)
        finally:
            teacher_h, self._outs, self._mode = self._outs["teacher"], {"student": [], "teacher": []}, "student"
        dev = student_h[0].device
        sb, sq = student[:, 0].to(dev), student[:, 1].to(dev)
        tb, tq = teacher[:, 0].to(dev), teacher[:, 1].to(dev)
        total = 0.0
        for s, t in zip(student_h, teacher_h):
            target = t[tb, tq].float()
            total = total + ((s[sb, sq].float() - target) ** 2).mean() / target.var().clamp_min(1e-6)
        loss = total / len(student_h)
        self.last = float(loss.detach())
        return self.weight * loss

    def for_batch(self, batch, progress: float) -> torch.Tensor | float:
        return self.loss(batch.plan, progress)

    def step(self) -> None:  # no parameters of its own
        pass

    def close(self) -> None:
        for h in self._hooks:
            h.remove()

    def log_values(self) -> dict:
        return {} if self.last is None else {"train/twin_loss": self.last}
