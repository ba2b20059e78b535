"""The taker process of test_offer_endings.py (multiprocessing 'spawn'
imports this module by name in the child)."""

import kvferry
import kvpeers


def taker_main(port, mode, cmd_q, result_q):
    """Connects to the owner at `port` as "taker" and gets an offer's ticket.
    mode "idle": never posts on it until told "try", then reports what that
    post ended with. mode "partial": moves layer 0 of the offer, posts layer
    1, says "mid" and waits to be killed (layer 2 is never asked for, so the
    offer stays open until this process is gone)."""
    try:
        with kvferry.Agent("taker", secret=kvpeers.SECRET) as agent:
            pool = agent.create_pool("kv", kvpeers.layout())
            agent.connect("127.0.0.1", port, timeout=60)
            result_q.put("connected")
            ticket, count = cmd_q.get(timeout=120)
            local = pool.lease(count)
            if mode == "idle":
                assert cmd_q.get(timeout=120) == "try"
                try:
                    agent.read_offer(ticket, local).wait(60)
                    result_q.put(("moved", ""))
                except kvferry.Error as e:
                    result_q.put((type(e).__name__, str(e)))
                local.release()
                assert cmd_q.get(timeout=120) == "bye"
            else:
                agent.read_offer(ticket, local, layers=range(0, 1)).wait(60)
                in_flight = agent.read_offer(ticket, local, layers=range(1, 2))
                result_q.put("mid")
                cmd_q.get(timeout=600)  # the owner kills this process meanwhile
                in_flight.wait(60)
    except BaseException as e:  # reported to the test, which fails with it
        result_q.put(f"taker failed: {type(e).__name__}: {e}")
        raise
