"""The engine's step as the scheduler plans it: a prefill budget of one chunk, the step plan and the
request statuses, the prompt fed at its layout's positions, abort's final result."""

import pytest

from test_engine import _engine, _ids, check  # the engine-vs-teacher helpers
from vist2.build import load_tokenizer
from vist2.config import preset_config
from vist2.engine.request import FinishReason, RequestStatus
from vist2.engine.sampling import SamplingParams
from vist2.engine.types import Request
from vist2.positions import Kind, window_slots


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


BETA = preset_config("tiny").n_visual


@pytest.mark.parametrize("encoding", ["visual", "interleaved"])
def test_a_prefill_budget_of_one_chunk_equals_the_teacher(tok, encoding):
    """``prefill_budget == n_visual`` (the least allowed): every piece holds at most one chunk's visual
    tokens, with and without a row decoding, and every logit still equals the teacher-forced model."""
    reports = []
    eng = _engine(tok, encoding, max_batch=2, prefill_budget=BETA, observer=reports.append)
    assert eng.n_visual == BETA
    first = Request(query=_ids(tok, 2 * eng.K + 20), params=SamplingParams(max_new_tokens=60, ignore_eos=True))
    second = Request(query=_ids(tok, 3 * eng.K + 30, offset=40), prefix=_ids(tok, 5, offset=500),
                     params=SamplingParams(max_new_tokens=eng.K + 8, ignore_eos=True))
    a = eng.add(first)
    eng.step()  # alone: its whole prompt in pieces of at most BETA entries, then its first token
    b = eng.add(second)
    while eng.busy:
        eng.step()
    check(eng, first, eng.result(a))
    check(eng, second, eng.result(b))
    assert all(n <= BETA for r in reports for n in [r.prefill_tokens] if r.step > 1)  # while `first` decodes
    assert sum(1 for r in reports if r.prefill_tokens) > 3  # the second prompt took several steps


def test_schedule_plans_the_step_and_sets_the_status(tok):
    eng = _engine(tok, max_batch=1, prefill_budget=2048)
    req = Request(query=_ids(tok, 2 * eng.K + 20), prefix=_ids(tok, 3, offset=300),
                  params=SamplingParams(max_new_tokens=3, ignore_eos=True))
    rid = eng.add(req)
    other = eng.add(Request(query=_ids(tok, 10), params=SamplingParams(max_new_tokens=2)))
    [state, waiting] = eng.scheduler.waiting
    assert state.status is RequestStatus.WAITING and state.rid == rid and waiting.rid == other
    plan = eng.scheduler.schedule()
    assert plan.admitted == [state] and not plan.failed and state.row == 0
    assert list(eng.scheduler.waiting) == [waiting]  # one row: the other request waits
    # no row decodes: the whole prompt is planned in this step, and the request decodes in it
    assert plan.decode == [state] and state.status is RequestStatus.DECODING
    # the pieces feed the prompt's kept slots at the positions its layout gives them
    sample = state.plan.sample
    kept = [p for p, k, ev in zip(sample.position, sample.kind, sample.evicted) if k == Kind.VISUAL or not ev]
    fed = [q for batch in plan.prefill for _, piece in batch.pieces for q in piece.positions]
    assert fed == kept and fed == list(range(len(fed)))
    assert state.plan.footprint == len(fed) + 1  # the visual encoding: no text beside its chunk


def test_abort_returns_a_final_result(tok):
    eng = _engine(tok, max_batch=1)
    running = eng.add(Request(query=_ids(tok, 30), params=SamplingParams(max_new_tokens=50, ignore_eos=True)))
    waiting = eng.add(Request(query=_ids(tok, 12), params=SamplingParams(max_new_tokens=5)))
    for _ in range(4):
        eng.step()
    state = eng.scheduler.running[0]
    generated = list(state.generated)
    res = eng.abort(running)
    assert res.request_id == running and res.stats.finish_reason == "abort" and res.token_ids == generated
    assert len(generated) == 4 and state.status is RequestStatus.FINISHED
    assert state.finish_reason is FinishReason.ABORT
    assert eng.kv.n_free == 1 and eng.kv.length(0) == 0  # its row is free and empty
    res = eng.abort(waiting)
    assert res.request_id == waiting and res.stats.finish_reason == "abort" and res.token_ids == []
    assert eng.abort(waiting) is None and eng.abort(12345) is None
    assert not eng.busy and eng.result(running) is None  # an aborted request leaves nothing to collect


def test_window_slots_are_those_of_a_closed_olm_chunk():
    """Decode-time compression places a window's visual tokens where training's layout puts them."""
    from vist2.chunking import fixed_chunker
    from vist2.layout import build_sample, olm_segments

    s = build_sample(olm_segments(list(range(10)), 4, 2, chunker=fixed_chunker(4)))
    second_visual = [p for p, k, c in zip(s.position, s.kind, s.chunk) if k == Kind.VISUAL and c == 1]
    second_text = [p for p, k, c in zip(s.position, s.kind, s.chunk) if k == Kind.TEXT and c == 1]
    assert list(window_slots(second_text[0], len(second_text), 2).visual) == second_visual == [2, 3]


def test_prompt_encoding_can_be_set_per_engine(tok):
    """Engine(prompt_encoding=...) lays a prompt out, and writes after it, exactly as an engine whose model
    has that encoding; an unknown encoding is refused by name."""
    from vist2.engine import Engine

    base = _engine(tok, "visual")
    req = Request(query=_ids(tok, 2 * base.K + 20), params=SamplingParams(max_new_tokens=12, ignore_eos=True))
    over = Engine(base.model, base.processor, max_batch=1, prompt_encoding="interleaved")
    native = _engine(tok, "interleaved", max_batch=1)
    assert {c.kind for c in base.plan(req).sample.chunks} == {"visual"}
    assert {c.kind for c in over.plan(req).sample.chunks} == {"interleaved"}
    assert over.plan(req).sample.position == native.plan(req).sample.position
    assert over.generate([req])[0].token_ids == native.generate([req])[0].token_ids
    with pytest.raises(ValueError, match="prompt_encoding"):
        Engine(base.model, base.processor, prompt_encoding="pixels")
