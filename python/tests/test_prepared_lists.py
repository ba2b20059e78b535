"""Prepared descriptor lists from Python (Agent.prepare, Agent.post_prepared),
with the peer in a spawned process: reads and writes by index lists that
reorder and repeat descriptors, head slices, compared byte for byte with the
peer's torch tensors; bad input raises the typed exception naming the value
and leaves nothing in flight; a list alive at close is a survivor."""

import numpy as np
import pytest

import kvferry
import kvpeers
from contract_peers import DEADLINE, assert_pair_idle, connected_pair

HEAD_BYTES = kvpeers.BLOCK_SIZE * kvpeers.HEAD_DIM * 2  # one head of one chunk (float16)


@pytest.fixture(scope="module")
def connected():
    """One connected pair for the module (each test snapshots the bytes it
    compares): see contract_peers.connected_pair."""
    yield from connected_pair(peer_seed=3, local_seed=4)


@pytest.fixture
def pair(connected):
    """The module's pair; after each test nothing of it is in flight."""
    yield connected
    assert_pair_idle(connected)


def _block(kv, i, b):
    return kv[i][b].numpy().view(np.uint8).reshape(-1)


def test_read_and_write_by_reordered_and_repeated_indices(pair):
    agent, pool, kv, peer = pair
    with agent.prepare(pool, [0, 1, 2, 3, 4, 5]) as local, \
            agent.prepare("kv", [9, 8, 7, 6, 10], peer="prefill") as remote:
        assert (len(local), local.remote, local.pool) == (6, False, "kv")
        assert (len(remote), remote.remote, remote.peer) == (5, True, "prefill")
        before = [t.clone() for t in kv]
        theirs = peer.ask("blocks", list(range(kvpeers.BLOCKS)))
        # local descriptor 4 (block 4) <- remote 0 (block 9); 1 (block 1) <-
        # remote 3 (block 6); 2 (block 2) <- remote 3 again (block 6).
        t = agent.post_prepared("read", local, [4, 1, 2], remote, np.array([0, 3, 3], np.uint32))
        t.wait(DEADLINE)
        assert t.state == "done" and t.telemetry.bytes == 3 * kvpeers.LAYERS * 2 * kvpeers.HEADS * HEAD_BYTES
        for i in range(2 * kvpeers.LAYERS):
            assert np.array_equal(_block(kv, i, 4), theirs[i][9].reshape(-1)), i
            assert np.array_equal(_block(kv, i, 1), theirs[i][6].reshape(-1)), i
            assert np.array_equal(_block(kv, i, 2), theirs[i][6].reshape(-1)), i
            for b in (0, 3, 5, 11):  # not named: untouched
                assert np.array_equal(_block(kv, i, b), before[i][b].numpy().view(np.uint8).reshape(-1))
        # WRITE local blocks 0 and 3 into the peer's 10 and 7, named in
        # reverse order, on layer 1 only.
        t = agent.post_prepared("write", local, [3, 0], remote, [2, 4], layers=range(1, 2))
        t.wait(DEADLINE)
        after = peer.ask("blocks", list(range(kvpeers.BLOCKS)))
        for i in range(2 * kvpeers.LAYERS):
            layer = i // 2
            for lb, rb in ((3, 7), (0, 10)):
                want = _block(kv, i, lb) if layer == 1 else theirs[i][rb].reshape(-1)
                assert np.array_equal(after[i][rb].reshape(-1), want), (i, lb, rb)


def test_head_slices(pair):
    agent, pool, kv, peer = pair
    theirs = peer.ask("blocks", list(range(kvpeers.BLOCKS)))
    before = [t.clone() for t in kv]
    # The peer's head 1 of block 12 into this side's head 2 of block 13.
    with agent.prepare(pool, [13], slice_offset=2 * HEAD_BYTES, slice_bytes=HEAD_BYTES) as local, \
            agent.prepare("kv", [12], peer="prefill", slice_offset=HEAD_BYTES,
                          slice_bytes=HEAD_BYTES) as remote:
        agent.post_prepared("read", local, [0], remote, [0]).wait(DEADLINE)
    for i in range(2 * kvpeers.LAYERS):
        got = _block(kv, i, 13)
        was = before[i][13].numpy().view(np.uint8).reshape(-1)
        src = theirs[i][12].reshape(-1)
        assert np.array_equal(got[2 * HEAD_BYTES:3 * HEAD_BYTES], src[HEAD_BYTES:2 * HEAD_BYTES]), i
        assert np.array_equal(got[:2 * HEAD_BYTES], was[:2 * HEAD_BYTES]), i
        assert np.array_equal(got[3 * HEAD_BYTES:], was[3 * HEAD_BYTES:]), i


def test_bad_input_names_the_value_and_leaves_nothing(pair):
    agent, pool, _, _ = pair
    with pytest.raises(kvferry.NotFoundError, match="no_such_pool"):
        agent.prepare("no_such_pool", [0])
    with pytest.raises(kvferry.OutOfRangeError, match="99"):
        agent.prepare(pool, [0, 99])
    with pytest.raises(kvferry.InvalidArgumentError, match="blocks"):
        agent.prepare(pool, None)
    with pytest.raises(kvferry.InvalidArgumentError, match="-1"):
        agent.prepare(pool, [1, -1])
    local = agent.prepare(pool, [0, 1])
    remote = agent.prepare("kv", [2, 3], peer="prefill")
    with pytest.raises(kvferry.OutOfRangeError, match="index 2"):
        agent.post_prepared("read", local, [0, 2], remote, [0, 1])
    with pytest.raises(kvferry.InvalidArgumentError):
        agent.post_prepared("read", local, [0, 1], remote, [0])  # lengths differ
    with pytest.raises(kvferry.InvalidArgumentError):
        agent.post_prepared("read", remote, [0], local, [0])  # kinds swapped
    with pytest.raises(kvferry.InvalidArgumentError, match="'copy'"):
        agent.post_prepared("copy", local, [0], remote, [0])
    with pytest.raises(kvferry.InvalidArgumentError, match="not a PreparedList"):
        agent.post_prepared("read", [0, 1], [0], remote, [0])
    remote.release()
    assert remote.released and not local.released
    with pytest.raises(kvferry.InvalidArgumentError, match="released"):
        agent.post_prepared("read", local, [0], remote, [0])
    local.release()
    local.release()  # idempotent
    assert agent.stats()["live"]["prepared_list"] == 0


def test_a_list_alive_at_close_is_a_survivor_with_this_site():
    with kvferry.Agent("lonely", allow_insecure=True) as agent:
        pool = agent.create_pool("kv", kvpeers.layout(), exported=False)
        kept = agent.prepare(pool, [1, 2, 3])
        line = kept._site[1]
    kinds = [(s.kind, s.line) for s in agent.survivors]
    assert ("prepared_list", line) in kinds, agent.survivors
    assert all(s.file.endswith("test_prepared_lists.py") for s in agent.survivors
               if s.kind == "prepared_list")
    del kept
