"""Fault tools for the campaign: each one small, each one a fault a hospital deployment will meet.

- ``kill_at_random_moments``: SIGKILL the coordinator at random moments of its life (the supervisor restarts it).
- ``crash_loop``: SIGKILL each restarted coordinator right after it took its first update off the queue
  (``fedmq_updates_received_total`` > 0 on its metrics endpoint).
- ``TcpProxy``: a loopback TCP proxy between a site and the broker that can cut every connection for N seconds
  (open connections are reset, new ones are refused until the cut ends).
- ``kill_broker``: kill -9 a broker node's Erlang VM and start the node again on the same ports and data.
- ``memory_alarm``: lower the node's memory high watermark so the memory alarm blocks every publisher, then
  restore it (``rabbitmqctl set_vm_memory_high_watermark`` with the node's own environment).
- ``SmallMount``: a small tmpfs mounted where the coordinator writes, made read-only or full for a while.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import random
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from broker.node import LocalNode
from tests.faults.harness import HANDLED_MARKERS, Supervisor

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ coordinator kills
def kill_at_random_moments(
    supervisor: Supervisor, kills: int, rng: random.Random, *, min_life: float = 0.1, max_life: float = 1.5
) -> None:
    """``kills`` SIGKILLs, each a random time after the restarted coordinator started serving."""
    for _ in range(kills):
        supervisor.wait_serving()
        time.sleep(rng.uniform(min_life, max_life))
        supervisor.kill()


# Runs in a process of its own, so that neither the GIL nor the sites' threads in the harness delay the kill: a
# coordinator on a small model handles a whole prefetch window in a few milliseconds.
_KILL_ON_FIRST_UPDATE = """
import os, signal, sys, time
pid, path, offset, deadline = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), time.monotonic() + float(sys.argv[4])
markers = [marker.encode() for marker in sys.argv[5:]]
with open(path, "rb") as handle:
    while time.monotonic() < deadline:
        handle.seek(offset)
        if any(marker in handle.read() for marker in markers):
            os.kill(pid, signal.SIGKILL)
            sys.exit(0)
        time.sleep(0.0005)
sys.exit(1)
"""


def crash_loop(supervisor: Supervisor, kills: int, *, timeout: float = 60.0) -> int:
    """Kill the running coordinator, then SIGKILL each restarted process right after it handled its first update
    (its log says so), ``kills`` times; return how many restarted processes were killed that way (one that handles
    nothing within ``timeout`` ends the loop)."""
    done = 0
    generation = supervisor.generation
    supervisor.kill()
    for _ in range(kills):
        deadline = time.monotonic() + timeout
        while supervisor.generation == generation or not supervisor.running():  # the next process
            if time.monotonic() > deadline:
                return done
            time.sleep(0.005)
        generation = supervisor.generation
        process = supervisor.coordinator.process
        assert process is not None
        watcher = subprocess.run(
            [
                sys.executable,
                "-c",
                _KILL_ON_FIRST_UPDATE,
                str(process.pid),
                str(supervisor.coordinator.log_path),
                str(supervisor.log_offset),
                str(timeout),
                *(marker.decode() for marker in HANDLED_MARKERS),
            ],
            check=False,
            timeout=timeout + 30,
        )
        if watcher.returncode != 0:
            return done
        supervisor.kills += 1
        done += 1
    return done


# -------------------------------------------------------------------------------------------------- TCP proxy
class TcpProxy:
    """``127.0.0.1:<port>`` -> ``target``, one thread, select-based; ``cut(seconds)`` drops the link for a while."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.setblocking(False)
        self.port = int(self._listener.getsockname()[1])
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, None)
        self._peers: dict[socket.socket, socket.socket] = {}
        self._cut_until = 0.0
        self._lock = threading.Lock()
        self._closing = False
        self.cuts = 0
        self._thread = threading.Thread(target=self._serve, name="tcp-proxy", daemon=True)
        self._thread.start()

    def url_for(self, url: str, port: int) -> str:
        """``url`` with the broker's port replaced by the proxy's."""
        return url.replace(f":{port}/", f":{self.port}/", 1)

    def _reset(self, sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST, not FIN
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(sock)
        with contextlib.suppress(OSError):
            sock.close()

    def _drop_all(self) -> None:
        for sock in list(self._peers):
            self._reset(sock)
        self._peers.clear()

    def _accept(self) -> None:
        with contextlib.suppress(BlockingIOError):
            client, _ = self._listener.accept()
            if time.monotonic() < self._cut_until:
                self._reset(client)
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                self._reset(client)
                return
            for sock in (client, upstream):
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._peers[client], self._peers[upstream] = upstream, client
            self._selector.register(client, selectors.EVENT_READ, None)
            self._selector.register(upstream, selectors.EVENT_READ, None)

    def _pump(self, source: socket.socket) -> None:
        target = self._peers.get(source)
        if target is None:
            return
        try:
            data = source.recv(65536)
            if data:
                target.setblocking(True)
                target.sendall(data)
                target.setblocking(False)
                return
        except BlockingIOError:
            return
        except OSError:
            pass
        for sock in (source, target):  # one side closed or failed: close both
            self._peers.pop(sock, None)
            self._reset(sock)

    def _serve(self) -> None:
        while not self._closing:
            with self._lock:
                if self._peers and time.monotonic() < self._cut_until:
                    self._drop_all()
            for key, _ in self._selector.select(timeout=0.05):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                with self._lock:
                    if sock is self._listener:
                        self._accept()
                    else:
                        self._pump(sock)

    def cut(self, seconds: float) -> None:
        """Reset every proxied connection now and refuse new ones for ``seconds`` (returns at once)."""
        with self._lock:
            self._cut_until = time.monotonic() + seconds
            self.cuts += 1

    def close(self) -> None:
        self._closing = True
        self._thread.join(timeout=5)
        with self._lock:
            self._drop_all()
        self._listener.close()
        self._selector.close()


# ------------------------------------------------------------------------------------------------- the broker
def kill_broker(node: LocalNode, down_seconds: float = 1.0, start_timeout: float = 120.0) -> None:
    """kill -9 the node's Erlang VM (no clean shutdown, no flush), wait, and start it again."""
    pid = node.running_pid()
    if pid is None:
        raise RuntimeError(f"broker node {node.node_name} is not running")
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while node.running_pid() is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(down_seconds)
    node.start(timeout=start_timeout)


def _rabbitmqctl(node: LocalNode, *arguments: str) -> str:
    result = node._rabbitmqctl(*arguments, timeout=60)  # the node's own cookie and name
    if result.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(arguments)} failed: {result.stderr.strip()}")
    return result.stdout.strip()


