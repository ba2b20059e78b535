"""The C++ ledger records the Python file and line that created each handle
(builds with KVFERRY_LEDGER: Debug and the sanitizer presets)."""

import logging
import sys
import time

import pytest

import kvferry
import kvpeers

pytestmark = pytest.mark.skipif(not kvferry.ledger_sites_enabled(),
                                reason="built without KVFERRY_LEDGER: the C++ ledger keeps no sites")


def _here():
    return sys._getframe(1).f_lineno


def test_cpp_survivor_report_names_the_python_file_and_line(caplog):
    agent = kvferry.Agent("sites", secret=kvpeers.SECRET)
    pool = agent.create_pool("kv", kvpeers.layout())
    lease_line = _here() + 1
    leaked = pool.lease(2)
    with caplog.at_level(logging.WARNING, logger="kvferry"):
        agent.close()
    fn = "test_cpp_survivor_report_names_the_python_file_and_line"
    # The C++ ledger's own report at shutdown (not the package's): the live
    # BlockSet with this file, line and function.
    assert f"live block_set created at {__file__}:{lease_line} ({fn})" in caplog.text, caplog.text
    assert "python/src/module.cc" not in caplog.text, caplog.text
    # The package's report agrees.
    assert agent.survivors == [kvferry.Survivor("block_set", __file__, lease_line, fn)]
    leaked.release()


def test_live_objects_carry_python_sites():
    with kvferry.Agent("owner", secret=kvpeers.SECRET) as a, \
            kvferry.Agent("taker", secret=kvpeers.SECRET) as b:
        fn = "test_live_objects_carry_python_sites"
        pool_line = _here() + 1
        pa = a.create_pool("kv", kvpeers.layout())
        pb = b.create_pool("kv", kvpeers.layout())
        b.connect("127.0.0.1", a.listen(), timeout=60)
        a.wait_for_peer("taker", timeout=60)
        lease_line = _here() + 1
        lent = pa.lease_ids([1, 2])
        offer_line = _here() + 1
        offer = a.offer(lent, "taker", ttl=60)
        objects = a.ledger_objects()
        for kind, line in (("pool", pool_line), ("block_set", lease_line), ("offer", offer_line)):
            assert kvferry.Survivor(kind, __file__, line, fn) in objects, (kind, line, objects)
        report = a.ledger_report()
        assert f"live offer created at {__file__}:{offer_line} ({fn})" in report, report
        with pb.lease_ids([0, 1]) as local:
            read_line = _here() + 1
            t = b.read_offer(offer.ticket, local)
            assert kvferry.Survivor("transfer_handle", __file__, read_line, fn) in b.ledger_objects()
            t.wait(60)
        offer.wait(60)
        lent.release()
        del t
        # Once the handles are gone none of them is left; what remains from
        # this file is each agent's own (context, worker, pool, its memory).
        for agent in (a, b):
            deadline = time.monotonic() + 120
            while True:
                left = [o for o in agent.ledger_objects() if o.file == __file__]
                handles = [o for o in left if o.kind in ("block_set", "offer", "transfer_handle")]
                if not handles:
                    break
                assert time.monotonic() < deadline, left
                time.sleep(0.02)
            assert any(o.kind == "context" for o in left), left
