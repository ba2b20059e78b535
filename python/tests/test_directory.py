"""kvferry.Directory against a real etcd member (started here on free loopback
ports, as tests/etcd_process.h does for the C++ suite): agents in two
processes find each other by name and move bytes, entries go when their
owner closes or dies, watches see registrations, bad input is refused."""

import itertools
import multiprocessing
import os
import threading
import time

import pytest

import directory_peers
import kvferry
import kvpeers

DEADLINE = 90.0  # seconds, for conditions that wait on etcd or another process
_clusters = itertools.count()


@pytest.fixture(scope="module")
def etcd():
    binary = directory_peers.etcd_binary()
    if binary is None:
        pytest.skip("etcd is not installed (Debian's etcd-server; KVFERRY_ETCD_BINARY)")
    member = directory_peers.Etcd(binary)
    yield member
    member.stop()


@pytest.fixture
def cluster():
    """A cluster name of its own per test: tests share one etcd member."""
    return f"pytest-{os.getpid()}-{next(_clusters)}"


def wait_until(condition, what, timeout=DEADLINE):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout} s")
        time.sleep(0.05)


def absent(directory, name):
    try:
        directory.resolve(name)
        return False
    except kvferry.NotFoundError:
        return True


def wait_event(directory, type_, name, timeout=DEADLINE):
    """The first watch event of `type_` for `name`, waiting up to `timeout`."""
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        for e in directory.wait_events(timeout=max(0.0, deadline - time.monotonic())):
            if e.type == type_ and e.name == name:
                return e
            seen.append((e.type, e.name))
    pytest.fail(f"no '{type_}' event for {name!r} within {timeout} s; saw {seen}")


def start_prefill(etcd, cluster, lease_ttl):
    ctx = multiprocessing.get_context("spawn")
    result_q, cmd_q = ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=directory_peers.prefill_main,
                        args=(etcd.endpoint, cluster, lease_ttl, result_q, cmd_q))
    child.start()
    return child, result_q, cmd_q


def expect(result_q, tag):
    msg = result_q.get(timeout=180)
    assert msg[0] == tag, msg
    return msg


def stop(child):
    if child.is_alive():
        child.kill()
    child.join(60)


def test_two_processes_find_each_other_by_name_and_move_bytes(etcd, cluster):
    # The child's lease outlives the test (600 s): its entry can only vanish
    # within the deadline below because close() deleted it.
    child, result_q, cmd_q = start_prefill(etcd, cluster, lease_ttl=600)
    try:
        kv = kvpeers.kv_tensors(seed=2)
        remote = kvpeers.kv_tensors(seed=1)  # what dir-prefill holds
        with kvferry.Agent("dir-decode", secret=kvpeers.SECRET) as agent, \
                kvferry.Directory(etcd.endpoint, cluster=cluster) as directory:
            pool = agent.register_pool("kv", kvpeers.layout(), kv)
            directory.watch()
            _, port, incarnation = expect(result_q, "published")

            joined = wait_event(directory, "joined", "dir-prefill")
            assert joined.record.port == port and joined.record.incarnation == incarnation
            record = directory.resolve("dir-prefill")
            assert (record.address, record.port, record.role) == ("127.0.0.1", port, "prefill")
            assert record.incarnation == incarnation
            assert record.pools == {"kv": kvpeers.layout()}
            assert [r.name for r in directory.list()] == ["dir-prefill"]
            assert directory.key_of("dir-prefill") == f"/kvferry/{cluster}/agents/dir-prefill"

            peer = directory.connect(agent, "dir-prefill", timeout=60)
            assert peer.name == "dir-prefill" and peer.pools == ["kv"]
            assert peer.incarnation == incarnation
            local_ids, remote_ids = [0, 2, 3], [1, 4, 6]
            with pool.lease_ids(local_ids) as blocks:
                t = agent.read("dir-prefill", blocks, remote_ids)
                t.wait(60)
                assert t.state == "done" and t.error is None
                del t
            for i in range(2 * kvpeers.LAYERS):
                for lb, rb in zip(local_ids, remote_ids):
                    assert kvpeers.same_block(kv, i, lb, remote, i, rb), (i, lb, rb)

            # The owner closes its directory (its process lives on): the entry goes.
            cmd_q.put("close")
            expect(result_q, "closed")
            wait_until(lambda: absent(directory, "dir-prefill"),
                       "dir-prefill's entry after its directory closed")
            left = wait_event(directory, "left", "dir-prefill")
            assert left.record.incarnation == incarnation
            assert directory.list() == []
            assert "dir-prefill" not in directory.watched_agents()
            cmd_q.put("exit")
            child.join(120)
            assert child.exitcode == 0
        assert directory.closed and agent.closed
    finally:
        stop(child)


