"""Stale aggregation's running totals (generate/stale_cache.py) against merging all other chunks."""
import pytest
import torch

import zsq_fast
from zsq_fast.generate import dgh
from zsq_fast.generate.stale_cache import StaleCache, unmerge
from zsq_fast.ops import ChannelStats, channel_stats
from test_generate import tiny


def brute_others(chunks, j, layer):
    """The pre-running-totals definition: merge every cached chunk but j, in order."""
    total = ChannelStats(0.0, data=torch.zeros_like(chunks[0][layer].data))
    for k, chunk in enumerate(chunks):
        if k != j:
            total = total.merge(chunk[layer])
    return total


def random_chunk(g, channels=(3, 5), scale=1.0):
    # count, offset and spread differ per chunk and layer, as activations of differently sized chunks do
    out = []
    for c in channels:
        x = torch.randn(int(torch.randint(1, 9, (1,), generator=g)), c, 4, 4, generator=g, dtype=torch.float64)
        spread, offset = 1 + 3 * torch.rand(1, generator=g).item(), 5 * torch.randn(1, generator=g).item()
        out.append(channel_stats(x * scale * spread + offset))
    return out


def test_unmerge_inverts_merge():
    g = torch.Generator().manual_seed(0)
    a, b = random_chunk(g)[0], random_chunk(g)[0]
    back = unmerge(a.merge(b), b)
    assert back.count == a.count
    torch.testing.assert_close(back.data, a.data, rtol=1e-10, atol=1e-10)
    assert unmerge(a, a).count == 0


def test_others_equal_merging_all_other_chunks_through_many_replacements():
    g = torch.Generator().manual_seed(1)
    chunks = [random_chunk(g) for _ in range(12)]
    cache = StaleCache.from_chunks(chunks)
    worst = 0.0
    for step in range(40):  # 480 replacements without a resync: the drift stays at float64 rounding
        for j in range(len(chunks)):
            others = cache.others(j)
            for layer in range(2):
                ref = brute_others(chunks, j, layer)
                assert others[layer].count == ref.count
                err = ((others[layer].data - ref.data).abs() / ref.data.abs().clamp_min(1.0)).max().item()
                worst = max(worst, err)
            chunks[j] = random_chunk(g, scale=10.0 ** (step % 3 - 1))
            cache.replace(j, chunks[j], others)
    assert worst < 1e-11, worst
    for layer, t in enumerate(cache.resync()):  # j = -1: every chunk
        torch.testing.assert_close(t.data, brute_others(chunks, -1, layer).data, rtol=1e-12, atol=1e-12)


def test_stale_generation_equals_the_all_others_merge(monkeypatch):
    common = dict(iterations=4, chunk_size=2, lr=0.3, seed=5, aggregation="stale")
    fast, rec_fast = zsq_fast.generate(tiny(), 7, "dgh", 8, **common)

    def brute(self, j):
        return [brute_others(list(self), j, layer) for layer in range(len(self.data))]
    monkeypatch.setattr(StaleCache, "others", brute)
    slow, rec_slow = zsq_fast.generate(tiny(), 7, "dgh", 8, **common)
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-5)
    for a, b in zip(rec_fast.losses, rec_slow.losses):
        assert a["bn"] == pytest.approx(b["bn"], rel=1e-6)


def test_old_checkpoint_cache_format_restores():
    g = torch.Generator().manual_seed(2)
    chunks = [random_chunk(g) for _ in range(3)]
    old = {"counts": [[c.count for c in ch] for ch in chunks], "means": [[c.mean for c in ch] for ch in chunks],
           "m2s": [[c.m2 for c in ch] for ch in chunks]}
    restored = StaleCache.from_state(old, "cpu")
    new = StaleCache.from_state(StaleCache.from_chunks(chunks).state(), "cpu")
    for a, b in zip(restored.totals + new.totals, new.totals + restored.totals):
        torch.testing.assert_close(a.data, b.data)
    assert dgh.StaleCache is StaleCache


def test_from_chunks_fills_rows_as_a_generator_yields_them():
    # the setup pass streams chunk statistics in: the cache must equal the one built from a list, and a
    # generator that yields fewer chunks than announced is an error, not a cache with uninitialized rows
    g = torch.Generator().manual_seed(3)
    chunks = [random_chunk(g) for _ in range(5)]
    listed = StaleCache.from_chunks(chunks)
    streamed = StaleCache.from_chunks((c for c in chunks), len(chunks))
    torch.testing.assert_close(streamed.counts, listed.counts)
    for a, b in zip(streamed.data, listed.data):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="expected 6 chunks, got 5"):
        StaleCache.from_chunks((c for c in chunks), 6)
