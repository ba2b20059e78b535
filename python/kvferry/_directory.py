"""kvferry.Directory: agents find each other by name through etcd (kvferry::Directory)."""

from __future__ import annotations

import atexit
import dataclasses
import math
import weakref
from typing import Iterable, Optional, Union

from . import _kvferry
from ._agent import Agent, KvLayout, PeerInfo, drain_logs, logger
from .errors import Error, InvalidArgumentError, from_status


@dataclasses.dataclass(frozen=True)
class AgentRecord:
    """One agent's directory entry: where its control listener is, who it is
    (incarnation), its role, and the pools it exports with their layouts.
    ``create_revision`` and ``mod_revision`` are etcd's revisions of the key."""

    name: str
    address: str
    port: int
    incarnation: int
    role: str
    pools: dict  # pool name -> KvLayout
    create_revision: int
    mod_revision: int

    @staticmethod
    def _from(d: dict) -> "AgentRecord":
        d = dict(d)
        d["pools"] = {name: KvLayout(**layout) for name, layout in d["pools"]}
        return AgentRecord(**d)


@dataclasses.dataclass(frozen=True)
class DirectoryEvent:
    """A change a watch saw. ``type`` is "joined" (a name appeared, or came
    back with a new incarnation), "updated" (same incarnation, new value) or
    "left" (deleted, or its lease expired; ``record`` is the last one known)."""

    type: str
    name: str
    record: AgentRecord
    revision: int


