"""Cache entries of one benchmarked sequence: the engine's own prompt plan, then the generated tokens.

The prompt's layout and footprint come from the engine (:meth:`Engine.plan`: query chunks cut by
the fit rule, the tail rule), so the bench sizes the cache exactly as the engine admits the prompt.
The generated tokens are not known before the run; they are laid out every K tokens (a window the
fit rule closes earlier would add visual entries sooner; the run then reports it and
``--max-cache-tokens`` lifts the limit).

    >>> from vist2.layout import Raw
    >>> kv_layout([Raw(tuple(range(150)))], 140, 64, 16, "none")
    {'prompt': 150, 'final': 289, 'peak': 289}
"""

from __future__ import annotations

from typing import Sequence

from ..chunking import fixed_chunker
from ..layout import Kind, Raw, Segment, build_sample, olm_segments
from ..modes import Mode


def prompt_plan(engine, request):
    """The engine's plan of a request's prompt: ``.segments`` (its layout) and ``.footprint`` (cache
    entries it needs at its peak, the first generated token included)."""
    return engine.plan(request)


def kv_layout(prompt: Sequence[Segment], n_new: int, K: int, n_visual: int, mode: str) -> dict:
    """Cache entries of one sequence whose prompt is laid out as ``prompt`` and which generates
    ``n_new`` tokens: ``prompt`` (after prefill), ``final`` and ``peak``.

    Read off the layout plan (:mod:`vist2.layout`): walking the laid-out sequence, every token enters
    the cache, and after a chunk's last visual token that chunk's evicted text leaves. The last
    generated token is sampled but never fed, so ``n_new - 1`` tokens enter; one more is laid out so
    that a window filled exactly at the end counts as compressed, as in the engine. Generated text is
    cut every ``K`` tokens in ``gcc`` and stays raw otherwise.
    """
    prompt = list(prompt)
    response = list(range(n_new))
    reply = (olm_segments(response, K, n_visual, chunker=fixed_chunker(K)) if mode == Mode.GCC
             else [Raw(tuple(response))])
    s = build_sample(prompt + reply)
    alive, peak, trace = 0, 0, []
    for t in range(len(s)):
        alive += 1
        peak = max(peak, alive)
        last_visual = s.kind[t] == Kind.VISUAL and (t + 1 == len(s) or s.kind[t + 1] != Kind.VISUAL
                                                    or s.chunk[t + 1] != s.chunk[t])
        if last_visual:
            alive -= sum(1 for c, e in zip(s.chunk, s.evicted) if e and c == s.chunk[t])
        trace.append((alive, peak))
    n_prompt_slots = len(build_sample(prompt))
    final_alive, final_peak = trace[len(s) - 2]  # before the never-fed last token
    return {"prompt": trace[n_prompt_slots - 1][0], "final": final_alive, "peak": final_peak}


def cache_need(engine, request, n_new: int) -> tuple[dict, int]:
    """``(kv_expected, capacity)`` for one request generating ``n_new`` tokens: the layout's prompt /
    final / peak entries, and the row capacity that holds both the engine's prompt footprint and the
    generation's peak (plus the entry a sampled token is written to)."""
    plan = prompt_plan(engine, request)
    need = kv_layout(plan.segments, n_new, engine.K, engine.n_visual, request.mode)
    return need, max(plan.footprint, need["peak"] + 1)


def fit_batch(budget_gib: float, capacity: int, bytes_per_entry: int) -> int:
    """The most rows of ``capacity`` entries whose preallocated cache fits ``budget_gib`` GiB (the engine
    allocates one scratch row beside them). Weights and activations come on top of the budget."""
    rows = int(budget_gib * 2**30 // (capacity * bytes_per_entry)) - 1
    if rows < 1:
        raise ValueError(f"--batch-fit {budget_gib}: {budget_gib} GiB holds no row of {capacity} entries "
                         f"({capacity * bytes_per_entry} bytes each, and one scratch row)")
    return rows
