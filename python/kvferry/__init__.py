"""kvferry for Python: move paged KV-cache blocks between serving processes.

    import kvferry
    with kvferry.Agent("decode", secret=s) as agent:
        pool = agent.register_pool("kv", layout, kv_tensors)
        agent.connect("10.0.0.1", port)
        agent.read("prefill", pool.lease_ids(ids), remote_ids).wait()

kvferry.Directory finds agents by name through etcd (publish, resolve,
connect, watch). See docs/python.md. kvferry.nixl offers NIXL's nixl_agent
API on top of this package (import it as ``from kvferry import nixl``).
"""

from . import _kvferry
from .errors import (
    AbortedError,
    AlreadyExistsError,
    CancelledError,
    DataLossError,
    DeadlineExceededError,
    Error,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    OutOfRangeError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from ._agent import (
    Agent,
    BlockSet,
    PreparedList,
    Completion,
    Completions,
    EndReason,
    KvLayout,
    Notification,
    Offer,
    PeerInfo,
    Pool,
    Survivor,
    Transfer,
    TransferTelemetry,
    drain_logs,
)
from ._directory import AgentRecord, Directory, DirectoryEvent
from . import aio


def ledger_sites_enabled() -> bool:
    """Whether the C++ library records creation sites (built with KVFERRY_LEDGER)."""
    return _kvferry.ledger_sites_enabled()


__all__ = [
    "AbortedError", "AlreadyExistsError", "CancelledError", "DataLossError",
    "DeadlineExceededError", "Error", "FailedPreconditionError", "InternalError",
    "InvalidArgumentError", "NotFoundError", "OutOfRangeError", "PermissionDeniedError",
    "ResourceExhaustedError", "UnauthenticatedError", "UnavailableError",
    "Agent", "BlockSet", "PreparedList", "Completion", "Completions", "EndReason", "KvLayout", "Notification", "Offer",
    "PeerInfo", "Pool", "Survivor", "Transfer", "TransferTelemetry", "aio", "drain_logs", "ledger_sites_enabled",
    "AgentRecord", "Directory", "DirectoryEvent",
]
