"""kvferry.nixl: a program written against NIXL's Python API, in one process
and in two, and the errors bad input gets."""

import multiprocessing
import queue
import threading

import numpy as np
import pytest
import torch

import kvferry
from kvferry import nixl

import nixl_peers
from nixl_peers import COLS, DEADLINE, ROWS


def test_nixl_program_one_process():
    to_initiator, to_target = queue.Queue(), queue.Queue()
    t = threading.Thread(target=nixl_peers.target,
                         args=(to_initiator.put, lambda: to_target.get(timeout=DEADLINE)))
    t.start()
    try:
        nixl_peers.initiator(to_target.put, lambda: to_initiator.get(timeout=DEADLINE))
    finally:
        t.join(DEADLINE)
    assert not t.is_alive()


def test_nixl_program_two_processes():
    ctx = multiprocessing.get_context("spawn")
    to_parent, to_child = ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=nixl_peers.target_process, args=(to_parent, to_child))
    child.start()
    try:
        nixl_peers.initiator(to_child.put, lambda: to_parent.get(timeout=DEADLINE))
    finally:
        child.join(DEADLINE)
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0


@pytest.fixture
def pair():
    """Two connected agents of this process, each with one registered tensor."""
    a = nixl.nixl_agent("a", nixl_peers.config())
    b = nixl.nixl_agent("b", nixl_peers.config())
    ta, tb = nixl_peers.pattern(3), nixl_peers.pattern(4)
    ra, rb = a.register_memory(ta), b.register_memory(tb)
    assert a.add_remote_agent(b.get_agent_metadata()) == "b"
    yield a, b, ta, tb, ra, rb
    a.close()
    b.close()


def quiet(agent):
    """Nothing in flight, no lease, no block set left behind."""
    live = agent.kvferry_agent.stats()["live"]
    return live["transfer"] == 0 and live["block_set"] == 0


def test_descriptor_outside_registered_memory(pair):
    a, b, ta, tb, _, _ = pair
    outside = torch.zeros(COLS, dtype=torch.float16)  # never registered
    with pytest.raises(nixl.nixlNotFoundError, match=hex(outside.data_ptr())):
        a.initialize_xfer("READ", a.get_xfer_descs([outside]), b.get_xfer_descs([tb[0]]), "b")
    # Runs past the end of the region it starts in.
    past = [(ta[ROWS - 1].data_ptr(), 2 * COLS * 2, 0)]
    with pytest.raises(nixl.nixlNotFoundError, match="local descriptor 0"):
        a.prep_xfer_dlist("NIXL_INIT_AGENT", past, "DRAM")
    with pytest.raises(nixl.nixlNotFoundError, match="agent 'b' descriptor 0"):
        a.prep_xfer_dlist("b", [(tb[ROWS - 1].data_ptr() + 64, COLS * 2, 0)], "DRAM")
    # Inside, but not on a chunk boundary.
    with pytest.raises(nixl.nixlInvalidParamError, match="chunk"):
        a.prep_xfer_dlist("NIXL_INIT_AGENT", [(ta[0].data_ptr() + 2, 64, 0)], "DRAM")
    # Pairs of different lengths.
    with pytest.raises(nixl.nixlInvalidParamError, match="descriptor pair 0"):
        a.initialize_xfer("WRITE", a.get_xfer_descs([ta[0]]), b.get_xfer_descs([tb[0:2]]), "b")
    assert quiet(a) and quiet(b)
    assert isinstance(nixl.nixlNotFoundError("x"), LookupError)
    assert isinstance(nixl.nixlInvalidParamError("x"), ValueError)


def test_unknown_agent(pair):
    a, b, ta, tb, _, _ = pair
    with pytest.raises(nixl.nixlNotFoundError, match="'nobody'"):
        a.prep_xfer_dlist("nobody", [tb[0]])
    with pytest.raises(nixl.nixlNotFoundError, match="'nobody'"):
        a.initialize_xfer("READ", [ta[0]], [tb[0]], "nobody")
    with pytest.raises(nixl.nixlNotFoundError, match="'nobody'"):
        a.send_notif("nobody", b"hi")
    with pytest.raises(nixl.nixlNotFoundError, match="'nobody'"):
        a.remove_remote_agent("nobody")
    with pytest.raises(nixl.nixlNotSupportedError, match="loopback"):
        a.prep_xfer_dlist("a", [ta[0]])
    # A handle made before its peer was removed cannot be posted afterwards.
    h = a.initialize_xfer("READ", [ta[0]], [tb[0]], "b")
    a.remove_remote_agent("b")
    with pytest.raises(nixl.nixlNotFoundError, match="'b'"):
        a.transfer(h)
    assert quiet(a) and quiet(b)


