"""NIXL's Python API (``nixl_agent``) over kvferry.

Code written for NIXL's ``nixl_agent`` moves to kvferry by changing its import::

    from kvferry.nixl import nixl_agent, nixl_agent_config

    agent = nixl_agent("decode", nixl_agent_config(secret=s))
    reg = agent.register_memory(kv_tensor)
    peer = agent.add_remote_agent(prefill_metadata)
    h = agent.initialize_xfer("READ", local_descs, remote_descs, peer, b"tag")
    agent.transfer(h)
    while agent.check_xfer_state(h) == "PROC": ...

How it maps onto kvferry: every registered region (one descriptor of
``register_memory``) becomes a kvferry pool of fixed-size chunks
(``nixl_agent_config.chunk_bytes``, default 64) exported to peers. A transfer
descriptor (address, length) must lie inside one registered region and start
and end on a chunk boundary of it; it then names a run of block ids of that
pool, and a transfer moves those block ids without a lease (one kvferry
transfer per pair of regions it touches). docs/python.md (section "kvferry.nixl") lists every NIXL
method and how kvferry's differs.

Metadata (``get_agent_metadata``) carries the agent's name, its registered
regions and kvferry's connection metadata; ``add_remote_agent`` connects
over kvferry's authenticated control connection, so both agents need the same
shared secret (``nixl_agent_config(secret=...)`` or KVFERRY_SECRET).
"""

from __future__ import annotations

import base64
import binascii
import bisect
import dataclasses
import enum
import itertools
import json
import threading
import time
from typing import Any, Optional

from ._agent import Agent, KvLayout, drain_logs
from .errors import (
    AlreadyExistsError,
    DeadlineExceededError,
    Error,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)

__all__ = [
    "NIXL_INIT_AGENT", "nixl_agent", "nixl_agent_config", "nixl_thread_sync_t",
    "nixl_xfer_handle", "nixl_prepped_dlist_handle", "nixlXferTelemetry",
    "nixlRegDList", "nixlXferDList",
    "nixlInvalidParamError", "nixlNotFoundError",
    "nixlRepostActiveError", "nixlNotPostedError", "nixlNotSupportedError",
    "nixlNoTelemetryError",
]

NIXL_INIT_AGENT = "NIXL_INIT_AGENT"
BACKEND = "UCX"  # the one backend: kvferry's own UCX data path
_METADATA_FORMAT = "kvferry-nixl/1"
_DIAL_GRACE = 1.0  # seconds the agent whose name sorts last waits to be dialed (see _connect)


# --- errors -----------------------------------------------------------------
# NIXL's bindings raise one exception class per nixl_status_t; these carry the
# same names and derive from kvferry's typed errors (so ValueError, LookupError
# work as well).
class nixlInvalidParamError(InvalidArgumentError):
    """A descriptor, index, handle or argument that is not valid (NIXL_ERR_INVALID_PARAM)."""


class nixlNotFoundError(NotFoundError):
    """An unknown agent, region or backend (NIXL_ERR_NOT_FOUND)."""


class nixlRepostActiveError(FailedPreconditionError):
    """transfer() on a handle whose previous post is still in flight (NIXL_ERR_REPOST_ACTIVE)."""


class nixlNotPostedError(FailedPreconditionError):
    """check_xfer_state or telemetry of a handle never posted (NIXL_ERR_NOT_POSTED)."""


class nixlNoTelemetryError(FailedPreconditionError):
    """Telemetry asked of an agent made without capture_telemetry (NIXL_ERR_NO_TELEMETRY)."""


class nixlNotSupportedError(Error, NotImplementedError):
    """A NIXL feature kvferry does not have (NIXL_ERR_NOT_SUPPORTED)."""

    code = "UNIMPLEMENTED"
    code_value = 12


# --- configuration ----------------------------------------------------------
class nixl_thread_sync_t(enum.Enum):
    """Accepted for compatibility; every kvferry agent is thread-safe."""

    NIXL_THREAD_SYNC_NONE = 0
    NIXL_THREAD_SYNC_STRICT = 1
    NIXL_THREAD_SYNC_RW = 2
    NIXL_THREAD_SYNC_DEFAULT = 3


class nixl_agent_config:
    """NIXL's agent configuration, plus kvferry's own keyword-only settings.

    NIXL's positional arguments keep their order and meaning where kvferry
    has one: ``enable_prog_thread`` (kvferry's progress thread, default True),
    ``listen_port`` (the control port peers connect to; 0, the default, picks a
    free one), ``capture_telemetry`` (default False: get_xfer_telemetry raises
    nixlNoTelemetryError). ``enable_listen_thread``, ``num_threads`` and
    ``sync_mode`` are accepted and ignored; ``backends`` may only name "UCX".

    kvferry's settings: ``secret`` (the shared secret of the control
    connection; both agents need the same; empty takes KVFERRY_SECRET),
    ``listen_address`` (default "127.0.0.1"), ``advertise_address`` (the
    address metadata gives peers; default "": the listen address, which then
    must not be a wildcard),
    ``chunk_bytes`` (the transfer granularity: registered regions and
    descriptors are whole chunks of it; default 64; both agents need the
    same), ``connect_timeout`` (seconds add_remote_agent waits for the
    connection, default 10), ``allow_insecure`` and ``ucx_config`` (as for
    kvferry.Agent).
    """

    def __init__(self, enable_prog_thread: bool = True, enable_listen_thread: bool = False,
                 listen_port: int = 0, capture_telemetry: bool = False, num_threads: int = 0,
                 backends: Optional[list] = None, sync_mode: Optional[nixl_thread_sync_t] = None,
                 *, secret: str = "", listen_address: str = "127.0.0.1", advertise_address: str = "",
                 chunk_bytes: int = 64,
                 connect_timeout: float = 10.0, allow_insecure: bool = False,
                 ucx_config: Optional[dict] = None):
        backends = [BACKEND] if backends is None else list(backends)
        for b in backends:
            if b != BACKEND:
                raise nixlNotSupportedError(
                    f"backend {b!r}: kvferry.nixl has one backend, {BACKEND!r}")
        if sync_mode is not None and not isinstance(sync_mode, nixl_thread_sync_t):
            raise nixlInvalidParamError(
                f"sync_mode {sync_mode!r} is not a nixl_thread_sync_t")
        if not isinstance(chunk_bytes, int) or chunk_bytes <= 0 or chunk_bytes % 64:
            raise nixlInvalidParamError(
                f"chunk_bytes {chunk_bytes!r} is not a positive multiple of 64")
        self.enable_pthread = bool(enable_prog_thread)
        self.enable_listen = bool(enable_listen_thread)
        self.port = int(listen_port)
        self.capture_telemetry = bool(capture_telemetry)
        self.num_threads = num_threads
        self.backends = backends
        self.sync_mode = sync_mode
        self.secret = secret
        self.listen_address = listen_address
        self.advertise_address = advertise_address
        self.chunk_bytes = chunk_bytes
        self.connect_timeout = float(connect_timeout)
        self.allow_insecure = allow_insecure
        self.ucx_config = ucx_config


