"""Layout plan: positions, kinds, loss targets and masks, checked token by token
against hand-worked examples (K=4 text tokens per chunk, beta=2 visual tokens)."""

import pytest
import torch

from vist2.attention import allowed_mask, block_mask, dense_mask, additive_mask
from vist2.chunking import fixed_chunker
from vist2.layout import (
    IGNORE,
    Kind,
    Chunk,
    Raw,
    build_sample,
    caption_segments,
    collate,
    ocr_segments,
    olm_segments,
    prompt_segments,
    sft_segments,
    pays,
    query_parts,
)

T, V = Kind.TEXT, Kind.VISUAL
K, BETA = 4, 2
EVERY_K = fixed_chunker(K)  # token ids that stand for no text: chunks of K tokens


def rows(plan, row=0):
    """Allowed keys of every query in a row, as sets (readable failure messages)."""
    m = dense_mask(plan)[row]
    return [set(torch.nonzero(m[q]).flatten().tolist()) for q in range(m.shape[0])]


def test_olm_three_chunks():
    toks = [10, 11, 12, 13, 20, 21, 22, 23, 30, 31]
    plan = collate([build_sample(olm_segments(toks, K, BETA, chunker=EVERY_K))])
    assert plan.kind[0].tolist() == [T, T, T, T, V, V, T, T, T, T, V, V, T, T]
    # pos = sum |v_<i| + j : text of chunk i and its visual tokens start at the same place
    assert plan.position[0].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 2, 3, 4, 5]
    assert plan.chunk[0].tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 2, 2]
    assert plan.evicted[0].tolist() == [1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0]
    assert plan.input_ids[0].tolist() == [10, 11, 12, 13, -1, -1, 20, 21, 22, 23, -1, -1, 30, 31]
    # the first token of chunk i+1 is predicted by the last visual token of chunk i (paper's L_olm)
    I = IGNORE
    assert plan.labels[0].tolist() == [11, 12, 13, I, I, 20, 21, 22, 23, I, I, 30, 31, I]
    assert rows(plan) == [
        {0}, {0, 1}, {0, 1, 2}, {0, 1, 2, 3},            # c1 causal
        {0, 1, 2, 3, 4}, {0, 1, 2, 3, 4, 5},             # v1 sees all of c1, v1 causally
        {4, 5, 6}, {4, 5, 6, 7}, {4, 5, 6, 7, 8}, {4, 5, 6, 7, 8, 9},  # c2: v1 + c2, never c1
        {4, 5, 6, 7, 8, 9, 10}, {4, 5, 6, 7, 8, 9, 10, 11},            # v2: v1, c2, v2
        {4, 5, 10, 11, 12}, {4, 5, 10, 11, 12, 13},      # c3: v1, v2, c3
    ]
    assert [c.tokens for c in plan.chunks] == [(10, 11, 12, 13), (20, 21, 22, 23)]


def test_olm_raw_prefix_and_exact_multiple():
    # a raw prefix stays text forever; a last chunk of exactly K gets no visual tokens
    # (nothing after it could read them)
    plan = collate([build_sample([Raw((1, 2))] + olm_segments([10, 11, 12, 13, 20, 21, 22, 23], K, BETA,
                                                              chunker=EVERY_K))])
    assert plan.kind[0].tolist() == [T, T, T, T, T, T, V, V, T, T, T, T]
    assert plan.position[0].tolist() == [0, 1, 2, 3, 4, 5, 2, 3, 4, 5, 6, 7]
    assert rows(plan) == [
        {0}, {0, 1},
        {0, 1, 2}, {0, 1, 2, 3}, {0, 1, 2, 3, 4}, {0, 1, 2, 3, 4, 5},
        {0, 1, 2, 3, 4, 5, 6}, {0, 1, 2, 3, 4, 5, 6, 7},
        {0, 1, 6, 7, 8}, {0, 1, 6, 7, 8, 9}, {0, 1, 6, 7, 8, 9, 10}, {0, 1, 6, 7, 8, 9, 10, 11},
    ]
    I = IGNORE
    # raw tokens carry no loss here; olm text does
    assert plan.labels[0].tolist() == [I, 10, 11, 12, 13, I, I, 20, 21, 22, 23, I]


