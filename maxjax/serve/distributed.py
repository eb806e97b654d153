"""Several hosts, one program: `max serve --coordinator HOST:PORT --num-processes N --process-id I`.

`jax.distributed` joins the processes (on CPU, XLA's collectives go over Gloo); the devices of all of them make
one mesh, so a step is one SPMD program over every device, tensor parallel as with several devices of one host
(`graph/mesh.py`). Process 0 is the leader: it serves HTTP, schedules, and builds every step's batch on its host.
The others are followers: they load the same model with the same flags, build the same runner, and then only
run what the leader runs.

XLA's collectives need every process to launch the same programs, with the same inputs, in the same order. So
each runner call that launches one (a step, the vision encoder, the prompt scores: `ModelRunner.mirror`) is first
sent to every follower over a TCP connection to the leader (the coordinator's port + 1): a length-prefixed pickle
of the call's name and its NumPy arguments, a few KiB a step. A follower makes the same call on its own runner.
Outputs are replicated: the leader reads its own shard of them (`ModelRunner.fetch`).

The processes must be started with the same flags (the KV pool is sized from them: give `--kv-cache-pages` where
the hosts differ); the follower checks the leader's pool and grid against its own when it connects. A follower
that dies leaves the leader's next collective waiting: a load balancer's health check on the leader sees it.
"""

from __future__ import annotations

import logging
import pickle
import socket
import struct
import time
from typing import Any

from maxjax.config import DistributedConfig
from maxjax.errors import UserError

log = logging.getLogger(__name__)

_HEADER = struct.Struct("!Q")


def initialize(dist: DistributedConfig, platform: str | None) -> None:
    """Join the processes (before anything touches a JAX backend)."""
    import jax

    if platform in (None, "cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # Its preemption service takes SIGTERM for itself; the server's own drain (`http_server`) must get it.
    jax.config.update("jax_enable_preemption_service", False)
    jax.distributed.initialize(coordinator_address=dist.coordinator, num_processes=dist.num_processes,
                               process_id=dist.process_id)
    log.info("process %d of %d: %d local devices of %d (%s)", dist.process_id, dist.num_processes,
             jax.local_device_count(), jax.device_count(), jax.devices()[0].platform)


def _send(conn: socket.socket, message: Any) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    conn.sendall(_HEADER.pack(len(data)) + data)


def _recv(conn: socket.socket) -> Any:
    def exactly(n: int) -> bytes:
        chunks, left = [], n
        while left:
            chunk = conn.recv(min(left, 1 << 20))
            if not chunk:
                raise ConnectionError("the leader closed the step channel")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    (n,) = _HEADER.unpack(exactly(_HEADER.size))
    return pickle.loads(exactly(n))


class Leader:
    """Process 0's end of the step channel: every follower connected, each call sent to all of them."""

    def __init__(self, dist: DistributedConfig, plan: dict[str, Any], *, timeout: float = 600.0):
        """Wait for every follower to connect and tell it `plan` (the pool and grid it must match)."""
        host, port = dist.channel
        self._server = socket.create_server((host, port))
        self._server.settimeout(timeout)
        self._followers: list[socket.socket] = []
        try:
            for _ in range(dist.num_processes - 1):
                conn, _ = self._server.accept()
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                who = _recv(conn)
                _send(conn, plan)
                log.info("follower %s connected", who)
                self._followers.append(conn)
        except TimeoutError:
            raise UserError(f"only {len(self._followers)} of {dist.num_processes - 1} followers connected to "
                            f"{host}:{port} in {timeout:.0f} s: start every process with the same flags") from None

    def __call__(self, name: str, args: tuple[Any, ...]) -> None:
        for conn in self._followers:
            _send(conn, (name, args))

    def close(self) -> None:
        """Tell the followers to stop."""
        for conn in self._followers:
            try:
                _send(conn, ("stop", ()))
                conn.close()
            except OSError:
                pass
        self._server.close()


def follow(dist: DistributedConfig, runner: Any, plan: dict[str, Any], *, timeout: float = 600.0) -> None:
    """A follower's life after warm-up: connect to the leader, check its `plan` against ours, then make every call
    it sends on `runner` until it says stop (or goes away)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn = socket.create_connection(dist.channel, timeout=5)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise UserError(f"could not reach the leader at {dist.channel[0]}:{dist.channel[1]}") from None
            time.sleep(0.2)
    conn.settimeout(None)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    _send(conn, dist.process_id)
    theirs = _recv(conn)
    if theirs != plan:
        raise UserError(f"process {dist.process_id}: the leader's pool and grid {theirs} differ from this process's "
                        f"{plan}: start every process with the same flags (and --kv-cache-pages)")
    runner.following = True
    log.info("process %d following the leader", dist.process_id)
    calls = 0
    while True:
        try:
            name, args = _recv(conn)
        except ConnectionError:
            log.warning("the leader went away after %d calls", calls)
            return
        if name == "stop":
            log.info("the leader stopped after %d calls", calls)
            return
        getattr(runner, name)(*args)
        calls += 1
