"""Start and stop a real Triton Inference Server (the binary bundled in nvidia-pytriton) on loopback.

The python backend needs wiring that the wheel does not do for us: a backend directory holding
`libtriton_python.so`, `triton_python_backend_utils.py` and the stub built for this Python; the wheel's
own libraries and Python's LIBDIR on LD_LIBRARY_PATH (otherwise the stub may load another libpython);
the venv's site-packages and the repository root on PYTHONPATH (the stub's interpreter does not process
.pth files, so the editable install is invisible to it); the venv's bin/ first on PATH.

What it adds to Triton's own defaults, so a server never outlives or outsmarts whoever started it:
- administration (model repository and control, shared memory, logging, trace) is restricted on HTTP
  and gRPC; without an `admin_key` nobody can use it (the key is a value no header can carry);
  statistics, health, metadata and inference stay open (perf_analyzer needs statistics);
- Triton runs in its own process group, gets SIGKILL when its starter dies (a parent-death signal),
  and a watchdog process kills the group and removes its shared memory when the starter dies however
  it died: its python-backend stubs survive Triton otherwise, holding the regions;
- the python backend's shared-memory regions carry a prefix naming this server, removed at stop, and
  leftovers of dead starters removed at start;
- `failure()` is a live check of the process and every python-backend stub (Triton 2.51 keeps
  answering ready after a stub is killed).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import glob
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.processes import cmdline, pid_alive, proc_stat

REPO_ROOT = Path(__file__).resolve().parents[2]


class ServerError(RuntimeError):
    """The server could not be found, started, or did not become ready; the message says why."""


def _site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def pytriton_root() -> Path:
    """The `pytriton/tritonserver` directory of the installed nvidia-pytriton wheel."""
    root = _site_packages() / "pytriton" / "tritonserver"
    if not (root / "bin" / "tritonserver").is_file():
        raise ServerError(
            f"no Triton server binary at {root}/bin/tritonserver: install the serving extra "
            "(`pip install -e '.[serve]'`, or `make setup`), which brings nvidia-pytriton==0.7.0"
        )
    return root


def library_path(extra: list[str] | None = None) -> str:
    """LD_LIBRARY_PATH for the server, its python stubs and perf_analyzer."""
    sp = _site_packages()
    parts = [
        str(sp / "nvidia_pytriton.libs"),
        str(sp / "nvidia" / "cuda_runtime" / "lib"),  # libcudart.so.12: perf_analyzer only has to load it
        sysconfig.get_config_var("LIBDIR") or "",
        *(extra or []),
        os.environ.get("LD_LIBRARY_PATH", ""),
    ]
    return os.pathsep.join(p for p in parts if p)


def server_env() -> dict[str, str]:
    """The environment the server and its python-backend stubs need (see the module docstring)."""
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = library_path()
    py_path = [str(_site_packages()), str(REPO_ROOT), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in py_path if p)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # the stubs import model.py from the repository: keep it as built
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    return env


def make_backend_dir(dest: Path) -> Path:
    """Write `dest/python/` (library, utils, this Python's stub) and return `dest`."""
    root = pytriton_root()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerError(f"nvidia-pytriton has no python backend stub for Python {version} ({stub})")
    python_dir = dest / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for src in (
        root / "backends" / "python" / "libtriton_python.so",
        root / "backends" / "python" / "triton_python_backend_utils.py",
        stub,
    ):
        target = python_dir / src.name
        if not target.exists():
            shutil.copy2(src, target)
    return dest


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


EXIT_TIMEOUT_S = 10
ADMIN_APIS = "model-repository,shared-memory,logging,trace"
ADMIN_KEY_HEADER = "admin-key"  # HTTP header; gRPC metadata `triton-grpc-protocol-admin-key`
ADMIN_KEY = re.compile(r"[A-Za-z0-9._~+/-]{16,256}")
SHM_PREFIX = "dms_triton_"  # + starter pid + "_" + HTTP port + "_"; Triton appends a uuid
WATCHDOG = Path(__file__).with_name("watchdog.py")
STUB = "triton_python_backend_stub"
_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded before any fork: the child only calls into it


def _die_with_parent(parent: int) -> None:
    """preexec_fn: SIGKILL this child when the thread that started it dies (the starter's main thread,
    in practice: start servers from a thread that outlives them)."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the starter died before prctl took effect
        os._exit(1)


def closed_admin_key() -> str:
    """A restricted-API key no client can send: HTTP header values and gRPC metadata never hold a line
    feed followed by a letter. Triton then refuses the administration APIs to everyone."""
    return f"closed\nx{secrets.token_hex(8)}"


def check_admin_key(key: str) -> str:
    if not ADMIN_KEY.fullmatch(key):
        raise ServerError(
            "the admin key must be 16-256 characters of letters, digits and ._~+/- (it is sent as the "
            f"`{ADMIN_KEY_HEADER}` header)"
        )
    return key


def remove_stale_shm(prefix: str = SHM_PREFIX) -> list[str]:
    """Remove python-backend regions of servers whose starter is dead (the watchdog missed them: it was
    killed too, or the machine went down). Regions of live starters stay."""
    removed = []
    for path in glob.glob(f"/dev/shm/{prefix}*"):
        owner = re.match(rf"{re.escape(prefix)}(\d+)_", Path(path).name)
        if owner and not pid_alive(int(owner[1])):
            try:
                os.unlink(path)
                removed.append(path)
            except OSError:
                pass
    return removed


def check_port(host: str, port: int, flag: str) -> None:
    """ServerError naming the port and the flag to change when host:port cannot be bound (a TIME_WAIT
    leftover of a stopped server does not count: Triton reuses the address too)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                message = f"cannot listen on {host}:{port} ({exc.strerror}); check --host and {flag}"
            else:
                message = (
                    f"port {port} on {host} is already in use (another server still running?); stop it or "
                    f"pick a free port with {flag}"
                )
            raise ServerError(message) from None


def check_ports(host: str, http: int, grpc: int, metrics: int) -> None:
    """ServerError when two endpoints ask for one port, or one cannot be bound (0: any free one)."""
    ports = {"--http-port": http, "--grpc-port": grpc, "--metrics-port": metrics}
    asked = [port for port in ports.values() if port]
    if len(set(asked)) < len(asked):
        given = ", ".join(f"{flag} {port}" for flag, port in ports.items())
        raise ServerError(f"{given}: each endpoint needs its own port")
    for flag, port in ports.items():
        if port:
            check_port(host, port, flag)


@dataclass
class TritonServer:
    """One tritonserver process serving `model_repo`; use as a context manager or call start()/stop().

    Ports of 0 are replaced by free ones. The log goes to `log_path` (a temporary file by default) so a
    failed start can show its tail.
    """

    model_repo: Path
    host: str = "127.0.0.1"
    http_port: int = 0
    grpc_port: int = 0
    metrics_port: int = 0
    log_path: Path | None = None
    startup_timeout_s: float = 240.0
    log_verbose: int = 0
    admin_key: str | None = None  # opens the administration APIs to clients sending it; None: closed
    process: subprocess.Popen | None = field(default=None, init=False)
    _log_offset: int = field(default=0, init=False)
    _workdir: Path | None = field(default=None, init=False)
    _watchdog: subprocess.Popen | None = field(default=None, init=False)
    _workers: dict[int, str] = field(default_factory=dict, init=False)  # stub pid -> model instance
    _shm_prefix: str = field(default="", init=False)

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def shm_prefix(self) -> str:
        return self._shm_prefix

    def command(self) -> list[str]:
        assert self._workdir is not None
        key = check_admin_key(self.admin_key) if self.admin_key is not None else closed_admin_key()
        return [
            str(pytriton_root() / "bin" / "tritonserver"),
            f"--model-repository={Path(self.model_repo).resolve()}",
            f"--backend-directory={self._workdir / 'backends'}",
            f"--http-address={self.host}",
            f"--grpc-address={self.host}",
            f"--metrics-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            "--disable-auto-complete-config",
            "--exit-on-error=true",
            f"--exit-timeout-secs={EXIT_TIMEOUT_S}",  # requests in flight at Ctrl-C get this long
            f"--log-verbose={self.log_verbose}",
            f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}",
            f"--http-restricted-api={ADMIN_APIS}:{ADMIN_KEY_HEADER}={key}",
            f"--grpc-restricted-protocol={ADMIN_APIS}:{ADMIN_KEY_HEADER}={key}",
        ]

    def start(self) -> TritonServer:
        repo = Path(self.model_repo)
        if not repo.is_dir():
            raise ServerError(f"model repository {repo} does not exist: run `make engine` first")
        check_ports(self.host, self.http_port, self.grpc_port, self.metrics_port)
        self._workdir = Path(tempfile.mkdtemp(prefix="dms-triton-"))
        make_backend_dir(self._workdir / "backends")
        self.http_port = self.http_port or free_port(self.host)
        self.grpc_port = self.grpc_port or free_port(self.host)
        self.metrics_port = self.metrics_port or free_port(self.host)
        self.log_path = Path(self.log_path or self._workdir / "server.log")
        self._shm_prefix = f"{SHM_PREFIX}{os.getpid()}_{self.http_port}_"
        remove_stale_shm()
        # Appended, never truncated: another server of the same build may be writing it. The tail shown
        # on a failure starts where this one's part does.
        try:
            log = self.log_path.open("ab")
        except OSError as exc:
            shutil.rmtree(self._workdir, ignore_errors=True)
            raise ServerError(f"cannot write the server log {self.log_path}: {exc.strerror}") from None
        log.write(f"=== tritonserver on {self.host}:{self.http_port} ({time.strftime('%F %T')})\n".encode())
        log.flush()
        self._log_offset = log.tell()
        command = self.command()
        self.process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=server_env(),
            start_new_session=True,  # its own group: stop() and the watchdog kill it with its stubs
            preexec_fn=functools.partial(_die_with_parent, os.getpid()),
        )
        log.close()
        self._watchdog = subprocess.Popen(
            [sys.executable, "-I", str(WATCHDOG), str(self.process.pid), self._shm_prefix],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # not taken down with the starter's group
        )
        try:
            self._wait_ready()
            self._workers = self._find_workers()
        except BaseException:
            self.stop()
            raise
        return self

    def _find_workers(self) -> dict[int, str]:
        """The python-backend stubs Triton started, by pid: {pid: model instance name}."""
        assert self.process is not None
        workers = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            stat = proc_stat(int(entry))
            args = cmdline(int(entry)) if stat and stat[1] == self.process.pid else []
            if args and Path(args[0]).name == STUB:
                workers[int(entry)] = args[8] if len(args) > 8 else Path(args[1]).parent.parent.name
        return workers

    @property
    def workers(self) -> dict[int, str]:
        return dict(self._workers)

    def failure(self) -> str | None:
        """What is wrong with the running server, checked live: Triton exited, or one of its python-backend
        stubs died (Triton 2.51 answers ready and fails every request to that model from then on).
        None when all is well."""
        if self.process is None:
            return "the server is not running"
        code = self.process.poll()
        if code is not None:
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"status {code}"
            return f"tritonserver exited ({how})"
        for pid, name in self._workers.items():
            stat = proc_stat(pid)
            if stat is None or stat[0] == "Z" or stat[1] != self.process.pid:
                return f"the python-backend stub of model instance {name} (pid {pid}) died"
        return None

    def _every_model_ready(self) -> bool:
        """Every model of the repository answers on its own ready endpoint: a first request has failed
        with "failed to find the requested model version" after the server as a whole answered ready.
        (The repository index API is restricted: the models are read from the directory.)"""
        for config in sorted(Path(self.model_repo).glob("*/config.pbtxt")):
            ready = f"http://{self.http_url}/v2/models/{config.parent.name}/ready"
            with urllib.request.urlopen(ready, timeout=2) as resp:
                if resp.status != 200:
                    return False
        return True

    def _wait_ready(self) -> None:
        url = f"http://{self.http_url}/v2/health/ready"
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise ServerError(
                    f"tritonserver exited with status {self.process.returncode} while loading "
                    f"{self.model_repo}; its log ends with:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200 and self._every_model_ready():
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.5)
        raise ServerError(
            f"tritonserver not ready after {self.startup_timeout_s:.0f} s; log tail:\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path or not Path(self.log_path).is_file():
            return "(no log)"
        with Path(self.log_path).open("rb") as fh:
            fh.seek(self._log_offset)
            text = fh.read().decode(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self, timeout_s: float = EXIT_TIMEOUT_S + 15) -> None:
        """SIGINT (Triton unloads models and exits), SIGKILL if it hangs; then SIGKILL to whatever is
        left of its process group: a crashed Triton leaves its python-backend stubs (hundreds of MB each)
        running otherwise."""
        proc, self.process = self.process, None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # its own session: the group is Triton's alone
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None:
            try:
                watchdog.communicate(b"stopped", timeout=10)  # a clean stop: it kills nothing
            except (subprocess.TimeoutExpired, BrokenPipeError):
                watchdog.kill()
                watchdog.wait()
        if self._shm_prefix:
            for path in glob.glob(f"/dev/shm/{glob.escape(self._shm_prefix)}*"):
                Path(path).unlink(missing_ok=True)
        self._workers = {}
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