def test_mt_ocr_is_causal_and_sequential():
    plan = collate([build_sample(ocr_segments([[10, 11, 12], [20, 21]], BETA))])
    assert plan.kind[0].tolist() == [V, V, T, T, T, V, V, T, T]
    assert plan.position[0].tolist() == list(range(9))
    assert not plan.evicted.any()
    assert rows(plan) == [set(range(q + 1)) for q in range(9)]
    I = IGNORE
    assert plan.labels[0].tolist() == [I, 10, 11, 12, I, I, 20, 21, I]
    assert [c.tokens for c in plan.chunks] == [(10, 11, 12), (20, 21)]


def test_caption_is_image_then_caption():
    plan = collate([build_sample(caption_segments(3, [7, 8]))])
    assert plan.kind[0].tolist() == [V, V, V, T, T]
    assert plan.position[0].tolist() == [0, 1, 2, 3, 4]
    assert rows(plan) == [set(range(q + 1)) for q in range(5)]
    assert plan.labels[0].tolist() == [IGNORE, IGNORE, 7, 8, IGNORE]
    assert plan.chunks[0].tokens == ()  # an external image, not rendered text


@pytest.mark.parametrize(
    "m, expect",
    [
        (0, ([], [])),
        (2, ([], [0, 1])),  # m <= beta: stays raw
        (3, ([[0, 1, 2]], [])),  # m > beta: compressed
        (4, ([[0, 1, 2, 3]], [])),
        (6, ([[0, 1, 2, 3]], [4, 5])),
        (7, ([[0, 1, 2, 3], [4, 5, 6]], [])),
    ],
)
def test_query_tail_rule(m, expect):
    pieces, carry = query_parts(list(range(m)), K, BETA, chunker=EVERY_K)
    chunks = [p for p, compressed, _, _ in pieces if compressed]
    tail = [t for p, compressed, _, _ in pieces if not compressed for t in p]
    assert (chunks, tail) == expect and carry == b""


def test_sft_visual_prompt_encoding_with_raw_tail():
    # header | query 6 tokens = chunk of 4 + raw tail of 2 | suffix | response 5 tokens
    segs = sft_segments([1], [50, 51, 52, 53, 54, 55], [2], [60, 61, 62, 63, 64], K, BETA, "visual", chunker=EVERY_K)
    plan = collate([build_sample(segs)])
    #            hdr  v(q1)  tail     sfx  r1              v(r1)  r2
    assert plan.kind[0].tolist() == [T, V, V, T, T, T, T, T, T, T, V, V, T]
    assert plan.position[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 6, 7, 8]
    assert plan.input_ids[0].tolist() == [1, -1, -1, 54, 55, 2, 60, 61, 62, 63, -1, -1, 64]
    I = IGNORE
    # loss only on the response; the first response token is predicted by the suffix
    assert plan.labels[0].tolist() == [I, I, I, I, I, 60, 61, 62, 63, I, I, 64, I]
    assert rows(plan) == [
        {0}, {0, 1}, {0, 1, 2},                      # header, v(q1) causal: its text never entered
        {0, 1, 2, 3}, {0, 1, 2, 3, 4}, {0, 1, 2, 3, 4, 5},
        {0, 1, 2, 3, 4, 5, 6}, {0, 1, 2, 3, 4, 5, 6, 7}, {0, 1, 2, 3, 4, 5, 6, 7, 8},
        {0, 1, 2, 3, 4, 5, 6, 7, 8, 9},
        {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10}, {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11},
        {0, 1, 2, 3, 4, 5, 10, 11, 12},              # r2: response chunk 1 evicted
    ]
    assert [c.tokens for c in plan.chunks] == [(50, 51, 52, 53), (60, 61, 62, 63)]


