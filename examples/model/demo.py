"""Serves a set of prompts with the tiny model twice, monolithic and
disaggregated through kvferry, and prints whether the outputs match, each
request's TTFT split and the run's summary (throughput, TTFT, TPOT, ITL,
where TTFT went).

Run: scripts/demo-model.sh [--prefill-tp N] [--decode-tp N] [--burst]
"""

import argparse
import os
import random
import sys
import time


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import serving  # noqa: E402


def prompts(n):
    rng = random.Random(5)
    base = [rng.randrange(256) for _ in range(48)]
    out = []
    for i in range(n):
        if i % 2 == 0:  # shares a prefix with the others of its kind
            out.append(base[:16 + 7 * i])
        else:
            out.append([rng.randrange(256) for _ in range(3 + 9 * i)])
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prefill-tp", type=int, default=1)
    ap.add_argument("--decode-tp", type=int, default=1)
    ap.add_argument("--requests", type=int, default=6)
    ap.add_argument("--max-new", type=int, default=16)
    ap.add_argument("--burst", action="store_true",
                    help="all requests arrive at once (queueing shows; prefix caching off)")
    a = ap.parse_args()
    ps = prompts(a.requests)
    caching = not a.burst
    ref = serving.run_monolithic(ps, a.max_new, tp=a.decode_tp, prefix_caching=caching)
    t0 = time.monotonic()
    router = serving.Router(prefill_tp=a.prefill_tp, decode_tp=a.decode_tp, prefix_caching=caching)
    print(f"prefill TP{a.prefill_tp} + decode TP{a.decode_tp} up in {time.monotonic() - t0:.1f} s")
    try:
        done = router.serve(ps, a.max_new, sequential=not a.burst)
        while router.prefill.busy:
            router.prefill.step()
    finally:
        reports = router.stop()
    same_tp = a.prefill_tp == a.decode_tp
    tokens_match = all(done[r].tokens == ref[r].tokens for r in ref)
    diff = max(float((x - y).abs().max()) for r in ref for x, y in zip(ref[r].logits, done[r].logits))
    print(f"outputs match: {'yes' if tokens_match else 'NO'} (tokens of {len(ref)} requests, "
          f"{a.max_new} each; logits max |diff| {diff:.3g}"
          f"{', bit-equal' if diff == 0 else ''}{'' if same_tp else ', TP layouts differ'})")
    print(f"{'request':8} {'prompt':>6} {'hit':>3} {'TTFT':>8} = {'queue':>7} + {'prefill':>7} + "
          f"{'handoff':>7} + {'dec.start':>9} | {'lend':>6} {'post':>6} {'xfer':>6} {'wait':>6} "
          f"{'kvferry':>7} {'ITL':>6}  (ms)")
    ms = lambda s: f"{1e3 * s:7.2f}"  # noqa: E731
    for rid in sorted(done, key=lambda r: int(r[3:])):
        t = serving.timing(done[rid])
        print(f"{rid:8} {len(done[rid].prompt):6} {done[rid].t['local_hit_blocks']:3} {ms(t['ttft']):>8} = "
              f"{ms(t['queue'])} + {ms(t['prefill'])} + {ms(t['handoff'])} + {ms(t['decode_start']):>9} | "
              f"{ms(t['kv_lend'])[1:]} {ms(t['kv_post'])[1:]} {ms(t['kv_transfer'])[1:]} {ms(t['kv_wait'])[1:]} "
              f"{100 * t['kvferry_share']:6.1f}% {ms(t['itl_mean'])[1:]}")
    paths = sorted({done[r].t.get("data_path", "") for r in done} - {""})
    moved = sum(done[r].t.get("kv_bytes", 0) for r in done)
    print(f"kvferry moved {moved / 1024:.0f} KiB of KV ({', '.join(paths)}), one READ per block, prefill/decode rank pair and layer")
    clean = all(r["free_blocks"] == r["total_blocks"] and not r["handles"] and not r["survivors"]
                and not any(r["live"].values())
                for ranks in reports.values() for r in ranks)
    print("kvferry ledgers clean (all blocks back, no live handle): " + ("yes" if clean else "NO"))
    print("  " + "; ".join(f"{name} r{r['rank']}: {r['counts']}" for name, ranks in reports.items()
                          for r in ranks))
    print("summary (disaggregated run):")
    print(serving.format_summary(serving.summary(done)))
    print("TTFT = arrival to decode's first step done; queue: to prefill's forward; handoff: prefill's\n"
          "step end + lending + router; dec.start: decode's first step. kvferry = (lend: prefill making\n"
          "offers + post: decode posting READs + wait: forward blocked on a layer) / TTFT; xfer: first\n"
          "READ posted to last layer landed (transfer telemetry; overlaps compute, layer by layer).\n"
          "Decode's first step emits two tokens (prefill's and its own): TPOT = (E2EL - TTFT) / (tokens - 2).")
    return 0 if tokens_match and clean else 1


if __name__ == "__main__":
    sys.exit(main())
