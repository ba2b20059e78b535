"""Offers from Python: consumed by the peer, revoked by the owner."""

import numpy as np
import pytest

import kvferry
import kvpeers


@pytest.fixture
def pair():
    with kvferry.Agent("owner", secret=kvpeers.SECRET) as a, \
            kvferry.Agent("taker", secret=kvpeers.SECRET) as b:
        pa = a.create_pool("kv", kvpeers.layout())
        pb = b.create_pool("kv", kvpeers.layout())
        b.connect("127.0.0.1", a.listen(), timeout=60)
        a.wait_for_peer("taker")
        yield a, b, pa, pb


def test_offer_consumed_by_a_read_moves_the_offered_blocks(pair):
    a, b, pa, pb = pair
    src = pa.numpy()
    src[...] = np.random.default_rng(11).integers(0, 256, size=src.shape, dtype=np.uint8)
    lent = pa.lease_ids([3, 9])
    offer = a.offer(lent, "taker", ttl=60)
    lent.release()  # the offer holds its own reference until it ends
    assert offer.state == "open" and offer.peer == "taker" and isinstance(offer.ticket, bytes)
    with pb.lease_ids([0, 1]) as local:
        b.read_offer(offer.ticket, local).wait(60)
    offer.wait(60)
    assert offer.state == "consumed" and offer.error is None
    dst = pb.numpy()
    assert np.array_equal(dst[:, :, 0], src[:, :, 3])
    assert np.array_equal(dst[:, :, 1], src[:, :, 9])
    del src, dst
    assert pa.free_blocks == kvpeers.BLOCKS  # blocks back once consumed


def test_offer_consumed_by_a_write(pair):
    a, b, pa, pb = pair
    src = pb.numpy()
    src[:, :, 5] = 0x5A
    offer = a.offer(pa.lease_ids([2]), "taker", ttl=60)
    with pb.lease_ids([5]) as local:
        b.write_offer(offer.ticket, local).wait(60)
    offer.wait(60)
    assert (pa.numpy()[:, :, 2] == 0x5A).all()
    del src


def test_revoked_offer_refuses_its_ticket_and_returns_the_blocks(pair):
    a, b, pa, pb = pair
    offer = a.offer(pa.lease(4), "taker", ttl=60)
    assert pa.free_blocks == kvpeers.BLOCKS - 4
    err = offer.revoke()
    assert isinstance(err, kvferry.CancelledError) and str(offer.id) in str(err)
    assert offer.state == "revoked"
    assert pa.free_blocks == kvpeers.BLOCKS
    with pytest.raises(kvferry.CancelledError):
        offer.wait(10)
    with pb.lease(4) as local:
        with pytest.raises(kvferry.FailedPreconditionError):
            b.read_offer(offer.ticket, local).wait(60)


def test_offer_to_unknown_peer_and_bad_ticket(pair):
    a, b, pa, pb = pair
    with pa.lease(1) as blocks:
        # An agent that has not connected may still be offered blocks: the
        # offer waits for it (until its ttl) and can be revoked meanwhile.
        waiting = a.offer(blocks, "nobody", ttl=60)
        assert waiting.state == "open"
        waiting.revoke()
        assert waiting.state == "revoked"
        with pytest.raises(kvferry.InvalidArgumentError, match="peer name"):
            a.offer(blocks, "no such/name")
        with pytest.raises(kvferry.InvalidArgumentError, match="ttl"):
            a.offer(blocks, "taker", ttl=0)
    with pb.lease(1) as local:
        with pytest.raises(kvferry.InvalidArgumentError):
            b.read_offer(b"not a ticket", local)
