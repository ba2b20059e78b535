"""Shared by the tests and the processes they spawn (multiprocessing 'spawn'
imports this module by name in the child)."""

import numpy as np
import torch

import kvferry

SECRET = "python-test-secret"

# vLLM's per-layer HND cache: K and V tensors [num_blocks, kv_heads, block_size, head_dim].
LAYERS, BLOCKS, BLOCK_SIZE, HEADS, HEAD_DIM = 3, 16, 16, 4, 32
SHAPE = (BLOCKS, HEADS, BLOCK_SIZE, HEAD_DIM)


def layout(num_blocks=BLOCKS):
    return kvferry.KvLayout(num_layers=LAYERS, num_blocks=num_blocks, tokens_per_block=BLOCK_SIZE,
                            num_kv_heads=HEADS, head_dim=HEAD_DIM, element_bytes=2)


def kv_tensors(seed):
    """[k0, v0, k1, v1, ...] filled with random bytes unique to (seed, layer, plane)."""
    out = []
    for layer in range(LAYERS):
        for plane in range(2):
            t = torch.empty(SHAPE, dtype=torch.float16)
            rng = np.random.default_rng([seed, layer, plane])
            t.numpy().view(np.uint8).reshape(-1)[:] = rng.integers(
                0, 256, size=t.numel() * 2, dtype=np.uint8)
            out.append(t)
    return out


def block_bytes(tensors, index, block):
    return tensors[index][block].numpy().view(np.uint8).copy()


def same_block(a, ai, a_block, b, bi, b_block):
    return np.array_equal(block_bytes(a, ai, a_block), block_bytes(b, bi, b_block))


def prefill_main(port_q, result_q, cmd_q):
    """The prefill process: registers its KV tensors, lets the decode side
    READ and WRITE them, WRITEs into the decode side itself, checks bytes."""
    try:
        kv = kv_tensors(seed=1)
        original = [t.clone() for t in kv]
        with kvferry.Agent("prefill", secret=SECRET) as agent:
            pool = agent.register_pool("kv", layout(), kv)
            port_q.put(agent.listen("127.0.0.1"))
            agent.wait_for_peer("decode", timeout=60)
            # 1. Decode READs and then WRITEs; its WRITE carries a notification.
            notes = []
            while not notes:
                notes = agent.wait_for_notifications(60)
            assert notes[0].peer == "decode", notes
            written = [int(x) for x in notes[0].payload.decode().split(",")]
            expected = kv_tensors(seed=2)  # what decode holds
            src = cmd_q.get(timeout=60)  # decode's source block ids, paired with `written`
            for i in range(2 * LAYERS):
                for dst_block, src_block in zip(written, src):
                    if not same_block(kv, i, dst_block, expected, i, src_block):
                        result_q.put(f"block {dst_block} tensor {i} differs after WRITE")
                        return
                for b in range(BLOCKS):
                    if b not in written and not same_block(kv, i, b, original, i, b):
                        result_q.put(f"block {b} tensor {i} changed but was not written")
                        return
            # 2. Prefill pushes (WRITE) its blocks 7, 8 into decode's 10, 11.
            with pool.lease_ids([7, 8]) as blocks:
                agent.write("decode", blocks, [10, 11], notification=b"pushed").wait(60)
            result_q.put("ok")
            assert cmd_q.get(timeout=60) == "bye"
    except BaseException as e:  # reported to the test, which fails with it
        result_q.put(f"prefill failed: {type(e).__name__}: {e}")
        raise
