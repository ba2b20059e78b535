"""A tiny transformer served disaggregated through kvferry gives the
monolithic run's outputs (examples/model/README.md).

Run: PYTHONPATH=build/release/python /usr/bin/python3 -m pytest -q examples/model
"""

import os
import random
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import serving  # noqa: E402

kvferry = pytest.importorskip("kvferry")

MAX_NEW = 6
BS = 16

# Decode on a TP layout other than prefill's computes the same sums split
# into other partial sums (per-rank slices of the attention output
# projection and the MLP, added by all_reduce), so float32 rounds them
# differently: ~2e-6 on these logits (|logit| up to ~4). 1e-4 leaves a wide
# margin over that and is far below what a wrong head slice or a stale block
# does (O(0.1) and more).
LOGIT_ATOL = 1e-4


def _prompts():
    rng = random.Random(5)
    base = [rng.randrange(256) for _ in range(40)]
    return [base[:20],                      # 2 blocks, the shared prefix's first owner
            [7, 8, 9],                      # shorter than a block
            base[:36] + [1, 2],             # shares 1 full block with req0 (longer than 2 blocks)
            base[:33],                      # shares 2 full blocks with req2
            [rng.randrange(256) for _ in range(17)],  # one token past a block
            base[:32]]                      # decode holds all of it: every offer declined