def test_sft_interleaved_prompt_encoding_with_compressed_tail():
    # query of 3 tokens > beta: one compressed chunk of 3; interleaved: text then visual
    segs = sft_segments([], [50, 51, 52], [2], [60], K, BETA, "interleaved", chunker=EVERY_K)
    plan = collate([build_sample(segs)])
    assert plan.kind[0].tolist() == [T, T, T, V, V, T, T]
    assert plan.position[0].tolist() == [0, 1, 2, 0, 1, 2, 3]
    assert plan.evicted[0].tolist() == [1, 1, 1, 0, 0, 0, 0]
    assert rows(plan) == [{0}, {0, 1}, {0, 1, 2}, {0, 1, 2, 3}, {0, 1, 2, 3, 4}, {3, 4, 5}, {3, 4, 5, 6}]
    I = IGNORE
    assert plan.labels[0].tolist() == [I, I, I, I, I, 60, I]


def test_prompt_encoding_is_validated():
    with pytest.raises(ValueError, match="prompt_encoding"):
        prompt_segments([], [1, 2, 3], [], K, BETA, "pixels", chunker=EVERY_K)


def test_packing_and_padding_never_cross_samples():
    a = build_sample(olm_segments([10, 11, 12, 13, 20], K, BETA, chunker=EVERY_K))  # c1 v1 c2: 7 tokens
    b = build_sample([Raw((5, 6), loss=True)])
    plan = collate([[a, b], [b]], pad_to=10)
    assert plan.sample[0].tolist() == [0] * 7 + [1, 1, -1]
    assert plan.position[0].tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1, 0]
    assert plan.sample[1].tolist() == [0, 0] + [-1] * 8
    r = rows(plan, 0)
    assert r[7] == {7} and r[8] == {7, 8}  # sample b sees nothing of sample a
    assert r[6] == {4, 5, 6}
    assert r[9] == {9}  # padding: only itself, so no softmax row is empty
    assert rows(plan, 1)[5] == {5}
    # chunk ids stay distinct across packed samples in a row (a's c1+v1 is chunk 0, its open c2 chunk 1)
    assert plan.chunk[0].tolist() == [0] * 6 + [1] + [-1] * 3 and plan.chunk[1].tolist() == [-1] * 10
    twice = collate([[a, a], [a]])
    assert twice.chunk[0].tolist() == [0] * 6 + [1] + [2] * 6 + [3]  # the second a does not reuse 0 and 1
    assert twice.chunk[1].tolist() == [0] * 6 + [1] + [-1] * 7
    assert [(c.row, c.sample) for c in twice.chunks] == [(0, 0), (0, 1), (1, 0)]
    I = IGNORE
    assert plan.labels[0].tolist() == [11, 12, 13, I, I, 20, I, 6, I, I]
    assert plan.labels[1].tolist() == [6, I] + [I] * 8
    assert plan.kind[0, 9].item() == Kind.PAD and plan.input_ids[0, 9].item() == -1


def test_pad_to_too_short_is_an_error():
    a = build_sample([Raw((1, 2, 3))])
    with pytest.raises(ValueError, match="pad_to"):
        collate([a], pad_to=2)


def test_additive_mask_is_zero_or_very_negative():
    plan = collate([build_sample(olm_segments([1, 2, 3, 4, 5], K, BETA, chunker=EVERY_K))])
    add = additive_mask(plan, torch.float32)
    assert add.shape == (1, 1, 7, 7)
    allowed = dense_mask(plan)
    assert torch.all(add[:, 0][allowed] == 0)
    assert torch.all(add[:, 0][~allowed] == torch.finfo(torch.float32).min)


def test_block_mask_matches_dense_mask():
    pytest.importorskip("torch.nn.attention.flex_attention")
    segs = sft_segments([1], list(range(40, 47)), [2], list(range(60, 71)), K, BETA, "interleaved", chunker=EVERY_K)
    plan = collate([[build_sample(segs), build_sample(olm_segments(list(range(9)), K, BETA, chunker=EVERY_K))]],
                   pad_to=64)
    bm = block_mask(plan, block_size=16)
    # evaluate the BlockMask's own mask_mod on every (q, k) and compare with the dense mask
    q = torch.arange(64).view(-1, 1)
    k = torch.arange(64).view(1, -1)
    from_flex = bm.mask_mod(torch.zeros((), dtype=torch.long), torch.zeros((), dtype=torch.long), q, k)
    assert torch.equal(from_flex, dense_mask(plan)[0])
    assert bm.shape[-2:] == (64, 64)


