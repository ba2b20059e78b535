"""The Pythonic layer over kvferry._kvferry: Agent, Pool, BlockSet, Transfer, Offer."""

from __future__ import annotations

import array
import atexit
import dataclasses
import enum
import logging
import os
import sys
import threading
import weakref
from typing import Any, Iterable, Optional, Sequence

from . import _kvferry
from .errors import (
    EndReason,
    Error,
    FailedPreconditionError,
    InvalidArgumentError,
    from_status,
)

logger = logging.getLogger("kvferry")

_LEVELS = {"info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def drain_logs() -> None:
    """Moves kvferry's queued log lines into the ``kvferry`` logger.

    kvferry's threads never run Python: they queue their lines, and every call
    into the package drains the queue on the caller's thread. Call this from
    an idle program to see lines logged meanwhile (a peer that failed).
    """
    if not _kvferry._logs_pending():
        return
    records, dropped = _kvferry.drain_logs()
    for severity, agent, message in records:
        if agent:
            logger.log(_LEVELS.get(severity, logging.INFO), "agent '%s': %s", agent, message)
        else:
            logger.log(_LEVELS.get(severity, logging.INFO), "%s", message)
    if dropped:
        logger.warning("%d kvferry log lines were dropped (queue full)", dropped)


_HERE = os.path.dirname(__file__)
# co_filename -> whether it is a module of this package (a small set: one
# entry per source file that ever called in), so _site does no path work
# per frame on the hot path.
_IN_PACKAGE: dict = {}


def _site(depth: int = 2) -> tuple:
    """(file, line, function) of the user's code calling into the package."""
    f = sys._getframe(depth)
    while f is not None:
        name = f.f_code.co_filename
        inside = _IN_PACKAGE.get(name)
        if inside is None:
            inside = _IN_PACKAGE[name] = os.path.dirname(name) == _HERE
        if not inside:
            break
        f = f.f_back
    if f is None:
        return ("<unknown>", 0, "<unknown>")
    return (f.f_code.co_filename, f.f_lineno, f.f_code.co_name)


@dataclasses.dataclass(frozen=True)
class KvLayout:
    """The shape of a paged KV cache (kvferry::KvLayout).

    For vLLM's HND per-layer cache, each layer has a K and a V tensor of
    shape ``[num_blocks, num_kv_heads, tokens_per_block, head_dim]``.
    """

    num_layers: int
    num_blocks: int
    tokens_per_block: int
    num_kv_heads: int
    head_dim: int
    element_bytes: int
    separate_kv: bool = True

    @property
    def num_planes(self) -> int:
        return 2 if self.separate_kv else 1

    @property
    def chunk_bytes(self) -> int:
        return self.tokens_per_block * self.num_kv_heads * self.head_dim * self.element_bytes

    @property
    def plane_bytes(self) -> int:
        return self.chunk_bytes * self.num_blocks

    @property
    def layer_bytes(self) -> int:
        return self.plane_bytes * self.num_planes

    @property
    def total_bytes(self) -> int:
        return self.layer_bytes * self.num_layers

    def _dict(self) -> dict:
        for field in ("num_layers", "num_blocks", "tokens_per_block", "num_kv_heads", "head_dim",
                      "element_bytes"):
            v = getattr(self, field)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0 or v >= 1 << 32:
                raise InvalidArgumentError(f"KvLayout.{field} {v!r} is not an integer in [0, 2**32)")
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class PeerInfo:
    name: str
    state: str  # "handshaking", "connected", "failed", "closed"
    error: Optional[Error]  # why it failed or closed
    pools: list
    same_host: bool
    data_error_handling: bool
    data_path: str  # "shm-direct", "shm-kernel-copy", "am-emulated", "tcp", ...
    address: str
    incarnation: int

    @staticmethod
    def _from(d: dict) -> "PeerInfo":
        d = dict(d)
        return PeerInfo(error=from_status(*d.pop("status")), **d)


@dataclasses.dataclass(frozen=True)
class Notification:
    peer: str
    payload: bytes


@dataclasses.dataclass(frozen=True)
class TransferTelemetry:
    """What one transfer moved, and when (kvferry::TransferTelemetry).

    ``posted`` and ``ended`` are Unix times in seconds (``time.time()``'s
    clock); ``ended`` and ``duration`` are None while it is in flight.
    ``bytes`` counts every block, layer and plane named, whether or not a
    failed transfer moved them all. ``data_path`` is how they moved
    ("shm-direct", "shm-kernel-copy", "rdma", "am-emulated", "tcp", ...).
    """

    bytes: int
    posted: Optional[float]
    ended: Optional[float]
    data_path: str

    @property
    def duration(self) -> Optional[float]:
        if self.ended is None or self.posted is None:
            return None
        return self.ended - self.posted


@dataclasses.dataclass(frozen=True)
class Completion:
    """One ended transfer or offer, as Agent.poll_completions reports it."""

    id: int
    state: str
    error: Optional[Error]
    end_reason: EndReason = EndReason.NONE  # why it ended, as a value


@dataclasses.dataclass(frozen=True)
class Completions:
    transfers: list
    offers: list
    notifications: list
    dropped: int


@dataclasses.dataclass(frozen=True)
class Survivor:
    """A handle still alive when its agent closed, with the Python site that made it."""

    kind: str  # "block_set", "transfer", "offer"
    file: str
    line: int
    function: str

    def __str__(self) -> str:
        return f"{self.kind} created at {self.file}:{self.line} ({self.function})"


class _Tracked:
    """Base of the handles an agent reports as survivors when they outlive it."""

    __slots__ = ("_site", "__weakref__")
    _kind = "handle"

    def _alive(self) -> bool:
        return True


class BlockSet(_Tracked):
    """Blocks of one pool leased to the caller (kvferry::BlockSet).

    The blocks go back to the pool once this object is released (``release()``,
    ``with``, or garbage collection) and every transfer posted on it ended.
    """

    __slots__ = ("_b", "_pool")
    _kind = "block_set"

    def __init__(self, native, pool: "Pool", site: tuple):
        self._b = native
        self._pool = pool.name
        self._site = site

    @property
    def ids(self) -> list:
        return self._b.ids

    @property
    def pool_name(self) -> str:
        return self._pool

    def __len__(self) -> int:
        return len(self._b.ids)

    @property
    def released(self) -> bool:
        return self._b.released

    def release(self) -> None:
        """Gives the blocks back (once no transfer holds them). Idempotent."""
        self._b.release()

    def _alive(self) -> bool:
        return not self._b.released

    def __enter__(self) -> "BlockSet":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"BlockSet(pool={self._pool!r}, ids={self.ids!r})"


class PreparedList(_Tracked):
    """Blocks of one pool resolved once (kvferry::PreparedList, made by
    ``Agent.prepare``), named by index in many ``Agent.post_prepared`` calls.

    A local list keeps its pool's memory registered until it is released; a
    remote list keeps nothing of the peer (a post after the peer or its pool
    changed is refused). Release it with ``release()``, ``with`` or garbage
    collection; a list alive when its agent closes is a survivor.
    """

    __slots__ = ("_p",)
    _kind = "prepared_list"

    def __init__(self, native, site: tuple):
        self._p = native
        self._site = site

    def __len__(self) -> int:
        return self._p.size()

    @property
    def remote(self) -> bool:
        return self._p.remote()

    @property
    def peer(self) -> str:
        """The peer's name; "" for a local list."""
        return self._p.peer()

    @property
    def pool(self) -> str:
        return self._p.pool()

    @property
    def released(self) -> bool:
        return self._p.released()

    def release(self) -> None:
        """Drops the list (posts already made are unaffected). Idempotent."""
        self._p.release()

    def _alive(self) -> bool:
        return not self._p.released()

    def __enter__(self) -> "PreparedList":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __repr__(self) -> str:
        where = f"peer={self.peer!r}, " if self.remote else ""
        return f"PreparedList({where}pool={self.pool!r}, size={len(self)})"


class Transfer(_Tracked):
    """A posted READ or WRITE (kvferry::Transfer).

    Dropping it neither cancels the transfer nor frees memory under it. In
    asyncio code, ``await transfer`` waits without blocking the loop.
    """

    __slots__ = ("_t", "_agent")
    _kind = "transfer"

    def __init__(self, native, agent: "Agent", site: tuple):
        self._t = native
        self._agent = agent._ref
        self._site = site

    @property
    def id(self) -> int:
        return self._t.id

    @property
    def state(self) -> str:
        """"in_flight", "done", "failed" or "cancelled"."""
        return self._t.state()

    @property
    def done(self) -> bool:
        return self._t.state() != "in_flight"

    @property
    def error(self) -> Optional[Error]:
        """None while in flight or once done; else the exception saying why it failed."""
        return from_status(*self._t.status())

    def wait(self, timeout: Optional[float] = None) -> None:
        """Waits until it ended (the GIL is released meanwhile).

        Raises the transfer's error if it failed, DeadlineExceededError (a
        TimeoutError) if it is still in flight after ``timeout`` seconds.
        """
        try:
            self._t.wait(timeout)
        finally:
            drain_logs()

    @property
    def end_reason(self) -> EndReason:
        """Why it ended (EndReason.NONE while in flight and once done)."""
        return EndReason._of(self._t.reason())

    @property
    def telemetry(self) -> TransferTelemetry:
        """Bytes moved, post and end times, data path."""
        return TransferTelemetry(*self._t.telemetry())

    def cancel(self, grace: float = 5.0) -> Optional[Error]:
        """Stops it; returns when no byte of it can move. Returns the final
        error (CancelledError when this call ended it; None if it was done)."""
        try:
            return from_status(*self._t.cancel(grace))
        finally:
            drain_logs()

    def __await__(self):
        from . import aio

        return aio.wait_transfer(self).__await__()

    def _alive(self) -> bool:
        return True

    def __repr__(self) -> str:
        return f"Transfer(id={self.id}, state={self.state!r})"


class Offer(_Tracked):
    """Blocks lent to one peer for one READ or WRITE (kvferry::Offer).

    Pass ``ticket`` to the peer by any channel; it moves the blocks with
    ``Agent.read_offer`` / ``Agent.write_offer``. ``await offer`` waits for
    its end in asyncio code.
    """

    __slots__ = ("_o", "_agent")
    _kind = "offer"

    def __init__(self, native, agent: "Agent", site: tuple):
        self._o = native
        self._agent = weakref.ref(agent)
        self._site = site

    @property
    def id(self) -> int:
        return self._o.id

    @property
    def ticket(self) -> bytes:
        return self._o.ticket

    @property
    def peer(self) -> str:
        return self._o.peer

    @property
    def state(self) -> str:
        """"open", "consumed", "released", "peer-failed", "expired" or "revoked"."""
        return self._o.state()

    @property
    def error(self) -> Optional[Error]:
        return from_status(*self._o.status())

    def wait(self, timeout: Optional[float] = None) -> None:
        """Waits until it ended and its blocks went back; raises unless consumed."""
        try:
            self._o.wait(timeout)
        finally:
            drain_logs()

    @property
    def end_reason(self) -> EndReason:
        """Why it ended (EndReason.NONE while open, once consumed or released)."""
        return EndReason._of(self._o.reason())

    def revoke(self) -> Optional[Error]:
        """Ends an open offer after fencing the peer's transfers on it. Returns
        the final error (CancelledError naming the offer when this call ended it)."""
        try:
            return from_status(*self._o.revoke())
        finally:
            drain_logs()

    def __await__(self):
        from . import aio

        return aio.wait_offer(self).__await__()

    def _alive(self) -> bool:
        return self._o.state() == "open"

    def __repr__(self) -> str:
        return f"Offer(id={self.id}, peer={self.peer!r}, state={self.state!r})"


def _region_of(value: Any, index: int, expected_len: int, element_bytes: int, what: str):
    """(address, nbytes) of one region; raises InvalidArgumentError naming it."""
    name = f"regions[{index}] ({what})"
    try:
        import torch  # noqa: WPS433 (optional dependency)
    except ImportError:  # pragma: no cover
        torch = None
    if torch is not None and isinstance(value, torch.Tensor):
        if value.device.type != "cpu":
            raise InvalidArgumentError(
                f"{name}: tensor on device '{value.device}'; kvferry registers host memory only "
                "(Debian's UCX has no CUDA support)")
        if not value.is_contiguous():
            raise InvalidArgumentError(
                f"{name}: tensor of shape {tuple(value.shape)} is not contiguous "
                f"(strides {tuple(value.stride())})")
        if value.element_size() != element_bytes:
            raise InvalidArgumentError(
                f"{name}: dtype {value.dtype} has {value.element_size()}-byte elements; "
                f"the layout says element_bytes={element_bytes}")
        nbytes = value.numel() * value.element_size()
        addr = value.data_ptr()
    else:
        try:
            import numpy as np
        except ImportError:  # pragma: no cover
            np = None
        if np is None or not isinstance(value, np.ndarray):
            raise InvalidArgumentError(
                f"{name}: {type(value).__name__} is neither a torch CPU tensor nor a numpy array")
        if not value.flags.c_contiguous:
            raise InvalidArgumentError(
                f"{name}: array of shape {value.shape} is not C-contiguous (strides {value.strides})")
        if not value.flags.writeable:
            raise InvalidArgumentError(f"{name}: array is read-only; peers may write into it")
        if value.itemsize != element_bytes:
            raise InvalidArgumentError(
                f"{name}: dtype {value.dtype} has {value.itemsize}-byte elements; "
                f"the layout says element_bytes={element_bytes}")
        nbytes = value.nbytes
        addr = value.ctypes.data
    if nbytes != expected_len:
        raise InvalidArgumentError(
            f"{name}: {nbytes} bytes, but the layout puts {expected_len} bytes in it")
    return addr, nbytes


class Pool:
    """A pool of KV blocks registered with UCX (kvferry::KvPool)."""

    __slots__ = ("_p", "_agent", "__weakref__")

    def __init__(self, native, agent: "Agent"):
        self._p = native
        self._agent = agent

    @property
    def name(self) -> str:
        return self._p.name

    @property
    def layout(self) -> KvLayout:
        return KvLayout(**self._p.layout())

    @property
    def free_blocks(self) -> int:
        return self._p.free_blocks()

    @property
    def exported(self) -> bool:
        return self._p.exported()

    @property
    def backing(self) -> str:
        return self._p.backing()

    @property
    def memory_source(self) -> str:
        return self._p.memory_source()

    @property
    def size_bytes(self) -> int:
        return self._p.size_bytes()

    def in_flight(self, id: int) -> int:
        """How many transfers of this agent in flight name block ``id`` as a
        local block (posted by ids or on a BlockSet), until each is fenced.
        OutOfRange/InvalidArgumentError names an id past the pool."""
        return self._agent._call(self._p.in_flight, _block_id(id, "id"))

    @property
    def busy_blocks(self) -> int:
        """How many blocks ``in_flight`` counts above zero."""
        return self._p.busy_blocks()

    def lease(self, count: int) -> BlockSet:
        """Leases ``count`` free blocks, lowest ids first."""
        site = _site()
        try:
            b = BlockSet(self._p.lease(count, site), self, site)
        finally:
            drain_logs()
        self._agent._track(b)
        return b

    def lease_ids(self, ids: Iterable[int]) -> BlockSet:
        """Leases exactly these block ids (all or nothing)."""
        site = _site()
        ids = _ids(ids, "ids")
        try:
            b = BlockSet(self._p.lease_ids(ids, site), self, site)
        finally:
            drain_logs()
        self._agent._track(b)
        return b

    def numpy(self):
        """The pool's memory as a writable numpy uint8 array of shape
        ``[num_layers, num_planes, num_blocks, chunk_bytes]``, without a copy.

        Only for pools kvferry allocated (create_pool). The array keeps the
        pool mapped; Agent.close() and remove_pool refuse while one lives.
        """
        import numpy as np

        addr, length, guard = self._p._memory()
        l = self.layout
        flat = np.asarray(_MemoryHolder(addr, length, guard))
        return flat.reshape(l.num_layers, l.num_planes, l.num_blocks, l.chunk_bytes)

    def tensors(self, dtype=None, order: str = "HND") -> list:
        """The pool's memory as torch tensors without a copy: per layer, a list
        of planes (K, V) shaped like vLLM's per-layer cache,
        ``[num_blocks, num_kv_heads, tokens_per_block, head_dim]`` for "HND"
        or ``[num_blocks, tokens_per_block, num_kv_heads, head_dim]`` for "NHD".
        ``dtype`` (default: torch's float type of element_bytes) must have the
        layout's element size."""
        import torch

        l = self.layout
        if dtype is None:
            dtype = {1: torch.uint8, 2: torch.float16, 4: torch.float32, 8: torch.float64}[
                l.element_bytes]
        size = torch.empty((), dtype=dtype).element_size()
        if size != l.element_bytes:
            raise InvalidArgumentError(
                f"dtype {dtype} has {size}-byte elements; the layout says element_bytes="
                f"{l.element_bytes}")
        if order == "HND":
            shape = (l.num_blocks, l.num_kv_heads, l.tokens_per_block, l.head_dim)
        elif order == "NHD":
            shape = (l.num_blocks, l.tokens_per_block, l.num_kv_heads, l.head_dim)
        else:
            raise InvalidArgumentError(f"order {order!r} is not 'HND' or 'NHD'")
        raw = torch.from_numpy(self.numpy())
        return [[raw[layer, plane].view(dtype).view(shape) for plane in range(l.num_planes)]
                for layer in range(l.num_layers)]

    def __repr__(self) -> str:
        return f"Pool({self.name!r}, {self.layout})"


class _MemoryHolder:
    """Describes (address, length) to numpy, keeping the native guard (and so
    the pool's memory) alive while an array made from it lives."""

    __slots__ = ("_guard", "__array_interface__")

    def __init__(self, addr: int, length: int, guard):
        self._guard = guard
        self.__array_interface__ = {
            "shape": (length,), "typestr": "|u1", "data": (addr, False), "version": 3}


def _ids(ids: Iterable[int], what: str) -> list:
    if type(ids) is list or type(ids) is range:
        try:  # fast path: every element an int in [0, 2**32)
            return array.array("I", ids).tolist()
        except (TypeError, OverflowError, ValueError):
            pass  # the slow path names the offending element
    out = []
    for i, v in enumerate(ids):
        try:
            iv = int(v)
        except (TypeError, ValueError):
            raise InvalidArgumentError(f"{what}[{i}] {v!r} is not an integer") from None
        if iv < 0 or iv >= 1 << 32:
            raise InvalidArgumentError(f"{what}[{i}] {iv} is not a block id (0 <= id < 2**32)")
        out.append(iv)
    return out


def _block_id(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            import numpy as np
        except ImportError:  # pragma: no cover
            np = None
        if np is None or not isinstance(value, np.integer):
            raise InvalidArgumentError(f"{what} {value!r} is not an integer")
    v = int(value)
    if v < 0 or v >= 1 << 32:
        raise InvalidArgumentError(f"{what} {v} is not a block id (0 <= id < 2**32)")
    return v


def _id_buffer(ids: Any, what: str):
    """Block ids as a one-dimensional integer buffer the binding reads as a
    span: numpy integer arrays and array.array go through as they are (a
    contiguous uint32 array without a copy), torch CPU integer tensors as
    their numpy view, lists, tuples and ranges as one array.array("I")
    built in C. Anything else raises InvalidArgumentError naming it."""
    if ids is None:
        return None
    kind = type(ids)
    if kind is list or kind is tuple:  # the common case first
        try:  # every element an int in [0, 2**32), converted in C
            return array.array("I", ids)
        except (TypeError, OverflowError, ValueError):
            pass  # the slow path below names the offending element
    if isinstance(ids, array.array):
        return ids
    if isinstance(ids, (str, bytes, bytearray, memoryview)):
        raise InvalidArgumentError(f"{what} {ids!r} is not a sequence of block ids")
    mod = type(ids).__module__
    if mod == "torch":
        import torch

        if not isinstance(ids, torch.Tensor):
            raise InvalidArgumentError(f"{what}: {type(ids).__name__} is not a sequence of block ids")
        if ids.device.type != "cpu":
            raise InvalidArgumentError(
                f"{what}: tensor on device '{ids.device}'; block ids must be a CPU tensor")
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise InvalidArgumentError(f"{what}: tensor of dtype {ids.dtype} is not of integers")
        return ids.detach().numpy()
    if mod == "numpy":
        import numpy as np

        if isinstance(ids, np.ndarray):
            if ids.dtype.kind not in "iu":
                raise InvalidArgumentError(f"{what}: array of dtype {ids.dtype} is not of integers")
            return ids
    if type(ids) is range and ids.step > 0 and 0 <= ids.start and ids.stop <= 1 << 32:
        try:
            import numpy as np

            return np.arange(ids.start, ids.stop, ids.step, dtype=np.uint32)
        except ImportError:  # pragma: no cover
            pass
    if type(ids) in (list, tuple, range):
        try:  # fast path: every element an int in [0, 2**32), converted in C
            return array.array("I", ids)
        except (TypeError, OverflowError, ValueError):
            pass  # the slow path names the offending element
    try:
        it = iter(ids)
    except TypeError:
        raise InvalidArgumentError(
            f"{what}: {type(ids).__name__} {ids!r} is not a sequence of block ids") from None
    return array.array("I", (_block_id(v, f"{what}[{i}]") for i, v in enumerate(it)))


def _pool_name(pool: Any, what: str) -> str:
    if isinstance(pool, Pool):
        return pool.name
    if isinstance(pool, str):
        return pool
    raise InvalidArgumentError(f"{what} {pool!r} is neither a Pool nor a pool name")


def _bytes_of(value: Any, what: str) -> bytes:
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise InvalidArgumentError(f"{what}: {type(value).__name__} {value!r} is not bytes")


def _layer_bounds(layers: Optional[range]) -> tuple:
    """(begin, end) of a ``layers=`` argument: all layers for None, else a
    range with step 1 of layer indices."""
    if layers is None:
        return 0, 0xFFFFFFFF
    if not isinstance(layers, range) or layers.step != 1:
        raise InvalidArgumentError(f"layers {layers!r} is not a range with step 1")
    if layers.start < 0 or layers.stop < layers.start or layers.stop >= 1 << 32:
        raise InvalidArgumentError(f"layers {layers!r} is not a range of layer indices")
    return layers.start, layers.stop


def _count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value >= 1 << 64:
        raise InvalidArgumentError(f"{what} {value!r} is not a byte count (0 <= n < 2**64)")
    return value


_live_agents: "weakref.WeakSet[Agent]" = weakref.WeakSet()
_new_object = object.__new__
_weakref = weakref.ref


@atexit.register
def _close_all() -> None:
    for agent in list(_live_agents):
        try:
            agent.close()
        except Error:
            pass


class Agent:
    """A kvferry agent (kvferry::Agent): pools, peers and transfers.

    ``secret`` is the shared secret of the control handshake (both sides must
    know it; empty takes KVFERRY_SECRET). Use it as a context manager or call
    ``close()``: closing waits (without the GIL) until no transfer can touch
    memory, then reports handles still alive as survivors. Create it in the
    process that uses it: in a forked child every call raises
    FailedPreconditionError.
    """

    def __init__(self, name: str = "kvferry", *, secret: str = "", progress_thread: bool = True,
                 allow_insecure: bool = False, peer_timeout: Optional[float] = None,
                 handshake_timeout: Optional[float] = None,
                 pool_memory: Optional[str] = None, kernel_copy: Optional[bool] = None,
                 ucx_config: Optional[dict] = None, leak_policy: str = "log",
                 max_queued_completions: Optional[int] = None):
        options: dict = {
            "name": name,
            "secret": secret,
            "progress_thread": progress_thread,
            "allow_insecure": allow_insecure,
            "leak_policy": leak_policy,
        }
        for key, value in (("peer_timeout", peer_timeout), ("handshake_timeout", handshake_timeout),
                           ("pool_memory", pool_memory), ("kernel_copy", kernel_copy),
                           ("max_queued_completions", max_queued_completions)):
            if value is not None:
                options[key] = value
        if ucx_config:
            options["ucx_config"] = [(str(k), str(v)) for k, v in dict(ucx_config).items()]
        # Weak references to the handles made by this agent (each removes
        # itself from the set when its handle goes): set.add and the
        # reference's callback are single C calls, atomic under the GIL.
        self._handles: set = set()
        self._handles_add = self._handles.add
        self._handles_discard = self._handles.discard
        self._ref = weakref.ref(self)
        self._survivors: list = []
        self._dispatchers: dict = {}
        self._lock = threading.Lock()
        try:
            self._a = _kvferry.Agent(options, _site())
        finally:
            drain_logs()
        _live_agents.add(self)

    # --- lifetime -------------------------------------------------------
    @property
    def name(self) -> str:
        return self._a.name

    @property
    def closed(self) -> bool:
        return self._a.closed

    def close(self) -> None:
        """Closes peers, waits until no transfer can touch memory, releases
        everything. Idempotent. Handles still alive are logged as survivors
        (``survivors``) with the Python line that created them."""
        if self._a.closed:
            return
        for d in list(self._dispatchers.values()):
            d.close()
        self._dispatchers.clear()
        alive = [h for h in (r() for r in self._handles.copy()) if h is not None and h._alive()]
        try:
            self._a.close()
        finally:
            drain_logs()
        _live_agents.discard(self)
        self._survivors = [Survivor(h._kind, *h._site) for h in alive]
        if self._survivors:
            logger.warning("agent '%s' closed with %d survivor(s):\n%s", self.name,
                           len(self._survivors), "\n".join(f"  {s}" for s in self._survivors))

    @property
    def survivors(self) -> list:
        """Handles that were alive when this agent closed (list of Survivor)."""
        return list(self._survivors)

    def __enter__(self) -> "Agent":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _track(self, handle: _Tracked) -> None:
        self._handles_add(weakref.ref(handle, self._handles_discard))

    def _call(self, fn, *args):
        try:
            return fn(*args)
        finally:
            drain_logs()

    @property
    def incarnation(self) -> int:
        return self._a.incarnation()

    # --- pools ----------------------------------------------------------
    def create_pool(self, name: str, layout: KvLayout, *, exported: bool = True) -> Pool:
        """Allocates and registers a pool; its memory is reachable from Python
        without a copy through ``Pool.tensors()`` / ``Pool.numpy()``."""
        return Pool(self._call(self._a.create_pool, name, layout._dict(), exported, _site()), self)

    def register_pool(self, name: str, layout: KvLayout, regions: Sequence, *,
                      exported: bool = True) -> Pool:
        """Registers memory the engine owns (torch CPU tensors or numpy arrays).

        ``regions`` follows the layout: one object for the whole cache,
        ``num_layers`` (per layer, planes in order: vLLM's [2, num_blocks, ...]
        tensor), or ``num_layers * num_planes`` (index layer * num_planes +
        plane: separate K and V tensors per layer). Each must be contiguous,
        host memory, with the layout's element size and exactly the bytes the
        layout puts in it; else InvalidArgumentError names it and nothing
        stays registered. The agent keeps a reference to each object until
        the pool is removed or the agent closed, so dropping them never frees
        memory kvferry still registers.
        """
        if isinstance(regions, (str, bytes)) or not isinstance(regions, Sequence):
            regions = [regions]
        regions = list(regions)
        d = layout._dict()
        n = len(regions)
        planes = layout.num_planes
        if n == 1:
            expected, what = [layout.total_bytes], ["the whole layout"]
        elif n == layout.num_layers:
            expected = [layout.layer_bytes] * n
            what = [f"layer {i}" for i in range(n)]
        elif n == layout.num_layers * planes:
            expected = [layout.plane_bytes] * n
            what = [f"layer {i // planes} plane {'KV'[i % planes] if planes == 2 else i % planes}"
                    for i in range(n)]
        else:
            raise InvalidArgumentError(
                f"{n} regions for a layout of {layout.num_layers} layers and {planes} planes: "
                f"expected 1, {layout.num_layers} or {layout.num_layers * planes}")
        spans = [_region_of(r, i, expected[i], layout.element_bytes, what[i])
                 for i, r in enumerate(regions)]
        return Pool(self._call(self._a.register_pool, name, d, spans, list(regions), exported,
                               _site()), self)

    def pool(self, name: str) -> Pool:
        """The pool of that name; NotFoundError when none."""
        from .errors import NotFoundError

        p = self._call(self._a.find_pool, name)
        if p is None:
            raise NotFoundError(f"no pool named '{name}' in agent '{self.name}'")
        return Pool(p, self)

    def remove_pool(self, name: str, timeout: float = 10.0) -> None:
        """Removes a pool (see kvferry::Agent::RemovePool); drops the references
        to its registered tensors."""
        self._call(self._a.remove_pool, name, timeout)

    @property
    def exported_pools(self) -> list:
        return self._a.exported_pools()

    # --- peers ----------------------------------------------------------
    def listen(self, address: str = "127.0.0.1", port: int = 0) -> int:
        """Listens for peers; returns the port (0 picks a free one)."""
        return self._call(self._a.listen, address, port)

    def connect(self, address: str, port: int, timeout: float = 10.0) -> PeerInfo:
        """Connects to a listening agent and authenticates; returns the peer."""
        return PeerInfo._from(self._call(self._a.connect, address, port, timeout))

    def local_metadata(self, advertise_address: str = "") -> bytes:
        """What a peer needs to connect to this listening agent, as bytes for
        the engine's own side channel (name, incarnation, address, port,
        wire version; no secret). ``advertise_address`` (an IP literal)
        replaces the address given to listen(), and is required when that
        was a wildcard. FailedPreconditionError when not listening."""
        if not isinstance(advertise_address, str):
            raise InvalidArgumentError(
                f"advertise_address {advertise_address!r} is not a str")
        return self._call(self._a.local_metadata, advertise_address)

    def connect_from_metadata(self, metadata: bytes, timeout: float = 10.0) -> PeerInfo:
        """Connects (as connect(), same handshake and errors) to the agent
        whose local_metadata() these bytes are. Malformed metadata raises
        InvalidArgumentError saying what is wrong, and nothing connects."""
        if not isinstance(metadata, (bytes, bytearray, memoryview)):
            raise InvalidArgumentError(
                f"metadata: {type(metadata).__name__} {metadata!r:.60} is not bytes")
        return PeerInfo._from(self._call(self._a.connect_from_metadata, bytes(metadata),
                                         float(timeout)))

    def wait_for_peer(self, name: str, timeout: float = 10.0) -> PeerInfo:
        return PeerInfo._from(self._call(self._a.wait_for_peer, name, timeout))

    def peer(self, name: str) -> PeerInfo:
        return PeerInfo._from(self._call(self._a.get_peer, name))

    @property
    def peers(self) -> list:
        return [PeerInfo._from(d) for d in self._call(self._a.peers)]

    def disconnect(self, name: str) -> None:
        self._call(self._a.disconnect, name)

    def progress(self) -> int:
        """Drives the worker once (only needed with progress_thread=False)."""
        return self._call(self._a.progress)

    # --- transfers ------------------------------------------------------
    def post_transfer(self, op: str, peer: str, local: Optional[BlockSet] = None,
                      remote_blocks: Any = None, *, remote_ids: Any = None,
                      local_pool: Any = None, local_blocks: Any = None,
                      remote_pool: str = "", layers: Optional[range] = None,
                      slice_bytes: int = 0, local_slice_offset: int = 0,
                      remote_slice_offset: int = 0,
                      notification: bytes = b"", ticket: bytes = b"",
                      offer_blocks: Any = None) -> Transfer:
        """Posts a READ (``op="read"``: pull remote blocks into the local
        ones) or a WRITE (``op="write"``: push the local blocks into remote
        ones). Never waits on the network.

        The local side is either ``local`` (a BlockSet lease) or
        ``local_pool`` (a Pool or its name) with ``local_blocks`` (block ids
        the engine owns, no lease: fence them with ``fence_blocks`` before
        reusing them). ``remote_blocks`` (or its alias ``remote_ids``) pair in
        order with the local blocks. Id lists may be lists, ranges, numpy
        integer arrays or torch CPU integer tensors; a contiguous numpy
        uint32 array is read in place.

        ``layers`` (a range with step 1) limits the layers moved.
        ``slice_bytes`` (default 0: whole chunks) moves a head slice of each
        chunk: that many bytes from ``local_slice_offset`` in each local
        chunk with as many from ``remote_slice_offset`` in each remote one
        (heterogeneous tensor parallelism; see docs/python.md).
        ``notification`` reaches the peer after the data. ``ticket`` moves
        an offer's blocks instead of naming them, and ``offer_blocks``
        (indices into the offer's blocks) takes only some of them."""
        site = _site()
        if op not in ("read", "write"):
            raise InvalidArgumentError(f"op {op!r} is not 'read' or 'write'")
        if not isinstance(peer, str):
            raise InvalidArgumentError(f"peer {peer!r} is not a str")
        if local is not None and not isinstance(local, BlockSet):
            raise InvalidArgumentError(f"local {local!r} is not a BlockSet")
        if remote_blocks is not None and remote_ids is not None:
            raise InvalidArgumentError("remote_blocks and remote_ids name the same thing; pass one")
        if remote_ids is None:
            remote_ids = remote_blocks
        if local_blocks is not None and local_pool is None:
            raise InvalidArgumentError("local_blocks without local_pool: name the pool they are in")
        if local_pool is not None and local_blocks is None:
            raise InvalidArgumentError(
                f"local_pool {_pool_name(local_pool, 'local_pool')!r} without local_blocks")
        if local is None and local_pool is None:
            raise InvalidArgumentError("no local blocks: pass local (a BlockSet) or "
                                       "local_pool and local_blocks")
        begin, end = (0, 0xFFFFFFFF) if layers is None else _layer_bounds(layers)
        if remote_pool.__class__ is not str and not isinstance(remote_pool, str):
            raise InvalidArgumentError(f"remote_pool {remote_pool!r} is not a str")
        # The common values (None ids, the default counts 0 and bytes b"")
        # pass as they are; anything else is checked and converted, in the
        # order the fields are listed.
        try:
            native = self._a.post_fields(
                op, peer,
                local._b if local is not None else None,
                "" if local_pool is None else _pool_name(local_pool, "local_pool"),
                None if local_blocks is None else _id_buffer(local_blocks, "local_blocks"),
                remote_pool,
                None if remote_ids is None else _id_buffer(remote_ids, "remote_blocks"),
                begin, end,
                slice_bytes if slice_bytes.__class__ is int and slice_bytes == 0
                else _count(slice_bytes, "slice_bytes"),
                local_slice_offset if local_slice_offset.__class__ is int and local_slice_offset == 0
                else _count(local_slice_offset, "local_slice_offset"),
                remote_slice_offset
                if remote_slice_offset.__class__ is int and remote_slice_offset == 0
                else _count(remote_slice_offset, "remote_slice_offset"),
                notification if notification.__class__ is bytes
                else _bytes_of(notification, "notification"),
                ticket if ticket.__class__ is bytes else _bytes_of(ticket, "ticket"),
                None if offer_blocks is None else _id_buffer(offer_blocks, "offer_blocks"),
                site)
        finally:
            if _kvferry._logs_pending():
                drain_logs()
        return self._adopt_transfer(native, site)

    def _adopt_transfer(self, native, site) -> "Transfer":
        """A Transfer over a native post's handle, tracked for close(); does
        Transfer.__init__'s work without its call (the post's hot path)."""
        t = _new_object(Transfer)
        t._t = native
        t._agent = self._ref
        t._site = site
        self._handles_add(_weakref(t, self._handles_discard))
        return t

    def prepare(self, pool: Any, blocks: Any, *, peer: str = "", slice_offset: int = 0,
                slice_bytes: int = 0) -> PreparedList:
        """Resolves ``blocks`` (ids, one descriptor each, in order; repeats
        allowed) of ``pool`` once: a pool of this agent (a Pool or its name)
        when ``peer`` is empty, else the connected peer's exported pool of
        that name. ``slice_bytes`` (default 0: whole chunks) makes each
        descriptor that many bytes from ``slice_offset`` in each chunk of
        its block (whole heads). Id lists are taken as by ``post_transfer``."""
        site = _site()
        if not isinstance(peer, str):
            raise InvalidArgumentError(f"peer {peer!r} is not a str")
        if peer and not isinstance(pool, str):
            raise InvalidArgumentError(f"pool {pool!r} of peer {peer!r} is not a pool name")
        name = pool if peer else _pool_name(pool, "pool")
        if blocks is None:
            raise InvalidArgumentError("blocks is None: pass the block ids to prepare")
        p = PreparedList(self._call(self._a.prepare, peer, name, _id_buffer(blocks, "blocks"),
                                    _count(slice_offset, "slice_offset"),
                                    _count(slice_bytes, "slice_bytes"), site), site)
        self._track(p)
        return p

    def post_prepared(self, op: str, local: PreparedList, local_indices: Any,
                      remote: PreparedList, remote_indices: Any, *,
                      layers: Optional[range] = None, notification: bytes = b"") -> Transfer:
        """Posts a READ or WRITE between a local and a remote PreparedList:
        the i-th descriptor named by ``local_indices`` pairs with the i-th
        named by ``remote_indices`` (indices into the lists; reordered and
        repeated as you like). Otherwise as ``post_transfer``: never waits on
        the network, fenced and counted per block the same way."""
        site = _site()
        if op not in ("read", "write"):
            raise InvalidArgumentError(f"op {op!r} is not 'read' or 'write'")
        for what, lst in (("local", local), ("remote", remote)):
            if not isinstance(lst, PreparedList):
                raise InvalidArgumentError(f"{what} {lst!r} is not a PreparedList")
        begin, end = _layer_bounds(layers)
        if local_indices is None or remote_indices is None:
            raise InvalidArgumentError("local_indices and remote_indices are both required")
        t = Transfer(self._call(self._a.post_prepared, op, local._p,
                                _id_buffer(local_indices, "local_indices"), remote._p,
                                _id_buffer(remote_indices, "remote_indices"),
                                _bytes_of(notification, "notification"), begin, end, site),
                     self, site)
        self._track(t)
        return t

    def _post_plain(self, op: str, peer: str, local: BlockSet, remote_ids: Any) -> Transfer:
        """post_transfer(op, peer, local, remote_ids) with every other
        argument at its default, for callers that checked op ("read" or
        "write"), peer (a str) and local (a BlockSet): the same native call,
        without the checks that cannot fail."""
        site = _site()
        try:
            native = self._a.post_fields(
                op, peer, local._b, "", None, "",
                remote_ids if remote_ids is None or remote_ids.__class__ is list
                else _id_buffer(remote_ids, "remote_blocks"),  # a list: converted natively
                0, 0xFFFFFFFF, 0, 0, 0, b"", b"", None, site)
        finally:
            if _kvferry._logs_pending():
                drain_logs()
        return self._adopt_transfer(native, site)

    def read(self, peer: str, local: Optional[BlockSet] = None, remote_blocks: Any = None,
             **kw) -> Transfer:
        """Pulls the peer's ``remote_blocks`` into the local blocks (see post_transfer)."""
        if kw or local.__class__ is not BlockSet or peer.__class__ is not str:
            return self.post_transfer("read", peer, local, remote_blocks, **kw)
        return self._post_plain("read", peer, local, remote_blocks)

    def write(self, peer: str, local: Optional[BlockSet] = None, remote_blocks: Any = None,
              **kw) -> Transfer:
        """Pushes the local blocks into the peer's ``remote_blocks`` (see post_transfer)."""
        if kw or local.__class__ is not BlockSet or peer.__class__ is not str:
            return self.post_transfer("write", peer, local, remote_blocks, **kw)
        return self._post_plain("write", peer, local, remote_blocks)

    def read_offer(self, ticket: bytes, local: Optional[BlockSet] = None, *, peer: str = "",
                   **kw) -> Transfer:
        """Pulls the blocks a peer offered (its Offer.ticket) into the local
        blocks; ``offer_blocks=`` (indices into the offer) takes a subset."""
        return self.post_transfer("read", peer, local, None, ticket=ticket, **kw)

    def write_offer(self, ticket: bytes, local: Optional[BlockSet] = None, *, peer: str = "",
                    **kw) -> Transfer:
        """Pushes the local blocks into the blocks a peer offered (its
        Offer.ticket); ``offer_blocks=`` (indices into the offer) takes a subset."""
        return self.post_transfer("write", peer, local, None, ticket=ticket, **kw)

    def offer(self, blocks: BlockSet, peer: str, ttl: float = 60.0) -> Offer:
        """Lends ``blocks`` to ``peer`` for one move; pass ``.ticket`` to it.
        ``peer`` need not be connected yet: the offer binds to the next
        connection of an agent of that name (the ttl covers the wait)."""
        site = _site()
        if not isinstance(blocks, BlockSet):
            raise InvalidArgumentError(f"blocks {blocks!r} is not a BlockSet")
        o = Offer(self._call(self._a.offer, blocks._b, peer, float(ttl), site), self, site)
        self._track(o)
        return o

    def release_offer(self, ticket: bytes) -> None:
        """Declines a peer's offer (the taking side) this agent will not move
        anything (more) on, so the offering agent gets its blocks back now
        rather than at the ttl. Later posts on the ticket are refused; the
        peer fences this agent's transfers still on it, then ends it
        "released". Does not wait for that. No error when the offer had
        ended or was released already."""
        if not isinstance(ticket, (bytes, bytearray, memoryview)):
            raise InvalidArgumentError(f"ticket: {type(ticket).__name__} {ticket!r:.60} is not bytes")
        self._call(self._a.release_offer, bytes(ticket))

    def fence_blocks(self, pool: Any, ids: Any, timeout: float = 10.0) -> None:
        """Waits (without the GIL) until no transfer of this agent names any
        of ``ids`` of ``pool`` (a Pool or its name) as a local block; then
        the engine may free and rewrite them. Does not stop transfers.
        DeadlineExceededError (a TimeoutError) says how many are still named
        after ``timeout``; OutOfRangeError names an id past the pool."""
        self._call(self._a.fence_blocks, _pool_name(pool, "pool"), _id_buffer(ids, "ids"),
                   float(timeout))

    def send_notification(self, peer: str, payload: bytes) -> None:
        """Sends ``payload`` (1 byte to 64 KiB) to connected ``peer`` without a
        transfer; it arrives as a Notification after the notification of
        every transfer to ``peer`` posted before this call, and after earlier
        send_notification payloads. Never blocks."""
        if not isinstance(peer, str):
            raise InvalidArgumentError(f"peer {peer!r} is not a str")
        self._call(self._a.send_notification, peer, _bytes_of(payload, "payload"))

    # --- notifications and completions ------------------------------------
    def poll_notifications(self) -> list:
        try:
            raw = self._a.poll_notifications()
        finally:
            drain_logs()
        return [Notification(p, b) for p, b in raw] if raw else []

    def wait_for_notifications(self, timeout: float) -> list:
        return [Notification(p, b)
                for p, b in self._call(self._a.wait_for_notifications, timeout)]

    @property
    def completion_fd(self) -> int:
        """Readable while poll_completions has something; never read or close it.
        The asyncio helpers (kvferry.aio) own it while one is installed."""
        return self._a.completion_fd()

    def poll_completions(self) -> Completions:
        ts, os_, ns, dropped = self._call(self._a.poll_completions)
        return Completions(
            [Completion(i, s, from_status(*st), EndReason._of(r)) for i, s, st, r in ts],
            [Completion(i, s, from_status(*st), EndReason._of(r)) for i, s, st, r in os_],
            [Notification(p, b) for p, b in ns], dropped)

    # --- telemetry --------------------------------------------------------
    def stats(self) -> dict:
        """Live counters: {"live": {kind: n}, "registered_bytes": n, "queues": {...}}."""
        return self._call(self._a.stats)

    def ledger_report(self) -> str:
        """The C++ ledger: live counters and (with KVFERRY_LEDGER) one line per object."""
        return self._call(self._a.ledger_report)

    def ledger_objects(self) -> list:
        """Live objects as the C++ ledger records them (kind, file, line,
        function); empty unless the library was built with KVFERRY_LEDGER
        (kvferry.ledger_sites_enabled())."""
        return [Survivor(*o) for o in self._call(self._a.ledger_survivors)]

    def memory_report(self, format: str = "text"):
        """The process's memory as this agent explains it: text, "json" (a
        dict), or "prometheus" text."""
        out = self._call(self._a.memory_report, format)
        if format == "json":
            import json

            return json.loads(out)
        return out

    def __repr__(self) -> str:
        return f"Agent({self._a.name!r}{', closed' if self._a.closed else ''})"
