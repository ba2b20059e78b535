"""The two sides of a program written against NIXL's Python API, run on
kvferry.nixl; shared by test_nixl.py and the processes it spawns
(multiprocessing 'spawn' imports this module by name in the child).

The target registers a source tensor and an inbox; the initiator READs the
source (posting one handle twice) and WRITEs into the inbox with prepared
lists and reordered indices. Each side checks every byte it received.
"""

import json
import time
import traceback

import numpy as np
import torch

from kvferry import nixl

SECRET = "python-nixl-test-secret"
ROWS, COLS = 8, 64  # float16 rows of 128 bytes: two 64-byte chunks each
DEADLINE = 30.0  # generous: the machine is busy


def config():
    return nixl.nixl_agent_config(secret=SECRET, capture_telemetry=True)


def pattern(seed, rows=ROWS):
    """A float16 tensor whose bytes are random and unique to `seed`."""
    t = torch.empty((rows, COLS), dtype=torch.float16)
    rng = np.random.default_rng(seed)
    t.numpy().view(np.uint8).reshape(-1)[:] = rng.integers(0, 256, size=t.numel() * 2,
                                                            dtype=np.uint8)
    return t


def raw(t):
    return t.numpy().view(np.uint8).copy()


def wait_until(what, fn, deadline=DEADLINE):
    end = time.monotonic() + deadline
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {deadline} s waiting for {what}")
        time.sleep(0.001)


def wait_done(agent, handle):
    def state():
        s = agent.check_xfer_state(handle)
        assert s != "ERR", f"transfer failed: {handle.error}"
        return s == "DONE"

    wait_until(f"{handle} to be DONE", state)


# The WRITE: initiator descriptors (rows of its `out` tensor, then rows of its
# `dst` tensor: two regions) by index, into the target's inbox rows.
WRITE_LOCAL = [5, 0, 9, 3, 12, 1]  # indices into out rows 0..7 + dst rows 0..7 (8..15)
WRITE_REMOTE = [2, 7, 0, 4, 1, 6]  # indices into the target's inbox rows


def expected_inbox():
    """What the target's inbox holds after the WRITE (byte for byte)."""
    src = list(pattern(2)) + list(pattern(1))  # out rows, then dst rows after the READ
    inbox = torch.zeros((ROWS, COLS), dtype=torch.float16)
    for l, r in zip(WRITE_LOCAL, WRITE_REMOTE):
        inbox[r] = src[l]
    return inbox


def target(send, recv, name="target", peer="initiator"):
    """The passive side. `send`/`recv` carry metadata and the verdict."""
    source, inbox = pattern(1), torch.zeros((ROWS, COLS), dtype=torch.float16)
    agent = nixl.nixl_agent(name, config())
    try:
        _target(agent, source, inbox, send, recv, peer)
    except BaseException:
        send(("err", traceback.format_exc()))
        raise
    finally:
        agent.close()
    send(("ok", None))


def _target(agent, source, inbox, send, recv, peer):
    reg = agent.register_memory([source, inbox])
    send(("md", agent.get_agent_metadata()))
    kind, md = recv()
    assert kind == "md"
    assert agent.add_remote_agent(md) == peer
    # The descriptors travel as in NIXL's examples: a standalone notification.
    src_descs = agent.get_xfer_descs([source[i] for i in range(ROWS)])
    inbox_descs = agent.get_xfer_descs(
        [(inbox[i].data_ptr(), COLS * 2, 0) for i in range(ROWS)], "DRAM")
    agent.send_notif(peer, b"descs:" + json.dumps(
        [agent.get_serialized_descs(src_descs).decode(),
         agent.get_serialized_descs(inbox_descs).decode()]).encode())

    # Both READ posts notify; so does the WRITE, once every byte is in place.
    wait_until("the first read-done", lambda: agent.check_remote_xfer_done(peer, b"read-done"))
    wait_until("the second read-done",
               lambda: agent.check_remote_xfer_done(peer, b"read-done"))
    wait_until("write-done", lambda: agent.check_remote_xfer_done(peer, b"write-"))
    assert np.array_equal(raw(inbox), raw(expected_inbox())), "inbox differs"
    assert np.array_equal(raw(source), raw(pattern(1))), "a READ changed the source"
    agent.send_notif(peer, b"verified")
    wait_until("bye", lambda: agent.check_remote_xfer_done(peer, b"bye"))
    agent.deregister_memory(reg)
    stats = agent.kvferry_agent.stats()["live"]
    assert stats["transfer"] == 0 and stats["block_set"] == 0, stats