PROMPTS = _prompts()
# Full blocks decode already holds when each request arrives (served one
# after the other): req2 shares block 0 with req0, req3 blocks 0-1 with
# req2, req5 is blocks 0-1 (decode pulls nothing; prefill still computes its
# last block, as vLLM computes at least one prompt token).
HITS = {"req0": 0, "req1": 0, "req2": 1, "req3": 2, "req4": 0, "req5": 2}
BLOCKS = {f"req{i}": -(-len(p) // BS) for i, p in enumerate(PROMPTS)}


@pytest.fixture(scope="module")
def mono():
    """Monolithic references: (tp, prefix_caching) -> {req id: Request}."""
    cache = {}

    def get(tp=1, prefix_caching=True):
        key = (tp, prefix_caching)
        if key not in cache:
            cache[key] = serving.run_monolithic(PROMPTS, MAX_NEW, tp=tp, prefix_caching=prefix_caching)
        return cache[key]
    return get


def _assert_bit_equal(ref, got):
    assert set(got) == set(ref)
    for rid in ref:
        assert got[rid].tokens == ref[rid].tokens, rid
        assert len(got[rid].logits) == len(ref[rid].logits) == MAX_NEW
        for step, (a, b) in enumerate(zip(ref[rid].logits, got[rid].logits)):
            assert torch.equal(a, b), (rid, step, float((a - b).abs().max()))


def _assert_close(ref, got):
    assert set(got) == set(ref)
    for rid in ref:
        assert got[rid].tokens == ref[rid].tokens, rid
        for step, (a, b) in enumerate(zip(ref[rid].logits, got[rid].logits)):
            top2 = a.topk(2).values
            # The greedy choice is not a near tie the tolerance could flip.
            assert float(top2[0] - top2[1]) > 2 * LOGIT_ATOL, (rid, step)
            assert torch.allclose(a, b, rtol=0, atol=LOGIT_ATOL), (rid, step, float((a - b).abs().max()))


def _assert_clean(reports):
    """Every surviving rank got all its blocks back and holds no handle."""
    for name, ranks in reports.items():
        assert ranks, name
        for r in ranks:
            assert r["free_blocks"] == r["total_blocks"], (name, r)
            assert r["offers_open"] == 0 and r["handles"] == [] and r["survivors"] == [], (name, r)
            # The C++ ledger's live counts: no lease, offer, transfer or UCX request left.
            assert not any(r["live"].values()), (name, r)


def _serve(prompts=PROMPTS, **kw):
    router = serving.Router(**kw)
    try:
        done = router.serve(prompts, MAX_NEW)
        while router.prefill.busy:  # offers that decode never took end by their ttl or peer
            router.prefill.step()
        return router, done
    finally:
        reports = router.stop()
        router.reports = reports


def test_same_tp_pull_is_bit_equal_and_shares_prefixes(mono):
    router, done = _serve()
    _assert_bit_equal(mono(), done)
    _assert_clean(router.reports)
    # Prefix sharing: decode reused its own blocks for the shared prefix and
    # pulled only the rest; it released (declined) prefill's offers on the
    # reused blocks, so prefill got them back without a ttl.
    assert {rid: r.t["local_hit_blocks"] for rid, r in done.items()} == HITS
    pulled = sum(BLOCKS.values()) - sum(HITS.values())
    assert router.reports["decode0"][0]["counts"] == {"blocks_pulled": pulled,
                                                      "offers_declined": sum(HITS.values())}
    assert router.reports["prefill"][0]["counts"] == {"offers_consumed": pulled,
                                                      "offers_released": sum(HITS.values())}
    # The READs moved exactly the pulled blocks: K and V, every layer.
    cfg = serving.Config()
    block_bytes = 2 * cfg.n_layers * cfg.n_kv_heads * BS * cfg.head_dim * 4
    for rid, r in done.items():
        assert r.t["kv_bytes"] == (BLOCKS[rid] - HITS[rid]) * block_bytes, rid
        # The TTFT split adds up; kvferry's part lies inside it.
        t = serving.timing(r)
        parts = t["queue"] + t["prefill"] + t["handoff"] + t["decode_start"]
        assert abs(parts - t["ttft"]) < 1e-6, t
        assert t["prefill"] > 0 and t["decode_start"] > 0 and t["itl_mean"] > 0, t
        assert 0 < t["kvferry_share"] < 1, t  # prefill's offers at least
        if HITS[rid] < BLOCKS[rid]:
            assert 0 < t["kv_transfer"] < t["ttft"], t
        else:
            assert t["kv_transfer"] == 0, t


@pytest.mark.parametrize("prefill_tp,decode_tp", [(1, 2), (2, 1)])
def test_heterogeneous_tp_pulls_head_slices(mono, prefill_tp, decode_tp):
    router, done = _serve(prefill_tp=prefill_tp, decode_tp=decode_tp)
    # The prompt's KV and the first token come from prefill's layout, the
    # later tokens from decode's: close to both monolithic runs.
    _assert_close(mono(tp=decode_tp), done)
    _assert_close(mono(tp=prefill_tp), done)
    for rid in done:  # the first token's logits are prefill's, unchanged
        assert torch.equal(done[rid].logits[0], mono(tp=prefill_tp)[rid].logits[0])
    _assert_clean(router.reports)
    units = max(prefill_tp, decode_tp)
    pulled = (sum(BLOCKS.values()) - sum(HITS.values())) * units
    assert sum(r["counts"]["blocks_pulled"] for r in router.reports["decode0"]) == pulled
    for r in router.reports["decode0"]:  # each decode rank pulled its own heads
        assert r["counts"]["blocks_pulled"] == pulled // decode_tp


def test_a_changed_pulled_byte_shows(mono):
    # The control for the tests above: decode adds 1e-3 to one float of
    # every block it pulled once the block landed; the comparison sees it.
    router, done = _serve(prompts=PROMPTS[:2], perturb_pulled=True)
    ref = mono()
    for rid in done:
        assert not torch.equal(done[rid].logits[1], ref[rid].logits[1]), rid
    _assert_clean(router.reports)


def test_tp2_to_tp2_is_bit_equal(mono):
    router, done = _serve(prefill_tp=2, decode_tp=2)
    _assert_bit_equal(mono(tp=2), done)
    _assert_clean(router.reports)


def test_decode_killed_mid_transfer_fails_over(mono):
    # The first decode instance's worker is SIGKILLed after layer 0 of the
    # first request's KV landed (layer 1 still open on prefill's offers).
    router, done = _serve(prefix_caching=False, spare_decode=True, pause_mid_load=True)
    assert len(router.failovers) == 1 and router.failovers[0][1] == ["req0"]
    assert done["req0"].id == "req0~1"  # served by the second decode instance
    _assert_bit_equal(mono(prefix_caching=False), done)
    assert set(router.reports) == {"prefill", "decode1"}
    _assert_clean(router.reports)
    counts = router.reports["prefill"][0]["counts"]
    # The first attempt's offers ended with the dead peer; every block came back.
    assert counts.get("offers_peer-failed", 0) + counts.get("offers_expired", 0) == BLOCKS["req0"]