# --- descriptor lists -------------------------------------------------------
class _DList:
    """A list of (address, length, device id) descriptors of one memory type.

    Holds references to the tensors or arrays it was made from, so memory
    described by it stays alive as long as it does.
    """

    __slots__ = ("mem_type", "descs", "_keep")

    def __init__(self, mem_type: str, descs: list, keep: tuple = ()):
        self.mem_type = mem_type
        self.descs = descs
        self._keep = keep

    def __len__(self) -> int:
        return len(self.descs)

    def __getitem__(self, i):
        return self.descs[i]

    def __iter__(self):
        return iter(self.descs)

    def __eq__(self, other) -> bool:
        return (type(other) is type(self) and other.mem_type == self.mem_type
                and other.descs == self.descs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.mem_type!r}, {self.descs!r})"

    def _dump(self) -> dict:
        return {"kind": type(self).__name__, "mem_type": self.mem_type,
                "descs": [list(d) for d in self.descs]}


class nixlRegDList(_DList):
    """Registration descriptors: (address, length, device id, meta info)."""


class nixlXferDList(_DList):
    """Transfer descriptors: (address, length, device id)."""


_MEM_TYPES = {"DRAM": "DRAM", "cpu": "DRAM", "VRAM": "VRAM", "cuda": "VRAM", "FILE": "FILE",
              "BLK": "BLK", "OBJ": "OBJ"}


def _mem_type(mem_type: Any) -> str:
    if mem_type is None:
        raise nixlInvalidParamError(
            "mem_type is required for descriptors given as tuples or a numpy array")
    kind = _MEM_TYPES.get(mem_type) if isinstance(mem_type, str) else None
    if kind is None:
        raise nixlInvalidParamError(f"mem_type {mem_type!r} is not one of {sorted(_MEM_TYPES)}")
    if kind != "DRAM":
        raise nixlNotSupportedError(
            f"mem_type {mem_type!r}: kvferry registers host memory (DRAM) only "
            "(Debian's UCX has no CUDA support)")
    return kind


def _torch():
    try:
        import torch
    except ImportError:  # pragma: no cover
        return None
    return torch


def _tensor_desc(t, name: str) -> tuple:
    if t.device.type != "cpu":
        raise nixlNotSupportedError(
            f"{name}: tensor on device '{t.device}'; kvferry registers host memory (DRAM) only")
    if not t.is_contiguous():
        raise nixlInvalidParamError(
            f"{name}: tensor of shape {tuple(t.shape)} is not contiguous "
            f"(strides {tuple(t.stride())})")
    return (t.data_ptr(), t.numel() * t.element_size(), 0)


def _int(v: Any, name: str) -> int:
    if isinstance(v, bool):
        raise nixlInvalidParamError(f"{name} {v!r} is not an integer")
    try:
        iv = int(v.__index__())
    except (AttributeError, TypeError):
        raise nixlInvalidParamError(f"{name} {v!r} is not an integer") from None
    return iv


def _descs(value: Any, mem_type: Optional[str], reg: bool) -> tuple:
    """(mem_type, [(addr, len, dev, meta)], objects to keep alive)."""
    import numpy as np

    torch = _torch()
    what = "reg_list" if reg else "xfer_list"
    if torch is not None and isinstance(value, torch.Tensor):
        return "DRAM", [_tensor_desc(value, what) + ("",)], (value,)
    if isinstance(value, np.ndarray):
        kind = _mem_type(mem_type)
        if value.ndim != 2 or value.shape[1] != 3:
            raise nixlInvalidParamError(
                f"{what}: numpy array of shape {value.shape} is not Nx3 (address, length, device)")
        if value.dtype.kind not in "iu":
            raise nixlInvalidParamError(
                f"{what}: numpy array of dtype {value.dtype} is not an integer array")
        rows = [(int(a), int(n), int(d), "") for a, n, d in value.tolist()]
        return kind, _checked(rows, what), ()
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
        raise nixlInvalidParamError(
            f"{what}: {type(value).__name__} is not a tensor, a list of tensors or tuples, "
            "or an Nx3 numpy array")
    items = list(value)
    if not items:
        return (_MEM_TYPES.get(mem_type, "DRAM") if isinstance(mem_type, str) else "DRAM"), [], ()
    if torch is not None and all(isinstance(t, torch.Tensor) for t in items):
        return "DRAM", [_tensor_desc(t, f"{what}[{i}]") + ("",) for i, t in enumerate(items)], \
            tuple(items)
    kind = _mem_type(mem_type)
    rows = []
    for i, d in enumerate(items):
        if not isinstance(d, (tuple, list)) or len(d) not in ((3, 4) if reg else (3,)):
            raise nixlInvalidParamError(
                f"{what}[{i}] {d!r} is not an (address, length, device id"
                f"{'[, meta]' if reg else ''}) tuple")
        meta = d[3] if len(d) == 4 else ""
        rows.append((_int(d[0], f"{what}[{i}] address"), _int(d[1], f"{what}[{i}] length"),
                     _int(d[2], f"{what}[{i}] device id"), meta))
    return kind, _checked(rows, what), ()


