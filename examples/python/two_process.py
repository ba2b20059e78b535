"""Two processes, one KV cache each: decode pulls prefill's blocks by id.

Run: PYTHONPATH=build/release/python /usr/bin/python3 examples/python/two_process.py
"""

import multiprocessing

import torch

import kvferry

SECRET = "change-me"  # both sides must know it (or set KVFERRY_SECRET)
LAYERS, BLOCKS, BLOCK_SIZE, HEADS, HEAD_DIM = 2, 32, 16, 8, 64

# vLLM's per-layer HND cache: per layer a K and a V tensor
# [num_blocks, num_kv_heads, block_size, head_dim].
LAYOUT = kvferry.KvLayout(num_layers=LAYERS, num_blocks=BLOCKS, tokens_per_block=BLOCK_SIZE,
                          num_kv_heads=HEADS, head_dim=HEAD_DIM, element_bytes=2)


def kv_cache(fill):
    return [torch.full((BLOCKS, HEADS, BLOCK_SIZE, HEAD_DIM), fill(layer, plane), dtype=torch.float16)
            for layer in range(LAYERS) for plane in range(2)]  # k0, v0, k1, v1


def prefill(port_queue, done_queue):
    kv = kv_cache(lambda layer, plane: 10 * layer + plane + 1)
    with kvferry.Agent("prefill", secret=SECRET) as agent:
        agent.register_pool("kv", LAYOUT, kv)
        port_queue.put(agent.listen("127.0.0.1"))
        # Decode connects, reads and says when it is done with our blocks.
        # (Not wait_for_peer: decode may come and go before this line runs.)
        done_queue.get(timeout=60)


def main():
    ctx = multiprocessing.get_context("spawn")  # create agents in the process that uses them
    port_queue, done_queue = ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=prefill, args=(port_queue, done_queue))
    child.start()

    kv = kv_cache(lambda layer, plane: 0)
    with kvferry.Agent("decode", secret=SECRET) as agent:
        pool = agent.register_pool("kv", LAYOUT, kv)
        agent.connect("127.0.0.1", port_queue.get(timeout=60))
        with pool.lease_ids([0, 1, 2]) as blocks:  # our blocks 0, 1, 2 ...
            agent.read("prefill", blocks, [5, 6, 7]).wait(timeout=30)  # ... get theirs 5, 6, 7
        done_queue.put("done")

    for layer in range(LAYERS):
        for plane in range(2):
            expected = 10 * layer + plane + 1
            assert (kv[2 * layer + plane][:3] == expected).all()
            assert (kv[2 * layer + plane][3:] == 0).all()
    child.join(60)
    assert child.exitcode == 0
    print("decode pulled blocks 5, 6, 7 of prefill into its blocks 0, 1, 2")


if __name__ == "__main__":
    main()
