"""Serving the tiny model, monolithic or disaggregated through kvferry.

The pieces follow vLLM's V1 engine:
  - a Scheduler per instance (vLLM's EngineCore scheduler) with a paged block
    manager and prefix caching, living in the driver process;
  - a KV connector split like vLLM's KVConnectorBase_V1: the scheduler half
    (get_num_new_matched_tokens, update_state_after_alloc,
    build_connector_meta, update_connector_output, request_finished) runs
    beside the scheduler, the worker half (register_kv_caches,
    bind_connector_metadata, start_load_kv, wait_for_layer_load,
    save_kv_layer, wait_for_save, get_finished) in every worker rank;
  - worker processes (multiprocessing spawn), one per tensor-parallel rank,
    joined by torch.distributed (gloo, 127.0.0.1) for the all-reduces;
  - a Router (the disaggregation proxy) that sends a request to a prefill
    instance (which computes the prompt and the first token) and then to a
    decode instance, handing over the connector's transfer parameters.

Pull model: prefill lends each KV block it computed to the decode rank that
needs it with a kvferry offer (which fences the block until the offer ends)
and passes the tickets in its transfer parameters; decode posts one READ per
offer and layer (layer l+1 lands while layer l computes) and
wait_for_layer_load(l) waits for layer l. Blocks decode already holds
(prefix cache) are not read: decode releases (declines) their offers. Prefill
frees its blocks when every offer on them ended (vLLM's delayed free /
finished_sending).

Heterogeneous tensor parallelism: every rank registers its K/V tensors as
they are. Prefill rank i lends each block to every decode rank whose KV
heads overlap its own, one offer each; the decode rank takes only those
heads, as a head slice of each chunk (slice_bytes with the offsets of the
shared heads on both sides: HND keeps a block's heads side by side). TP1 ->
TP2: each decode rank pulls its half of every block; TP2 -> TP1: decode
pulls each half from the prefill rank that computed it."""

import collections
import multiprocessing
import os
import queue
import signal
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from tinymodel import Config, Model, NoHooks

SECRET = "kvferry-model-example"
NUM_BLOCKS = 64
DEADLINE = 120.0  # seconds any one wait may take on a busy machine


