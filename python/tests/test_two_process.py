"""Two Python processes move torch tensors shaped like vLLM's per-layer KV cache."""

import multiprocessing

import kvferry
import kvpeers


def test_read_and_write_between_processes_by_block_ids():
    ctx = multiprocessing.get_context("spawn")
    port_q, result_q, cmd_q = ctx.Queue(), ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=kvpeers.prefill_main, args=(port_q, result_q, cmd_q))
    child.start()
    try:
        kv = kvpeers.kv_tensors(seed=2)
        remote = kvpeers.kv_tensors(seed=1)  # what prefill holds
        original = [t.clone() for t in kv]
        with kvferry.Agent("decode", secret=kvpeers.SECRET) as agent:
            pool = agent.register_pool("kv", kvpeers.layout(), kv)
            port = port_q.get(timeout=120)
            peer = agent.connect("127.0.0.1", port, timeout=60)
            assert peer.name == "prefill" and peer.pools == ["kv"]

            # READ: prefill's blocks 1, 4, 5, 6 into local 0, 2, 3, 15.
            local_ids, remote_ids = [0, 2, 3, 15], [1, 4, 5, 6]
            with pool.lease_ids(local_ids) as blocks:
                t = agent.read("prefill", blocks, remote_ids)
                t.wait(60)
                assert t.state == "done" and t.error is None
                del t  # a handle kept past close() is a survivor
            for i in range(2 * kvpeers.LAYERS):
                for lb, rb in zip(local_ids, remote_ids):
                    assert kvpeers.same_block(kv, i, lb, remote, i, rb), (i, lb, rb)
                for b in (1, 10, 11, 14):
                    assert kvpeers.same_block(kv, i, b, original, i, b), (i, b)

            # WRITE: local 5, 9 into prefill's 12, 13, with a notification.
            with pool.lease_ids([5, 9]) as blocks:
                agent.write("prefill", blocks, [12, 13], notification=b"12,13").wait(60)
            cmd_q.put([5, 9])
            assert result_q.get(timeout=120) == "ok"

            # Prefill's WRITE into local 10, 11 arrived before its notification.
            notes = []
            while not notes:
                notes = agent.wait_for_notifications(60)
            assert notes == [kvferry.Notification("prefill", b"pushed")]
            for i in range(2 * kvpeers.LAYERS):
                assert kvpeers.same_block(kv, i, 10, remote, i, 7)
                assert kvpeers.same_block(kv, i, 11, remote, i, 8)
            cmd_q.put("bye")
            child.join(60)
            assert child.exitcode == 0
        assert agent.closed and agent.survivors == []
    finally:
        if child.is_alive():
            child.kill()
            child.join()