def test_entry_of_a_killed_process_expires_with_its_lease(etcd, cluster):
    child, result_q, cmd_q = start_prefill(etcd, cluster, lease_ttl=2)
    try:
        with kvferry.Agent("dir-decode", secret=kvpeers.SECRET) as agent, \
                kvferry.Directory(etcd.endpoint, cluster=cluster) as directory:
            _, port, _ = expect(result_q, "published")
            assert directory.resolve("dir-prefill").port == port
            directory.connect(agent, "dir-prefill", timeout=60)
            child.kill()  # no close(): only the lease's expiry removes the entry
            child.join(60)
            wait_until(lambda: absent(directory, "dir-prefill"),
                       "dir-prefill's entry after its process was killed")
    finally:
        stop(child)


def test_entry_goes_when_its_process_exits_without_close(etcd, cluster):
    # A 600 s lease: only the exit (the package's exit hook, or the object's
    # destruction as the interpreter ends) can delete the entry in time.
    child, result_q, cmd_q = start_prefill(etcd, cluster, lease_ttl=600)
    try:
        with kvferry.Agent("dir-decode", secret=kvpeers.SECRET) as agent, \
                kvferry.Directory(etcd.endpoint, cluster=cluster) as directory:
            expect(result_q, "published")
            directory.connect(agent, "dir-prefill", timeout=60)
            cmd_q.put("leave")
            child.join(120)
            assert child.exitcode == 0
            wait_until(lambda: absent(directory, "dir-prefill"),
                       "dir-prefill's entry after its process exited")
    finally:
        stop(child)


def test_watch_sees_registrations_updates_and_departures(etcd, cluster):
    with kvferry.Agent("dir-watched", secret=kvpeers.SECRET) as agent, \
            kvferry.Directory(etcd.endpoint, cluster=cluster) as owner, \
            kvferry.Directory(etcd.endpoint, cluster=cluster) as watcher:
        port = agent.listen("127.0.0.1")
        watcher.watch()
        with pytest.raises(kvferry.FailedPreconditionError):
            watcher.watch()  # already watching
        owner.publish(agent, "127.0.0.1", port, role="decode")
        assert owner.publications() == {"dir-watched": None}
        joined = wait_event(watcher, "joined", "dir-watched")
        assert (joined.record.port, joined.record.role) == (port, "decode")
        assert joined.revision > 0
        wait_until(lambda: watcher.watch_revision >= joined.revision, "watch_revision")
        assert watcher.watched_agents()["dir-watched"].port == port

        agent.create_pool("extra", kvpeers.layout(num_blocks=4), exported=True)
        owner.publish(agent, "127.0.0.1", port, role="decode")  # again: an update
        updated = wait_event(watcher, "updated", "dir-watched")
        assert updated.record.pools == {"extra": kvpeers.layout(num_blocks=4)}

        owner.unpublish("dir-watched")
        assert owner.publications() == {}
        left = wait_event(watcher, "left", "dir-watched")
        assert left.revision > updated.revision
        with pytest.raises(kvferry.NotFoundError, match="dir-watched"):
            owner.unpublish("dir-watched")

        # A second watch from the revision after the last one sees only what comes next.
        watcher.unwatch()
        revision = left.revision
        watcher.watch(start_revision=revision + 1)
        owner.publish(agent, "127.0.0.1", port)
        events = []
        wait_until(lambda: events.extend(watcher.wait_events(timeout=1.0)) or events,
                   "an event of the resumed watch")
        assert (events[0].type, events[0].name) == ("joined", "dir-watched"), events
        assert events[0].revision > revision