def block_hashes(tokens: list, bs: int) -> list:
    """Chained hashes of the full blocks of `tokens` (vLLM's prefix cache keys)."""
    out, h = [], None
    for i in range(len(tokens) // bs):
        h = hash((h, tuple(tokens[i * bs:(i + 1) * bs])))
        out.append(h)
    return out


class BlockManager:
    """The scheduler's view of an instance's KV blocks: reference counts, a
    free queue (least recently freed first), and a prefix cache of full
    blocks by hash. A cached block with no reference stays cached until it
    is allocated again."""

    def __init__(self, num_blocks: int, prefix_caching: bool):
        self.num_blocks = num_blocks
        self.prefix_caching = prefix_caching
        self.free = collections.deque(range(num_blocks))
        self.ref = [0] * num_blocks
        self.hash_of = {}
        self.cached = {}

    def lookup(self, hashes: list) -> list:
        if not self.prefix_caching:
            return []
        hit = []
        for h in hashes:
            b = self.cached.get(h)
            if b is None:
                break
            hit.append(b)
        return hit

    def take(self, b: int) -> None:
        if self.ref[b] == 0:
            self.free.remove(b)
        self.ref[b] += 1

    def allocate(self) -> int:
        if not self.free:
            raise RuntimeError("out of KV blocks")
        b = self.free.popleft()
        h = self.hash_of.pop(b, None)
        if h is not None:
            del self.cached[h]
        self.ref[b] = 1
        return b

    def release(self, b: int) -> None:
        self.ref[b] -= 1
        assert self.ref[b] >= 0
        if self.ref[b] == 0:
            self.free.append(b)

    def cache(self, b: int, h) -> None:
        if self.prefix_caching and h not in self.cached and b not in self.hash_of:
            self.cached[h] = b
            self.hash_of[b] = h


@dataclass
class Request:
    id: str
    prompt: list
    max_new: int
    kv_transfer_params: Optional[dict] = None
    tokens: list = field(default_factory=list)  # generated
    logits: list = field(default_factory=list)  # per generated token
    block_table: list = field(default_factory=list)
    num_computed: int = 0
    t: dict = field(default_factory=dict)  # timestamps (time.monotonic) and durations
    step_ends: list = field(default_factory=list)


# ---------------------------------------------------------------------------
# The connector, scheduler half.

class KVFerryConnectorScheduler:
    """Scheduler half of the kvferry KV connector (vLLM: KVConnectorBase_V1
    with role SCHEDULER)."""

    def __init__(self, role: str, block_size: int):
        self.role, self.bs = role, block_size
        self._send = {}  # prefill: req id -> what its workers lend (this step)
        self._load = {}  # decode: req id -> what its workers pull (this step)
        self._decline = []  # decode: (ranks, owner, ticket) of blocks held locally already
        self.tickets = collections.defaultdict(dict)  # prefill: req id -> {(j, ranks): (owner, ticket)}
        self._sending_ranks = collections.Counter()
        self._recving_ranks = collections.Counter()

    def get_num_new_matched_tokens(self, req: Request, num_computed: int):
        """Tokens the connector can load beyond the local prefix-cache hit,
        and whether they load asynchronously (False: layer by layer inside
        the forward pass)."""
        p = req.kv_transfer_params or {}
        if self.role == "decode" and p.get("do_remote_prefill"):
            return len(req.prompt) - num_computed, False
        return 0, False

    def update_state_after_alloc(self, req: Request, block_table: list, num_external: int):
        p = req.kv_transfer_params or {}
        if self.role == "decode" and p.get("do_remote_prefill"):
            # Blocks held locally already (all of them when num_external is 0)
            # are declined, the rest pulled.
            first = req.num_computed // self.bs
            nblocks = -(-len(req.prompt) // self.bs)
            loads, declined = [], []
            for j in range(nblocks):
                for ranks, (owner, ticket) in p["tickets"][j].items():
                    if j < first:
                        declined.append((ranks, owner, ticket))
                    else:
                        loads.append((block_table[j], ranks, owner, ticket))
            self._load[req.id] = loads
            self._decline.extend(declined)
        elif self.role == "prefill" and p.get("do_remote_decode"):
            self._send[req.id] = {"block_table": list(block_table),
                                  "decode_peers": p["decode_peers"]}

    def build_connector_meta(self) -> dict:
        meta = {"send": self._send, "load": self._load, "decline": self._decline}
        self._send, self._load, self._decline = {}, {}, []
        return meta

    def update_connector_output(self, outputs: list, tp: int):
        """Merges the ranks' connector outputs; returns the requests every
        rank finished sending and receiving."""
        sent, recvd = [], []
        for o in outputs:
            for rid, tickets in o["tickets"].items():
                self.tickets[rid].update(tickets)
            for rid in o["finished_sending"]:
                self._sending_ranks[rid] += 1
                if self._sending_ranks[rid] == tp:
                    del self._sending_ranks[rid]
                    sent.append(rid)
            for rid in o["finished_recving"]:
                self._recving_ranks[rid] += 1
                if self._recving_ranks[rid] == tp:
                    del self._recving_ranks[rid]
                    recvd.append(rid)
        return sent, recvd

    def request_finished(self, req: Request, block_table: list, engine: str):
        """(delay_free, kv_transfer_params): prefill keeps its blocks until
        decode has pulled them and hands decode the tickets."""
        p = req.kv_transfer_params or {}
        if self.role != "prefill" or not p.get("do_remote_decode"):
            return False, None
        by_block = collections.defaultdict(dict)
        for (j, u), v in self.tickets.pop(req.id).items():
            by_block[j][u] = v
        nblocks = -(-len(req.prompt) // self.bs)
        return True, {"do_remote_prefill": True, "remote_engine": engine,
                      "tickets": [by_block[j] for j in range(nblocks)],
                      "first_token": req.tokens[0], "first_logits": req.logits[0]}


# ---------------------------------------------------------------------------
# The connector, worker half (runs in every rank's process).

class KVFerryConnectorWorker:
    """Worker half of the kvferry KV connector (vLLM: KVConnectorBase_V1 with
    role WORKER)."""

    def __init__(self, agent, role: str, rank: int, tp: int, cfg: Config):
        self.agent, self.role, self.rank, self.tp, self.cfg = agent, role, rank, tp, cfg
        self.heads = cfg.n_kv_heads // tp  # KV heads this rank holds
        self.head_bytes = cfg.block_size * cfg.head_dim * 4  # one head of one block (float32)
        self.pool = None
        self.meta = {}
        self.offers = {}  # (req, j, (prefill rank, decode rank)) -> (Offer, block)
        self.leases = {}  # block -> [BlockSet, open offers on it]
        self.pending = {}  # (req, layer) -> [Transfer]
        self.load_stats = {}  # req -> {"posted", "landed", "wait_s"} this step
        self.current = None  # the request the forward pass computes
        self.loading = {}  # req -> [Transfer]
        self.pause_mid_load = None  # fault injection: a queue to report "mid" on
        self.hold_mid_load = None  # fault injection: called once layer 0 of a load landed
        self.failed = {}  # req -> why its pull failed (this step)
        self.load_tickets = {}  # req -> the (owner, ticket) pairs it pulls
        self.load_errors = []  # why each failed pull failed (EndReason names)
        self.counts = collections.Counter()
        self.ended = set()
        self.perturb_pulled = False
        self.pulled_blocks = {}

    def register_kv_caches(self, kv_caches: list):
        """kv_caches: per layer (K, V) tensors [num_blocks, kv_heads, block_size, head_dim]."""
        import kvferry
        nb, heads, bs, hd = kv_caches[0][0].shape
        layout = kvferry.KvLayout(num_layers=len(kv_caches), num_blocks=nb, tokens_per_block=bs,
                                  num_kv_heads=heads, head_dim=hd,
                                  element_bytes=kv_caches[0][0].element_size())
        self.pool = self.agent.register_pool("kv", layout, [t for kv in kv_caches for t in kv])
        self.kv_caches = kv_caches

    def bind_connector_metadata(self, meta: dict):
        self.meta = meta

    def _overlap(self, prefill_rank: int, prefill_tp: int, decode_rank: int, decode_tp: int):
        """The KV heads [lo, hi) both ranks hold, or None."""
        h = self.cfg.n_kv_heads
        hp, hd = h // prefill_tp, h // decode_tp
        lo = max(prefill_rank * hp, decode_rank * hd)
        hi = min((prefill_rank + 1) * hp, (decode_rank + 1) * hd)
        return (lo, hi) if lo < hi else None

    def start_load_kv(self):
        """Posts the READs of every offer this rank pulls, layer by layer
        (all requests' layer 0 first, then layer 1, ...)."""
        self.pending, self.load_stats, self.failed = {}, {}, {}
        for (i, d, _), owner, ticket in self.meta.get("decline", []):
            if d == self.rank:  # our prefix cache has it: prefill gets the block back now
                self.agent.release_offer(ticket)
                self.counts["offers_declined"] += 1
        loads = self.meta.get("load", {})
        if not loads:
            return
        import kvferry
        posted = time.monotonic()
        per_req = {}
        for rid, items in loads.items():
            mine = []
            for block, (i, d, prefill_tp), owner, ticket in items:
                if d != self.rank:
                    continue
                # The heads both hold, as a slice of each side's chunk (a
                # block's K or V of one layer: [heads, block_size, head_dim]).
                lo, hi = self._overlap(i, prefill_tp, d, self.tp)
                sl = {} if prefill_tp == self.tp else {
                    "slice_bytes": (hi - lo) * self.head_bytes,
                    "remote_slice_offset": (lo - i * self.cfg.n_kv_heads // prefill_tp) * self.head_bytes,
                    "local_slice_offset": (lo - d * self.heads) * self.head_bytes}
                self.counts["blocks_pulled"] += 1
                mine.append((block, owner, ticket, sl))
                self.load_tickets.setdefault(rid, []).append((owner, ticket))
                self.pulled_blocks.setdefault(rid, []).append(block)
            per_req[rid] = mine
            self.load_stats[rid] = {"posted": posted, "landed": None, "wait_s": 0.0, "post_s": 0.0}
        for layer in range(self.cfg.n_layers):
            for rid, mine in per_req.items():
                for block, owner, ticket, sl in mine:
                    if rid in self.failed:
                        break
                    t1 = time.monotonic()
                    # Into engine-owned block ids (no lease): the scheduler
                    # gives the block to no one else before the READs end.
                    try:
                        t = self.agent.post_transfer("read", owner, local_pool=self.pool,
                                                     local_blocks=[block], ticket=ticket,
                                                     layers=range(layer, layer + 1), **sl)
                    except kvferry.Error as e:  # the lender is gone, or refused the ticket
                        self._pull_failed(rid, e)
                        break
                    self.load_stats[rid]["post_s"] += time.monotonic() - t1
                    self.pending.setdefault((rid, layer), []).append(t)
                    self.loading.setdefault(rid, []).append(t)
            if self.pause_mid_load is not None and layer == 0:
                for rid in per_req:
                    for t in self.pending.get((rid, 0), []):
                        t.wait(DEADLINE)
                self.pause_mid_load.put(("mid", self.rank))
                time.sleep(600)  # the test kills this process here
            if self.hold_mid_load is not None and layer == 0:
                # Layer 0 of every load landed, no later layer is posted yet:
                # the gate returns once the test killed a prefill worker.
                for rid in per_req:
                    for t in self.pending.get((rid, 0), []):
                        t.wait(DEADLINE)
                gate, self.hold_mid_load = self.hold_mid_load, None
                gate()

    def wait_for_layer_load(self, layer: int):
        """Blocks until layer `layer` of the request being computed landed."""
        import kvferry
        ts = self.pending.pop((self.current, layer), None)
        if not ts or self.current in self.failed:
            return
        t0 = time.monotonic()
        for t in ts:
            try:
                t.wait(DEADLINE)
            except kvferry.Error as e:
                self._pull_failed(self.current, e)
        if self.current in self.failed:
            # The forward pass goes on over what the blocks hold (every rank
            # runs the same collectives); the scheduler discards its output.
            return
        now = time.monotonic()
        tel = [t.telemetry for t in ts]
        if self.perturb_pulled:  # test-only: the checks must see a wrong KV byte
            for block in self.pulled_blocks.get(self.current, []):
                self.kv_caches[layer][0][block].view(-1)[0] += 1e-3
        st = self.load_stats[self.current]
        st["wait_s"] += now - t0
        st["landed"] = max(x.ended for x in tel)  # time.time() clock
        st["first_post"] = min([x.posted for x in tel] + ([st["first_post"]] if st.get("first_post") else []))
        st["bytes"] = st.get("bytes", 0) + sum(x.bytes for x in tel)
        st["path"] = tel[0].data_path

    def _pull_failed(self, rid, err):
        """Records that a pull failed because its peer, offer or transfer
        ended (the error's end_reason); any other error (bad input the call
        refused, a wait that timed out) is raised."""
        import kvferry
        if err.end_reason == kvferry.EndReason.NONE:
            raise err
        if rid not in self.failed:
            self.failed[rid] = str(err.end_reason)
            self.counts["pulls_failed"] += 1
            self.load_errors.append(str(err.end_reason))

    def _discard_pull(self, rid):
        """A pull that failed: every READ of it ends (cancelled if still in
        flight, so nothing writes into its blocks once the scheduler frees
        them) and the offers it still holds are released, so lenders that
        are alive get their blocks back now."""
        import kvferry
        for t in self.loading.pop(rid, []):
            if not t.done:
                t.cancel()
        for owner, ticket in self.load_tickets.pop(rid, []):
            try:
                self.agent.release_offer(ticket)
            except kvferry.FailedPreconditionError:
                pass  # the lender is not connected: its offer ended with the connection
        self.pulled_blocks.pop(rid, None)
        self.pending = {k: v for k, v in self.pending.items() if k[0] != rid}
        self.load_stats.pop(rid, None)

    def save_kv_layer(self, layer: int):
        pass  # pull: decode reads; nothing to push per layer

    def wait_for_save(self):
        """Prefill: the step's KV is in place; lend each block to every
        decode rank that holds some of this rank's heads (one offer each;
        each decode rank takes its head slice)."""
        self.new_tickets = collections.defaultdict(dict)
        self.lend_s = {}
        for rid, s in self.meta.get("send", {}).items():
            t0 = time.monotonic()
            peers = s["decode_peers"]
            takers = [d for d in range(len(peers)) if self._overlap(self.rank, self.tp, d, len(peers))]
            for j, block in enumerate(s["block_table"]):
                for d in takers:
                    lease = self.leases.get(block)
                    if lease is None:  # one lease per block, shared by its offers
                        lease = self.leases[block] = [self.pool.lease_ids([block]), 0]
                    offer = self.agent.offer(lease[0], peers[d], ttl=DEADLINE)
                    lease[1] += 1
                    self.offers[(rid, j, (self.rank, d))] = (offer, block)
                    self.new_tickets[rid][(j, (self.rank, d, self.tp))] = (self.agent.name, offer.ticket)
            self.lend_s[rid] = time.monotonic() - t0

    def get_finished(self):
        """(tickets made this step, requests whose offers all ended,
        requests whose READs all landed)."""
        ended = collections.Counter()
        total = collections.Counter()
        for key, (offer, pb) in list(self.offers.items()):
            total[key[0]] += 1
            if offer.state != "open":
                ended[key[0]] += 1
                if key not in self.ended:
                    self.ended.add(key)
                    self.counts["offers_" + offer.state] += 1
        sent = []
        for rid in total:
            if ended[rid] == total[rid]:
                sent.append(rid)
                for key in [k for k in self.offers if k[0] == rid]:
                    _, pb = self.offers.pop(key)
                    self.ended.discard(key)
                    lease = self.leases[pb]
                    lease[1] -= 1
                    if lease[1] == 0:
                        lease[0].release()
                        del self.leases[pb]
        failed = sorted(self.failed)
        for rid in failed:
            self._discard_pull(rid)
        recvd = []
        for rid, ts in list(self.loading.items()):
            if all(t.done for t in ts):
                for t in ts:
                    t.wait(0)  # raises a failed READ's error
                recvd.append(rid)
                del self.loading[rid]
                self.load_tickets.pop(rid, None)
                self.pulled_blocks.pop(rid, None)
        tickets = getattr(self, "new_tickets", {})
        self.new_tickets = {}
        return dict(tickets), sent, recvd, failed


class _Hooks(NoHooks):
    def __init__(self, conn):
        self.conn = conn

    def wait_for_layer_load(self, layer):
        self.conn.wait_for_layer_load(layer)

    def save_kv_layer(self, layer):
        self.conn.save_kv_layer(layer)


# ---------------------------------------------------------------------------
# Worker processes.

def worker_main(spec: dict, cmd_q, res_q):
    """One tensor-parallel rank of an instance (role 'mono', 'prefill' or 'decode')."""
    try:
        torch.set_num_threads(1)
        torch.use_deterministic_algorithms(True)
        rank, tp = spec["rank"], spec["tp"]
        group = None
        if tp > 1:
            import torch.distributed as dist
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{spec['dist_port']}",
                                    rank=rank, world_size=tp, timeout=__import__("datetime").timedelta(seconds=DEADLINE))
            group = dist.group.WORLD
        cfg = Config()
        model = Model(cfg, rank, tp, group)
        kv = model.kv_cache(spec["num_blocks"])
        agent = conn = None
        port = None
        if spec["role"] != "mono":
            import kvferry
            agent = kvferry.Agent(spec["agent"], secret=SECRET)
            conn = KVFerryConnectorWorker(agent, spec["role"], rank, tp, cfg)
            conn.register_kv_caches(kv)
            if spec.get("pause_mid_load"):
                conn.pause_mid_load = res_q
            if spec.get("hold_mid_load"):
                def gate():
                    res_q.put(("mid", rank))
                    go = cmd_q.get(timeout=DEADLINE)
                    assert go == ("go",), go
                conn.hold_mid_load = gate
            conn.perturb_pulled = spec.get("perturb_pulled", False)
            port = agent.listen("127.0.0.1")
        hooks = _Hooks(conn) if conn else NoHooks()
        res_q.put(("ready", rank, port))
        while True:
            cmd = cmd_q.get()
            if cmd[0] == "connect":
                for host, p in cmd[1]:
                    agent.connect(host, p, timeout=DEADLINE)
                res_q.put(("connected", rank))
            elif cmd[0] == "step":
                runs, meta = cmd[1], cmd[2]
                out = {"rank": rank, "logits": {}, "tickets": {}, "finished_sending": [],
                       "finished_recving": [], "failed_recving": [], "loads": {}}
                if conn:
                    conn.bind_connector_metadata(meta)
                    conn.start_load_kv()
                t0 = time.monotonic()
                out["run_times"] = {}
                for r in runs:
                    t1 = time.monotonic()
                    if conn:
                        conn.current = r["id"]
                    logits = model.forward(r["tokens"], r["start"], r["block_table"], kv, hooks)
                    out["run_times"][r["id"]] = (t1, time.monotonic())
                    if rank == 0:
                        out["logits"][r["id"]] = logits
                out["compute_s"] = time.monotonic() - t0
                if conn:
                    conn.wait_for_save()
                    (out["tickets"], out["finished_sending"], out["finished_recving"],
                     out["failed_recving"]) = conn.get_finished()
                    out["lend_s"] = conn.lend_s
                    out["loads"] = {rid: {"kv_transfer_s": st["landed"] - st["first_post"],
                                          "kv_wait_s": st["wait_s"], "kv_post_s": st["post_s"],
                                          "kv_bytes": st["bytes"], "data_path": st["path"]}
                                    for rid, st in conn.load_stats.items() if st["landed"]}
                res_q.put(("step", rank, out))
            elif cmd[0] == "stop":
                report = {"rank": rank}
                if agent is not None:
                    report["free_blocks"] = conn.pool.free_blocks
                    report["total_blocks"] = conn.pool.layout.num_blocks
                    report["handles"] = [str(o) for o in agent.ledger_objects()
                                         if o.kind in ("block_set", "offer", "transfer_handle")]
                    report["offers_open"] = len(conn.offers)
                    report["counts"] = dict(conn.counts)
                    report["load_errors"] = list(conn.load_errors)
                    import gc
                    gc.collect()
                    live = agent.stats()["live"]
                    report["live"] = {k: live[k] for k in ("block_set", "offer", "transfer",
                                                           "transfer_handle", "request")}
                    del conn, hooks
                    agent.close()
                    report["survivors"] = [str(s) for s in agent.survivors]
                res_q.put(("stopped", rank, report))
                break
    except BaseException as e:
        import traceback
        res_q.put(("error", spec.get("rank"), f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
        raise


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Instance:
    """An engine instance: its scheduler (here, in the driver) and its
    worker processes, one per TP rank."""

    def __init__(self, ctx, name: str, role: str, tp: int = 1,
                 prefix_caching: bool = True, num_blocks: int = NUM_BLOCKS, pause_mid_load=False,
                 perturb_pulled=False, hold_mid_load=False):
        self.name, self.role, self.tp = name, role, tp
        cfg = Config()
        self.bs = cfg.block_size
        self.blocks = BlockManager(num_blocks, prefix_caching)
        self.connector = KVFerryConnectorScheduler(role, self.bs)
        self.waiting = collections.deque()
        self.running = []
        self.held = {}  # prefill: req id -> blocks kept until finished_sending
        self.pull_failed = []  # decode: requests whose pull failed (blocks freed)
        self.on_mid = None  # fault injection: what to do when a rank reports "mid"
        self.res_q = ctx.Queue()
        self.cmd_qs = [ctx.Queue() for _ in range(tp)]
        port = _free_port()
        self.agent_names = [f"{name}-r{r}" for r in range(tp)]
        self.procs = []
        for r in range(tp):
            spec = {"role": role, "rank": r, "tp": tp, "dist_port": port,
                    "num_blocks": num_blocks, "agent": self.agent_names[r],
                    "pause_mid_load": pause_mid_load, "perturb_pulled": perturb_pulled,
                    "hold_mid_load": hold_mid_load}
            p = ctx.Process(target=worker_main, args=(spec, self.cmd_qs[r], self.res_q), daemon=True)
            p.start()
            self.procs.append(p)
        self.ports = [None] * tp

    def wait_ready(self):
        for _ in range(self.tp):
            m = self._get()
            assert m[0] == "ready", m
            self.ports[m[1]] = m[2]

    def _get(self, timeout=DEADLINE):
        deadline = time.monotonic() + timeout
        while True:
            try:
                m = self.res_q.get(timeout=0.5)
            except queue.Empty:
                dead = [p for p in self.procs if not p.is_alive()]
                if dead:
                    raise WorkerDied(self, dead[0].exitcode)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.name}: no answer from its workers")
                continue
            if m[0] == "error":
                raise RuntimeError(f"{self.name} rank {m[1]}: {m[2]}")
            return m

    def connect(self, peers: list):
        for q in self.cmd_qs:
            q.put(("connect", peers))
        for _ in range(self.tp):
            assert self._get()[0] == "connected"

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running or self.held)

    # The scheduler ------------------------------------------------------
    def add(self, req: Request):
        self.waiting.append(req)

    def schedule(self) -> list:
        runs = []
        now = time.monotonic()
        while self.waiting:
            req = self.waiting.popleft()
            req.t.setdefault(f"{self.role}_sched", now)
            T = len(req.prompt)
            hashes = block_hashes(req.prompt, self.bs)
            remote = (req.kv_transfer_params or {}).get("do_remote_prefill")
            cap = T // self.bs if remote else (T - 1) // self.bs  # compute >= 1 token locally
            hit = self.blocks.lookup(hashes)[:cap]
            for b in hit:
                self.blocks.take(b)
            req.num_computed = len(hit) * self.bs
            req.t["local_hit_blocks"] = len(hit)
            ext, _ = self.connector.get_num_new_matched_tokens(req, req.num_computed)
            total = T + (1 if remote else 0)
            table = list(hit) + [self.blocks.allocate() for _ in range(-(-total // self.bs) - len(hit))]
            req.block_table = table
            self.connector.update_state_after_alloc(req, table, ext)
            if remote:
                p = req.kv_transfer_params
                req.tokens, req.logits = [p["first_token"]], [p["first_logits"]]
                runs.append({"id": req.id, "tokens": [req.tokens[-1]], "start": T, "block_table": table})
            else:
                runs.append({"id": req.id, "tokens": req.prompt[req.num_computed:],
                             "start": req.num_computed, "block_table": table})
            req._hashes = hashes
            self.running.append(req)
        for req in self.running:
            if any(r["id"] == req.id for r in runs):
                continue
            pos = len(req.prompt) + len(req.tokens) - 1
            if pos // self.bs >= len(req.block_table):
                req.block_table.append(self.blocks.allocate())
            runs.append({"id": req.id, "tokens": [req.tokens[-1]], "start": pos,
                         "block_table": list(req.block_table)})
        return runs

    def step(self):
        """One engine step on every rank; returns the requests it finished."""
        runs = self.schedule()
        meta = self.connector.build_connector_meta()
        for q in self.cmd_qs:
            q.put(("step", runs, meta))
        outs = []
        while len(outs) < self.tp:
            m = self._get()
            if m[0] == "mid":  # fault injection: the rank is mid-transfer
                if self.on_mid is not None:
                    self.on_mid(self, m[1])
                else:  # crash it
                    os.kill(self.procs[m[1]].pid, signal.SIGKILL)
                    self.killed_mid = True
                continue
            outs.append(m[2])
        now = time.monotonic()
        outs.sort(key=lambda o: o["rank"])
        sent, recvd = self.connector.update_connector_output(outs, self.tp)
        for rid in sent:
            for b in self.held.pop(rid):
                self.blocks.release(b)
        finished = []
        logits = outs[0]["logits"]
        failed = {rid for o in outs for rid in o["failed_recving"]}
        for req in list(self.running):
            if req.id in failed:
                # Decode's verdict: the pull failed on some rank. What the
                # blocks hold is partial, so they go back uncached.
                self.running.remove(req)
                for b in req.block_table:
                    self.blocks.release(b)
                self.pull_failed.append(req)
                continue
            if req.id not in logits:
                continue
            if "first_step_end" not in req.t and self.role == "decode":
                req.t["first_step_end"] = now
                load = outs[0]["loads"].get(req.id, {})
                req.t["load_s"] = load.get("kv_transfer_s", 0.0)
                req.t["load_wait_s"] = load.get("kv_wait_s", 0.0)
                req.t["post_s"] = load.get("kv_post_s", 0.0)
                req.t["kv_bytes"] = sum(o["loads"].get(req.id, {}).get("kv_bytes", 0) for o in outs)
                req.t["data_path"] = load.get("data_path", "")
            if self.role == "prefill":
                req.t["prefill_start"], req.t["prefill_end"] = outs[0]["run_times"][req.id]
                req.t["lend_s"] = max(o["lend_s"].get(req.id, 0.0) for o in outs)
            lg = logits[req.id]
            for j, h in enumerate(req._hashes):  # the prompt's full blocks are now computed
                self.blocks.cache(req.block_table[j], h)
            req.tokens.append(int(lg.argmax()))
            req.logits.append(lg)
            req.step_ends.append(now)
            if self.role == "prefill" or len(req.tokens) >= req.max_new:
                self.running.remove(req)
                delay, params = self.connector.request_finished(req, req.block_table, self.name)
                if delay:
                    self.held[req.id] = req.block_table
                    req.kv_transfer_params = params
                else:
                    for b in req.block_table:
                        self.blocks.release(b)
                req.t[f"{self.role}_done"] = now
                finished.append(req)
        return finished

    def stop(self) -> list:
        reports = []
        for q, p in zip(self.cmd_qs, self.procs):
            if p.is_alive():
                q.put(("stop",))
        for p in self.procs:
            if p.is_alive():
                try:
                    m = self._get()
                    reports.append(m[2])
                except WorkerDied:
                    pass
        for p in self.procs:
            p.join(DEADLINE)
        return sorted(reports, key=lambda r: r["rank"])

    def kill(self):
        for p in self.procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
        for p in self.procs:
            p.join(DEADLINE)


class WorkerDied(Exception):
    def __init__(self, instance, exitcode):
        super().__init__(f"a worker of {instance.name} died (exit code {exitcode})")
        self.instance = instance


def context():
    return multiprocessing.get_context("spawn")


def run_monolithic(prompts: list, max_new: int, tp: int = 1, prefix_caching: bool = True):
    """The reference: one instance computes prompts and decodes, requests
    served one after the other. Returns {req id: Request}."""
    inst = Instance(context(), "mono", "mono", tp=tp, prefix_caching=prefix_caching)
    try:
        inst.wait_ready()
        done = {}
        for i, p in enumerate(prompts):
            req = Request(f"req{i}", list(p), max_new)
            req.t["arrival"] = time.monotonic()
            inst.add(req)
            while inst.busy:
                for r in inst.step():
                    done[r.id] = r
        return done
    finally:
        inst.stop()


class Router:
    """The disaggregation proxy: prefill instance first (max one token), then
    a decode instance with prefill's transfer parameters.

    Failures: a decode instance whose worker died is retired and its
    requests start over (prefill again). A prefill instance whose worker
    died is retired; the requests it had not finished go to the next
    prefill instance, and those it had handed to decode are decode's call:
    a pull that completed stands, a pull that failed (decode reports it and
    frees the blocks) sends the request to prefill again."""

    def __init__(self, prefill_tp=1, decode_tp=1, prefix_caching=True, spare_decode=False,
                 pause_mid_load=False, perturb_pulled=False, spare_prefill=False,
                 kill_prefill_mid_load=None):
        """kill_prefill_mid_load: a rank of the first prefill instance, which
        is SIGKILLed once decode's first pull has layer 0 landed and no later
        layer posted (fault injection; needs spare_prefill)."""
        ctx = context()
        self.prefills = [Instance(ctx, "prefill", "prefill", tp=prefill_tp,
                                  prefix_caching=prefix_caching)]
        if spare_prefill:
            self.prefills.append(Instance(ctx, "prefill1", "prefill", tp=prefill_tp,
                                          prefix_caching=prefix_caching))
        self.decodes = [Instance(ctx, "decode0", "decode", tp=decode_tp,
                                 prefix_caching=prefix_caching, pause_mid_load=pause_mid_load,
                                 perturb_pulled=perturb_pulled,
                                 hold_mid_load=kill_prefill_mid_load is not None)]
        if spare_decode:
            self.decodes.append(Instance(ctx, "decode1", "decode", tp=decode_tp,
                                         prefix_caching=prefix_caching))
        for inst in self.prefills + self.decodes:
            inst.wait_ready()
        for d in self.decodes:
            d.connect([("127.0.0.1", p) for inst in self.prefills for p in inst.ports])
        self.prefill = self.prefills[0]
        self.decode = self.decodes[0]
        self.failovers = []  # decode instances retired: (time, ids of their requests)
        self.prefill_failovers = []  # prefill instances retired: (name, ids it had not finished)
        self.retried = []  # (why, request id of the failed attempt)
        self.killed = []  # fault injection: (instance, rank, exit code)
        self._attempts = collections.Counter()
        if kill_prefill_mid_load is not None:
            self.decode.on_mid = lambda inst, rank: self._kill_prefill(
                inst, rank, kill_prefill_mid_load)

    def _kill_prefill(self, decode, decode_rank, prefill_rank):
        """The gate of the prefill fault: decode rank `decode_rank` has layer 0
        of its pull landed and waits; the prefill rank dies (SIGKILL, reaped
        here), then the decode rank goes on."""
        victim = self.prefills[0]
        if not self.killed:
            p = victim.procs[prefill_rank]
            os.kill(p.pid, signal.SIGKILL)
            p.join(DEADLINE)
            self.killed.append((victim.name, prefill_rank, p.exitcode))
        decode.cmd_qs[decode_rank].put(("go",))

    def serve(self, prompts: list, max_new: int, sequential=True) -> dict:
        done = {}
        reqs = [Request(f"req{i}", list(p), max_new) for i, p in enumerate(prompts)]
        pending = collections.deque(reqs)
        if not sequential:  # all arrive now
            for req in reqs:
                req.t["arrival"] = time.monotonic()
                self._to_prefill(req)
            pending.clear()
        while pending or self.prefill.busy or self.decode.busy:
            if pending and not (self.prefill.waiting or self.prefill.running or self.decode.busy):
                req = pending.popleft()
                req.t["arrival"] = time.monotonic()
                self._to_prefill(req)
            if self.prefill.busy:
                try:
                    for r in self.prefill.step():
                        dreq = Request(r.id, r.prompt, max_new, kv_transfer_params=r.kv_transfer_params)
                        dreq.t = dict(r.t)
                        self.decode.add(dreq)
                except WorkerDied as e:
                    self._prefill_died(e.instance)
            if self.decode.busy:
                try:
                    for r in self.decode.step():
                        done[r.id.split("~")[0]] = r
                except WorkerDied as e:
                    self._fail_over(e.instance)
                while self.decode.pull_failed:
                    self._retry(self.decode.pull_failed.pop(0), "pull failed")
        return done

    def _live_prefill(self) -> "Instance":
        """The prefill instance to use, after retiring any whose worker died."""
        for inst in list(self.prefills):
            if not all(p.is_alive() for p in inst.procs):
                self._prefill_died(inst)
        return self.prefill

    def _to_prefill(self, req):
        req.kv_transfer_params = {"do_remote_decode": True, "decode_peers": self.decode.agent_names}
        self._live_prefill().add(req)

    def _retry(self, r, why):
        """Request `r` starts over at prefill, under a new engine request id
        (the failed attempt's offers may still be open)."""
        base = r.id.split("~")[0]
        self._attempts[base] += 1
        self.retried.append((why, r.id))
        req = Request(f"{base}~{self._attempts[base]}", r.prompt, r.max_new)
        req.t = {"arrival": r.t["arrival"]}
        self._to_prefill(req)

    def _prefill_died(self, dead):
        """A prefill worker died: its instance goes. Requests it had not
        finished start over on the next prefill instance; those it finished
        are decode's (see the class comment)."""
        if dead not in self.prefills:
            return
        lost = list(dead.waiting) + list(dead.running)
        dead.kill()
        self.prefills.remove(dead)
        if not self.prefills:
            raise RuntimeError("no prefill instance left")
        self.prefill = self.prefills[0]
        self.prefill_failovers.append((dead.name, [r.id for r in lost]))
        for r in lost:
            self._retry(r, "prefill died")

    def _fail_over(self, dead):
        """A decode worker died: its instance goes, its requests start over
        on the next decode instance (prefill recomputes them)."""
        lost = list(dead.waiting) + list(dead.running)
        dead.kill()
        self.decodes.remove(dead)
        if not self.decodes:
            raise RuntimeError("no decode instance left")
        self.decode = self.decodes[0]
        self.failovers.append((time.monotonic(), [r.id for r in lost]))
        for r in lost:
            self._retry(r, "decode died")

    def stop(self) -> dict:
        out = {}
        for p in self.prefills:
            out[p.name] = p.stop()
        for d in self.decodes:
            out[d.name] = d.stop()
        return out


def timing(req: Request) -> dict:
    """TTFT split for a disaggregated request (seconds). TTFT runs from
    arrival to the end of decode's first step (when decode has the KV and
    emits the first token with the second) = queue (arrival to the start of
    the prompt's forward pass on prefill) + prefill (that pass) + handoff
    (its end to decode scheduling the request: the rest of prefill's step,
    lending the blocks, the router) + decode_start (decode's first step,
    with the layer-by-layer pull). Inside those: kv_lend (prefill's offer
    calls), kv_post (decode's read_offer calls), kv_wait (decode's forward
    pass blocked in wait_for_layer_load); kv_transfer is first READ posted
    to last layer landed, from kvferry's transfer telemetry (it overlaps
    decode's compute). kvferry_share = (kv_lend + kv_post + kv_wait) / TTFT:
    the part of TTFT spent in kvferry calls on the request's path."""
    t = req.t
    ttft = t["first_step_end"] - t["arrival"]
    queue_s = t["prefill_start"] - t["arrival"]
    prefill_s = t["prefill_end"] - t["prefill_start"]
    handoff_s = t["decode_sched"] - t["prefill_end"]
    transfer_s = t["load_s"] or 0.0
    decode_start_s = t["first_step_end"] - t["decode_sched"]
    itl = [b - a for a, b in zip(req.step_ends, req.step_ends[1:])]
    return {"ttft": ttft, "queue": queue_s, "prefill": prefill_s, "handoff": handoff_s,
            "decode_start": decode_start_s, "kv_transfer": transfer_s,
            "kv_wait": t["load_wait_s"], "kv_lend": t["lend_s"], "kv_post": t["post_s"],
            "kvferry_share": (t["lend_s"] + t["post_s"] + t["load_wait_s"]) / ttft,
            "itl_mean": sum(itl) / len(itl) if itl else 0.0,
            "kv_bytes": t.get("kv_bytes", 0), "data_path": t.get("data_path", "")}


def _stats(xs: list) -> dict:
    """mean, median, p99 (linear interpolation between order statistics),
    min and max of `xs`, in milliseconds (xs in seconds)."""
    v = sorted(1e3 * x for x in xs)
    if not v:
        return {"mean": 0.0, "median": 0.0, "p99": 0.0, "min": 0.0, "max": 0.0}

    def pct(q):
        k = (len(v) - 1) * q / 100
        lo = int(k)
        hi = min(lo + 1, len(v) - 1)
        return v[lo] + (v[hi] - v[lo]) * (k - lo)
    return {"mean": sum(v) / len(v), "median": pct(50), "p99": pct(99), "min": v[0], "max": v[-1]}


TTFT_PARTS = ("queue", "prefill", "handoff", "decode_start")


def summary(done: dict) -> dict:
    """The figures of one serve() run over its completed requests, as a
    `vllm bench serve` user reads them, plus where TTFT went.

    duration_s runs from the first arrival to the last token. TTFT as in
    timing(); decode's first step emits two tokens (prefill's and its own),
    so TPOT is (E2E latency - TTFT) / (output tokens - 2) per request, the
    mean of its ITLs; ITL pools the gaps between decode steps of every
    request. ttft_split_ms holds the mean of each TTFT part and
    ttft_split_pct its share of the mean TTFT (the parts add up to TTFT, so
    the shares to 100). kvferry_share_pct is the time in kvferry calls on
    the requests' paths (lend + post + wait) over their TTFT, summed over
    requests; kv_transfer_ms overlaps compute and is not a part of TTFT."""
    reqs = list(done.values())
    per = [timing(r) for r in reqs]
    start = min(r.t["arrival"] for r in reqs)
    end = max(r.step_ends[-1] for r in reqs)
    duration = end - start
    e2el = [r.step_ends[-1] - r.t["arrival"] for r in reqs]
    tpot = [(e - t["ttft"]) / (len(r.tokens) - 2)
            for r, t, e in zip(reqs, per, e2el) if len(r.tokens) > 2]
    itl = [b - a for r in reqs for a, b in zip(r.step_ends, r.step_ends[1:])]
    n_in = sum(len(r.prompt) for r in reqs)
    n_out = sum(len(r.tokens) for r in reqs)
    ttft_sum = sum(t["ttft"] for t in per)
    split = {k: 1e3 * sum(t[k] for t in per) / len(per) for k in TTFT_PARTS}
    kvferry = [t["kv_lend"] + t["kv_post"] + t["kv_wait"] for t in per]
    return {"completed": len(reqs), "duration_s": duration,
            "input_tokens": n_in, "output_tokens": n_out,
            "request_throughput": len(reqs) / duration,
            "output_throughput": n_out / duration,
            "total_token_throughput": (n_in + n_out) / duration,
            "ttft_ms": _stats([t["ttft"] for t in per]), "tpot_ms": _stats(tpot),
            "itl_ms": _stats(itl), "e2el_ms": _stats(e2el),
            "ttft_split_ms": split,
            "ttft_split_pct": {k: 100 * sum(t[k] for t in per) / ttft_sum for k in TTFT_PARTS},
            "kv_transfer_ms": 1e3 * sum(t["kv_transfer"] for t in per) / len(per),
            "kvferry_ms": 1e3 * sum(kvferry) / len(per),
            "kvferry_share_pct": 100 * sum(kvferry) / ttft_sum}


SUMMARY_LINES = [  # (label, key, subkey, format)
    ("Successful requests", "completed", None, "{:d}"),
    ("Benchmark duration (s)", "duration_s", None, "{:.3f}"),
    ("Total input tokens", "input_tokens", None, "{:d}"),
    ("Total generated tokens", "output_tokens", None, "{:d}"),
    ("Request throughput (req/s)", "request_throughput", None, "{:.2f}"),
    ("Output token throughput (tok/s)", "output_throughput", None, "{:.2f}"),
    ("Total token throughput (tok/s)", "total_token_throughput", None, "{:.2f}"),
] + [(f"{stat.capitalize()} {name} (ms)", key, stat, "{:.2f}")
     for name, key in (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("ITL", "itl_ms"),
                       ("E2EL", "e2el_ms"))
     for stat in ("mean", "median", "p99")] + [
    (f"TTFT {part.replace('_', ' ')} (ms, % of TTFT)", "ttft_split", part, None)
    for part in TTFT_PARTS] + [
    ("KV transfer, overlaps compute (ms)", "kv_transfer_ms", None, "{:.2f}"),
    ("kvferry calls in TTFT (ms, % of TTFT)", "kvferry", None, None),
]


def format_summary(s: dict) -> str:
    """summary() as one `label: value` line per figure (means for the
    TTFT split and kvferry's part, with their share of TTFT)."""
    out = []
    for label, key, sub, fmt in SUMMARY_LINES:
        if key == "ttft_split":
            value = f"{s['ttft_split_ms'][sub]:.2f} ({s['ttft_split_pct'][sub]:.1f}%)"
        elif key == "kvferry":
            value = f"{s['kvferry_ms']:.2f} ({s['kvferry_share_pct']:.1f}%)"
        else:
            value = fmt.format(s[key] if sub is None else s[key][sub])
        out.append(f"{label + ':':<42}{value:>16}")
    return "\n".join(out)
