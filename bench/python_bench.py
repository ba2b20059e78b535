"""What the Python binding costs, as JSON (two agents of one process, shared memory).

    PYTHONPATH=build/release/python /usr/bin/python3 bench/python_bench.py [--seconds 2]

- post_64_us: posting a READ of 64 blocks that do not coalesce (64
  descriptors per layer, one layer) from Python, per call (the transfers
  are waited for outside the timed region);
- poll_notifications_empty_us: Agent.poll_notifications with nothing pending;
- loop_256k_gbps: a Python loop of READs of 256 KiB (one block), each
  posted and waited for, in GB/s.
"""

import argparse
import json
import time

import kvferry


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=2.0)
    args = ap.parse_args()
    layout = kvferry.KvLayout(num_layers=1, num_blocks=256, tokens_per_block=16, num_kv_heads=8,
                              head_dim=128, element_bytes=2)  # 32 KiB chunks
    big = kvferry.KvLayout(num_layers=1, num_blocks=64, tokens_per_block=64, num_kv_heads=16,
                           head_dim=128, element_bytes=2)  # 256 KiB chunks
    out = {}
    with kvferry.Agent("bench-a", secret="bench") as a, kvferry.Agent("bench-b", secret="bench") as b:
        a.create_pool("kv", layout)
        a.create_pool("big", big)
        pb = b.create_pool("kv", layout)
        pbig = b.create_pool("big", big)
        b.connect("127.0.0.1", a.listen(), timeout=30)
        a.wait_for_peer("bench-b", timeout=30)

        local = pb.lease_ids(range(0, 128, 2))  # every other block: no runs
        remote = list(range(1, 129, 2))
        posts, n = 0.0, 0
        end = time.monotonic() + args.seconds
        while time.monotonic() < end:
            t0 = time.perf_counter()
            t = b.read("bench-a", local, remote)
            posts += time.perf_counter() - t0
            n += 1
            t.wait(30)
        del t
        out["post_64_us"] = posts / n * 1e6
        out["post_64_calls"] = n
        local.release()

        n = 100000
        t0 = time.perf_counter()
        for _ in range(n):
            b.poll_notifications()
        out["poll_notifications_empty_us"] = (time.perf_counter() - t0) / n * 1e6

        blocks = pbig.lease_ids([0])
        moved, n = 0, 0
        t0 = time.perf_counter()
        end = time.monotonic() + args.seconds
        while time.monotonic() < end:
            b.read("bench-a", blocks, [n % big.num_blocks], remote_pool="big").wait(30)
            moved += big.chunk_bytes
            n += 1
        out["loop_256k_gbps"] = moved / (time.perf_counter() - t0) / 1e9
        out["loop_256k_transfers"] = n
        out["data_path"] = b.peer("bench-a").data_path
        blocks.release()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
