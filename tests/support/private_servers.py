"""Private RabbitMQ and Redis servers that a test may stop, kill and restart.

The machine's shared services (RabbitMQ on 5672, Redis on 6379) are never touched: each
server here runs on free ports with its data in the test's temporary directory, and is stopped
by its own node name or process id. A private Redis can also be frozen (SIGSTOP), restarted
empty on its own port, given a memory limit and an eviction policy, and shared with a
:class:`Tenant` that fills its memory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import redis

# The real scripts: the /usr/sbin wrappers switch to the rabbitmq user (and its HOME), which
# could not write the test's directory nor share its Erlang cookie.
RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")


def free_port() -> int:
    """A TCP port nothing listens on right now (on 127.0.0.1)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float, *, up: bool = True) -> bool:
    """Wait until 127.0.0.1:``port`` accepts connections (or, ``up=False``, refuses them)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                is_up = True
        except OSError:
            is_up = False
        if is_up == up:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


def rabbit_unavailable_reason() -> str | None:
    """Why a private RabbitMQ node cannot be started here, or ``None`` when it can."""
    server = RABBIT_BIN / "rabbitmq-server"
    if not server.exists() or not (RABBIT_BIN / "rabbitmqctl").exists():
        return f"RabbitMQ's scripts are not in {RABBIT_BIN}"
    if os.geteuid() != 0:
        return "a private RabbitMQ node is started as root (its files in a temporary HOME)"
    if shutil.which("erl") is None and not Path("/usr/lib/erlang/bin/erl").exists():
        return "Erlang (erl) is not installed"
    return None


class PrivateRabbit:
    """A RabbitMQ node of the test's own: ``bftest-<random>@localhost`` on free ports.

    Its Mnesia directory (durable queues, persistent messages) lives in ``base`` and survives
    :meth:`stop` / :meth:`start`. No plugin is enabled, no config of the machine is read.
    """

    def __init__(self, base: Path) -> None:
        self.base = base
        self.base.mkdir(parents=True, exist_ok=True)
        self.node = f"bftest-{uuid.uuid4().hex[:8]}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}//"
        self.pid_file = base / "node.pid"
        (base / "enabled_plugins").write_text("[].\n", encoding="utf-8")
        (base / "rabbitmq-env.conf").write_text("", encoding="utf-8")
        (base / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
            "loopback_users.guest = true\n"
            "disk_free_limit.absolute = 1MB\n",
            encoding="utf-8",
        )

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(
            {
                # The Erlang cookie is made in HOME: the node and rabbitmqctl share this one.
                "HOME": str(self.base),
                "RABBITMQ_CONF_ENV_FILE": str(self.base / "rabbitmq-env.conf"),
                "RABBITMQ_CONFIG_FILE": str(self.base / "rabbitmq.conf"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "enabled_plugins"),
                "RABBITMQ_NODENAME": self.node,
                "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
                "RABBITMQ_NODE_PORT": str(self.port),
                "RABBITMQ_DIST_PORT": str(self.dist_port),
                "RABBITMQ_MNESIA_BASE": str(self.base / "mnesia"),
                "RABBITMQ_LOG_BASE": str(self.base / "log"),
                "RABBITMQ_PID_FILE": str(self.pid_file),
                "ERL_EPMD_ADDRESS": "127.0.0.1",
                "ERL_CRASH_DUMP": str(self.base / "erl_crash.dump"),
                "ERL_FLAGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            }
        )
        return env

    def _ctl(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(RABBIT_BIN / "rabbitmqctl"), "-n", self.node, *args],
            env=self._env(),
            cwd=self.base,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def start(self, timeout: float = 90.0) -> PrivateRabbit:
        """Start the node (detached) and wait until it accepts AMQP connections."""
        self.pid_file.unlink(missing_ok=True)
        subprocess.run(
            [str(RABBIT_BIN / "rabbitmq-server"), "-detached"],
            env=self._env(),
            cwd=self.base,
            capture_output=True,
            timeout=30,
            check=True,
        )
        # The script's own limit first: on a loaded machine the node takes its time.
        waited = self._ctl(
            "wait", str(self.pid_file), "--timeout", str(int(timeout)), timeout=timeout + 30
        )
        if waited.returncode != 0 or not wait_for_port(self.port, 10):
            raise RuntimeError(
                f"private RabbitMQ node {self.node} did not start: {waited.stdout[-1500:]}"
                f"{waited.stderr[-1500:]}\n{self.log_tail()}"
            )
        return self

    def pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int(self.pid_file.read_text().strip())
        return None

    def stop(self) -> None:
        """Stop the node cleanly (``rabbitmqctl stop``), or kill it by its pid."""
        pid = self.pid()
        result = self._ctl("stop", timeout=60)
        if pid is not None:
            deadline = time.monotonic() + 30
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        elif result.returncode != 0 and wait_for_port(self.port, 0.2):
            raise RuntimeError(f"could not stop {self.node}: {result.stderr[-1000:]}")
        wait_for_port(self.port, 10, up=False)

    def log_tail(self, size: int = 3000) -> str:
        logs = sorted((self.base / "log").glob("*.log")) if (self.base / "log").exists() else []
        return "\n".join(p.read_text(errors="replace")[-size:] for p in logs)


class PrivateRedis:
    """A ``redis-server`` of the test's own on a free port, no persistence.

    :param maxmemory: the server's ``maxmemory`` (bytes, or Redis' own units such as
        ``"8mb"``); unlimited when omitted.
    :param maxmemory_policy: what the server does when that memory is full; Redis' default
        (``noeviction``) when omitted.

    Both are start-up settings: :meth:`restart` brings them back, whatever ``CONFIG SET``
    changed in between. Without persistence a restarted server comes back empty, as a
    cache server restarted without a dump file does.
    """

    def __init__(
        self,
        base: Path,
        *,
        maxmemory: int | str | None = None,
        maxmemory_policy: str | None = None,
    ) -> None:
        self.base = base
        self.base.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.maxmemory = maxmemory
        self.maxmemory_policy = maxmemory_policy
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    def _command(self, binary: str) -> list[str]:
        command = [
            binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.base),
        ]
        if self.maxmemory is not None:
            command += ["--maxmemory", str(self.maxmemory)]
        if self.maxmemory_policy is not None:
            command += ["--maxmemory-policy", self.maxmemory_policy]
        return command

    def start(self, timeout: float = 10.0) -> PrivateRedis:
        """Start the server on its port (the same port on every start)."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        self.process = subprocess.Popen(
            self._command(binary),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
        if not wait_for_port(self.port, timeout):
            self.kill()
            raise RuntimeError(f"private redis-server did not listen on {self.port}")
        return self

    def restart(self, timeout: float = 10.0) -> PrivateRedis:
        """SIGKILL and start again on the same port: every key is gone, clients that kept a
        connection find it closed, and the next connection reaches an empty server."""
        self.kill()
        self.start(timeout)
        self.restarts += 1
        return self

    def kill(self) -> None:
        """SIGKILL: the server is gone at once, without a goodbye to its clients."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def pause(self) -> None:
        """SIGSTOP: the server still accepts connections (the kernel does) but never answers."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """SIGSTOP for the duration of the ``with`` block, SIGCONT after it, whatever
        happens inside."""
        self.pause()
        try:
            yield
        finally:
            self.resume()

    def freeze(self, seconds: float) -> None:
        """Freeze the server for ``seconds`` (blocks the caller for as long)."""
        with self.frozen():
            time.sleep(seconds)

    def freeze_later(self, delay: float, seconds: float) -> threading.Thread:
        """In a thread of its own: wait ``delay`` seconds, then freeze for ``seconds``. Join
        the thread to know the server answers again."""

        def freeze() -> None:
            time.sleep(delay)
            self.freeze(seconds)

        thread = threading.Thread(target=freeze, name=f"freeze-redis-{self.port}", daemon=True)
        thread.start()
        return thread

    def restart_later(self, delay: float, down_for: float) -> threading.Thread:
        """In a thread of its own: wait ``delay`` seconds, SIGKILL the server, start it again
        (empty) ``down_for`` seconds later. Join the thread to know it is back."""

        def outage() -> None:
            time.sleep(delay)
            self.kill()
            time.sleep(down_for)
            self.restart()

        thread = threading.Thread(target=outage, name=f"restart-redis-{self.port}", daemon=True)
        thread.start()
        return thread

    def client(self, db: int = 0) -> redis.Redis:
        """A client of the test's own (the code under test makes its own)."""
        import redis

        return redis.Redis(
            host="127.0.0.1", port=self.port, db=db, socket_timeout=10, socket_connect_timeout=5
        )

    def config_set(self, name: str, value: str | int) -> None:
        with contextlib.closing(self.client()) as client:
            client.config_set(name, value)

    def info(self, section: str) -> dict[str, Any]:
        with contextlib.closing(self.client()) as client:
            return dict(client.info(section))

    def keys_in(self, db: int = 0) -> int:
        with contextlib.closing(self.client(db)) as client:
            return int(client.dbsize())

    def flushall(self) -> None:
        with contextlib.closing(self.client()) as client:
            client.flushall()

    def stop(self) -> None:
        if self.process is None:
            return
        self.resume()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