def test_allowed_mask_is_the_one_rule():
    # the dense mask is the one rule broadcast over (q, k); spot-check the rule itself
    plan = collate([build_sample(olm_segments([1, 2, 3, 4, 5], K, BETA, chunker=EVERY_K))])
    f = {n: getattr(plan, n)[0] for n in ("sample", "chunk", "evicted")}
    q, k = torch.tensor(6), torch.tensor(2)  # c2[0] looking at c1[2]
    assert not allowed_mask(f["sample"][q], f["sample"][k], f["chunk"][q], f["chunk"][k], f["evicted"][k], q, k)
    q, k = torch.tensor(4), torch.tensor(2)  # v1[0] looking at c1[2]
    assert allowed_mask(f["sample"][q], f["sample"][k], f["chunk"][q], f["chunk"][k], f["evicted"][k], q, k)


def test_a_chunk_is_compressed_only_where_it_pays():
    """The tail rule holds for every piece: a chunk the fit rule closed early with <= beta tokens stays
    text (its image would hold more entries than its text), wherever it sits."""
    from vist2.chunking import Cuts

    def fit(tokens, carry=b""):  # closed early: [7] (1 <= beta), [8, 9, 10] (3 > beta); tail [11, 12]
        return Cuts([list(tokens[:1]), list(tokens[1:4])], [True, True], list(tokens[4:]), carries=[b"", b"x"])

    pieces, _ = query_parts([7, 8, 9, 10, 11, 12], K, BETA, chunker=fit)
    assert [(p, c) for p, c, _, _ in pieces] == [([7], False), ([8, 9, 10], True), ([11, 12], False)]
    assert [pays(n, BETA) for n in (1, 2, 3)] == [False, False, True]
    segs = prompt_segments([1], [7, 8, 9, 10, 11, 12], [2], K, BETA, "visual", chunker=fit)
    assert segs == [Raw((1,)), Raw((7,)), Chunk((8, 9, 10), BETA, "visual", fit_cut=True, style="user", carry=b"x"),
                    Raw((11, 12)), Raw((2,))]
    # generated text (OLM) keeps the same rule: the short chunk is text with loss, never an image
    plan = collate([build_sample(olm_segments([7, 8, 9, 10, 11, 12], K, BETA, chunker=fit))])
    assert plan.kind[0].tolist() == [T, T, T, T, V, V, T, T]
    assert plan.position[0].tolist() == [0, 1, 2, 3, 1, 2, 3, 4]
    I = IGNORE
    assert plan.labels[0].tolist() == [8, 9, 10, I, I, 11, 12, I]
    # K <= beta: no chunk pays, so nothing is compressed
    assert olm_segments(list(range(5)), 2, 3, chunker=fixed_chunker(2)) == [Raw((0, 1), True), Raw((2, 3), True),
                                                                            Chunk((4,), 0, "open", True)]


def test_fit_cut_boundary_token_is_predicted_from_memory():
    """Paper §3.1 at every boundary: the first token of chunk i+1 is predicted by the last visual token
    of chunk i, never by c_i's text, whether K or the fit rule closed c_i."""
    from vist2.chunking import Cuts

    def fit(tokens, carry=b""):
        return Cuts([list(tokens[:3])], [True], list(tokens[3:]))

    plan = collate([build_sample(olm_segments([10, 11, 12, 13, 14], K, BETA, chunker=fit))])
    I = IGNORE
    # c1 = [10, 11, 12] (closed early), v1 v1, c2 = [13, 14]: the second v1 predicts 13
    assert plan.input_ids[0].tolist() == [10, 11, 12, -1, -1, 13, 14]
    assert plan.labels[0].tolist() == [11, 12, I, I, 13, 14, I]
