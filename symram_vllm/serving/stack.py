"""`symram up`: the whole local stack in one command.

Starts, each in its own process group with its log in one directory:

* ``redis-server`` on a free port (the shared block directory), skipped with a message
  when it is not installed;
* N vLLM + symram engines (``symram serve``) on free ports, each with a control port,
  its own disk-tier directory and the Redis URL in its environment;
* the gateway (``python -m symram_vllm.serving.gateway``) in front of them on the
  public port; with one engine and no gateway installed, the engine takes the port.

Health is awaited with a progress display, then the URL, dashboard and a sample
request are printed. Ctrl-C or SIGTERM stops everything (gateway, engines, Redis;
SIGTERM to each process group, SIGKILL after a grace period; a second Ctrl-C kills at
once), leaving no process or port behind. Every child also gets SIGTERM if this
process dies (PR_SET_PDEATHSIG), so even ``kill -9`` of ``symram up`` cleans up.

``ManagedProcess`` / ``ProcessSet`` are reused by the A/B runner (loadtest/ab.py).
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from symram_vllm.serving.engine_process import die_with_parent, free_port

GATEWAY_MODULE = "symram_vllm.serving.gateway"
Health = Callable[[], bool]


class StartupError(RuntimeError):
    """A process exited or did not become healthy; the message carries its log tail."""


def http_health(url: str) -> Health:
    def check() -> bool:
        try:
            return httpx.get(url, timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    return check


def redis_health(port: int, host: str = "127.0.0.1", password: str | None = None) -> Health:
    def check() -> bool:
        try:
            with socket.create_connection((host, port), timeout=1.0) as sock:
                expected = b"+PONG\r\n"
                if password is not None:
                    sock.sendall(f"AUTH {password}\r\n".encode())
                    expected = b"+OK\r\n" + expected
                sock.sendall(b"PING\r\n")
                got = b""
                while len(got) < len(expected):
                    chunk = sock.recv(64)
                    if not chunk:
                        break
                    got += chunk
                return got.startswith(expected)
        except OSError:
            return False

    return check


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


@dataclass
class ManagedProcess:
    """One child in its own process group, output to a log file, with a health probe."""

    name: str
    cmd: list[str]
    log_path: Path
    health: Health | None = None
    env: dict[str, str] = field(default_factory=dict)
    ports: list[int] = field(default_factory=list)
    cwd: Path | None = None
    # Stop order: lower first; processes of one level stop in parallel.
    stop_level: int = 1
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Must run on the main thread: PR_SET_PDEATHSIG fires when the *thread* that
        forked the child exits, not only the process."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== {time.strftime('%F %T')} {shlex.join(self.cmd)}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                self.cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, **self.env}, cwd=self.cwd,
                start_new_session=True, preexec_fn=die_with_parent,
            )

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def healthy(self) -> bool:
        return self.running() and (self.health is None or self.health())

    def signal_group(self, signum: int) -> None:
        if self.process is not None:
            with suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signum)

    def terminate(self) -> None:
        """SIGTERM the whole group (the leader forwards it to vLLM's engine core)."""
        if self.running():
            self.signal_group(signal.SIGTERM)

    def wait_stopped(self, deadline: float) -> None:
        """Wait for the leader until `deadline` (monotonic), SIGKILL the group if it is
        still there, and reap stragglers of the group after the leader exited."""
        if self.process is None:
            return
        try:
            self.process.wait(timeout=max(deadline - time.monotonic(), 0.0))
        except subprocess.TimeoutExpired:
            self.signal_group(signal.SIGKILL)
            self.process.wait(timeout=30)
        # Children of the leader (vLLM's engine core) may outlive it briefly.
        linger = time.monotonic() + 10
        while group_alive(self.process.pid) and time.monotonic() < linger:
            time.sleep(0.2)
        if group_alive(self.process.pid):
            self.signal_group(signal.SIGKILL)
            linger = time.monotonic() + 5
            while group_alive(self.process.pid) and time.monotonic() < linger:
                time.sleep(0.1)

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM the group, wait up to `grace_s`, SIGKILL what is left."""
        self.terminate()
        self.wait_stopped(time.monotonic() + grace_s)

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # Zombies of our own group leader count as gone.
    return any(not _is_zombie(pid) for pid in _group_members(pgid))


def _group_members(pgid: int) -> Iterator[int]:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            yield int(entry.name)


def _is_zombie(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


class ProcessSet:
    """Processes started together, awaited together, stopped in reverse order."""

    def __init__(self) -> None:
        self.processes: list[ManagedProcess] = []

    def add(self, process: ManagedProcess) -> ManagedProcess:
        self.processes.append(process)
        return process

    def start(self, processes: Sequence[ManagedProcess] | None = None) -> None:
        for process in processes if processes is not None else self.processes:
            process.start()

    def wait_healthy(
        self,
        processes: Sequence[ManagedProcess] | None = None,
        timeout_s: float = 900.0,
        description: str = "starting",
        quiet: bool = False,
    ) -> None:
        """Poll until all are healthy, with a rich progress display; StartupError if one
        exits or the timeout passes."""
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        todo = list(processes if processes is not None else self.processes)
        deadline = time.monotonic() + timeout_s
        with Progress(
            SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
            transient=False, disable=quiet,
        ) as progress:
            tasks = {p.name: progress.add_task(f"{description} {p.name}", total=1) for p in todo}
            while todo:
                for process in list(todo):
                    code = process.returncode()
                    if code is not None:
                        raise StartupError(
                            f"{process.name} exited with code {code} while starting; "
                            f"log {process.log_path}:\n{process.log_tail()}"
                        )
                    if process.healthy():
                        todo.remove(process)
                        progress.update(tasks[process.name], completed=1,
                                        description=f"[green]ready[/] {process.name}")
                if todo and time.monotonic() > deadline:
                    names = ", ".join(p.name for p in todo)
                    raise StartupError(f"not healthy after {timeout_s:.0f}s: {names}")
                if todo:
                    time.sleep(0.5)

    def stop(self, grace_s: float = 30.0) -> None:
        """Stop level by level (gateway 0, engines 1, Redis 2): the gateway never proxies
        to a dying engine and engines never lose their directory mid-shutdown. Within a
        level every process gets SIGTERM at once and shares one grace period, so N
        engines flushing their DRAM to disk take one flush time, not N."""
        for level in sorted({p.stop_level for p in self.processes}):
            group = [p for p in self.processes if p.stop_level == level]
            for process in group:
                process.terminate()
            deadline = time.monotonic() + grace_s
            for process in group:
                process.wait_stopped(deadline)

    def kill(self) -> None:
        for process in self.processes:
            process.signal_group(signal.SIGKILL)

    def first_exited(self) -> ManagedProcess | None:
        return next((p for p in self.processes if p.returncode() is not None), None)


def gateway_available() -> bool:
    try:
        return importlib.util.find_spec(GATEWAY_MODULE) is not None
    except (ImportError, ValueError):
        return False


def engine_command(
    model: str, port: int, *, connector: str = "symram", dram_bytes: str | None = None,
    host: str = "127.0.0.1", vllm_args: Sequence[str] = (),
) -> list[str]:
    cmd = [sys.executable, "-m", "symram_vllm.cli", "serve", model, "--host", host,
           "--port", str(port), "--kv-connector", connector]
    if connector == "symram" and dram_bytes:
        cmd += ["--dram-bytes", dram_bytes]
    return [*cmd, "--", *vllm_args]


@dataclass(frozen=True)
class Backend:
    """An engine as the gateway sees it: OpenAI URL, symram control URL, name."""

    url: str
    control_url: str | None = None
    name: str | None = None

    def spec(self) -> str:
        """The gateway's ``--backend URL[,control=URL][,name=NAME]`` syntax."""
        parts = [self.url]
        if self.control_url:
            parts.append(f"control={self.control_url}")
        if self.name:
            parts.append(f"name={self.name}")
        return ",".join(parts)


def gateway_command(port: int, backends: Sequence[Backend], host: str = "127.0.0.1",
                    extra: Sequence[str] = ()) -> list[str]:
    cmd = [sys.executable, "-m", GATEWAY_MODULE, "--host", host, "--port", str(port)]
    for backend in backends:
        cmd += ["--backend", backend.spec()]
    return [*cmd, *extra]


def redis_command(port: int, workdir: Path, password: str | None = None) -> list[str]:
    """redis-server for the stack's directory. With a password it goes into a config
    file only the user can read (on the command line any local user could see it in
    the process list), which redis-server reads first."""
    cmd = ["redis-server"]
    if password is not None:
        conf = workdir / "redis.conf"
        conf.touch(mode=0o600, exist_ok=True)
        conf.chmod(0o600)
        conf.write_text(f"requirepass {password}\n")
        cmd.append(str(conf))
    # Nothing persisted: the directory is rebuilt from the engines' tiers on start.
    return [*cmd, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(workdir), "--protected-mode", "yes"]


def without_password(url: str) -> str:
    """A Redis URL fit for a log line."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


@dataclass
class UpOptions:
    model: str | None = None
    size: str = "mid"
    instances: int = 1
    host: str = "127.0.0.1"
    port: int = 8000
    dram_bytes: str = "4GiB"
    disk_bytes: str = "8GiB"
    state_dir: Path = Path(".symram")
    redis: bool = True
    gateway: bool = True
    vllm_args: list[str] = field(default_factory=list)
    timeout_s: float = 900.0

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"


@dataclass
class Stack:
    """What `symram up` started and where to reach it."""

    processes: ProcessSet
    url: str
    model: str
    engines: list[str]
    redis_url: str | None
    gateway: bool
    log_dir: Path
    notes: list[str] = field(default_factory=list)


def plan_stack(options: UpOptions, model: str) -> Stack:
    """Build (not start) the processes for `symram up`."""
    if options.instances < 1:
        raise ValueError("--instances must be >= 1")
    use_gateway = options.gateway and gateway_available()
    notes: list[str] = []
    if options.gateway and not use_gateway:
        if options.instances > 1:
            raise StartupError(
                f"{options.instances} instances need the gateway ({GATEWAY_MODULE}), which "
                "is not installed in this build; run with --instances 1"
            )
        notes.append(f"gateway ({GATEWAY_MODULE}) not installed: the engine serves the "
                     "public port directly")
    if not port_is_free(options.port, options.host):
        raise StartupError(f"port {options.port} on {options.host} is in use; pass --port")
    processes = ProcessSet()
    log_dir = options.log_dir
    redis_url: str | None = None
    if options.redis:
        if shutil.which("redis-server") is None:
            notes.append("redis-server not installed: engines use the embedded directory "
                         "(apt-get install redis-server for the shared one)")
        else:
            redis_port = free_port()
            redis_dir = options.state_dir / "redis"
            redis_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            # Even on 127.0.0.1 other local users could reach an open Redis and forge
            # or wipe the directory: the stack's own one needs a fresh password.
            password = secrets.token_urlsafe(24)
            processes.add(ManagedProcess(
                "redis", redis_command(redis_port, redis_dir.resolve(), password),
                log_dir / "redis.log", redis_health(redis_port, password=password),
                ports=[redis_port], stop_level=2))
            redis_url = f"redis://:{password}@127.0.0.1:{redis_port}/0"
    engine_urls: list[str] = []
    backends: list[Backend] = []
    control_token = secrets.token_urlsafe(32)  # engines' control endpoints need it
    for i in range(options.instances):
        port = options.port if not use_gateway else free_port()
        control_port = free_port()
        env = {
            "SYMRAM_INSTANCE_ID": f"engine-{i}",
            "SYMRAM_CONTROL_PORT": str(control_port),
            "SYMRAM_CONTROL_TOKEN": control_token,
            "SYMRAM_DRAM_BYTES": options.dram_bytes,
        }
        if options.disk_bytes and options.disk_bytes != "0":
            # One disk path for all engines: each writes its own slot and reads the
            # others' pages, so an instance reuses what another one computed.
            disk = (options.state_dir / "disk").resolve()
            disk.mkdir(parents=True, exist_ok=True)
            env |= {"SYMRAM_DISK_PATH": str(disk), "SYMRAM_DISK_BYTES": options.disk_bytes}
        if redis_url:
            env["SYMRAM_DIRECTORY_URL"] = redis_url
        url = f"http://127.0.0.1:{port}"
        engine_urls.append(url)
        backends.append(Backend(url, f"http://127.0.0.1:{control_port}", f"engine-{i}"))
        processes.add(ManagedProcess(
            f"engine-{i}",
            engine_command(model, port, dram_bytes=options.dram_bytes, host="127.0.0.1"
                           if use_gateway else options.host, vllm_args=options.vllm_args),
            log_dir / f"engine-{i}.log", http_health(f"{url}/health"), env=env,
            ports=[port, control_port]))
    public = f"http://{options.host}:{options.port}"
    if use_gateway:
        processes.add(ManagedProcess(
            "gateway", gateway_command(options.port, backends, host=options.host),
            log_dir / "gateway.log", http_health(f"{public}/health"), ports=[options.port],
            stop_level=0, env={"SYMRAM_GATEWAY_CONTROL_TOKEN": control_token}))
    return Stack(processes, public, model, engine_urls, redis_url, use_gateway, log_dir, notes)


def resolve_model(options: UpOptions) -> str:
    if options.model:
        return options.model
    from symram_vllm.demo_model import build_demo_model

    return str(build_demo_model(options.state_dir / "models" / options.size, options.size))


class _Signals:
    """SIGINT/SIGTERM set an event; a second one while stopping kills at once."""

    def __init__(self, processes: ProcessSet) -> None:
        self.stop = threading.Event()
        self.count = 0
        self.processes = processes
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        for signum in (signal.SIGINT, signal.SIGTERM):
            self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, _frame: Any) -> None:
        self.count += 1
        if self.count > 1:
            self.processes.kill()
        self.stop.set()
        raise KeyboardInterrupt


def sample_curl(url: str, model: str) -> str:
    from symram_vllm.serving.launcher import sample_request

    host, port = url.removeprefix("http://").rsplit(":", 1)
    return sample_request(host, int(port), model)


def up(options: UpOptions) -> int:
    """Run the stack until Ctrl-C / SIGTERM; 0 on a clean stop, 1 if a process died."""
    from rich.console import Console

    console = Console(stderr=True)
    options.log_dir.mkdir(parents=True, exist_ok=True)
    try:
        with console.status("model"):
            model = resolve_model(options)
        stack = plan_stack(options, model)
    except (StartupError, ValueError) as exc:
        console.print(f"[red]symram up:[/] {exc}")
        return 2
    for note in stack.notes:
        console.print(f"[yellow]note:[/] {note}")
    console.print(f"logs: {stack.log_dir.resolve()}")
    rc = 0
    with _Signals(stack.processes) as signals:
        try:
            # Redis first: engines connect to it as they start; the gateway last.
            for process in stack.processes.processes:
                process.start()
                if process.name == "redis":
                    stack.processes.wait_healthy([process], 30, quiet=True)
            stack.processes.wait_healthy(timeout_s=options.timeout_s)
            print_ready(console, stack)
            while not signals.stop.is_set():
                dead = stack.processes.first_exited()
                if dead is not None:
                    console.print(f"[red]{dead.name} exited (code {dead.returncode()})[/]; "
                                  f"log {dead.log_path}:\n{dead.log_tail()}")
                    rc = 1
                    break
                signals.stop.wait(1.0)
        except KeyboardInterrupt:
            pass
        except StartupError as exc:
            console.print(f"[red]symram up:[/] {exc}")
            rc = 1
        finally:
            console.print("stopping: gateway, engines, redis ...")
            try:
                stack.processes.stop()
            except KeyboardInterrupt:
                stack.processes.kill()
            console.print(f"stopped; logs in {stack.log_dir}")
    return rc


def print_ready(console: Any, stack: Stack) -> None:
    lines = [
        f"[bold green]symram is up[/] at {stack.url}/v1 "
        f"({len(stack.engines)} engine{'s' if len(stack.engines) > 1 else ''}"
        f"{' behind the gateway' if stack.gateway else ''})",
    ]
    if stack.gateway:
        lines.append(f"dashboard: {stack.url}/dashboard   metrics: {stack.url}/metrics")
    for i, engine in enumerate(stack.engines):
        lines.append(f"engine-{i}: {engine} (metrics {engine}/metrics)")
    if stack.redis_url:
        lines.append(f"directory: {without_password(stack.redis_url)}")
    lines += [f"logs: {stack.log_dir}", "try:", "  " + sample_curl(stack.url, stack.model),
              "stop with Ctrl-C"]
    console.print("\n".join(lines), highlight=False, soft_wrap=True)


@contextmanager
def running(processes: ProcessSet, timeout_s: float = 900.0,
            quiet: bool = False) -> Iterator[ProcessSet]:
    """Start, await and always stop a process set (for the A/B runner and tests)."""
    try:
        processes.start()
        processes.wait_healthy(timeout_s=timeout_s, quiet=quiet)
        yield processes
    finally:
        try:
            processes.stop()
        except KeyboardInterrupt:
            processes.kill()