def _seconds(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value <= 0:
        raise InvalidArgumentError(f"{name} {value!r} is not a positive number of seconds")
    return float(value)


def _text(name: str, value) -> str:
    if not isinstance(value, str):
        raise InvalidArgumentError(f"{name} {value!r} is not a str")
    return value


_live_directories: "weakref.WeakSet[Directory]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    # Registered after the agents' hook, so it runs first: entries go before their agents.
    for directory in list(_live_directories):
        try:
            directory.close()
        except Error:
            pass


def _agent(agent) -> Agent:
    if not isinstance(agent, Agent):
        raise InvalidArgumentError(f"agent {agent!r} is not a kvferry.Agent")
    return agent


class Directory:
    """Cluster membership in etcd: publish agents under their names, resolve
    a name to an address, connect by name, watch who joins and leaves.

    ``endpoints`` are etcd client URLs ("http://host:port" or "host:port"),
    a list or one string (commas separate several); None takes
    KVFERRY_ETCD_ENDPOINTS. Every agent published here lives under
    ``/kvferry/<cluster>/agents/<name>`` on a lease of ``lease_ttl``
    seconds that a background thread renews: when the process dies its
    entries vanish within the TTL; ``close()`` (or ``with``) deletes them at
    once. Creating it does not contact etcd; calls that do raise
    UnavailableError naming the endpoints when none answers (after trying
    for ``retry_deadline`` seconds). Calls release the GIL. Thread-safe.
    Create it in the process that uses it (as an Agent).
    """

    def __init__(self, endpoints: Union[None, str, Iterable[str]] = None, *,
                 cluster: str = "default", lease_ttl: float = 10.0, username: str = "",
                 password: str = "", connect_timeout: float = 1.0, request_timeout: float = 3.0,
                 retry_deadline: float = 6.0):
        options: dict = {
            "cluster": _text("cluster", cluster),
            "username": _text("username", username),
            "password": password,
            "lease_ttl": _seconds("lease_ttl", lease_ttl),
            "connect_timeout": _seconds("connect_timeout", connect_timeout),
            "request_timeout": _seconds("request_timeout", request_timeout),
            "retry_deadline": _seconds("retry_deadline", retry_deadline),
        }
        if not isinstance(password, str):  # its value stays out of the message
            raise InvalidArgumentError(f"password of type {type(password).__name__} is not a str")
        if endpoints is not None:
            if isinstance(endpoints, str):
                endpoints = [e.strip() for e in endpoints.split(",") if e.strip()]
            else:
                endpoints = list(endpoints)
            for e in endpoints:
                _text("etcd endpoint", e)
            if not endpoints:
                raise InvalidArgumentError(
                    "endpoints is empty: name an etcd endpoint, or pass None to use "
                    "KVFERRY_ETCD_ENDPOINTS")
            options["endpoints"] = endpoints
        try:
            self._d = _kvferry.Directory(options)
        finally:
            drain_logs()
        _live_directories.add(self)

    # --- lifetime -------------------------------------------------------
    @property
    def cluster(self) -> str:
        return self._d.cluster

    @property
    def endpoints(self) -> list:
        return list(self._d.endpoints)

    @property
    def closed(self) -> bool:
        return self._d.closed

    def close(self) -> None:
        """Stops the watch and deletes every entry this directory published
        (revokes its lease; best effort, bounded by ``request_timeout``).
        Waits for calls under way. Idempotent. Directories still open at
        interpreter exit are closed then."""
        try:
            self._d.close()
        finally:
            drain_logs()
        _live_directories.discard(self)

    def __enter__(self) -> "Directory":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, fn, *args):
        try:
            return fn(*args)
        finally:
            drain_logs()

    # --- entries --------------------------------------------------------
    def key_of(self, name: str) -> str:
        """The etcd key of agent ``name``: /kvferry/<cluster>/agents/<name>."""
        return self._d.key_of(_text("name", name))

    def publish(self, agent: Agent, address: str, port: int, role: str = "") -> None:
        """Publishes ``agent`` as reachable at ``address`` (an IP literal peers
        can reach, not 0.0.0.0) and ``port`` (what ``agent.listen`` returned),
        with its exported pools. AlreadyExistsError when another live entry
        holds the name; publishing again from this directory updates it."""
        a = _agent(agent)
        if isinstance(port, bool) or not isinstance(port, int):
            raise InvalidArgumentError(f"publish '{a.name}': port {port!r} is not an int")
        self._call(self._d.publish, a._a, _text("address", address), port, _text("role", role))

    def unpublish(self, name: str) -> None:
        """Deletes the entry now. NotFoundError if this directory did not publish it."""
        self._call(self._d.unpublish, _text("name", name))

    def publications(self) -> dict:
        """Names this directory publishes -> None while the entry is in etcd
        under a live lease, else the error that keeps it out."""
        return {name: from_status(*status) for name, status in self._call(self._d.publications)}

    def resolve(self, name: str) -> AgentRecord:
        """The entry of agent ``name``; NotFoundError when there is none."""
        return AgentRecord._from(self._call(self._d.resolve, _text("name", name)))

    def list(self) -> list:
        """Every valid entry of the cluster (invalid ones are skipped and logged)."""
        return [AgentRecord._from(d) for d in self._call(self._d.list)]

    def connect(self, agent: Agent, name: str, timeout: float = 10.0) -> PeerInfo:
        """Resolves ``name`` and connects ``agent`` to it. The peer must
        authenticate as ``name``: one that answers under another name is
        refused (PermissionDeniedError) and disconnected."""
        a = _agent(agent)
        return PeerInfo._from(self._call(self._d.connect, a._a, _text("name", name),
                                         _seconds("timeout", timeout)))

    # --- watching -------------------------------------------------------
    def watch(self, start_revision: int = 0) -> None:
        """Starts watching the cluster's agents. From 0, every current entry
        is first reported as "joined", then changes follow; from a revision
        (``watch_revision + 1`` of an earlier watch), changes from there.
        Events queue up for ``poll_events`` / ``wait_events``.
        FailedPreconditionError if already watching."""
        if isinstance(start_revision, bool) or not isinstance(start_revision, int):
            raise InvalidArgumentError(f"start_revision {start_revision!r} is not an int")
        self._call(self._d.watch, start_revision)

    def unwatch(self) -> None:
        self._call(self._d.unwatch)

    def _events(self, timeout) -> list:
        events, dropped = self._call(self._d.wait_events, timeout)
        if dropped:
            logger.warning("directory of cluster '%s': %d watch events were dropped (queue full)",
                           self.cluster, dropped)
        return [DirectoryEvent(t, n, AgentRecord._from(r), rev) for t, n, r, rev in events]

    def poll_events(self) -> list:
        """The watch events queued so far (list of DirectoryEvent); never waits."""
        return self._events(0.0)

    def wait_events(self, timeout: Optional[float] = None) -> list:
        """Waits up to ``timeout`` seconds (None: no limit) for a watch event,
        then returns every queued one; [] on timeout or once closed."""
        if timeout is not None:
            if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
                    or math.isnan(timeout) or timeout < 0:
                raise InvalidArgumentError(f"timeout {timeout!r} is not a number of seconds >= 0")
            timeout = float(timeout)
        return self._events(timeout)

    @property
    def watch_revision(self) -> int:
        """The etcd revision up to which the watch reported everything (0 before its first answer)."""
        return self._call(self._d.watch_revision)

    def watched_agents(self) -> dict:
        """The membership as the watch sees it: name -> AgentRecord."""
        return {r.name: r for r in (AgentRecord._from(d) for d in self._call(self._d.watched_agents))}

    def __repr__(self) -> str:
        return f"Directory({self.cluster!r}{', closed' if self.closed else ''})"
