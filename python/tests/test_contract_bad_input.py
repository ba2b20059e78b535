"""Bad input to the engine-contract calls raises the typed exception naming
the value, and leaves nothing in flight or leased."""

import numpy as np
import pytest
import torch

import kvferry
import kvpeers


@pytest.fixture
def pair():
    """(agent "a" listening, agent "b" connected to it, b's pool "kv")."""
    with kvferry.Agent("a", secret=kvpeers.SECRET) as a, \
            kvferry.Agent("b", secret=kvpeers.SECRET) as b:
        a.create_pool("kv", kvpeers.layout())
        pool = b.create_pool("kv", kvpeers.layout())
        a.listen("127.0.0.1")
        b.connect_from_metadata(a.local_metadata(), timeout=60)
        a.wait_for_peer("b", timeout=60)
        free = pool.free_blocks
        yield a, b, pool
        assert pool.busy_blocks == 0 and pool.free_blocks == free
        assert b.stats()["live"]["transfer"] == 0
        assert all(pool.in_flight(i) == 0 for i in range(kvpeers.BLOCKS))


def test_metadata_bad_input():
    with kvferry.Agent("m", secret=kvpeers.SECRET) as agent:
        with pytest.raises(kvferry.FailedPreconditionError):
            agent.local_metadata()  # not listening
        agent.listen("127.0.0.1")
        with pytest.raises(kvferry.InvalidArgumentError, match="not-an-ip"):
            agent.local_metadata("not-an-ip")
        with pytest.raises(kvferry.InvalidArgumentError, match=r"0\.0\.0\.0"):
            agent.local_metadata("0.0.0.0")
        with pytest.raises(kvferry.InvalidArgumentError, match="42"):
            agent.local_metadata(42)
        good = agent.local_metadata("127.0.0.1")
        assert isinstance(good, bytes)
        with kvferry.Agent("n", secret=kvpeers.SECRET) as other:
            for bad in (b"", b"garbage", good[: len(good) // 2], good + b"x"):
                with pytest.raises(kvferry.InvalidArgumentError):
                    other.connect_from_metadata(bad, timeout=10)
            with pytest.raises(kvferry.InvalidArgumentError, match="str"):
                other.connect_from_metadata(good.decode("latin-1"), timeout=10)
            with pytest.raises(kvferry.InvalidArgumentError, match="negative"):
                other.connect_from_metadata(good, timeout=-1)
            assert other.peers == []
        with pytest.raises(kvferry.InvalidArgumentError, match="own name|'m'"):
            agent.connect_from_metadata(good, timeout=10)  # itself


def test_send_notification_bad_input(pair):
    a, b, _ = pair
    with pytest.raises(kvferry.NotFoundError, match="nobody"):
        b.send_notification("nobody", b"x")
    with pytest.raises(kvferry.InvalidArgumentError):
        b.send_notification("a", b"")
    with pytest.raises(kvferry.InvalidArgumentError, match="65537|64 KiB|65536"):
        b.send_notification("a", b"x" * (64 * 1024 + 1))
    with pytest.raises(kvferry.InvalidArgumentError, match="int"):
        b.send_notification("a", 7)
    with pytest.raises(kvferry.InvalidArgumentError, match="None"):
        b.send_notification(None, b"x")
    b.send_notification("a", b"x" * (64 * 1024))  # the limit itself is fine
    assert a.wait_for_notifications(60) == [kvferry.Notification("b", b"x" * (64 * 1024))]


@pytest.mark.parametrize("kw, error, match", [
    (dict(local_blocks=[99], remote_ids=[0]), kvferry.OutOfRangeError, "99"),
    (dict(local_blocks=[0], remote_ids=[77]), kvferry.OutOfRangeError, "77"),
    (dict(local_blocks=[0, 1], remote_ids=[0]), kvferry.InvalidArgumentError, ""),
    (dict(local_blocks=[3, 3], remote_ids=[0, 1]), kvferry.InvalidArgumentError, "3"),
    (dict(local_blocks=[-1], remote_ids=[0]), kvferry.InvalidArgumentError, "-1"),
    (dict(local_blocks=[2 ** 32], remote_ids=[0]), kvferry.InvalidArgumentError, "4294967296"),
    (dict(local_blocks=np.array([1, -5]), remote_ids=[0, 1]), kvferry.InvalidArgumentError,
     r"local_blocks\[1\] -5"),
    (dict(local_blocks=["x"], remote_ids=[0]), kvferry.InvalidArgumentError, r"local_blocks\[0\] 'x'"),
    (dict(local_blocks=[1.5], remote_ids=[0]), kvferry.InvalidArgumentError, "1.5"),
    (dict(local_blocks=torch.tensor([1.0]), remote_ids=[0]), kvferry.InvalidArgumentError,
     "float"),
    (dict(local_blocks=np.zeros((1, 1), dtype=np.uint32), remote_ids=[0]),
     kvferry.InvalidArgumentError, "dimensions"),
    (dict(local_blocks=b"\x01", remote_ids=[0]), kvferry.InvalidArgumentError, "local_blocks"),
    (dict(local_blocks=5, remote_ids=[0]), kvferry.InvalidArgumentError, "int"),
    (dict(local_blocks=[0], remote_ids=[0], slice_bytes=100), kvferry.InvalidArgumentError, "100"),
    (dict(local_blocks=[0], remote_ids=[0], slice_bytes=1024, remote_slice_offset=4096),
     kvferry.InvalidArgumentError, "4096"),
    (dict(local_blocks=[0], remote_ids=[0], slice_bytes=-1024), kvferry.InvalidArgumentError,
     "-1024"),
    (dict(local_blocks=[0], remote_ids=[0], slice_bytes="1024"), kvferry.InvalidArgumentError,
     "1024"),
    (dict(local_blocks=[0], remote_ids=[0], layers=range(2, 9)), kvferry.InvalidArgumentError, ""),
    (dict(local_blocks=[0], remote_ids=[0], remote_blocks=[0]), kvferry.InvalidArgumentError,
     "remote_ids"),
    (dict(local_blocks=[0], remote_ids=[0], offer_blocks=[0]), kvferry.InvalidArgumentError,
     "offer_blocks"),
    (dict(local_blocks=[0], remote_ids=[0], notification=3), kvferry.InvalidArgumentError, "int"),
])
def test_post_by_ids_bad_input(pair, kw, error, match):
    _, b, pool = pair
    with pytest.raises(error, match=match) as raised:
        b.read("a", local_pool=pool, **kw)
    assert raised.value.end_reason == kvferry.EndReason.NONE  # refused by the call itself
    with pytest.raises(error, match=match):
        b.write("a", local_pool="kv", **kw)


def test_post_local_side_bad_input(pair):
    _, b, pool = pair
    with pytest.raises(kvferry.NotFoundError, match="nope"):
        b.read("a", local_pool="nope", local_blocks=[0], remote_ids=[0])
    with pytest.raises(kvferry.InvalidArgumentError, match="local_pool"):
        b.read("a", local_blocks=[0], remote_ids=[0])
    with pytest.raises(kvferry.InvalidArgumentError, match="local_blocks"):
        b.read("a", local_pool=pool, remote_ids=[0])
    with pytest.raises(kvferry.InvalidArgumentError, match="no local blocks"):
        b.read("a", remote_ids=[0])
    with pytest.raises(kvferry.InvalidArgumentError, match="3.5"):
        b.read("a", local_pool=3.5, local_blocks=[0], remote_ids=[0])
    with pytest.raises(kvferry.NotFoundError, match="ghost"):
        b.read("ghost", local_pool=pool, local_blocks=[0], remote_ids=[0])
    with pool.lease_ids([4]) as blocks:  # both local forms
        with pytest.raises(kvferry.InvalidArgumentError):
            b.read("a", blocks, [0], local_pool=pool, local_blocks=[0])
    blocks = pool.lease_ids([4])
    blocks.release()  # a released handle
    with pytest.raises(kvferry.InvalidArgumentError, match="released"):
        b.read("a", blocks, [0])


def test_fence_and_in_flight_bad_input(pair):
    _, b, pool = pair
    with pytest.raises(kvferry.NotFoundError, match="nope"):
        b.fence_blocks("nope", [0])
    with pytest.raises(kvferry.OutOfRangeError, match="16"):
        b.fence_blocks(pool, [0, 16])
    with pytest.raises(kvferry.InvalidArgumentError, match="negative"):
        b.fence_blocks(pool, [0], timeout=-1)
    with pytest.raises(kvferry.InvalidArgumentError, match=r"ids\[0\] -2"):
        b.fence_blocks(pool, [-2])
    with pytest.raises(kvferry.InvalidArgumentError, match="None"):
        b.fence_blocks(None, [0])
    with pytest.raises(kvferry.InvalidArgumentError, match="99"):
        pool.in_flight(99)
    with pytest.raises(kvferry.InvalidArgumentError, match="-1"):
        pool.in_flight(-1)
    with pytest.raises(kvferry.InvalidArgumentError, match="'3'"):
        pool.in_flight("3")
    assert pool.in_flight(np.uint32(3)) == 0


def test_release_offer_bad_input(pair):
    a, b, _ = pair
    with pytest.raises(kvferry.InvalidArgumentError):
        b.release_offer(b"not a ticket")
    with pytest.raises(kvferry.InvalidArgumentError, match="str"):
        b.release_offer("not bytes")
    # A ticket made for another agent.
    pa = a.pool("kv")
    offer = a.offer(pa.lease_ids([1]), "someone-else", ttl=60)
    with pytest.raises(kvferry.PermissionDeniedError):
        b.release_offer(offer.ticket)
    assert offer.state == "open"
    offer.revoke()
    assert pa.free_blocks == kvpeers.BLOCKS


def test_closed_agent_refuses_every_new_call():
    agent = kvferry.Agent("closed", secret=kvpeers.SECRET)
    pool = agent.create_pool("kv", kvpeers.layout())
    agent.listen("127.0.0.1")
    md = agent.local_metadata()
    agent.close()
    for call in (lambda: agent.local_metadata(), lambda: agent.connect_from_metadata(md),
                 lambda: agent.send_notification("x", b"y"), lambda: agent.release_offer(b"t"),
                 lambda: agent.fence_blocks("kv", [0]), lambda: pool.in_flight(0),
                 lambda: agent.read("x", local_pool="kv", local_blocks=[0], remote_ids=[0])):
        with pytest.raises(kvferry.FailedPreconditionError, match="closed"):
            call()


def test_ids_are_read_in_place_when_they_can_be():
    borrowed = kvferry._kvferry.Agent._ids_borrowed
    from kvferry._agent import _id_buffer

    assert borrowed(np.arange(8, dtype=np.uint32))
    assert borrowed(_id_buffer([1, 2, 3], "ids"))
    assert borrowed(_id_buffer(range(100), "ids"))
    assert not borrowed(np.arange(8, dtype=np.int64))  # converted, each value checked
    assert not borrowed(np.arange(8, dtype=np.uint32)[::2])  # strided
    assert not borrowed(_id_buffer(torch.arange(4), "ids"))
