"""asyncio support: awaitable transfers and offers on the agent's completion fd.

One reader per agent and event loop (``loop.add_reader`` on
``Agent.completion_fd``) takes ``poll_completions`` batches and resolves the
futures of the transfers and offers awaited, by id. Awaiting never blocks the
loop. A task cancelled while it awaits a transfer cancels the transfer (the
cancel returns once no byte of it can move, usually at once). While a
dispatcher is installed it owns the agent's completions: do not call
``Agent.poll_completions`` yourself; notifications it takes are queued for
``Dispatcher.notifications()``.
"""

from __future__ import annotations

import asyncio
from typing import Optional

from ._agent import Agent, Notification, Offer, Transfer, drain_logs
from .errors import from_status


class Dispatcher:
    """Routes one agent's completions to futures on one event loop."""

    def __init__(self, agent: Agent, loop: asyncio.AbstractEventLoop):
        self._agent = agent
        self._loop = loop
        self._fd = agent.completion_fd
        self._transfers: dict = {}
        self._offers: dict = {}
        self._notifications: list = []
        self._notified: Optional[asyncio.Future] = None
        self._closed = False
        loop.add_reader(self._fd, self._on_readable)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._loop.remove_reader(self._fd)
        except (RuntimeError, ValueError):  # the loop is closed already
            pass

    def _on_readable(self) -> None:
        c = self._agent._a.poll_completions()
        ts, os_, ns, _dropped = c
        for tid, _state, st, _reason in ts:
            fut = self._transfers.pop(tid, None)
            if fut is not None and not fut.done():
                _resolve(fut, st)
        for oid, _state, st, _reason in os_:
            fut = self._offers.pop(oid, None)
            if fut is not None and not fut.done():
                _resolve(fut, st)
        if ns:
            self._notifications.extend(Notification(p, b) for p, b in ns)
            if self._notified is not None and not self._notified.done():
                self._notified.set_result(None)
        drain_logs()

    def _future(self, table: dict, key: int) -> asyncio.Future:
        fut = table.get(key)
        if fut is None or fut.done():
            fut = self._loop.create_future()
            table[key] = fut
        return fut

    async def notifications(self) -> list:
        """Waits until at least one notification arrived; returns and clears them."""
        while not self._notifications:
            self._notified = self._loop.create_future()
            await self._notified
        out, self._notifications = self._notifications, []
        return out


def _resolve(fut: asyncio.Future, status) -> None:
    err = from_status(*status)
    if err is None:
        fut.set_result(None)
    else:
        fut.set_exception(err)


def dispatcher(agent: Agent, loop: Optional[asyncio.AbstractEventLoop] = None) -> Dispatcher:
    """The agent's dispatcher on ``loop`` (default: the running loop), made on first use."""
    loop = loop or asyncio.get_running_loop()
    for old in [l for l in agent._dispatchers if l.is_closed()]:
        del agent._dispatchers[old]  # asyncio.run's earlier loops
    d = agent._dispatchers.get(loop)
    if d is None or d._closed:
        d = Dispatcher(agent, loop)
        agent._dispatchers[loop] = d
    return d


async def _wait(handle, table: str, pending: str, cancel) -> None:
    """Awaits ``handle`` (a Transfer or Offer) through the completion fd; ``table`` is the
    dispatcher's map of futures for its kind, ``pending`` the state it has until it ends, and
    ``cancel`` what a cancelled await does to it (None: nothing)."""
    agent = handle._agent()
    if agent is None or agent.closed:
        handle.wait()
        return
    d = dispatcher(agent)
    futures = getattr(d, table)
    fut = d._future(futures, handle.id)
    # Ended before the future existed: its completion may have been taken.
    if handle.state != pending:
        futures.pop(handle.id, None)
        err = handle.error
        if err is not None:
            raise err
        return
    try:
        await asyncio.shield(fut)
    except asyncio.CancelledError:
        futures.pop(handle.id, None)
        if cancel is not None and not fut.done():
            cancel(handle)
        raise


async def wait_transfer(transfer: Transfer) -> None:
    """Awaits the transfer; cancelling the awaiting task cancels the transfer."""
    await _wait(transfer, "_transfers", "in_flight", lambda t: t.cancel())


async def wait_offer(offer: Offer) -> None:
    """Awaits the offer's end; cancelling the awaiting task leaves the offer open."""
    await _wait(offer, "_offers", "open", None)