@contextlib.contextmanager
def running_redis(base: Path, **options: Any) -> Iterator[PrivateRedis]:
    """A started :class:`PrivateRedis` (``options`` as it takes them), stopped afterwards; the
    test is skipped where no ``redis-server`` can be started."""
    server = PrivateRedis(base, **options)
    try:
        server.start()
    except RuntimeError as exc:
        server.stop()
        pytest.skip(f"no private redis-server: {exc}")
    try:
        yield server
    finally:
        server.stop()


class Tenant:
    """Another application sharing a :class:`PrivateRedis`: a thread that writes big values
    into a database of its own, which is what fills a shared server's memory and makes it
    evict (under ``allkeys-*`` policies anyone's keys, under ``volatile-*`` any key with an
    expiry: the tenant's keys get one, so that it keeps finding room).

    Writes are spaced by ``pace`` seconds so the thread does not take a whole core of a
    small machine. A write refused for want of memory (``OOM``, under ``noeviction`` or once
    nothing is left to evict) is counted, not raised: the tenant goes on trying.
    """

    def __init__(
        self,
        server: PrivateRedis,
        *,
        db: int = 1,
        value_bytes: int = 64 * 1024,
        expire_s: int | None = 3600,
        pace: float = 0.002,
    ) -> None:
        self.server = server
        self.db = db
        self.value = b"t" * value_bytes
        self.expire_s = expire_s
        self.pace = pace
        self.written_bytes = 0
        self.refused = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Tenant:
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, name=f"tenant-{self.server.port}", daemon=True
        )
        self._thread.start()
        return self

    def _run(self) -> None:
        import redis

        client = self.server.client(self.db)
        index = 0
        try:
            while not self._stop.is_set():
                try:
                    client.set(f"tenant:{index}", self.value, ex=self.expire_s)
                    self.written_bytes += len(self.value)
                    index += 1
                except redis.ResponseError:
                    self.refused += 1
                    self._stop.wait(0.05)
                except redis.RedisError:
                    self._stop.wait(0.1)  # the server is frozen or restarting: try again
                self._stop.wait(self.pace)
        finally:
            client.close()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def __enter__(self) -> Tenant:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
