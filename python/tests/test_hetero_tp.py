"""Heterogeneous tensor parallelism from Python: one prefill process at TP1
holds every KV head; two decode ranks (processes, TP2) each hold half the
heads and pull their head slice by block ids, then push their slice back
into other prefill blocks. Verified against the prefill's whole cache."""

import multiprocessing

import numpy as np

import kvferry
import kvpeers
from contract_peers import DEADLINE, Peer, kv_tensors, layout

HEADS = kvpeers.HEADS  # prefill's; each decode rank has HEADS // 2
RANKS = 2
HEAD_BYTES = kvpeers.BLOCK_SIZE * kvpeers.HEAD_DIM * 2
RANK_CHUNK = HEADS // RANKS * HEAD_BYTES  # a decode rank's chunk: its heads of one block


def test_two_decode_ranks_each_pull_and_push_their_head_slice():
    ctx = multiprocessing.get_context("spawn")
    kv = kv_tensors(seed=7, heads=HEADS)
    with kvferry.Agent("prefill", secret=kvpeers.SECRET) as agent:
        pool = agent.register_pool("kv", layout(HEADS), kv)
        agent.listen("127.0.0.1")
        metadata = agent.local_metadata()
        ranks = []
        try:
            for r in range(RANKS):
                ranks.append(Peer(ctx, f"decode{r}", seed=20 + r, heads=HEADS // RANKS))
            for r, rank in enumerate(ranks):
                assert rank.ask("connect", metadata) == "prefill"
                assert agent.wait_for_peer(f"decode{r}", timeout=DEADLINE).pools == ["kv"]
            whole = [t.clone() for t in kv]

            # Pull: rank r reads heads [2r, 2r + 2) of prefill blocks 3..8 into its 0..5.
            remote_ids, local_ids = list(range(3, 9)), list(range(6))
            for r, rank in enumerate(ranks):
                rank.ask("post_nowait", "read", "prefill",
                         dict(local_blocks=local_ids, remote_ids=remote_ids,
                              slice_bytes=RANK_CHUNK, remote_slice_offset=r * RANK_CHUNK))
            for rank in ranks:
                assert rank.ask("wait_all") is None
            for r, rank in enumerate(ranks):
                got = rank.ask("blocks", local_ids)
                for i in range(2 * kvpeers.LAYERS):
                    for j, b in enumerate(remote_ids):
                        want = whole[i][b, 2 * r:2 * r + 2].numpy().view(np.uint8)
                        assert np.array_equal(got[i][j].reshape(want.shape), want), (r, i, b)

            # Push: each rank writes its slice of its blocks 10..12 into the same
            # prefill blocks 13..15 at its heads' offset; the halves make whole blocks.
            for r, rank in enumerate(ranks):
                state = rank.ask("post", "write", "prefill",
                                 dict(local_blocks=[10, 11, 12], remote_ids=[13, 14, 15],
                                      slice_bytes=RANK_CHUNK, remote_slice_offset=r * RANK_CHUNK))
                assert state == ("done", "none", 3 * kvpeers.LAYERS * 2 * RANK_CHUNK)
            halves = [rank.ask("blocks", [10, 11, 12]) for rank in ranks]
            for i in range(2 * kvpeers.LAYERS):
                for j, b in enumerate([13, 14, 15]):
                    want = np.concatenate([halves[r][i][j] for r in range(RANKS)]).reshape(-1)
                    assert np.array_equal(kv[i][b].numpy().view(np.uint8).reshape(-1), want), (i, b)
                for b in range(13):  # nothing else of the prefill's cache changed
                    assert np.array_equal(kv[i][b].numpy().view(np.uint8),
                                          whole[i][b].numpy().view(np.uint8)), (i, b)

            # A slice that is not whole heads, or runs past the chunk, is refused
            # naming the values, and nothing stays in flight.
            name, msg = ranks[0].ask_error("post", "read", "prefill",
                                           dict(local_blocks=[0], remote_ids=[0],
                                                slice_bytes=RANK_CHUNK + 1))
            assert name == "InvalidArgumentError" and str(RANK_CHUNK + 1) in msg, msg
            name, msg = ranks[1].ask_error("post", "read", "prefill",
                                           dict(local_blocks=[0], remote_ids=[0],
                                                slice_bytes=RANK_CHUNK,
                                                remote_slice_offset=2 * RANK_CHUNK))
            assert name == "InvalidArgumentError" and str(2 * RANK_CHUNK) in msg, msg
            for rank in ranks:
                free, busy, live = rank.ask("counters")
                assert busy == 0 and live["transfer"] == 0, (busy, live)
        finally:
            for rank in ranks:
                rank.close()
        assert pool.busy_blocks == 0
