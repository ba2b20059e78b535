"""Survivors with Python sites, fork safety, the GIL, logs reaching `logging`."""

import logging
import os
import sys
import threading
import time

import pytest

import kvferry
import kvpeers


def test_leaked_handle_is_a_survivor_naming_this_file_and_line(caplog):
    agent = kvferry.Agent("leaky", secret=kvpeers.SECRET)
    pool = agent.create_pool("kv", kvpeers.layout())
    line = sys._getframe().f_lineno + 1
    leaked = pool.lease(2)
    kept_but_released = pool.lease(1)
    kept_but_released.release()
    with caplog.at_level(logging.WARNING, logger="kvferry"):
        agent.close()
    assert agent.survivors == [
        kvferry.Survivor("block_set", __file__, line, "test_leaked_handle_is_a_survivor_naming_this_file_and_line")]
    assert f"{__file__}:{line}" in caplog.text
    # The C++ ledger agrees (one live BlockSet at its shutdown).
    assert "block_set=1" in caplog.text
    # The handle stays valid (it holds its own references) and is dropped safely.
    assert leaked.ids == [0, 1]
    leaked.release()
    del leaked


def test_agent_used_in_a_forked_child_raises():
    agent = kvferry.Agent("parent", secret=kvpeers.SECRET)
    pool = agent.create_pool("kv", kvpeers.layout())
    blocks = pool.lease(1)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report what each call raised, never run atexit
        out = []
        for call in (lambda: agent.listen(), lambda: pool.lease(1), lambda: blocks.release(),
                     lambda: agent.close()):
            try:
                call()
                out.append("no error")
            except kvferry.FailedPreconditionError as e:
                out.append("forked" if "forked" in str(e) else f"other: {e}")
            except BaseException as e:  # noqa: BLE001
                out.append(f"{type(e).__name__}: {e}")
        os.write(w, "|".join(out).encode())
        os._exit(0)
    os.close(w)
    deadline = time.monotonic() + 120
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        assert time.monotonic() < deadline, "the forked child hung"
        time.sleep(0.05)
    report = os.read(r, 4096).decode()
    os.close(r)
    assert os.waitstatus_to_exitcode(status) == 0
    # close() in a child only forgets the agent (it belongs to the parent).
    assert report == "forked|forked|forked|no error"
    # The parent's agent is untouched.
    assert agent.listen() > 0
    blocks.release()
    agent.close()
    assert agent.survivors == []


def test_blocking_calls_release_the_gil():
    with kvferry.Agent("gil", secret=kvpeers.SECRET) as agent:
        started = threading.Event()

        def waiter():
            started.set()
            agent.wait_for_notifications(2.0)  # nothing arrives: waits 2 s

        th = threading.Thread(target=waiter)
        th.start()
        started.wait()
        ticks = 0
        begin = time.monotonic()
        while th.is_alive() and time.monotonic() - begin < 30:
            ticks += 1
            time.sleep(0.001)
        th.join()
        # With the GIL held for 2 s this thread could not have run meanwhile.
        assert ticks > 100


def test_kvferry_log_lines_reach_python_logging(caplog):
    with caplog.at_level(logging.INFO, logger="kvferry"):
        with kvferry.Agent("listener", secret=kvpeers.SECRET) as a, \
                kvferry.Agent("wrong", secret="wrong-secret") as b:
            with pytest.raises(kvferry.UnauthenticatedError):
                b.connect("127.0.0.1", a.listen(), timeout=30)
            deadline = time.monotonic() + 60
            while "agent 'listener'" not in caplog.text and time.monotonic() < deadline:
                kvferry.drain_logs()
                time.sleep(0.01)
    assert "agent 'listener'" in caplog.text
    assert any(r.name == "kvferry" and r.levelno >= logging.WARNING for r in caplog.records)


def test_close_waits_for_calls_under_way_in_other_threads():
    # A thread inside a call that released the GIL keeps using the agent;
    # close() from another thread waits for it instead of destroying the
    # agent under it. Each waiter either finished its wait or found the
    # agent closed, never anything else.
    for _ in range(10):
        agent = kvferry.Agent("closing", secret=kvpeers.SECRET)
        outcomes = []
        started = threading.Barrier(5)

        def waiter():
            started.wait()
            try:
                outcomes.append(agent.wait_for_notifications(0.2))
            except kvferry.FailedPreconditionError as e:
                outcomes.append(str(e))

        threads = [threading.Thread(target=waiter) for _ in range(4)]
        for th in threads:
            th.start()
        started.wait()
        agent.close()
        for th in threads:
            th.join()
        assert len(outcomes) == 4
        assert all(o == [] or o == "agent 'closing' is closed" for o in outcomes), outcomes