def _checked(rows: list, what: str) -> list:
    for i, (addr, length, dev, _) in enumerate(rows):
        if addr <= 0 or addr >= 1 << 64 or length <= 0 or addr + length > 1 << 64:
            raise nixlInvalidParamError(
                f"{what}[{i}] ({addr:#x}, {length}, {dev}) is not a non-empty range of addresses")
    return rows


# --- handles ----------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Run:
    """A descriptor resolved to a pool: `count` blocks from `first`."""

    pool: str
    first: int
    count: int
    length: int


class nixl_prepped_dlist_handle:
    """A descriptor list resolved against one side's registered memory (prep_xfer_dlist)."""

    def __init__(self, agent: "nixl_agent", remote: Optional[str], runs: list, descs: list):
        self._agent = agent
        self._remote = remote  # None: the local side (NIXL_INIT_AGENT)
        self._runs = runs
        self._descs = descs
        self._released = False

    def release(self) -> None:
        self._released = True

    def __len__(self) -> int:
        return len(self._runs)

    def __repr__(self) -> str:
        side = "local" if self._remote is None else f"agent {self._remote!r}"
        return (f"nixl_prepped_dlist_handle({side}, {len(self._runs)} descriptors, "
                f"released={self._released})")


@dataclasses.dataclass
class nixlXferTelemetry:
    """A transfer's telemetry: times in microseconds (startTime since the
    epoch), bytes moved and descriptors in the request."""

    startTime: int
    postDuration: int
    xferDuration: int
    totalBytes: int
    descCount: int


class nixl_xfer_handle:
    """A transfer request: posted by transfer(), any number of times once it ended."""

    _ids = itertools.count(1)

    def __init__(self, agent: "nixl_agent", op: str, remote: str, parts: list, notif: bytes,
                 total_bytes: int, desc_count: int):
        self._agent = agent
        self._op = op
        self._remote = remote
        self._parts = parts  # [(local pool, [local ids], remote pool, [remote ids])]
        self._notif = notif
        self._total_bytes = total_bytes
        self._desc_count = desc_count
        self._handle = next(self._ids)
        self._released = False
        self._posted = False
        self._transfers: list = []
        self._deferred = None  # the notification-carrying part, posted after the others
        self._state = None
        self._error: Optional[Error] = None
        self._start_us = 0  # µs since the epoch
        self._post_us = 0
        self._xfer_us = 0
        self._moved = 0
        self._lock = threading.Lock()

    def release(self) -> None:
        self._agent.release_xfer_handle(self)

    @property
    def error(self) -> Optional[Error]:
        """Why the last post ended in "ERR" (None otherwise)."""
        return self._error

    def __repr__(self) -> str:
        return f"nixl_xfer_handle(0x{self._handle:x}, released={self._released})"


def _state(t) -> str:
    s = t.state
    return "DONE" if s == "done" else "PROC" if s == "in_flight" else "ERR"


class _MemoryHolder:
    """Lets numpy view (address, length) as bytes; keeps the owner alive."""

    __slots__ = ("_owner", "__array_interface__")

    def __init__(self, addr: int, length: int, owner):
        self._owner = owner
        self.__array_interface__ = {
            "shape": (length,), "typestr": "|u1", "data": (addr, False), "version": 3}


@dataclasses.dataclass
class _Region:
    pool: str
    addr: int
    length: int
    dev: int


class _RegionMap:
    """Registered regions by address, for finding the one holding a descriptor."""

    def __init__(self):
        self._starts: list = []
        self._regions: list = []

    def add(self, r: _Region) -> None:
        i = bisect.bisect_right(self._starts, r.addr)
        self._starts.insert(i, r.addr)
        self._regions.insert(i, r)

    def remove(self, r: _Region) -> None:
        i = self._regions.index(r)
        del self._starts[i]
        del self._regions[i]

    def find(self, addr: int, length: int) -> Optional[_Region]:
        i = bisect.bisect_right(self._starts, addr) - 1
        if i < 0:
            return None
        r = self._regions[i]
        return r if addr + length <= r.addr + r.length else None

    def overlapping(self, addr: int, length: int) -> Optional[_Region]:
        i = bisect.bisect_left(self._starts, addr + length) - 1
        if i >= 0 and self._regions[i].addr + self._regions[i].length > addr:
            return self._regions[i]
        return None

    def exact(self, addr: int, length: int) -> Optional[_Region]:
        r = self.find(addr, length)
        return r if r is not None and r.addr == addr and r.length == length else None

    def __iter__(self):
        return iter(list(self._regions))

    def __len__(self) -> int:
        return len(self._regions)


@dataclasses.dataclass
class _Remote:
    name: str
    regions: _RegionMap