def test_released_handles(pair):
    a, b, ta, tb, _, _ = pair
    h = a.initialize_xfer("READ", [ta[0], ta[1]], [tb[2], tb[3]], "b", b"tag")
    with pytest.raises(nixl.nixlNotPostedError):
        a.check_xfer_state(h)
    assert a.transfer(h) in ("PROC", "DONE")
    nixl_peers.wait_done(a, h)
    assert torch.equal(ta[0:2].view(torch.int16), tb[2:4].view(torch.int16))
    a.release_xfer_handle(h)
    a.release_xfer_handle(h)  # twice is a no-op
    with pytest.raises(nixl.nixlInvalidParamError, match="released"):
        a.transfer(h)
    with pytest.raises(nixl.nixlInvalidParamError, match="released"):
        a.check_xfer_state(h)
    with pytest.raises(nixl.nixlInvalidParamError, match="released"):
        a.get_xfer_telemetry(h)
    lp = a.prep_xfer_dlist("NIXL_INIT_AGENT", [ta[0]])
    rp = a.prep_xfer_dlist("b", [tb[0]])
    a.release_dlist_handle(lp)
    with pytest.raises(nixl.nixlInvalidParamError, match="local_xfer_side .* released"):
        a.make_prepped_xfer("READ", lp, [0], rp, [0])
    # Sides swapped, an index past the list, indices of a float dtype.
    lp = a.prep_xfer_dlist("NIXL_INIT_AGENT", [ta[0]])
    with pytest.raises(nixl.nixlInvalidParamError, match="remote_xfer_side"):
        a.make_prepped_xfer("READ", lp, [0], lp, [0])
    with pytest.raises(nixl.nixlInvalidParamError, match=r"remote_indices\[0\] 1 "):
        a.make_prepped_xfer("READ", lp, [0], rp, [1])
    with pytest.raises(nixl.nixlInvalidParamError, match="float64"):
        a.make_prepped_xfer("READ", lp, np.zeros(1), rp, [0])
    with pytest.raises(nixl.nixlInvalidParamError, match="'COPY'"):
        a.make_prepped_xfer("COPY", lp, [0], rp, [0])
    assert quiet(a) and quiet(b)


def test_bad_tensors_and_arrays_register_nothing():
    with nixl.nixl_agent("solo", nixl_peers.config()) as a:
        before = a.kvferry_agent.stats()["registered_bytes"]
        good = torch.zeros((ROWS, COLS), dtype=torch.float16)
        strided = torch.zeros((ROWS, 2 * COLS), dtype=torch.float16)[:, :COLS]
        with pytest.raises(nixl.nixlInvalidParamError, match=r"reg_list\[1\].*not contiguous"):
            a.register_memory([good, strided])
        with pytest.raises(nixl.nixlNotSupportedError, match="'meta'"):
            a.register_memory(torch.zeros(64, device="meta"))
        with pytest.raises(nixl.nixlInvalidParamError, match="float64"):
            a.register_memory(np.zeros((1, 3)), "DRAM")
        with pytest.raises(nixl.nixlInvalidParamError, match=r"shape \(2, 2\)"):
            a.register_memory(np.zeros((2, 2), dtype=np.uint64), "DRAM")
        with pytest.raises(nixl.nixlNotSupportedError, match="'VRAM'"):
            a.register_memory([(good.data_ptr(), 64, 0, "")], "VRAM")
        with pytest.raises(nixl.nixlInvalidParamError, match="mem_type is required"):
            a.register_memory([(good.data_ptr(), 64, 0, "")])
        with pytest.raises(nixl.nixlInvalidParamError, match="multiple of chunk_bytes 64"):
            a.register_memory(torch.zeros(24, dtype=torch.uint8))
        # Overlapping entries of one call: the first is not left registered.
        with pytest.raises(nixl.nixlInvalidParamError, match=r"reg_list\[1\].*overlaps reg_list\[0\]"):
            a.register_memory([good, good[2:]])
        assert a.kvferry_agent.stats()["registered_bytes"] == before
        reg = a.register_memory(good)
        with pytest.raises(nixl.nixlInvalidParamError, match="overlaps the registered region"):
            a.register_memory(good[1:3])
        with pytest.raises(nixl.nixlNotFoundError, match="not a registered region"):
            a.deregister_memory(a.get_reg_descs(good[1:3]))
        a.deregister_memory(reg)
        assert a.kvferry_agent.stats()["registered_bytes"] == before
        with pytest.raises(nixl.nixlNotFoundError, match="not a registered region"):
            a.deregister_memory(reg)  # already gone
        with pytest.raises(nixl.nixlInvalidParamError, match="not kvferry.nixl agent metadata"):
            a.add_remote_agent(b"garbage")
        with pytest.raises(nixl.nixlInvalidParamError, match="not a serialized descriptor list"):
            a.deserialize_descs(b"\x80\x04garbage")
        with pytest.raises(nixl.nixlNotFoundError, match="'GDS'"):
            a.get_new_notifs(["GDS"])
        assert quiet(a)


def test_wrong_secret_connects_nothing():
    a = nixl.nixl_agent("a", nixl_peers.config())
    b = nixl.nixl_agent("b", nixl.nixl_agent_config(secret="another secret", connect_timeout=5))
    try:
        with pytest.raises(kvferry.UnauthenticatedError):
            b.add_remote_agent(a.get_agent_metadata())
        assert not b.check_remote_metadata("a")
        assert not b.kvferry_agent.peers or all(p.state != "connected"
                                                for p in b.kvferry_agent.peers)
    finally:
        a.close()
        b.close()


