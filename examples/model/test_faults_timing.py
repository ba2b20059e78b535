"""A prefill worker SIGKILLed while decode pulls its KV: the request runs
again on another prefill instance, outputs stay bit-equal, survivors are
clean. And the serving summary (throughput, TTFT/TPOT/ITL, TTFT split,
kvferry's share) holds every field with values that agree.

Run: PYTHONPATH=build/release/python /usr/bin/python3 -m pytest -q examples/model/test_faults_timing.py
"""

import os
import re
import signal
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import serving  # noqa: E402
from test_model import (BLOCKS, HITS, MAX_NEW, PROMPTS, _assert_bit_equal,  # noqa: E402,F401
                        _assert_clean, _assert_close, mono)

kvferry = pytest.importorskip("kvferry")


@pytest.mark.parametrize("prefill_tp,kill_rank", [(1, 0), (2, 1)])
def test_prefill_killed_mid_transfer_fails_over(mono, prefill_tp, kill_rank):
    # Decode's first pull (req0, 2 blocks) has layer 0 landed and layer 1
    # not posted; it waits at a gate while the driver SIGKILLs a prefill
    # worker (TP2: rank 1, rank 0 lives on) and reaps it, then posts layer
    # 1. The READs on the dead lender's offers fail; decode reports the pull
    # failed, releases the offers it still holds and frees the blocks; the
    # router retires the instance and sends req0 to the spare one.
    router = serving.Router(prefill_tp=prefill_tp, spare_prefill=True,
                            kill_prefill_mid_load=kill_rank)
    try:
        done = router.serve(PROMPTS, MAX_NEW)
        while router.prefill.busy:
            router.prefill.step()
    finally:
        reports = router.stop()
    assert router.killed == [("prefill", kill_rank, -signal.SIGKILL)]
    # The dead instance had finished req0 (handed to decode) and held nothing
    # else; decode's verdict alone sent req0 back to prefill.
    assert router.prefill_failovers == [("prefill", [])]
    assert router.retried == [("pull failed", "req0")]
    assert done["req0"].id == "req0~1"
    assert router.failovers == []
    if prefill_tp == 1:
        _assert_bit_equal(mono(), done)
    else:  # the prompt's KV and the first token come from the TP2 layout
        _assert_close(mono(), done)
        _assert_close(mono(tp=2), done)
        for rid in done:
            assert torch.equal(done[rid].logits[0], mono(tp=2)[rid].logits[0]), rid
    # Prefix sharing as without the fault: the failed pull's blocks went back
    # uncached, the second attempt's were cached.
    assert {rid: r.t["local_hit_blocks"] for rid, r in done.items()} == HITS
    assert set(reports) == {"prefill1", "decode0"}
    _assert_clean(reports)
    dec = reports["decode0"][0]
    assert dec["counts"]["pulls_failed"] == 1, dec
    # The READs on the dead lender's offers ended with it (peer-failed), or
    # failed in the copy before the agent saw the peer go (transport-error).
    assert len(dec["load_errors"]) == 1, dec
    assert dec["load_errors"][0] in ("peer-failed", "transport-error"), dec
    pulled = sum(BLOCKS.values()) - sum(HITS.values())
    # One READ stream per block and prefill rank: req0's blocks twice (the
    # failed attempt, then from prefill1), the rest once.
    assert dec["counts"]["blocks_pulled"] == (pulled + BLOCKS["req0"]) * prefill_tp, dec
    assert dec["counts"]["offers_declined"] == sum(HITS.values()) * prefill_tp, dec
    # prefill1 lent every request once; each offer was consumed or declined.
    assert len(reports["prefill1"]) == prefill_tp
    for r in reports["prefill1"]:
        assert r["counts"] == {"offers_consumed": pulled, "offers_released": sum(HITS.values())}, r


def test_stats_percentiles():
    s = serving._stats([i / 1000 for i in range(1, 101)])  # 1..100 ms
    assert s["mean"] == pytest.approx(50.5)
    assert s["median"] == pytest.approx(50.5)
    assert s["p99"] == pytest.approx(99.01)
    assert (s["min"], s["max"]) == (pytest.approx(1.0), pytest.approx(100.0))


