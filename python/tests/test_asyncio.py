"""asyncio: transfers and offers awaited on the agent's completion fd."""

import asyncio

import numpy as np
import pytest

import kvferry
import kvpeers

SMALL = kvferry.KvLayout(num_layers=1, num_blocks=1024, tokens_per_block=16, num_kv_heads=1,
                         head_dim=32, element_bytes=2)


def _pair(layout, **kw):
    """Two agents with a pool "kv" each, connected (pools made first, so
    each side knows the other's at once)."""
    a = kvferry.Agent("async-a", secret=kvpeers.SECRET, **kw)
    b = kvferry.Agent("async-b", secret=kvpeers.SECRET, **kw)
    pa = a.create_pool("kv", layout)
    pb = b.create_pool("kv", layout)
    b.connect("127.0.0.1", a.listen(), timeout=60)
    a.wait_for_peer("async-b", timeout=60)
    return a, b, pa, pb


def test_1000_concurrent_awaited_transfers_complete():
    a, b, pa, pb = _pair(SMALL)
    with a, b:
        src = pa.numpy()
        src[...] = np.random.default_rng(7).integers(0, 256, size=src.shape, dtype=np.uint8)
        n = 1000

        async def one(i):
            blocks = pb.lease_ids([i])
            t = b.read("async-a", blocks, [n - 1 - i])
            blocks.release()  # the transfer holds the lease until it ends
            await t
            return t.state

        async def main():
            return await asyncio.gather(*(one(i) for i in range(n)))

        states = asyncio.run(main())
        assert states == ["done"] * n
        dst = pb.numpy()
        for i in range(n):
            assert np.array_equal(dst[0, :, i], src[0, :, n - 1 - i]), i
        del src, dst
        assert pb.free_blocks == SMALL.num_blocks


def test_cancelled_task_cancels_its_transfer():
    # 512 MiB takes long enough (even over shared memory) that the cancel
    # lands while the transfer is in flight.
    big = kvferry.KvLayout(num_layers=1, num_blocks=128, tokens_per_block=64, num_kv_heads=16,
                           head_dim=1024, element_bytes=4)
    a, b, pa, pb = _pair(big)
    with a, b:

        async def attempt():
            """True when the cancel found the transfer in flight."""
            blocks = pb.lease(big.num_blocks)
            t = b.read("async-a", blocks, range(big.num_blocks))
            blocks.release()
            task = asyncio.ensure_future(t)  # Transfer is awaitable
            await asyncio.sleep(0)  # the task starts waiting
            if t.state != "in_flight":  # a descheduled test thread: try again
                await task
                return False
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            if t.state == "done":  # it ended just before the cancel
                return False
            assert t.state == "cancelled"
            assert isinstance(t.error, kvferry.CancelledError)
            return True

        async def main():
            for _ in range(5):
                if await attempt():
                    return True
            return False

        assert asyncio.run(main()), "no transfer was still in flight when its task was cancelled"
        assert pb.free_blocks == big.num_blocks


def test_awaited_offer_and_failed_transfer_raise_typed_errors():
    a, b, pa, pb = _pair(SMALL)
    with a, b:
        a.wait_for_peer("async-b")

        async def main():
            offer = a.offer(pa.lease(4), "async-b", ttl=60)
            with pb.lease(4) as local:
                await b.read_offer(offer.ticket, local)
            await offer
            assert offer.state == "consumed"
            revoked = a.offer(pa.lease(2), "async-b", ttl=60)
            assert isinstance(revoked.revoke(), kvferry.CancelledError)
            with pytest.raises(kvferry.CancelledError):
                await revoked
            with pb.lease(2) as local:
                with pytest.raises(kvferry.FailedPreconditionError):
                    b.read_offer(revoked.ticket, local)

        asyncio.run(main())
