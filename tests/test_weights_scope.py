"""The weights scope: the one check by which the encoder cache and the prefix cache drop entries of other weights."""

import torch

from vist2.engine.cache import CompressedKVCache
from vist2.engine.encoder_cache import EncoderCache
from vist2.engine.prefix_cache import Piece, PrefixCache
from vist2.engine.weights_scope import WeightsScope, model_scope


def test_the_scope_follows_in_place_weight_changes():
    lin = torch.nn.Linear(2, 2)
    before = model_scope([lin])
    assert model_scope([lin]) == before
    with torch.no_grad():
        lin.weight.add_(1.0)  # an optimizer step does this
    assert model_scope([lin]) != before


def test_other_weights_drop_every_entry_and_count_only_when_some_were_held():
    entries = []
    weights = WeightsScope(entries)
    weights.check("w1")
    assert (weights.current, weights.invalidations) == ("w1", 0)  # nothing held yet: no invalidation
    entries += ["a", "b"]
    weights.check("w1")
    assert entries == ["a", "b"] and weights.invalidations == 0  # the same weights: kept
    weights.check("w2")
    assert entries == [] and (weights.current, weights.invalidations) == ("w2", 1)
    weights.check("w3")
    assert weights.invalidations == 1  # empty: dropped nothing


def test_both_caches_check_their_scope_through_it():
    def read(texts, styles):  # a stand-in vision tower
        return torch.ones(len(texts), 2, 4)

    ec = EncoderCache(10_000)
    ec.fetch(["a"], ["plain"], read, scope="w1")
    assert isinstance(ec.weights, WeightsScope) and ec.weights.current == "w1"
    ec.fetch(["a"], ["plain"], read, scope="w2")
    assert ec.invalidations == ec.weights.invalidations == 1 and ec.stats()["invalidations"] == 1

    cache = CompressedKVCache(n_layers=1, batch=1, n_kv_heads=1, head_dim=2, capacity=8, dtype=torch.float32)
    pc, pieces = PrefixCache(1 << 20), [Piece(("r", (1, 2)), 2, None), Piece(("r", (3,)), 1, None)]
    pc.begin(0, pieces, cache, scope="w1")
    pc.settle(0, 3, cache, scope="w1")
    assert isinstance(pc.weights, WeightsScope) and pc.weights.current == "w1" and len(pc) == 1
    pc.begin(0, pieces, cache, scope="w2")
    assert len(pc) == 0 and pc.invalidations == pc.weights.invalidations == 1 and pc.stats()["invalidations"] == 1
