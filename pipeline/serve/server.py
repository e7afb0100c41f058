"""Start and stop a real Triton Inference Server (the binary bundled in nvidia-pytriton) on loopback.

The python backend needs wiring that the wheel does not do for us: a backend directory holding
`libtriton_python.so`, `triton_python_backend_utils.py` and the stub built for this Python; the wheel's
own libraries and Python's LIBDIR on LD_LIBRARY_PATH (otherwise the stub may load another libpython);
the venv's site-packages and the repository root on PYTHONPATH (the stub's interpreter does not process
.pth files, so the editable install is invisible to it); the venv's bin/ first on PATH.
"""

from __future__ import annotations

import errno
import os
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
    process: subprocess.Popen | None = field(default=None, init=False)
    _log_offset: int = field(default=0, init=False)
    _workdir: Path | None = field(default=None, init=False)

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def command(self) -> list[str]:
        assert self._workdir is not None
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
        ]

    def start(self) -> TritonServer:
        repo = Path(self.model_repo)
        if not repo.is_dir():
            raise ServerError(f"model repository {repo} does not exist: run `make engine` first")
        ports = {"--http-port": self.http_port, "--grpc-port": self.grpc_port}
        ports["--metrics-port"] = self.metrics_port
        asked = [port for port in ports.values() if port]
        if len(set(asked)) < len(asked):
            given = ", ".join(f"{flag} {port}" for flag, port in ports.items())
            raise ServerError(f"{given}: each endpoint needs its own port")
        for flag, port in ports.items():
            if port:
                check_port(self.host, port, flag)
        self._workdir = Path(tempfile.mkdtemp(prefix="dms-triton-"))
        make_backend_dir(self._workdir / "backends")
        self.http_port = self.http_port or free_port(self.host)
        self.grpc_port = self.grpc_port or free_port(self.host)
        self.metrics_port = self.metrics_port or free_port(self.host)
        self.log_path = Path(self.log_path or self._workdir / "server.log")
        # Appended, never truncated: another server of the same build may be writing it. The tail shown
        # on a failure starts where this one's part does.
        log = self.log_path.open("ab")
        log.write(f"=== tritonserver on {self.host}:{self.http_port} ({time.strftime('%F %T')})\n".encode())
        log.flush()
        self._log_offset = log.tell()
        self.process = subprocess.Popen(
            self.command(), stdout=log, stderr=subprocess.STDOUT, env=server_env(), start_new_session=True
        )
        log.close()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

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
                    if resp.status == 200:
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
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