def initiator(send, recv, name="initiator", peer="target"):
    out, dst = pattern(2), torch.zeros((ROWS, COLS), dtype=torch.float16)
    agent = nixl.nixl_agent(name, config())
    try:
        reg = agent.register_memory([out, dst])
        kind, md = recv()
        assert kind == "md"
        assert agent.add_remote_agent(md) == peer
        send(("md", agent.get_agent_metadata()))

        msg = wait_until("the target's descriptors", lambda: agent.get_new_notifs().get(peer))
        assert len(msg) == 1 and msg[0].startswith(b"descs:"), msg
        src_ser, inbox_ser = json.loads(msg[0][len(b"descs:"):])
        src_descs = agent.deserialize_descs(src_ser.encode())
        inbox_descs = agent.deserialize_descs(inbox_ser.encode())
        assert len(src_descs) == ROWS and len(inbox_descs) == ROWS

        # READ, posted twice on one handle.
        local = agent.get_xfer_descs([dst[i] for i in range(ROWS)])
        h = agent.initialize_xfer("READ", local, src_descs, peer, b"read-done")
        assert agent.transfer(h) in ("PROC", "DONE")
        wait_done(agent, h)
        assert np.array_equal(raw(dst), raw(pattern(1))), "first READ: bytes differ"
        first = agent.get_xfer_telemetry(h)
        assert first.totalBytes == ROWS * COLS * 2 and first.descCount == ROWS, first
        assert first.startTime > 0 and first.postDuration >= 0 and first.xferDuration >= 0
        dst.zero_()
        assert agent.transfer(h) in ("PROC", "DONE")
        wait_done(agent, h)
        assert np.array_equal(raw(dst), raw(pattern(1))), "second READ: bytes differ"
        assert agent.get_xfer_telemetry(h).startTime >= first.startTime
        agent.release_xfer_handle(h)

        # WRITE with prepared lists and reordered indices; the local list spans
        # two registered regions (an Nx3 numpy array of descriptors).
        rows = np.array([(out[i].data_ptr(), COLS * 2, 0) for i in range(ROWS)]
                        + [(dst[i].data_ptr(), COLS * 2, 0) for i in range(ROWS)], dtype=np.uint64)
        lp = agent.prep_xfer_dlist("NIXL_INIT_AGENT", rows, "DRAM")
        rp = agent.prep_xfer_dlist(peer, inbox_descs)
        w = agent.make_prepped_xfer("WRITE", lp, np.array(WRITE_LOCAL, dtype=np.int32), rp,
                                    WRITE_REMOTE, b"write-done")
        assert agent.transfer(w) in ("PROC", "DONE")
        wait_done(agent, w)
        t = agent.get_xfer_telemetry(w)
        assert t.totalBytes == len(WRITE_LOCAL) * COLS * 2 and t.descCount == len(WRITE_LOCAL), t
        agent.release_xfer_handle(w)
        agent.release_dlist_handle(lp)
        agent.release_dlist_handle(rp)

        wait_until("the target's verdict", lambda: agent.check_remote_xfer_done(peer, b"verified"))
        agent.send_notif(peer, b"bye")
        kind, detail = recv()  # the target is done (and closed)
        assert kind == "ok", f"the target failed:\n{detail}"
        agent.remove_remote_agent(peer)
        assert not agent.check_remote_metadata(peer)
        agent.deregister_memory(reg)
        stats = agent.kvferry_agent.stats()["live"]
        assert stats["transfer"] == 0 and stats["block_set"] == 0, stats
    finally:
        agent.close()


def target_process(to_parent, to_child):
    """Entry point of the spawned target."""
    target(to_parent.put, lambda: to_child.get(timeout=DEADLINE))