def memory_watermark(node: LocalNode) -> str:
    """The node's memory high watermark as ``set_vm_memory_high_watermark`` takes it back."""
    answer = _rabbitmqctl(node, "eval", "vm_memory_monitor:get_vm_memory_high_watermark().")
    if answer.startswith("{absolute"):
        return "absolute " + answer.strip("{}").split(",", 1)[1].strip()
    return answer


def memory_alarm(node: LocalNode, seconds: float) -> None:
    """Raise the memory alarm for ``seconds`` (all publishers on the node are blocked), then clear it."""
    previous = memory_watermark(node)
    _rabbitmqctl(node, "set_vm_memory_high_watermark", "0.000001")
    try:
        time.sleep(seconds)
    finally:
        _rabbitmqctl(node, "set_vm_memory_high_watermark", *previous.split())


# ------------------------------------------------------------------------------------------------ filesystems
class MountUnavailable(RuntimeError):
    """This machine cannot mount a filesystem for the test (not root, no tmpfs, a container without it)."""


class SmallMount:
    """A small tmpfs at ``path`` (which must be empty), unmounted by ``close``."""

    def __init__(self, path: Path, size_mb: int = 64) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0700", "tmpfs", str(path)],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise MountUnavailable(f"cannot mount a tmpfs at {path}: {result.stderr.strip() or result.returncode}")

    def _remount(self, mode: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            result = subprocess.run(
                ["mount", "-o", f"remount,{mode}", str(self.path)], capture_output=True, text=True, check=False
            )
            if result.returncode == 0:
                return
            if time.monotonic() >= deadline:  # busy: a file is open for writing right now
                raise RuntimeError(f"cannot remount {self.path} {mode}: {result.stderr.strip()}")
            time.sleep(0.02)

    @contextlib.contextmanager
    def read_only(self) -> Iterator[None]:
        """Read-only (EROFS on every write) inside the block. Linux refuses the remount while a file on it is open
        for writing, so mount this only where files are written and closed (the checkpoint directory)."""
        self._remount("ro")
        try:
            yield
        finally:
            self._remount("rw")

    @contextlib.contextmanager
    def full(self) -> Iterator[None]:
        """No space left (ENOSPC on every write that needs a block) inside the block."""
        filler = self.path / ".campaign-filler"
        with filler.open("wb", buffering=0) as handle:
            for chunk in (1 << 20, 1 << 12, 1):
                block = b"\0" * chunk
                try:
                    while True:
                        handle.write(block)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
        try:
            yield
        finally:
            filler.unlink()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._remount("rw", timeout=1)
        subprocess.run(["umount", "-l", str(self.path)], capture_output=True, check=False)


def hold_through_a_restart(
    supervisor: Supervisor, seconds: float, action: contextlib.AbstractContextManager[None], *, longest: float
) -> None:
    """Keep ``action`` (read_only(), full()) in force for ``seconds``, and on until a coordinator restarted after
    it began has handled an update (at most ``longest`` seconds): the issue's disk stayed broken across restarts
    (40 s against systemd's 10 s), and whether the first failure surfaces in the consumer or between polls is
    luck, so the restarted process, which meets the fault with a backlog, must meet it too."""
    with action:
        started, generation = time.monotonic(), supervisor.generation
        time.sleep(seconds)
        while time.monotonic() - started < longest:
            if supervisor.generation > generation and supervisor.handled_an_update():
                time.sleep(2.0)  # and tried to commit what it handled
                return
            time.sleep(0.1)
