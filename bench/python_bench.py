"""What the Python binding costs next to the C++ calls it wraps, as JSON.

    PYTHONPATH=build/release/python /usr/bin/python3 bench/python_bench.py \\
        [--seconds 1] [--rounds 5] [--baseline build/release/bench/kvferry_binding_baseline]

Two agents of one process, connected over loopback (shared memory), progress
threads on, pools of one plane (a block is one chunk, one descriptor). The
C++ side is kvferry_binding_baseline (bench/binding_baseline.cc): the same
agents, pools and transfers in a child process, driven line by line so its
measurements interleave with the Python ones in every round (the order
alternates between rounds). Each figure is the median over the rounds:

- post_64_us: posting a READ of 64 blocks that do not coalesce (64
  descriptors) on a lease taken once, per call, wall time (each transfer is
  waited for, and its handle dropped, outside the timed region);
  post_64_cpu_us: the posting thread's CPU time in that call (the wall
  time also holds waits for the agent's lock and for a CPU, which depend
  on when the post comes after the last transfer's end; see
  bench/results/2026-12-08-python-binding.md);
- post_64_after_10us_gap_us (C++ only): post_64_us when the caller spins
  10 us between a transfer's end and the next post, as a Python caller's
  own code there does;
- loop_256k_gbps: a loop of READs of one 256 KiB block, each posted and
  waited for, in GB/s;
- poll_notifications_empty_us: Agent.poll_notifications (C++:
  PollNotifications) with nothing pending, per call;
- nixl_get_new_notifs_empty_us (Python only): kvferry.nixl's
  nixl_agent.get_new_notifs with nothing pending, per call.

"ratio" holds python / cpp of the medians (post_64: lower is better;
loop_256k: higher is better), "ratio_median_of_rounds" the median of the
ratios of each round. Nothing here asserts a figure.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import kvferry
from kvferry import nixl


def _default_baseline():
    # PYTHONPATH=build/<preset>/python: the binary is in build/<preset>/bench.
    pkg = os.path.dirname(os.path.abspath(kvferry.__file__))
    return os.path.join(os.path.dirname(os.path.dirname(pkg)), "bench", "kvferry_binding_baseline")


class Baseline:
    """The C++ side, one command at a time."""

    def __init__(self, path):
        self._p = subprocess.Popen([path], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        ready = self._read()
        if not ready.get("ready"):
            raise RuntimeError(f"{path} did not start: {ready!r}")

    def _read(self):
        line = self._p.stdout.readline()
        if not line:
            raise RuntimeError(f"kvferry_binding_baseline exited (rc {self._p.wait()})")
        return json.loads(line)

    def run(self, cmd, arg):
        self._p.stdin.write(f"{cmd} {arg}\n")
        self._p.stdin.flush()
        return self._read()

    def close(self):
        self._p.stdin.close()
        if self._p.wait(60) != 0:
            raise RuntimeError(f"kvferry_binding_baseline exited with {self._p.returncode}")


def _timed_calls(fn, seconds):
    """Mean seconds per call of fn() over about `seconds` (batches of 1000)."""
    calls, spent = 0, 0.0
    end = time.monotonic() + seconds
    while time.monotonic() < end or calls == 0:
        t0 = time.perf_counter()
        for _ in range(1000):
            fn()
        spent += time.perf_counter() - t0
        calls += 1000
    return spent / calls


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=1.0, help="per measurement and round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--baseline", default=_default_baseline(),
                    help="the kvferry_binding_baseline binary")
    args = ap.parse_args()
    if args.seconds <= 0 or args.rounds < 1:
        ap.error("--seconds must be > 0 and --rounds >= 1")
    if not os.access(args.baseline, os.X_OK):
        ap.error(f"--baseline {args.baseline!r} is not an executable (build kvferry_binding_baseline)")

    layout = kvferry.KvLayout(num_layers=1, num_blocks=256, tokens_per_block=16, num_kv_heads=8,
                              head_dim=128, element_bytes=2, separate_kv=False)  # 32 KiB
    big = kvferry.KvLayout(num_layers=1, num_blocks=64, tokens_per_block=64, num_kv_heads=16,
                           head_dim=128, element_bytes=2, separate_kv=False)  # 256 KiB
    out = {"nproc": os.cpu_count(), "loadavg_before": list(os.getloadavg()),
           "rounds": args.rounds, "seconds": args.seconds}
    detail = []
    base = Baseline(args.baseline)
    with kvferry.Agent("bench-a", secret="bench") as a, \
            kvferry.Agent("bench-b", secret="bench") as b, \
            nixl.nixl_agent("bench-nixl", nixl.nixl_agent_config(secret="bench")) as nx:
        a.create_pool("kv", layout)
        a.create_pool("big", big)
        pb = b.create_pool("kv", layout)
        pbig = b.create_pool("big", big)
        b.connect("127.0.0.1", a.listen(), timeout=30)
        a.wait_for_peer("bench-b", timeout=30)
        local = pb.lease_ids(range(0, 128, 2))  # every other block: no runs
        remote = list(range(1, 129, 2))
        blocks = pbig.lease_ids([0])

        def py_post64():
            posts, cpu, n = 0.0, 0.0, 0
            end = time.monotonic() + args.seconds
            while time.monotonic() < end:
                c0 = time.thread_time()
                t0 = time.perf_counter()
                t = b.read("bench-a", local, remote)
                posts += time.perf_counter() - t0
                cpu += time.thread_time() - c0
                n += 1
                t.wait(30)
                del t  # as in C++: the handle goes outside the timed region
            return {"post_64_us": posts / n * 1e6, "post_64_cpu_us": cpu / n * 1e6,
                    "post_64_calls": n}

        def py_loop256k():
            moved, n = 0, 0
            t0 = time.perf_counter()
            end = time.monotonic() + args.seconds
            while time.monotonic() < end:
                b.read("bench-a", blocks, [n % big.num_blocks], remote_pool="big").wait(30)
                moved += big.chunk_bytes
                n += 1
            return {"loop_256k_gbps": moved / (time.perf_counter() - t0) / 1e9,
                    "loop_256k_transfers": n}

        def py_polls():
            quarter = max(args.seconds / 4, 0.01)
            return {"poll_notifications_empty_us":
                    _timed_calls(b.poll_notifications, quarter) * 1e6,
                    "nixl_get_new_notifs_empty_us": _timed_calls(nx.get_new_notifs, quarter) * 1e6}

        poll_calls = max(10000, int(args.seconds * 200000))
        for r in range(args.rounds):
            py, cpp = {}, {}
            def cpp_gap():
                r = base.run("post64", f"{args.seconds} 10")
                return {"post_64_after_10us_gap_us": r["post_64_us"]}

            steps = [(py, py_post64), (cpp, lambda: base.run("post64", args.seconds)),
                     (cpp, cpp_gap), (py, lambda: {}),
                     (py, py_loop256k), (cpp, lambda: base.run("loop256k", args.seconds)),
                     (py, py_polls), (cpp, lambda: base.run("poll", poll_calls))]
            if r % 2:  # C++ first in odd rounds
                for i in range(0, len(steps), 2):
                    steps[i], steps[i + 1] = steps[i + 1], steps[i]
            for into, step in steps:
                into.update(step())
            detail.append({"python": py, "cpp": cpp})
        out["data_path"] = b.peer("bench-a").data_path
        blocks.release()
        local.release()
    base.close()

    def median(side, key):
        return statistics.median(d[side][key] for d in detail)

    keys = {"python": ["post_64_us", "post_64_cpu_us", "loop_256k_gbps",
                       "poll_notifications_empty_us", "nixl_get_new_notifs_empty_us"],
            "cpp": ["post_64_us", "post_64_cpu_us", "post_64_after_10us_gap_us", "loop_256k_gbps",
                    "poll_notifications_empty_us"]}
    med = {side: {k: median(side, k) for k in ks} for side, ks in keys.items()}
    out["median"] = med
    out["ratio"] = {
        "post_64_python_over_cpp": med["python"]["post_64_us"] / med["cpp"]["post_64_us"],
        "post_64_cpu_python_over_cpp":
            med["python"]["post_64_cpu_us"] / med["cpp"]["post_64_cpu_us"],
        "loop_256k_python_over_cpp": med["python"]["loop_256k_gbps"] / med["cpp"]["loop_256k_gbps"],
    }
    # The same ratios taken within each round (the two sides measured
    # seconds apart), then the median: steadier when the load drifts.
    out["ratio_median_of_rounds"] = {
        "post_64_python_over_cpp": statistics.median(
            d["python"]["post_64_us"] / d["cpp"]["post_64_us"] for d in detail),
        "loop_256k_python_over_cpp": statistics.median(
            d["python"]["loop_256k_gbps"] / d["cpp"]["loop_256k_gbps"] for d in detail),
    }
    out["targets"] = {
        "post_64_ratio_at_most_2": out["ratio"]["post_64_python_over_cpp"] <= 2.0,
        "loop_256k_ratio_at_least_0_9": out["ratio"]["loop_256k_python_over_cpp"] >= 0.9,
        "nixl_get_new_notifs_under_2us": med["python"]["nixl_get_new_notifs_empty_us"] < 2.0,
    }
    out["loadavg_after"] = list(os.getloadavg())
    out["rounds_detail"] = detail
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    sys.exit(main())