# --- the agent --------------------------------------------------------------
class nixl_agent:
    """NIXL's ``nixl_agent`` on a kvferry Agent (see the module docstring).

    ``agent_name`` must be unique among the agents that talk to each other.
    The agent listens for peers at once (``listen_address``, ``listen_port``
    of the config). ``close()`` (or ``with``) closes the kvferry agent; NIXL
    has no such call, so an agent also closes when garbage-collected or at
    interpreter exit.
    """

    def __init__(self, agent_name: str, nixl_conf: Optional[nixl_agent_config] = None,
                 instantiate_all: bool = False):
        if not isinstance(agent_name, str) or not agent_name or agent_name == NIXL_INIT_AGENT:
            raise nixlInvalidParamError(f"agent_name {agent_name!r} is not a usable agent name")
        conf = nixl_conf if nixl_conf is not None else nixl_agent_config()
        if not isinstance(conf, nixl_agent_config):
            raise nixlInvalidParamError(f"nixl_conf {conf!r} is not a nixl_agent_config")
        self._conf = conf
        self.name = agent_name
        self._chunk = conf.chunk_bytes
        self._lock = threading.Lock()
        self._regions = _RegionMap()
        self._keep: dict = {}  # pool name -> objects backing it
        self._remotes: dict = {}
        self._pool_ids = itertools.count()
        self.notifs: dict = {}
        self._agent = Agent(agent_name, secret=conf.secret, progress_thread=conf.enable_pthread,
                            allow_insecure=conf.allow_insecure, ucx_config=conf.ucx_config)
        try:
            self._port = self._agent.listen(conf.listen_address, conf.port)
        except BaseException:
            self._agent.close()
            raise
        self.backends = {BACKEND: BACKEND}
        self.plugin_list = [BACKEND]

    def _layout(self, blocks: int) -> KvLayout:
        return KvLayout(num_layers=1, num_blocks=blocks, tokens_per_block=1, num_kv_heads=1,
                        head_dim=self._chunk, element_bytes=1, separate_kv=False)

    @property
    def kvferry_agent(self) -> Agent:
        """The kvferry.Agent underneath (its stats, memory report, offers)."""
        return self._agent

    @property
    def listen_port(self) -> int:
        return self._port

    def close(self) -> None:
        """Closes the kvferry agent: peers, pools, transfers (kvferry.Agent.close)."""
        self._agent.close()

    def __enter__(self) -> "nixl_agent":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- backends and plugins -------------------------------------------------
    def _check_backends(self, backends) -> None:
        for b in backends or ():
            if b != BACKEND:
                raise nixlNotFoundError(
                    f"backend {b!r}: kvferry.nixl has one backend, {BACKEND!r}")

    def get_plugin_list(self) -> list:
        return [BACKEND]

    def get_plugin_mem_types(self, backend: str) -> list:
        return ["DRAM"] if backend == BACKEND else []

    def get_plugin_params(self, backend: str) -> dict:
        return {} if backend != BACKEND else {"chunk_bytes": str(self._chunk)}

    def get_backend_mem_types(self, backend: str) -> list:
        return self.get_plugin_mem_types(backend)

    def get_backend_params(self, backend: str) -> dict:
        if backend != BACKEND:
            return {}
        return {"chunk_bytes": str(self._chunk), "listen_address": self._conf.listen_address,
                "listen_port": str(self._port), "progress_thread": str(self._conf.enable_pthread)}

    def create_backend(self, backend: str, initParams: Optional[dict] = None) -> None:
        """The UCX backend exists from the start; any other is nixlNotSupportedError."""
        if backend != BACKEND:
            raise nixlNotSupportedError(
                f"backend {backend!r}: kvferry.nixl has one backend, {BACKEND!r}")

    # --- descriptors ------------------------------------------------------------
    def get_reg_descs(self, descs, mem_type: Optional[str] = None) -> nixlRegDList:
        """A registration list from a tensor, a list of tensors, a list of
        (address, length, device id[, meta]) tuples or an Nx3 integer numpy
        array (tuples and arrays need ``mem_type``, "DRAM")."""
        if isinstance(descs, nixlRegDList):
            return descs
        if isinstance(descs, nixlXferDList):
            raise nixlInvalidParamError("a nixlXferDList given where a registration list is needed")
        kind, rows, keep = _descs(descs, mem_type, reg=True)
        return nixlRegDList(kind, rows, keep)

    def get_xfer_descs(self, descs, mem_type: Optional[str] = None) -> nixlXferDList:
        """A transfer list from a tensor, a list of tensors, a list of
        (address, length, device id) tuples or an Nx3 integer numpy array
        (tuples and arrays need ``mem_type``, "DRAM")."""
        if isinstance(descs, nixlXferDList):
            return descs
        if isinstance(descs, nixlRegDList):
            return nixlXferDList(descs.mem_type, [d[:3] for d in descs.descs], descs._keep)
        kind, rows, keep = _descs(descs, mem_type, reg=False)
        return nixlXferDList(kind, [r[:3] for r in rows], keep)

    def get_serialized_descs(self, descs) -> bytes:
        """Descriptor list as bytes (JSON, not pickle: safe to take from a peer)."""
        if not isinstance(descs, _DList):
            raise nixlInvalidParamError(f"{descs!r} is not a nixlXferDList or nixlRegDList")
        return json.dumps(descs._dump()).encode()

    def deserialize_descs(self, serialized_descs: bytes):
        try:
            d = json.loads(bytes(serialized_descs))
            cls = {"nixlRegDList": nixlRegDList, "nixlXferDList": nixlXferDList}[d["kind"]]
            rows = [tuple(r) for r in d["descs"]]
            for i, r in enumerate(rows):
                for j in range(3):
                    if not isinstance(r[j], int):
                        raise ValueError(f"descriptor {i} field {j}")
            return cls(d["mem_type"], rows)
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise nixlInvalidParamError(
                f"{bytes(serialized_descs)[:40]!r}... is not a serialized descriptor list ({e})"
            ) from None

    # --- memory -------------------------------------------------------------
    def register_memory(self, reg_list, mem_type: Optional[str] = None,
                        backends: Optional[list] = None) -> nixlRegDList:
        """Registers each descriptor as a region peers may read and write.

        Each must be host memory, 64-byte aligned, a whole number of
        chunk_bytes long, and overlap no registered region; otherwise
        nixlInvalidParamError names it and nothing is registered.
        """
        self._check_backends(backends)
        regs = self.get_reg_descs(reg_list, mem_type)
        if regs.mem_type != "DRAM":
            _mem_type(regs.mem_type)
        import numpy as np

        with self._lock:
            for i, (addr, length, dev, _) in enumerate(regs.descs):
                desc = f"reg_list[{i}] ({addr:#x}, {length}, {dev})"
                if length % self._chunk:
                    raise nixlInvalidParamError(
                        f"{desc}: length is not a multiple of chunk_bytes {self._chunk}")
                if addr % 64:
                    raise nixlInvalidParamError(f"{desc}: address is not 64-byte aligned")
                other = self._regions.overlapping(addr, length)
                if other is not None:
                    raise nixlInvalidParamError(
                        f"{desc} overlaps the registered region ({other.addr:#x}, {other.length})")
                for j in range(i):
                    a2, l2 = regs.descs[j][:2]
                    if addr < a2 + l2 and a2 < addr + length:
                        raise nixlInvalidParamError(f"{desc} overlaps reg_list[{j}]")
            done = []
            try:
                for addr, length, dev, _ in regs.descs:
                    name = f"nixl{next(self._pool_ids)}"
                    view = np.asarray(_MemoryHolder(addr, length, regs._keep))
                    self._agent.register_pool(name, self._layout(length // self._chunk), [view])
                    r = _Region(name, addr, length, dev)
                    self._regions.add(r)
                    self._keep[name] = regs._keep
                    done.append(r)
            except BaseException:
                for r in done:
                    self._drop_region(r)
                raise
        return regs

    def _drop_region(self, r: _Region) -> None:
        self._agent.remove_pool(r.pool)  # raises (the region stays) if it cannot
        self._regions.remove(r)
        self._keep.pop(r.pool, None)

    def deregister_memory(self, dereg_list, backends: Optional[list] = None) -> None:
        """Deregisters regions exactly as registered; nixlNotFoundError names a
        descriptor that is not one (then nothing is deregistered)."""
        self._check_backends(backends)
        regs = self.get_reg_descs(dereg_list)
        with self._lock:
            found = []
            for i, (addr, length, dev, _) in enumerate(regs.descs):
                r = self._regions.exact(addr, length)
                if r is None:
                    raise nixlNotFoundError(
                        f"dereg_list[{i}] ({addr:#x}, {length}, {dev}) is not a registered region")
                found.append(r)
            for r in found:
                self._drop_region(r)

    def query_memory(self, reg_list, backend: str, mem_type: Optional[str] = None) -> list:
        raise nixlNotSupportedError("query_memory: kvferry.nixl has no storage backends")

    # --- metadata and peers -----------------------------------------------------
    def _metadata(self, regions, conn: bool) -> bytes:
        md = {"format": _METADATA_FORMAT, "name": self.name, "chunk_bytes": self._chunk,
              "regions": [[r.pool, r.addr, r.length, r.dev] for r in regions]}
        if conn:
            # kvferry's own connection metadata: name, incarnation, address, port
            md["conn"] = base64.b64encode(
                self._agent.local_metadata(self._conf.advertise_address)).decode()
        return json.dumps(md).encode()

    def get_agent_metadata(self) -> bytes:
        """This agent's name, its registered regions and what a peer needs to
        connect to it (kvferry's Agent.local_metadata)."""
        with self._lock:
            return self._metadata(self._regions, True)

    def get_partial_agent_metadata(self, descs, inc_conn_info: bool = False,
                                   backends: Optional[list] = None) -> bytes:
        """Metadata for the registered regions in ``descs`` only (each must be one)."""
        self._check_backends(backends)
        regs = self.get_reg_descs(descs) if len(descs) else nixlRegDList("DRAM", [])
        with self._lock:
            out = []
            for i, (addr, length, dev, _) in enumerate(regs.descs):
                r = self._regions.exact(addr, length)
                if r is None:
                    raise nixlNotFoundError(
                        f"descs[{i}] ({addr:#x}, {length}, {dev}) is not a registered region")
                out.append(r)
            return self._metadata(out, inc_conn_info)

    def add_remote_agent(self, metadata: bytes) -> str:
        """Loads a peer's metadata and connects to it (over kvferry's
        authenticated control connection: both need the same secret).
        Loading metadata of a known agent again adds the regions it lists.
        Returns the peer's name."""
        try:
            md = json.loads(bytes(metadata))
            if md.get("format") != _METADATA_FORMAT:
                raise ValueError(f"format {md.get('format')!r}")
            name, chunk = str(md["name"]), int(md["chunk_bytes"])
            regions = [_Region(str(p), int(a), int(n), int(d)) for p, a, n, d in md["regions"]]
        except (ValueError, KeyError, TypeError) as e:
            raise nixlInvalidParamError(
                f"{bytes(metadata)[:40]!r}... is not kvferry.nixl agent metadata ({e})") from None
        try:
            conn = base64.b64decode(md["conn"], validate=True) if "conn" in md else None
        except (binascii.Error, TypeError) as e:
            raise nixlInvalidParamError(
                f"metadata of agent '{name}': its connection info is not base64 ({e})") from None
        if name == self.name:
            raise nixlNotSupportedError(
                f"metadata of '{name}' is this agent's own: kvferry.nixl has no loopback transfers")
        if chunk != self._chunk:
            raise nixlInvalidParamError(
                f"agent '{name}' uses chunk_bytes {chunk}, this agent {self._chunk}: "
                "both need the same nixl_agent_config.chunk_bytes")
        with self._lock:
            known = self._remotes.get(name)
        if known is None:
            if "conn" not in md:
                raise nixlNotFoundError(
                    f"partial metadata of unknown agent '{name}' has no connection info")
            self._connect(name, conn)
            known = _Remote(name, _RegionMap())
        with self._lock:
            for r in regions:
                if known.regions.exact(r.addr, r.length) is None:
                    old = known.regions.overlapping(r.addr, r.length)
                    if old is not None:
                        known.regions.remove(old)
                    known.regions.add(r)
            self._remotes[name] = known
        return name

    def _connected(self, name: str) -> bool:
        try:
            return self._agent.peer(name).state == "connected"
        except NotFoundError:
            return False

    def _connect(self, name: str, conn: bytes) -> None:
        """Connects to `name` unless it is connected to us already.

        kvferry keeps one connection between two agents and refuses a second;
        two that dial each other at the same moment can lose both. So when
        both load the other's metadata at once, the one whose name sorts first
        dials, and the other waits up to _DIAL_GRACE seconds for it before
        dialing itself (a peer that never loads our metadata costs that once).
        """
        timeout = self._conf.connect_timeout
        if self._connected(name):
            return
        if self.name > name:
            try:
                self._agent.wait_for_peer(name, min(_DIAL_GRACE, timeout))
            except DeadlineExceededError:
                pass
            if self._connected(name):
                return
        try:
            info = self._agent.connect_from_metadata(conn, timeout)
        except AlreadyExistsError:
            # the peer connected to us meanwhile
            info = self._agent.wait_for_peer(name, timeout)
        if info.name != name:
            self._agent.disconnect(info.name)
            raise nixlInvalidParamError(
                f"metadata of agent '{name}' leads to agent '{info.name}'")

    def check_remote_metadata(self, agent: str, descs=None) -> bool:
        """Whether ``agent``'s metadata is loaded (and covers ``descs`` if given)."""
        with self._lock:
            remote = self._remotes.get(agent)
            if remote is None:
                return False
            if descs is None:
                return True
            for addr, length, _ in self.get_xfer_descs(descs, "DRAM").descs:
                if remote.regions.find(addr, length) is None:
                    return False
        return True

    def remove_remote_agent(self, agent: str) -> None:
        """Forgets ``agent``'s metadata and disconnects from it."""
        with self._lock:
            if self._remotes.pop(agent, None) is None:
                raise nixlNotFoundError(f"no remote agent named '{agent}' was added")
        try:
            self._agent.disconnect(agent)
        except (NotFoundError, FailedPreconditionError):
            pass  # the peer went away already: its metadata is forgotten all the same

    def make_connection(self, remote_agent: str, backends: Optional[list] = None) -> None:
        """add_remote_agent connects already; this checks the agent is known."""
        self._check_backends(backends)
        with self._lock:
            if remote_agent not in self._remotes:
                raise nixlNotFoundError(f"no remote agent named '{remote_agent}' was added")

    def _no_metadata_server(self, what: str):
        raise nixlNotSupportedError(
            f"{what}: kvferry.nixl has no metadata listener or server; pass "
            "get_agent_metadata() to the peer's add_remote_agent by your own channel")

    def send_local_metadata(self, ip_addr: str = "", port: int = 0):
        self._no_metadata_server("send_local_metadata")

    def send_partial_agent_metadata(self, *args, **kwargs):
        self._no_metadata_server("send_partial_agent_metadata")

    def fetch_remote_metadata(self, *args, **kwargs):
        self._no_metadata_server("fetch_remote_metadata")

    def invalidate_local_metadata(self, *args, **kwargs):
        self._no_metadata_server("invalidate_local_metadata")

    # --- preparing transfers ------------------------------------------------------
    def _resolve(self, regions: _RegionMap, descs: list, side: str) -> list:
        runs = []
        for i, (addr, length, dev) in enumerate(descs):
            r = regions.find(addr, length)
            desc = f"{side} descriptor {i} ({addr:#x}, {length}, {dev})"
            if r is None:
                raise nixlNotFoundError(f"{desc} is not inside a registered region")
            off = addr - r.addr
            if off % self._chunk or length % self._chunk:
                raise nixlInvalidParamError(
                    f"{desc} does not start and end on a {self._chunk}-byte chunk of region "
                    f"({r.addr:#x}, {r.length}) (offset {off})")
            runs.append(_Run(r.pool, off // self._chunk, length // self._chunk, length))
        return runs

    def prep_xfer_dlist(self, agent_name: str, xfer_list, mem_type: Optional[str] = None,
                        backends: Optional[list] = None) -> nixl_prepped_dlist_handle:
        """Resolves descriptors once for make_prepped_xfer: the local side with
        agent_name NIXL_INIT_AGENT (or ""), a peer's side with its name."""
        self._check_backends(backends)
        descs = self.get_xfer_descs(xfer_list, mem_type)
        if descs.mem_type != "DRAM":
            _mem_type(descs.mem_type)
        with self._lock:
            if agent_name in (NIXL_INIT_AGENT, ""):
                return nixl_prepped_dlist_handle(
                    self, None, self._resolve(self._regions, descs.descs, "local"), descs)
            if agent_name == self.name:
                raise nixlNotSupportedError(
                    f"agent_name '{agent_name}' is this agent: kvferry.nixl has no loopback "
                    "transfers")
            remote = self._remotes.get(agent_name)
            if remote is None:
                raise nixlNotFoundError(f"no remote agent named '{agent_name}' was added")
            return nixl_prepped_dlist_handle(
                self, agent_name, self._resolve(remote.regions, descs.descs,
                                                f"agent '{agent_name}'"), descs)

    @staticmethod
    def _indices(indices, n: int, what: str) -> list:
        import numpy as np

        if isinstance(indices, np.ndarray):
            if indices.ndim != 1 or indices.dtype.kind not in "iu":
                raise nixlInvalidParamError(
                    f"{what}: numpy array of dtype {indices.dtype} and shape {indices.shape} is "
                    "not a 1-D integer array")
            indices = indices.tolist()
        out = []
        for k, v in enumerate(indices):
            iv = _int(v, f"{what}[{k}]")
            if iv < 0 or iv >= n:
                raise nixlInvalidParamError(
                    f"{what}[{k}] {iv} is not an index into a list of {n} descriptors")
            out.append(iv)
        return out

    def _op(self, operation: str) -> str:
        if operation not in ("READ", "WRITE"):
            raise nixlInvalidParamError(f"operation {operation!r} is not 'READ' or 'WRITE'")
        return operation.lower()

    def make_prepped_xfer(self, operation: str, local_xfer_side: nixl_prepped_dlist_handle,
                          local_indices, remote_xfer_side: nixl_prepped_dlist_handle,
                          remote_indices, notif_msg: bytes = b"",
                          backends: Optional[list] = None,
                          skip_desc_merge: bool = False) -> nixl_xfer_handle:
        """A transfer of local descriptors ``local_indices`` with the peer's
        ``remote_indices`` (paired in order; each pair of one length)."""
        self._check_backends(backends)
        op = self._op(operation)
        for side, h, local in (("local_xfer_side", local_xfer_side, True),
                               ("remote_xfer_side", remote_xfer_side, False)):
            if not isinstance(h, nixl_prepped_dlist_handle) or h._agent is not self:
                raise nixlInvalidParamError(
                    f"{side} {h!r} is not a prepared list of this agent")
            if h._released:
                raise nixlInvalidParamError(f"{side} {h!r} was released")
            if (h._remote is None) != local:
                raise nixlInvalidParamError(
                    f"{side} {h!r} was prepared for "
                    f"{'a peer' if local else 'the local side (NIXL_INIT_AGENT)'}")
        li = self._indices(local_indices, len(local_xfer_side._runs), "local_indices")
        ri = self._indices(remote_indices, len(remote_xfer_side._runs), "remote_indices")
        if len(li) != len(ri):
            raise nixlInvalidParamError(
                f"{len(li)} local indices but {len(ri)} remote indices")
        if not li:
            raise nixlInvalidParamError("no descriptors to transfer")
        return self._make(op, remote_xfer_side._remote,
                          [local_xfer_side._runs[i] for i in li],
                          [remote_xfer_side._runs[i] for i in ri], notif_msg)

    def _make(self, op: str, remote: str, lruns: list, rruns: list, notif) -> nixl_xfer_handle:
        import numpy as np

        groups: dict = {}
        total = 0
        for k, (l, r) in enumerate(zip(lruns, rruns)):
            if l.length != r.length:
                raise nixlInvalidParamError(
                    f"descriptor pair {k}: local length {l.length} but remote length {r.length}")
            lr, rr = groups.setdefault((l.pool, r.pool), ([], []))
            lr.append((l.first, l.count))
            rr.append((r.first, r.count))
            total += l.length
        parts = []
        for (lpool, rpool), (lr, rr) in groups.items():
            ids = []
            for side, pool, runs in (("local", lpool, lr), ("remote", rpool, rr)):
                a = np.concatenate([np.arange(f, f + c, dtype=np.uint32) for f, c in runs])
                if len(np.unique(a)) != len(a):
                    raise nixlInvalidParamError(
                        f"{side} descriptors of one transfer overlap in region pool '{pool}' "
                        "(each byte moves once per transfer)")
                ids.append(a)
            parts.append((lpool, ids[0], rpool, ids[1]))
        return nixl_xfer_handle(self, op, remote, parts, _bytes(notif, "notif_msg"), total,
                                len(lruns))

    def initialize_xfer(self, operation: str, local_descs, remote_descs, remote_agent: str,
                        notif_msg: bytes = b"", backends: Optional[list] = None
                        ) -> nixl_xfer_handle:
        """A transfer of ``local_descs`` with ``remote_agent``'s ``remote_descs``
        (paired in order) in one call."""
        self._check_backends(backends)
        op = self._op(operation)
        if remote_agent in (NIXL_INIT_AGENT, "", self.name):
            raise nixlNotSupportedError(
                f"remote_agent {remote_agent!r}: kvferry.nixl has no loopback transfers")
        local = self.prep_xfer_dlist(NIXL_INIT_AGENT, local_descs)
        remote = self.prep_xfer_dlist(remote_agent, remote_descs)
        if len(local._runs) != len(remote._runs):
            raise nixlInvalidParamError(
                f"{len(local._runs)} local descriptors but {len(remote._runs)} remote ones")
        if not local._runs:
            raise nixlInvalidParamError("no descriptors to transfer")
        return self._make(op, remote_agent, local._runs, remote._runs, notif_msg)

    # --- posting and polling -------------------------------------------------------
    def _live(self, handle, what: str = "handle") -> nixl_xfer_handle:
        if not isinstance(handle, nixl_xfer_handle) or handle._agent is not self:
            raise nixlInvalidParamError(f"{what} {handle!r} is not a transfer of this agent")
        if handle._released:
            raise nixlInvalidParamError(f"{what} {handle!r} was released")
        return handle

    def _post_part(self, h: nixl_xfer_handle, part, notif: bytes):
        lpool, lids, rpool, rids = part
        # By block ids, without a lease: transfers in flight may share local
        # chunks (one source written to several peers), as NIXL allows.
        return self._agent.post_transfer(h._op, h._remote, local_pool=lpool, local_blocks=lids,
                                         remote_pool=rpool, remote_ids=rids, notification=notif)

    def transfer(self, handle: nixl_xfer_handle, notif_msg: bytes = b"") -> str:
        """Posts the transfer ("PROC"; "DONE" if it ended at once). A handle
        may be posted again once it ended; while in flight that is
        nixlRepostActiveError. ``notif_msg`` replaces the handle's for this
        post; the peer receives it after every byte is in place."""
        h = self._live(handle)
        notif = _bytes(notif_msg, "notif_msg") or h._notif
        with h._lock:
            if h._posted and self._poll(h) == "PROC":
                raise nixlRepostActiveError(f"handle {h!r} is still in flight")
            with self._lock:
                if h._remote not in self._remotes:
                    raise nixlNotFoundError(f"no remote agent named '{h._remote}' was added")
            t0 = time.perf_counter()
            h._start_us, h._xfer_us, h._moved = time.time_ns() // 1000, 0, 0
            h._transfers, h._deferred, h._error, h._state = [], None, None, None
            parts = list(h._parts)
            if notif and len(parts) > 1:
                h._deferred = (parts.pop(), notif)  # posted once the others are done
                notif = b""
            try:
                for k, part in enumerate(parts):
                    h._transfers.append(
                        self._post_part(h, part, notif if k == len(parts) - 1 else b""))
            except BaseException:
                for t in h._transfers:
                    t.cancel()
                h._transfers, h._deferred = [], None
                h._posted = False
                raise
            h._posted = True
            h._post_us = int((time.perf_counter() - t0) * 1e6)
            return self._poll(h)

    def _poll(self, h: nixl_xfer_handle) -> str:
        if h._state is not None:
            return h._state
        states = [_state(t) for t in h._transfers]
        if "ERR" in states:
            t = h._transfers[states.index("ERR")]
            h._error = t.error
            for other in h._transfers:
                if other.state == "in_flight":
                    other.cancel()
            h._deferred = None
            h._transfers = []
            h._state = "ERR"
            return "ERR"
        if "PROC" in states:
            return "PROC"
        if h._deferred is not None:
            part, notif = h._deferred
            h._deferred = None
            try:
                h._transfers.append(self._post_part(h, part, notif))
            except Error as e:
                h._error = e
                h._state = "ERR"
                return "ERR"
            return self._poll(h)
        # The library's telemetry of the parts: first post to last end.
        tel = [t.telemetry for t in h._transfers]
        posted = min(x.posted for x in tel)
        ended = max(x.ended for x in tel)
        h._start_us = int(posted * 1e6)
        h._xfer_us = max(0, int((ended - posted) * 1e6))
        h._moved = sum(x.bytes for x in tel)
        h._transfers = []  # ended: nothing of kvferry's to keep alive
        h._state = "DONE"
        return "DONE"

    def check_xfer_state(self, handle: nixl_xfer_handle) -> str:
        """"DONE", "PROC" or "ERR" (``handle.error`` then says why)."""
        h = self._live(handle)
        with h._lock:
            if not h._posted:
                raise nixlNotPostedError(f"handle {h!r} was never posted")
            try:
                return self._poll(h)
            finally:
                drain_logs()

    def get_xfer_telemetry(self, handle: nixl_xfer_handle) -> nixlXferTelemetry:
        """Of the last post: startTime (µs since the epoch), postDuration (µs
        in transfer()), xferDuration (µs from the post to the end of its last
        byte, as the library timed them; 0 until check_xfer_state saw it
        DONE), totalBytes, descCount."""
        h = self._live(handle)
        if not self._conf.capture_telemetry:
            raise nixlNoTelemetryError(
                f"agent '{self.name}' was made without nixl_agent_config(capture_telemetry=True)")
        if not h._posted:
            raise nixlNotPostedError(f"handle {h!r} was never posted")
        return nixlXferTelemetry(h._start_us, h._post_us, h._xfer_us,
                                 h._moved or h._total_bytes, h._desc_count)

    def query_xfer_backend(self, handle: nixl_xfer_handle) -> str:
        self._live(handle)
        return BACKEND

    def estimate_xfer_cost(self, req_handle: nixl_xfer_handle):
        raise nixlNotSupportedError("estimate_xfer_cost: kvferry has no cost model")

    def prep_mem_view(self, *args, **kwargs):
        raise nixlNotSupportedError("prep_mem_view: kvferry has no GPU device API")

    def release_mem_view(self, mvh: int) -> None:
        raise nixlNotSupportedError("release_mem_view: kvferry has no GPU device API")

    def release_xfer_handle(self, handle: nixl_xfer_handle) -> None:
        """Releases a handle; one still in flight is cancelled first (returns
        once no byte of it can move). Releasing twice is a no-op."""
        if not isinstance(handle, nixl_xfer_handle) or handle._agent is not self:
            raise nixlInvalidParamError(f"handle {handle!r} is not a transfer of this agent")
        with handle._lock:
            if handle._released:
                return
            for t in handle._transfers:
                if t.state == "in_flight":
                    t.cancel()
            handle._deferred = None
            handle._transfers = []
            handle._released = True

    def release_dlist_handle(self, handle: nixl_prepped_dlist_handle) -> None:
        if not isinstance(handle, nixl_prepped_dlist_handle) or handle._agent is not self:
            raise nixlInvalidParamError(f"handle {handle!r} is not a prepared list of this agent")
        handle.release()

    # --- notifications -----------------------------------------------------------
    def _take_notifs(self) -> dict:
        out: dict = {}
        for n in self._agent.poll_notifications():
            out.setdefault(n.peer, []).append(n.payload)
        return out

    def get_new_notifs(self, backends: Optional[list] = None) -> dict:
        """Notifications received since the last call, {agent name: [bytes]}."""
        if backends:
            self._check_backends(backends)
        return self._take_notifs()

    def update_notifs(self, backends: Optional[list] = None) -> dict:
        """Adds new notifications to ``self.notifs`` and returns it."""
        self._check_backends(backends)
        for peer, msgs in self._take_notifs().items():
            self.notifs.setdefault(peer, []).extend(msgs)
        return self.notifs

    def check_remote_xfer_done(self, remote_agent_name: str, lookup_tag: bytes,
                               backends: Optional[list] = None, tag_is_prefix: bool = True
                               ) -> bool:
        """Whether a notification from ``remote_agent_name`` starting with (or,
        with tag_is_prefix=False, containing) ``lookup_tag`` arrived; takes it."""
        tag = _bytes(lookup_tag, "lookup_tag")
        msgs = self.update_notifs(backends).get(remote_agent_name, [])
        for i, m in enumerate(msgs):
            if (m.startswith(tag) if tag_is_prefix else tag in m):
                del msgs[i]
                return True
        return False

    def send_notif(self, remote_agent_name: str, notif_msg: bytes,
                   backend: Optional[str] = None) -> None:
        """Sends a notification not bound to a transfer; it reaches the peer's
        get_new_notifs after those of transfers to it that ended before."""
        if backend is not None:
            self._check_backends([backend])
        msg = _bytes(notif_msg, "notif_msg")
        with self._lock:
            if remote_agent_name not in self._remotes:
                raise nixlNotFoundError(f"no remote agent named '{remote_agent_name}' was added")
        self._agent.send_notification(remote_agent_name, msg)


def _bytes(v: Any, what: str) -> bytes:
    if isinstance(v, str):
        return v.encode()
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v)
    raise nixlInvalidParamError(f"{what} {v!r} is not bytes or str")