def test_backend_queries_and_telemetry_off():
    with nixl.nixl_agent("q", nixl.nixl_agent_config(secret=nixl_peers.SECRET)) as a, \
            nixl.nixl_agent("r", nixl_peers.config()) as r:
        ta, tr = nixl_peers.pattern(5), nixl_peers.pattern(6)
        a.register_memory(ta)
        r.register_memory(tr)
        a.add_remote_agent(r.get_agent_metadata())
        h = a.initialize_xfer("WRITE", [ta[1]], [tr[0]], "r")
        assert a.transfer(h) in ("PROC", "DONE")
        nixl_peers.wait_done(a, h)
        assert torch.equal(ta[1].view(torch.int16), tr[0].view(torch.int16))
        with pytest.raises(nixl.nixlNoTelemetryError, match="capture_telemetry"):
            a.get_xfer_telemetry(h)
        assert a.query_xfer_backend(h) == "UCX"

        assert a.get_plugin_list() == ["UCX"]
        assert a.get_backend_mem_types("UCX") == ["DRAM"]
        assert a.get_backend_params("UCX")["chunk_bytes"] == "64"
        assert a.get_plugin_mem_types("GDS") == []
        with pytest.raises(nixl.nixlNotSupportedError, match="'GDS'"):
            a.create_backend("GDS")
        with pytest.raises(nixl.nixlNotSupportedError, match="metadata"):
            a.fetch_remote_metadata("x", "127.0.0.1", 5555)
        with pytest.raises(nixl.nixlNotSupportedError):
            nixl.nixl_agent_config(backends=["GDS"])
        with pytest.raises(nixl.nixlInvalidParamError, match="chunk_bytes 100"):
            nixl.nixl_agent_config(chunk_bytes=100)
        d = a.get_xfer_descs([(4096, 64, 0)], "DRAM")
        assert a.deserialize_descs(a.get_serialized_descs(d)) == d


def test_agents_loading_each_others_metadata_at_once():
    """Both call add_remote_agent at the same moment (kvferry keeps one
    connection between two agents): both end connected, and both directions move."""
    for round in range(10):
        a = nixl.nixl_agent("a", nixl_peers.config())
        b = nixl.nixl_agent("b", nixl_peers.config())
        try:
            ta, tb = nixl_peers.pattern(10 + round), nixl_peers.pattern(20 + round)
            a.register_memory(ta)
            b.register_memory(tb)
            errors = []

            def load(agent, md):
                try:
                    agent.add_remote_agent(md)
                except Exception as e:  # reported below
                    errors.append(e)

            threads = [threading.Thread(target=load, args=(a, b.get_agent_metadata())),
                       threading.Thread(target=load, args=(b, a.get_agent_metadata()))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(DEADLINE)
            assert not errors, f"round {round}: {errors}"
            ha = a.initialize_xfer("READ", [ta[0]], [tb[1]], "b")
            hb = b.initialize_xfer("READ", [tb[2]], [ta[3]], "a")
            a.transfer(ha)
            b.transfer(hb)
            nixl_peers.wait_done(a, ha)
            nixl_peers.wait_done(b, hb)
            assert torch.equal(ta[0].view(torch.int16), tb[1].view(torch.int16))
            assert torch.equal(tb[2].view(torch.int16), ta[3].view(torch.int16))
        finally:
            a.close()
            b.close()


def test_transfers_in_flight_share_local_memory(pair):
    """One local source written to two places at once, and re-read while
    a READ of the same remote rows is in flight: no lease stands in the way."""
    a, b, ta, tb, _, _ = pair
    w1 = a.initialize_xfer("WRITE", [ta[0:4]], [tb[0:4]], "b", b"w1")
    w2 = a.initialize_xfer("WRITE", [ta[0:4]], [tb[4:8]], "b", b"w2")
    assert a.transfer(w1) in ("PROC", "DONE")
    assert a.transfer(w2) in ("PROC", "DONE")
    nixl_peers.wait_done(a, w1)
    nixl_peers.wait_done(a, w2)
    raw = nixl_peers.raw
    assert np.array_equal(raw(tb[0:4]), raw(ta[0:4]))
    assert np.array_equal(raw(tb[4:8]), raw(ta[0:4]))
    for tag in (b"w1", b"w2"):
        nixl_peers.wait_until(tag, lambda: b.check_remote_xfer_done("a", tag))
    assert quiet(a) and quiet(b)


def test_post_to_a_peer_that_went_away(pair):
    a, b, ta, tb, _, _ = pair
    h = a.initialize_xfer("READ", [ta[0]], [tb[0]], "b", b"never")
    b.close()
    nixl_peers.wait_until("a to see b go", lambda: a.kvferry_agent.peer("b").state != "connected")
    with pytest.raises(kvferry.Error, match="'b'"):
        a.transfer(h)
    with pytest.raises(nixl.nixlNotPostedError):
        a.check_xfer_state(h)  # the refused post left nothing to poll
    assert quiet(a)
    a.remove_remote_agent("b")  # forgets a peer that went away
    assert not a.check_remote_metadata("b")
