"""The engine contract from Python, between two processes: connection
metadata, transfers posted by block ids on torch tensors shaped like vLLM's
per-layer HND cache (no lease), send_notification ordered after a write,
fence_blocks before rewriting blocks, telemetry and end reasons."""

import numpy as np
import pytest
import torch

import kvferry
import kvpeers
from contract_peers import DEADLINE, assert_pair_idle, blocks_bytes, connected_pair

CHUNK = kvpeers.BLOCK_SIZE * kvpeers.HEADS * kvpeers.HEAD_DIM * 2


@pytest.fixture(scope="module")
def connected():
    """One connected pair for the module (each test snapshots the bytes it
    compares): see contract_peers.connected_pair."""
    yield from connected_pair(peer_seed=1, local_seed=2)


@pytest.fixture
def pair(connected):
    """The module's pair; after each test nothing of it is in flight."""
    yield connected
    assert_pair_idle(connected)


def _same(a, b):
    return all(np.array_equal(x, y) for xs, ys in zip(a, b) for x, y in zip(xs, ys))


def test_metadata_names_the_agent_and_connects_from_bytes_alone(pair):
    agent, _, _, peer = pair
    assert isinstance(peer.metadata, bytes)
    assert b"prefill" in peer.metadata  # the name travels; the secret does not
    assert kvpeers.SECRET.encode() not in peer.metadata
    assert agent.peer("prefill").state == "connected"


def test_read_and_write_by_block_ids_byte_for_byte(pair):
    agent, pool, kv, peer = pair
    original = [t.clone() for t in kv]
    remote = peer.ask("blocks", list(range(kvpeers.BLOCKS)))
    # READ: prefill's 1, 4, 5, 6 into local 0, 2, 3, 15; local ids as a numpy
    # uint32 array (read in place), remote ids as a torch tensor.
    local_ids = np.array([0, 2, 3, 15], dtype=np.uint32)
    remote_ids = torch.tensor([1, 4, 5, 6])
    t = agent.read("prefill", local_pool=pool, local_blocks=local_ids, remote_ids=remote_ids)
    t.wait(DEADLINE)
    assert t.state == "done" and t.error is None and t.end_reason == kvferry.EndReason.NONE
    tel = t.telemetry
    assert tel.bytes == 4 * kvpeers.LAYERS * 2 * CHUNK
    assert tel.posted is not None and tel.ended is not None and tel.ended >= tel.posted
    assert tel.duration >= 0 and tel.data_path
    for i in range(2 * kvpeers.LAYERS):
        for lb, rb in zip(local_ids.tolist(), remote_ids.tolist()):
            assert np.array_equal(kv[i][lb].numpy().view(np.uint8), remote[i][rb]), (i, lb, rb)
        for b in set(range(kvpeers.BLOCKS)) - set(local_ids.tolist()):
            assert np.array_equal(kv[i][b].numpy().view(np.uint8),
                                  original[i][b].numpy().view(np.uint8)), (i, b)
    # WRITE: local 5, 9 into prefill's 12, 13, one layer at a time, ids as ranges and lists.
    for layer in range(kvpeers.LAYERS):
        agent.write("prefill", local_pool="kv", local_blocks=[5, 9], remote_blocks=range(12, 14),
                    layers=range(layer, layer + 1)).wait(DEADLINE)
    assert _same(peer.ask("blocks", [12, 13]), blocks_bytes(kv, [5, 9]))
    # The peer posts by ids too: its WRITE into local 10, 11 arrives before its notification.
    state = peer.ask("post", "write", "decode",
                     dict(local_blocks=[7, 8], remote_ids=[10, 11], notification=b"pushed"))
    assert state == ("done", "none", 2 * kvpeers.LAYERS * 2 * CHUNK)
    notes = []
    while not notes:
        notes += agent.wait_for_notifications(DEADLINE)
    assert notes == [kvferry.Notification("prefill", b"pushed")]
    assert _same(blocks_bytes(kv, [10, 11]), [r[7:9] for r in remote])


def test_send_notification_arrives_after_an_earlier_write(pair):
    agent, pool, kv, peer = pair
    # A write without a notification, then send_notification at once: when
    # the payload arrives, the written bytes are there.
    for b in (3, 4):
        for t in kv:
            t[b].numpy().view(np.uint8)[...] = 0x30 + b
    w = agent.write("prefill", local_pool=pool, local_blocks=[3, 4], remote_ids=[6, 7])
    agent.send_notification("prefill", b"after-write")
    assert peer.ask("notes", 1) == [("decode", b"after-write")]
    assert _same(peer.ask("blocks", [6, 7]), blocks_bytes(kv, [3, 4]))
    w.wait(DEADLINE)
    # With the write's own notification: it comes first, then the calls' in order.
    w = agent.write("prefill", local_pool=pool, local_blocks=[1], remote_ids=[2],
                    notification=b"write")
    agent.send_notification("prefill", b"one")
    agent.send_notification("prefill", bytearray(b"two"))
    assert peer.ask("notes", 3) == [("decode", b"write"), ("decode", b"one"), ("decode", b"two")]
    w.wait(DEADLINE)


def test_fence_blocks_then_rewrite_with_canaries(pair):
    agent, pool, kv, peer = pair
    ids = [1, 2, 3]
    sent = blocks_bytes(kv, ids)
    transfers = [agent.write("prefill", local_pool=pool, local_blocks=ids, remote_ids=[10, 11, 12],
                             layers=range(layer, layer + 1)) for layer in range(kvpeers.LAYERS)]
    transfers.append(agent.read("prefill", local_pool=pool, local_blocks=[4], remote_ids=[4]))
    agent.fence_blocks(pool, np.array(ids + [4], dtype=np.uint32), timeout=DEADLINE)
    for b in ids + [4]:
        assert pool.in_flight(b) == 0
    assert pool.busy_blocks == 0
    assert all(t.done for t in transfers)
    # The blocks are the engine's again: canaries written now never reach the
    # peer's 10..12 (which hold what was sent), only a later transfer's target.
    for t in kv:
        t.numpy().view(np.uint8)[ids] = 0xA5
    assert _same(peer.ask("blocks", [10, 11, 12]), sent)
    agent.write("prefill", local_pool=pool, local_blocks=ids, remote_ids=[13, 14, 15]).wait(DEADLINE)
    canaries = peer.ask("blocks", [13, 14, 15])
    assert all(np.all(c == 0xA5) for cs in canaries for c in cs)
    assert _same(peer.ask("blocks", [10, 11, 12]), sent)
    # An empty list fences at once; a pool given by name works the same.
    agent.fence_blocks("kv", [], timeout=0)
    agent.fence_blocks("kv", range(kvpeers.BLOCKS))
    del transfers


def test_blocks_named_by_a_transfer_in_flight_are_counted(pair):
    agent, pool, _, peer = pair
    # Queue many transfers naming block 5; while any is in flight, in_flight(5)
    # counts it. Whatever the timing, after the fence it is 0 again.
    transfers = [agent.read("prefill", local_pool=pool, local_blocks=[5], remote_ids=[b])
                 for b in range(kvpeers.BLOCKS)]
    seen = pool.in_flight(5)
    assert 0 <= seen <= len(transfers)
    assert pool.busy_blocks in (0, 1)
    agent.fence_blocks(pool, [5], timeout=DEADLINE)
    assert pool.in_flight(5) == 0 and pool.busy_blocks == 0
    for t in transfers:
        assert t.state == "done", t
    del transfers
