"""Offers between two processes through the engine contract: the taker
releases an offer (release_offer), takes part of one (offer_blocks) into
blocks named by ids, takes one made for its name before it connected, and
is SIGKILLed with an offer half moved. Each time the owner's pool comes
back whole and its counters return to where they were."""

import multiprocessing
import time

import numpy as np
import pytest

import kvferry
import kvpeers
from contract_peers import DEADLINE, Peer, blocks_bytes, layout


def _wait_for(condition, what):
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _counters(agent, pool):
    return pool.free_blocks, pool.busy_blocks, agent.stats()["live"]


@pytest.fixture
def owner():
    """(agent "owner", its pool "kv" of random bytes, a copy of them, counters
    before any peer, spawn(name) -> Peer connected to it)."""
    ctx = multiprocessing.get_context("spawn")
    peers = []
    with kvferry.Agent("owner", secret=kvpeers.SECRET) as agent:
        pool = agent.create_pool("kv", layout())
        mem = pool.numpy()
        mem[...] = np.random.default_rng(11).integers(0, 256, size=mem.shape, dtype=np.uint8)
        before = mem.copy()
        del mem
        agent.listen("127.0.0.1")
        baseline = _counters(agent, pool)

        def spawn(name, connect=True):
            peer = Peer(ctx, name, seed=3)
            peers.append(peer)
            if connect:
                assert peer.ask("connect", agent.local_metadata()) == "owner"
                agent.wait_for_peer(name, timeout=DEADLINE)
            return peer

        try:
            yield agent, pool, before, baseline, spawn
        finally:
            for p in peers:
                p.close()
        _wait_for(lambda: _counters(agent, pool) == baseline, "the owner's counters at baseline")
        mem = pool.numpy()
        assert np.array_equal(mem, before), "the owner's pool changed"
        del mem
    assert agent.survivors == []


def _owner_blocks(pool, ids):
    mem = pool.numpy()
    out = [[mem[layer, plane, b].copy() for b in ids]
           for layer in range(kvpeers.LAYERS) for plane in range(2)]
    del mem
    return out


def test_released_by_the_taker_comes_back_at_once(owner):
    agent, pool, _, baseline, spawn = owner
    taker = spawn("taker")
    offer = agent.offer(pool.lease_ids([2, 3, 4]), "taker", ttl=600)
    assert pool.free_blocks == baseline[0] - 3
    taker.ask("take", "a", offer.ticket)
    assert taker.ask("release_offer", "a") is None
    offer.wait(DEADLINE)  # long before the ttl
    assert offer.state == "released" and offer.error is None
    assert offer.end_reason == kvferry.EndReason.NONE
    assert pool.free_blocks == baseline[0]
    # Releasing again is no error; posting on it is refused.
    assert taker.ask("release_offer", "a") is None
    name, msg = taker.ask_error("read_offer", "a", [0, 1, 2], {})
    assert name in ("FailedPreconditionError", "AbortedError"), (name, msg)
    free, busy, live = taker.ask("counters")
    assert busy == 0 and live["transfer"] == 0


def test_part_of_an_offer_is_taken_into_blocks_named_by_ids(owner):
    agent, pool, _, baseline, spawn = owner
    taker = spawn("taker")
    before = taker.ask("blocks", list(range(kvpeers.BLOCKS)))
    offer = agent.offer(pool.lease_ids([5, 6, 7, 8]), "taker", ttl=600)
    taker.ask("take", "p", offer.ticket)
    # Indices past the offer, or given twice, are refused naming them; nothing moves.
    name, msg = taker.ask_error("read_offer", "p", [0], {"offer_blocks": [4]})
    assert name == "InvalidArgumentError" and "4" in msg, msg
    name, msg = taker.ask_error("read_offer", "p", [0, 1], {"offer_blocks": [1, 1]})
    assert name == "InvalidArgumentError" and "1" in msg, msg
    assert offer.state == "open"
    # Offered blocks 6 and 8 (indices 1, 3) into the taker's 14 and 2.
    state = taker.ask("read_offer", "p", np.array([14, 2], dtype=np.uint32),
                      {"offer_blocks": [1, 3]})
    assert state == ("done", "none")
    offer.wait(DEADLINE)
    assert offer.state == "consumed" and offer.end_reason == kvferry.EndReason.NONE
    assert pool.free_blocks == baseline[0]
    after = taker.ask("blocks", list(range(kvpeers.BLOCKS)))
    want = _owner_blocks(pool, [6, 8])
    for i in range(2 * kvpeers.LAYERS):
        assert np.array_equal(after[i][14].reshape(-1), want[i][0]), i
        assert np.array_equal(after[i][2].reshape(-1), want[i][1]), i
        for b in set(range(kvpeers.BLOCKS)) - {2, 14}:
            assert np.array_equal(after[i][b], before[i][b]), (i, b)


def test_offer_to_a_name_before_it_connected(owner):
    agent, pool, _, baseline, spawn = owner
    offer = agent.offer(pool.lease_ids([9, 10]), "late", ttl=600)
    assert offer.state == "open" and offer.peer == "late"
    late = spawn("late", connect=False)
    assert late.ask("connect", agent.local_metadata()) == "owner"
    late.ask("take", "t", offer.ticket)
    assert late.ask("read_offer", "t", [0, 1], {}) == ("done", "none")
    offer.wait(DEADLINE)
    assert offer.state == "consumed"
    got = late.ask("blocks", [0, 1])
    want = _owner_blocks(pool, [9, 10])
    for i in range(2 * kvpeers.LAYERS):
        for j in range(2):
            assert np.array_equal(got[i][j].reshape(-1), want[i][j]), (i, j)
    assert pool.free_blocks == baseline[0]


def test_taker_killed_with_the_offer_half_moved(owner):
    agent, pool, _, baseline, spawn = owner
    taker = spawn("taker")
    offer = agent.offer(pool.lease_ids([0, 1, 2, 3]), "taker", ttl=600)
    taker.ask("take", "k", offer.ticket)
    # Layer 0 moves, and then the taker dies without a word.
    assert taker.ask("read_offer", "k", [4, 5, 6, 7], {"layers": range(0, 1)}) == ("done", "none")
    assert offer.state == "open"
    taker.process.kill()
    taker.process.join(DEADLINE)
    with pytest.raises(kvferry.Error):
        offer.wait(DEADLINE)
    assert offer.state == "peer-failed"
    assert offer.end_reason in (kvferry.EndReason.PEER_FAILED,
                                kvferry.EndReason.PEER_DISCONNECTED), offer.end_reason
    assert pool.free_blocks == baseline[0] and pool.busy_blocks == 0
    # Posting to the dead peer by ids is refused with its end reason; nothing stays in flight.
    _wait_for(lambda: agent.peer("taker").state != "connected", "the taker failed")
    with pytest.raises((kvferry.UnavailableError, kvferry.FailedPreconditionError,
                        kvferry.NotFoundError)):
        agent.read("taker", local_pool=pool, local_blocks=[0], remote_ids=[0])
    assert pool.busy_blocks == 0 and pool.in_flight(0) == 0
