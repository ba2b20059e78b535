"""Processes for the engine-contract tests (test_engine_contract.py,
test_hetero_tp.py, test_offer_contract.py); multiprocessing 'spawn'
imports this module by name in the child.

`serve` runs one agent holding a KV cache shaped like vLLM's per-layer HND
cache (separate K and V tensors per layer, registered as engine memory) and
answers commands from the test, so each test says what the peer does, step
by step, and checks what it reports."""

import queue
import time

import numpy as np
import torch

import kvferry
import kvpeers

DEADLINE = 120.0  # generous: the machine may be busy


def kv_tensors(seed, heads=kvpeers.HEADS, blocks=kvpeers.BLOCKS):
    """[k0, v0, k1, v1, ...] of [blocks, heads, block_size, head_dim] float16,
    random bytes unique to (seed, layer, plane)."""
    out = []
    for layer in range(kvpeers.LAYERS):
        for plane in range(2):
            t = torch.empty((blocks, heads, kvpeers.BLOCK_SIZE, kvpeers.HEAD_DIM),
                            dtype=torch.float16)
            rng = np.random.default_rng([seed, layer, plane, heads])
            t.numpy().view(np.uint8).reshape(-1)[:] = rng.integers(
                0, 256, size=t.numel() * 2, dtype=np.uint8)
            out.append(t)
    return out


def layout(heads=kvpeers.HEADS, blocks=kvpeers.BLOCKS):
    return kvferry.KvLayout(num_layers=kvpeers.LAYERS, num_blocks=blocks,
                            tokens_per_block=kvpeers.BLOCK_SIZE, num_kv_heads=heads,
                            head_dim=kvpeers.HEAD_DIM, element_bytes=2)


def blocks_bytes(tensors, ids):
    """uint8 copies of blocks `ids` of every tensor: [tensor][i] -> bytes of block ids[i]."""
    return [[t[b].numpy().view(np.uint8).copy() for b in ids] for t in tensors]


def serve(name, seed, heads, to_test, from_test):
    """An agent `name` whose pool "kv" holds kv_tensors(seed, heads). Puts
    ("ready", metadata) once listening, then runs commands (tuples) from
    `from_test` and puts ("ok", value) or ("error", class name, message)."""
    try:
        kv = kv_tensors(seed, heads)
        with kvferry.Agent(name, secret=kvpeers.SECRET) as agent:
            pool = agent.register_pool("kv", layout(heads), kv)
            agent.listen("127.0.0.1")
            to_test.put(("ready", agent.local_metadata()))
            offers = {}
            tickets = {}
            transfers = []
            while True:
                cmd, *args = from_test.get(timeout=600)
                if cmd == "bye":
                    break
                try:
                    value = None
                    if cmd == "connect":  # (metadata,)
                        value = agent.connect_from_metadata(args[0], timeout=DEADLINE).name
                    elif cmd == "wait_peer":  # (name,)
                        value = agent.wait_for_peer(args[0], timeout=DEADLINE).name
                    elif cmd == "notes":  # (count,): the next `count` notifications
                        notes = []
                        while len(notes) < args[0]:
                            notes += agent.wait_for_notifications(DEADLINE)
                        value = [(n.peer, n.payload) for n in notes]
                    elif cmd == "blocks":  # (ids,)
                        value = blocks_bytes(kv, args[0])
                    elif cmd == "fill":  # (ids, byte): every tensor's blocks set to `byte`
                        for t in kv:
                            t.numpy().view(np.uint8)[list(args[0])] = args[1]
                    elif cmd == "post":  # (op, peer, kwargs): by ids of "kv", waited for
                        t = agent.post_transfer(args[0], args[1], local_pool=pool, **args[2])
                        t.wait(DEADLINE)
                        value = (t.state, str(t.end_reason), t.telemetry.bytes)
                        del t
                    elif cmd == "post_nowait":  # (op, peer, kwargs)
                        transfers.append(
                            agent.post_transfer(args[0], args[1], local_pool=pool, **args[2]))
                    elif cmd == "wait_all":
                        for t in transfers:
                            t.wait(DEADLINE)
                        transfers.clear()
                    elif cmd == "take":  # (key, peer): the ticket an owner offered, kept
                        tickets[args[0]] = args[1]
                    elif cmd == "read_offer":  # (key, local ids, kwargs)
                        t = agent.read_offer(tickets[args[0]], local_pool=pool,
                                             local_blocks=args[1], **args[2])
                        t.wait(DEADLINE)
                        value = (t.state, str(t.end_reason))
                        del t
                    elif cmd == "release_offer":  # (key,)
                        agent.release_offer(tickets[args[0]])
                    elif cmd == "offer":  # (key, peer, ids, ttl) -> ticket
                        blocks = pool.lease_ids(args[2])
                        offers[args[0]] = agent.offer(blocks, args[1], ttl=args[3])
                        blocks.release()  # the offer holds its own reference
                        value = offers[args[0]].ticket
                    elif cmd == "offer_end":  # (key,) -> (state, reason)
                        o = offers.pop(args[0])
                        try:
                            o.wait(DEADLINE)
                        except kvferry.Error:
                            pass
                        value = (o.state, str(o.end_reason))
                    elif cmd == "counters":
                        s = agent.stats()
                        value = (pool.free_blocks, pool.busy_blocks, s["live"])
                    else:
                        raise ValueError(f"unknown command {cmd!r}")
                    to_test.put(("ok", value))
                except kvferry.Error as e:
                    to_test.put(("error", type(e).__name__, str(e)))
            transfers.clear()
    except BaseException as e:  # reported to the test, which fails with it
        to_test.put(("failed", f"{name}: {type(e).__name__}: {e}"))
        raise


