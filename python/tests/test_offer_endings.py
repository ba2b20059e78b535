"""Offers to another process that end without being consumed: the taker
never posts (the offer expires), or is SIGKILLed while it moves the blocks
(the offer ends peer-failed). Either way the owner's blocks come back and its
counters return to where they were before the taker connected."""

import multiprocessing
import os
import signal
import time

import numpy as np
import pytest

import kvferry
import kvpeers
import offer_peers

DEADLINE = 120.0  # generous: the machine may be busy


def _counters(agent):
    s = agent.stats()
    return s["live"], s["registered_bytes"]


def _taker_gone(agent):
    try:
        return agent.peer("taker").state != "connected"
    except kvferry.NotFoundError:  # already forgotten
        return True


def _wait_for(condition, what):
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.fixture
def owner():
    ctx = multiprocessing.get_context("spawn")
    with kvferry.Agent("owner", secret=kvpeers.SECRET) as agent:
        pool = agent.create_pool("kv", kvpeers.layout())
        src = pool.numpy()
        src[...] = np.random.default_rng(5).integers(0, 256, size=src.shape, dtype=np.uint8)
        before = src.copy()
        del src
        port = agent.listen("127.0.0.1")
        baseline = _counters(agent)
        children = []

        def start(mode):
            cmd_q, result_q = ctx.Queue(), ctx.Queue()
            child = ctx.Process(target=offer_peers.taker_main, args=(port, mode, cmd_q, result_q))
            child.start()
            children.append(child)
            assert result_q.get(timeout=DEADLINE) == "connected"
            agent.wait_for_peer("taker", timeout=DEADLINE)
            return child, cmd_q, result_q

        yield agent, pool, start, baseline, before
        for child in children:
            if child.is_alive():
                child.kill()
            child.join(DEADLINE)


def test_offer_the_taker_never_uses_expires_and_returns_its_blocks(owner):
    agent, pool, start, baseline, before = owner
    child, cmd_q, result_q = start("idle")
    lent = pool.lease_ids([4, 5, 6])
    offer = agent.offer(lent, "taker", ttl=2.0)
    lent.release()  # the offer holds its own reference until it ends
    free = pool.free_blocks
    if offer.state == "open":  # read in that order: still lent when counted
        assert free == kvpeers.BLOCKS - 3
    cmd_q.put((offer.ticket, 3))
    with pytest.raises(kvferry.DeadlineExceededError, match="expired") as raised:
        offer.wait(DEADLINE)
    assert str(offer.id) in str(raised.value)
    assert offer.state == "expired"
    assert isinstance(offer.error, kvferry.DeadlineExceededError)
    assert pool.free_blocks == kvpeers.BLOCKS  # back once it ended
    assert agent.stats()["live"]["offer"] == 0
    # The expired ticket moves nothing.
    cmd_q.put("try")
    outcome, message = result_q.get(timeout=DEADLINE)
    assert outcome != "moved", "an expired offer's ticket moved blocks"
    assert outcome.endswith("Error"), (outcome, message)
    cmd_q.put("bye")
    child.join(DEADLINE)
    assert child.exitcode == 0
    _wait_for(lambda: _taker_gone(agent), "the taker to leave")
    _wait_for(lambda: _counters(agent) == baseline, "counters back at baseline")
    assert np.array_equal(pool.numpy(), before)  # nothing wrote into the pool


def test_taker_killed_mid_transfer_ends_the_offer_peer_failed(owner):
    agent, pool, start, baseline, before = owner
    child, cmd_q, result_q = start("partial")
    lent = pool.lease_ids([1, 2, 3, 4])
    offer = agent.offer(lent, "taker", ttl=600)
    lent.release()
    cmd_q.put((offer.ticket, 4))
    assert result_q.get(timeout=DEADLINE) == "mid"  # layer 0 moved, layer 1 posted
    assert offer.state == "open"
    assert pool.free_blocks == kvpeers.BLOCKS - 4
    os.kill(child.pid, signal.SIGKILL)
    child.join(DEADLINE)
    assert child.exitcode == -signal.SIGKILL
    with pytest.raises(kvferry.Error) as raised:
        offer.wait(DEADLINE)
    assert not isinstance(raised.value, kvferry.DeadlineExceededError), raised.value
    assert offer.state == "peer-failed"
    assert offer.error is not None
    # The pool is whole: every block back, its bytes as they were (the taker
    # only read), and the counters where they were before the taker came.
    assert pool.free_blocks == kvpeers.BLOCKS
    _wait_for(lambda: _taker_gone(agent), "the taker to fail")
    _wait_for(lambda: _counters(agent) == baseline, "counters back at baseline")
    assert np.array_equal(pool.numpy(), before)
    # The owner still works: a fresh lease of every block succeeds.
    with pool.lease(kvpeers.BLOCKS) as everything:
        assert sorted(everything.ids) == list(range(kvpeers.BLOCKS))