def test_wait_events_returns_when_the_directory_closes(etcd, cluster):
    directory = kvferry.Directory(etcd.endpoint, cluster=cluster)
    directory.watch()
    out = []

    def wait():
        try:
            out.append(directory.wait_events(timeout=None))
        except kvferry.FailedPreconditionError as e:  # close() came first
            out.append(e)

    # The snapshot of an empty cluster reports nothing: the waiter blocks
    # (without the GIL) until close() wakes it, or finds it closed.
    waiter = threading.Thread(target=wait)
    waiter.start()
    directory.close()
    waiter.join(DEADLINE)
    assert not waiter.is_alive(), "wait_events(timeout=None) still waits after close()"
    assert out == [[]] or "is closed" in str(out[0]), out
    assert directory.closed


def test_same_name_twice_is_refused_naming_the_holder(etcd, cluster):
    with kvferry.Agent("dir-twin", secret=kvpeers.SECRET) as a, \
            kvferry.Agent("dir-twin", secret=kvpeers.SECRET) as b, \
            kvferry.Directory(etcd.endpoint, cluster=cluster) as first, \
            kvferry.Directory(etcd.endpoint, cluster=cluster) as second:
        port_a, port_b = a.listen("127.0.0.1"), b.listen("127.0.0.1")
        first.publish(a, "127.0.0.1", port_a)
        with pytest.raises(kvferry.AlreadyExistsError, match=f"127.0.0.1.*{port_a}"):
            second.publish(b, "127.0.0.1", port_b)
        assert second.publications() == {}
        assert second.resolve("dir-twin").port == port_a


@pytest.mark.parametrize("cluster_name, fragment", [
    ("", "cluster name ''"),
    ("a/b", "'a/b'"),
    ("has space", "'has space'"),
])
def test_bad_cluster_name_is_refused_naming_it(cluster_name, fragment):
    with pytest.raises(kvferry.InvalidArgumentError, match=fragment) as e:
        kvferry.Directory("127.0.0.1:2379", cluster=cluster_name)
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"endpoints": "https://127.0.0.1:2379"}, "https://127.0.0.1:2379"),
    ({"endpoints": ["127.0.0.1"]}, "'127.0.0.1'"),
    ({"endpoints": ["127.0.0.1:99999"]}, "127.0.0.1:99999"),
    ({"endpoints": []}, "endpoints is empty"),
    ({"endpoints": [7]}, "etcd endpoint 7"),
    ({"endpoints": "127.0.0.1:2379", "lease_ttl": 0}, "lease_ttl 0"),
    ({"endpoints": "127.0.0.1:2379", "lease_ttl": 0.5}, "lease_ttl 500ms"),
    ({"endpoints": "127.0.0.1:2379", "retry_deadline": -1}, "retry_deadline -1"),
    ({"endpoints": "127.0.0.1:2379", "request_timeout": float("nan")}, "request_timeout nan"),
    ({"endpoints": "127.0.0.1:2379", "password": b"s3cret"}, "password of type bytes"),
])
def test_bad_options_are_refused_naming_the_value(kwargs, fragment):
    with pytest.raises(kvferry.InvalidArgumentError) as e:
        kvferry.Directory(**kwargs)
    assert fragment in str(e.value)
    assert "s3cret" not in str(e.value)  # a password is never echoed


