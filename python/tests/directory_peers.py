"""The etcd member test_directory.py runs, and the process it spawns
(multiprocessing 'spawn' imports this module by name in the child)."""

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request

import kvferry
import kvpeers


def etcd_binary():
    """The etcd binary, as tests/etcd_process.h finds it; None when absent."""
    env = os.environ.get("KVFERRY_ETCD_BINARY")
    if env:
        return env
    for path in ("/usr/bin/etcd", "/usr/local/bin/etcd"):
        if os.access(path, os.X_OK):
            return path
    return None


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Etcd:
    """One etcd member on free loopback ports with a temporary data directory."""

    def __init__(self, binary, ready_timeout=90.0):
        self.root = tempfile.mkdtemp(prefix="kvferry-py-etcd-")
        self.client_port, peer_port = free_port(), free_port()
        self.endpoint = f"http://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{peer_port}"
        self.log_path = os.path.join(self.root, "etcd.log")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [binary, "--name", "m0", "--data-dir", os.path.join(self.root, "m0"),
                 "--listen-client-urls", self.endpoint, "--advertise-client-urls", self.endpoint,
                 "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                 "--initial-cluster", f"m0={peer}",
                 "--initial-cluster-token", f"kvferry-py-{os.getpid()}-{time.time_ns()}",
                 "--initial-cluster-state", "new"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + ready_timeout
        while not self.healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log_tail()
                self.stop()
                raise RuntimeError(f"etcd at {self.endpoint} did not become healthy:\n{tail}")
            time.sleep(0.1)

    def healthy(self):
        try:
            with urllib.request.urlopen(f"{self.endpoint}/health", timeout=3) as r:
                return r.status == 200 and b'"true"' in r.read()
        except OSError:
            return False

    def log_tail(self, size=4000):
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-size:].decode(errors="replace")
        except OSError:
            return ""

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)


_kept = []


def prefill_main(endpoint, cluster, lease_ttl, result_q, cmd_q):
    """Publishes agent 'dir-prefill' (its KV tensors exported as pool 'kv')
    in `cluster`, waits for 'dir-decode' to connect by name and read, then
    closes its directory on 'close' (the process stays until 'exit', or is
    killed). On 'leave' it returns without closing the directory, and the
    process ends."""
    try:
        kv = kvpeers.kv_tensors(seed=1)
        with kvferry.Agent("dir-prefill", secret=kvpeers.SECRET) as agent:
            agent.register_pool("kv", kvpeers.layout(), kv)
            port = agent.listen("127.0.0.1")
            directory = kvferry.Directory(endpoint, cluster=cluster, lease_ttl=lease_ttl)
            directory.publish(agent, "127.0.0.1", port, role="prefill")
            result_q.put(("published", port, agent.incarnation))
            agent.wait_for_peer("dir-decode", timeout=120)
            cmd = cmd_q.get(timeout=300)
            if cmd == "leave":
                _kept.append(directory)  # alive until the interpreter exits
                return
            if cmd == "close":
                directory.close()
                result_q.put(("closed",))
                cmd = cmd_q.get(timeout=300)
            assert cmd == "exit", cmd
            directory.close()
    except BaseException as e:  # reported to the test, which fails with it
        result_q.put(("failed", f"{type(e).__name__}: {e}"))
        raise