def _value(text, label):
    lines = [ln for ln in text.splitlines() if ln.startswith(label + ":")]
    assert len(lines) == 1, (label, text)
    m = re.fullmatch(r"\s*(-?[0-9.]+)(?: \((-?[0-9.]+)%\))?", lines[0][len(label) + 1:])
    assert m, lines[0]
    return float(m.group(1)), (float(m.group(2)) if m.group(2) else None)


def test_summary_has_every_field_and_they_agree():
    # Every request arrives at once (queueing shows), prefix caching off.
    router = serving.Router(prefix_caching=False)
    try:
        t0 = time.monotonic()
        done = router.serve(PROMPTS, MAX_NEW, sequential=False)
        wall = time.monotonic() - t0
        while router.prefill.busy:
            router.prefill.step()
    finally:
        reports = router.stop()
    _assert_clean(reports)
    s = serving.summary(done)
    n = len(PROMPTS)
    assert s["completed"] == n
    assert s["input_tokens"] == sum(len(p) for p in PROMPTS)
    assert s["output_tokens"] == n * MAX_NEW
    assert 0 < s["duration_s"] <= wall
    assert s["request_throughput"] == pytest.approx(n / s["duration_s"], rel=1e-12)
    assert s["output_throughput"] == pytest.approx(n * MAX_NEW / s["duration_s"], rel=1e-12)
    assert s["total_token_throughput"] == pytest.approx(
        (s["input_tokens"] + s["output_tokens"]) / s["duration_s"], rel=1e-12)
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        st = s[key]
        assert 0 < st["min"] <= st["median"] <= st["p99"] <= st["max"], (key, st)
        assert st["min"] <= st["mean"] <= st["max"], (key, st)
    # A request's TPOT is the mean of its ITLs, so it lies within them.
    assert s["itl_ms"]["min"] - 1e-9 <= s["tpot_ms"]["mean"] <= s["itl_ms"]["max"] + 1e-9
    assert s["ttft_ms"]["max"] < s["e2el_ms"]["max"]
    assert s["e2el_ms"]["max"] <= 1e3 * s["duration_s"] + 1e-9
    # The TTFT split adds up to TTFT; kvferry's part lies inside TTFT.
    split, pct = s["ttft_split_ms"], s["ttft_split_pct"]
    assert set(split) == set(pct) == {"queue", "prefill", "handoff", "decode_start"}
    assert sum(split.values()) == pytest.approx(s["ttft_ms"]["mean"], rel=1e-9)
    assert sum(pct.values()) == pytest.approx(100, rel=1e-9)
    assert all(v >= 0 for v in pct.values()) and pct["prefill"] > 0 and pct["decode_start"] > 0
    assert pct["queue"] > 0  # requests waited behind each other
    assert 0 < s["kvferry_share_pct"] <= 100 and s["kvferry_ms"] <= s["ttft_ms"]["mean"]
    assert 0 < s["kv_transfer_ms"] < s["ttft_ms"]["max"]
    # The printed form: one line per figure, each showing the value above.
    text = serving.format_summary(s)
    assert len(text.splitlines()) == len(serving.SUMMARY_LINES)
    assert _value(text, "Successful requests") == (n, None)
    assert _value(text, "Total generated tokens") == (n * MAX_NEW, None)
    for label, key in (("Request throughput (req/s)", "request_throughput"),
                       ("Output token throughput (tok/s)", "output_throughput"),
                       ("Benchmark duration (s)", "duration_s")):
        assert _value(text, label)[0] == pytest.approx(s[key], abs=0.006), label
    for name, key in (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("ITL", "itl_ms"), ("E2EL", "e2el_ms")):
        for stat in ("mean", "median", "p99"):
            got = _value(text, f"{stat.capitalize()} {name} (ms)")[0]
            assert got == pytest.approx(s[key][stat], abs=0.006), (name, stat)
    for part in split:
        ms, share = _value(text, f"TTFT {part.replace('_', ' ')} (ms, % of TTFT)")
        assert ms == pytest.approx(split[part], abs=0.006) and share == pytest.approx(pct[part], abs=0.06)
    ms, share = _value(text, "kvferry calls in TTFT (ms, % of TTFT)")
    assert ms == pytest.approx(s["kvferry_ms"], abs=0.006)
    assert share == pytest.approx(s["kvferry_share_pct"], abs=0.06)