def test_bad_names_and_addresses_leave_nothing_behind(etcd, cluster):
    with kvferry.Agent("dir-ok", secret=kvpeers.SECRET) as agent, \
            kvferry.Agent("dir/slash", secret=kvpeers.SECRET) as slashed, \
            kvferry.Directory(etcd.endpoint, cluster=cluster) as directory:
        port = agent.listen("127.0.0.1")
        for name, fragment in (("", "agent name ''"), ("x/y", "'x/y'"), ("a b", "'a b'")):
            with pytest.raises(kvferry.InvalidArgumentError, match=fragment):
                directory.resolve(name)
            with pytest.raises(kvferry.InvalidArgumentError, match=fragment):
                directory.connect(agent, name, timeout=5)
        # An agent may be called so, but a directory key may not.
        with pytest.raises(kvferry.InvalidArgumentError, match="'dir/slash'"):
            directory.publish(slashed, "127.0.0.1", slashed.listen("127.0.0.1"))
        for address, bad_port, fragment in (
                ("0.0.0.0", port, "0.0.0.0"),
                ("not-an-ip", port, "not-an-ip"),
                ("127.0.0.1", 0, "port 0 "),
                ("127.0.0.1", 70000, "port 70000"),
                ("127.0.0.1", -1, "port -1")):
            with pytest.raises(kvferry.InvalidArgumentError, match=fragment):
                directory.publish(agent, address, bad_port)
        with pytest.raises(kvferry.InvalidArgumentError, match="kvferry.Agent"):
            directory.publish("dir-ok", "127.0.0.1", port)
        with pytest.raises(kvferry.InvalidArgumentError, match="start_revision -1"):
            directory.watch(start_revision=-1)
        with pytest.raises(kvferry.NotFoundError, match="dir-missing"):
            directory.resolve("dir-missing")
        with pytest.raises(kvferry.NotFoundError, match="dir-missing"):
            directory.connect(agent, "dir-missing", timeout=5)
        # Nothing was published, nothing is in etcd, and the directory still works.
        assert directory.publications() == {}
        assert directory.list() == []
        assert agent.peers == []
        directory.publish(agent, "127.0.0.1", port)
        assert [r.name for r in directory.list()] == ["dir-ok"]
    with kvferry.Directory(etcd.endpoint, cluster=cluster) as after:
        wait_until(lambda: after.list() == [], "the entry after its directory closed")


def test_unreachable_etcd_raises_unavailable_naming_the_endpoint(cluster):
    endpoint = f"127.0.0.1:{directory_peers.free_port()}"  # nothing listens there
    with kvferry.Agent("dir-lonely", secret=kvpeers.SECRET) as agent, \
            kvferry.Directory(endpoint, cluster=cluster, connect_timeout=0.5,
                              retry_deadline=2) as directory:
        port = agent.listen("127.0.0.1")
        with pytest.raises(kvferry.UnavailableError, match=endpoint) as e:
            directory.publish(agent, "127.0.0.1", port)
        assert isinstance(e.value, ConnectionError)
        assert directory.publications() == {}
        with pytest.raises(kvferry.UnavailableError, match=endpoint):
            directory.resolve("dir-lonely")
        with pytest.raises(kvferry.UnavailableError, match=endpoint):
            directory.list()
        with pytest.raises(kvferry.UnavailableError, match=endpoint):
            directory.connect(agent, "dir-lonely", timeout=5)
        assert agent.peers == []
    assert directory.closed


def test_closed_directory_refuses_calls_naming_its_cluster(cluster):
    directory = kvferry.Directory("127.0.0.1:2379", cluster=cluster)
    assert directory.endpoints == ["127.0.0.1:2379"] and directory.cluster == cluster
    directory.close()
    directory.close()  # idempotent
    with pytest.raises(kvferry.FailedPreconditionError, match=f"'{cluster}' is closed"):
        directory.resolve("anyone")
    with pytest.raises(kvferry.FailedPreconditionError, match=f"'{cluster}' is closed"):
        directory.watch()