class Peer:
    """The test's side of a `serve` process."""

    def __init__(self, ctx, name, seed, heads=kvpeers.HEADS):
        self.name = name
        self.to_test, self.from_test = ctx.Queue(), ctx.Queue()
        self.process = ctx.Process(target=serve,
                                   args=(name, seed, heads, self.to_test, self.from_test))
        self.process.start()
        reply = self.to_test.get(timeout=DEADLINE)
        assert reply[0] == "ready", reply
        self.metadata = reply[1]

    def ask(self, *cmd):
        """Runs a command; returns its value, raises AssertionError on an error."""
        self.from_test.put(cmd)
        reply = self.to_test.get(timeout=DEADLINE)
        assert reply[0] == "ok", reply
        return reply[1]

    def ask_error(self, *cmd):
        """Runs a command that must fail; returns (class name, message)."""
        self.from_test.put(cmd)
        reply = self.to_test.get(timeout=DEADLINE)
        assert reply[0] == "error", reply
        return reply[1], reply[2]

    def send(self, *cmd):
        """Sends a command without waiting for its answer."""
        self.from_test.put(cmd)

    def close(self):
        if self.process.is_alive():
            try:
                self.from_test.put(("bye",))
                # Replies the test did not read (it failed) must leave the
                # queue, or the child's exit waits for its feeder thread.
                deadline = time.monotonic() + DEADLINE
                while self.process.is_alive() and time.monotonic() < deadline:
                    try:
                        self.to_test.get(timeout=0.2)
                    except queue.Empty:
                        pass
                self.process.join(DEADLINE)
            finally:
                if self.process.is_alive():
                    self.process.kill()
                    self.process.join()


def connected_pair(peer_seed, local_seed):
    """A generator for a module fixture: yields (agent "decode" here with
    kv_tensors(local_seed) registered as pool "kv", that pool, the tensors,
    Peer "prefill" in a spawned process holding kv_tensors(peer_seed)),
    connected by the prefill's metadata; at the end, checks that no handle of
    the agent survived and stops the peer."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    peer = Peer(ctx, "prefill", seed=peer_seed)
    try:
        kv = kv_tensors(seed=local_seed)
        with kvferry.Agent("decode", secret=kvpeers.SECRET) as agent:
            pool = agent.register_pool("kv", layout(), kv)
            info = agent.connect_from_metadata(peer.metadata, timeout=DEADLINE)
            assert info.name == "prefill" and info.pools == ["kv"] and info.state == "connected"
            assert peer.ask("wait_peer", "decode") == "decode"
            yield agent, pool, kv, peer
        assert agent.survivors == []
    finally:
        peer.close()


def assert_pair_idle(pair):
    """Nothing of a connected_pair is in flight on either side."""
    agent, pool, _, peer = pair
    assert pool.busy_blocks == 0
    assert agent.stats()["live"]["transfer"] == 0
    assert peer.ask("counters")[1] == 0
