"""Find and run a real `tritonserver` for the model repository.

Outside the NGC container the binary and its Python backend come from the
`nvidia-pytriton` wheel. Two things make it load our models there:
- the Python backend stub for the running Python must sit in the backend folder;
- the stub embeds CPython and finds its site-packages by looking up `python3` on
  PATH, so the venv's bin goes first on PATH, and it links libpython from the
  loader path, so the running Python's LIBDIR goes first on LD_LIBRARY_PATH
  (the system's libpython can be a different patch release: `_PyModule_Add` errors).

`python -m llmserve.triton.launcher` runs a server in the foreground (`make serve`);
`TritonServer` starts one on free ports for tests and benchmarks.

With the front end beside it (`--openai-port`), tritonserver is locked down unless `--open-triton`:
gRPC, HTTP and metrics listen on 127.0.0.1 only, and its administrative protocols (ADMIN_PROTOCOLS)
answer only requests carrying a key generated per start and written to a file only the user can
read (`--admin-key-file`); health, metadata and inference stay open: all the front end and the
`client` package use.
"""

from __future__ import annotations

import argparse
import contextlib
import filecmp
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
from dataclasses import dataclass
from pathlib import Path

from llmserve.engine.config import DEFAULT_RUNTIME
from llmserve.paths import BUILD_DIR, DEFAULT_MODEL_DIR
from llmserve.paths import MODEL_REPOSITORY as DEFAULT_MODEL_REPOSITORY

NGC_TRITONSERVER = Path("/opt/tritonserver/bin/tritonserver")

# Triton's protocols (`--grpc-restricted-protocol`, `--http-restricted-api`) that only an operator
# needs: loading and unloading models, their configs, shared-memory regions, statistics, tracing and
# logging settings. health, metadata and inference stay open.
ADMIN_PROTOCOLS = ("shared-memory", "model-config", "model-repository", "statistics", "trace", "logging")
# The header carrying the admin key over HTTP; over gRPC Triton expects it as metadata
# `triton-grpc-protocol-<header>`.
ADMIN_HEADER = "admin-key"
GRPC_ADMIN_HEADER = f"triton-grpc-protocol-{ADMIN_HEADER}"
LOOPBACK = "127.0.0.1"
DEFAULT_ADMIN_KEY_FILE = BUILD_DIR / "run" / "triton-admin-key"
# The front end's API key, read from the environment (`make serve API_KEY=...` sets it): never on a
# command line, where any process listing would show it.
API_KEY_ENV = "LLMSERVE_API_KEY"


@dataclass(slots=True, frozen=True)
class TritonInstall:
    binary: Path
    backend_dir: Path


def find_tritonserver() -> TritonInstall:
    """$TRITONSERVER, the NGC container's server, the one in the nvidia-pytriton wheel, or a
    `tritonserver` on PATH (backends beside it in ../backends, or $TRITON_BACKEND_DIR), in that order."""
    if explicit := os.environ.get("TRITONSERVER"):
        binary = Path(explicit)
        if not binary.is_file():
            raise FileNotFoundError(f"TRITONSERVER={explicit} is not a file")
        return _system_install(binary)
    if NGC_TRITONSERVER.exists():
        return _system_install(NGC_TRITONSERVER)
    try:
        import pytriton
    except ImportError:
        if on_path := shutil.which("tritonserver"):
            return _system_install(Path(on_path).resolve())
        raise FileNotFoundError("no tritonserver found: install the requirements (`make install`), "
                                "run in the NGC Triton container, or set TRITONSERVER") from None
    root = Path(pytriton.__file__).parent / "tritonserver"
    install = TritonInstall(root / "bin" / "tritonserver", root / "backends")
    _install_python_stub(root)
    return install


def _system_install(binary: Path) -> TritonInstall:
    return TritonInstall(binary, Path(os.environ.get("TRITON_BACKEND_DIR", binary.parents[1] / "backends")))


def _install_python_stub(root: Path) -> None:
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise FileNotFoundError(f"the pytriton wheel has no Python backend stub for Python {version}")
    target = root / "backends" / "python" / stub.name
    if target.exists() and filecmp.cmp(stub, target, shallow=False):
        return
    # Copy then rename: two servers starting at once never see a half-written stub.
    with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
        shutil.copyfile(stub, tmp.name)
    os.chmod(tmp.name, 0o755)
    os.replace(tmp.name, target)


def server_env(overrides: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, env.get("LD_LIBRARY_PATH", "")) if p)
    env.update(overrides or {})
    return env


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports: all held open until chosen, so the OS cannot hand one out twice."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


def server_command(install: TritonInstall, model_repository: Path, grpc_port: int, http_port: int,
                   metrics_port: int, *, host: str | None = None, admin_key: str | None = None) -> list[str]:
    """tritonserver's command line; `host`: the address gRPC, HTTP and metrics listen on (None: all,
    Triton's default); `admin_key`: ADMIN_PROTOCOLS answer only requests with that key (`admin_headers`)."""
    cmd = [str(install.binary), f"--model-repository={model_repository}",
           f"--backend-directory={install.backend_dir}", f"--grpc-port={grpc_port}",
           f"--http-port={http_port}", f"--metrics-port={metrics_port}", "--exit-timeout-secs=10",
           "--log-verbose=0"]
    if host:
        cmd += [f"--grpc-address={host}", f"--http-address={host}", f"--metrics-address={host}"]
    if admin_key:
        cmd += restricted_protocol_flags(admin_key)
    return cmd


def restricted_protocol_flags(admin_key: str) -> list[str]:
    """Triton's flags restricting ADMIN_PROTOCOLS, over gRPC and HTTP, to requests carrying `admin_key`."""
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", admin_key):
        # Triton splits the flag at ',', ':' and '='; a header value must be one token anyway.
        raise ValueError("an admin key has letters, digits, '-' and '_' only")
    restriction = f"{','.join(ADMIN_PROTOCOLS)}:{ADMIN_HEADER}={admin_key}"
    return [f"--grpc-restricted-protocol={restriction}", f"--http-restricted-api={restriction}"]


def new_admin_key() -> str:
    return secrets.token_urlsafe(32)


def admin_headers(admin_key: str, protocol: str = "http") -> dict[str, str]:
    """The headers that open ADMIN_PROTOCOLS: tritonclient's `headers=` for `protocol` "http" or "grpc"."""
    return {(GRPC_ADMIN_HEADER if protocol == "grpc" else ADMIN_HEADER): admin_key}


def write_admin_key(path: str | os.PathLike, admin_key: str) -> Path:
    """`admin_key` into `path`, readable and writable by this user only (0600), replaced atomically
    (a reader never sees half a key; a file or link already there is replaced, not written through)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mkstemp: mode 0600
    try:
        with os.fdopen(fd, "w") as file:
            file.write(admin_key + "\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def remove_admin_key(path: str | os.PathLike, admin_key: str) -> None:
    """Remove the key file if it still holds `admin_key` (not another server's, started since)."""
    with contextlib.suppress(OSError):
        if Path(path).read_text().strip() == admin_key:
            os.unlink(path)


def model_env(model_dir: str | None = None, runtime: str | None = None, **extra: str | int) -> dict[str, str]:
    """LLM_* variables the models read (see llmserve.triton.settings)."""
    env = {"LLM_MODEL_DIR": str(Path(model_dir).resolve()) if model_dir else None, "LLM_RUNTIME": runtime}
    env = {k: v for k, v in env.items() if v}
    env.update({f"LLM_{k.upper()}": str(v) for k, v in extra.items()})  # "" = the setting's default
    return env


# Run by a fresh interpreter that then becomes the server (exec): SIGTERM when the process that
# started it dies, even by SIGKILL, so no server outlives a killed test run or benchmark (Linux;
# elsewhere a no-op). Not a `preexec_fn`: Python code between fork and exec runs every
# `os.register_at_fork` handler, and gRPC's crash the child (SIGSEGV, 1 in 5 forks) while the
# parent has streams open, as an AsyncClient's idle ones are.
_EXEC_WITH_PARENT = """\
import ctypes, os, signal, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
except (OSError, AttributeError):
    pass
if os.getppid() != int(sys.argv[1]):
    sys.exit("the process that started the server has exited")
os.execvp(sys.argv[2], sys.argv[2:])
"""


def exec_with_parent(cmd: list[str]) -> list[str]:
    """`cmd`, run so that it ends with the process that starts it."""
    return [sys.executable, "-I", "-S", "-c", _EXEC_WITH_PARENT, str(os.getpid()), *cmd]


def stop_process_group(process: subprocess.Popen, timeout: float) -> None:
    """SIGINT to the process's group (e.g. tritonserver and its model stubs), SIGKILL after `timeout`;
    then SIGKILL to the group anyway: a model stub can outlive its tritonserver (one blocked in an IPC
    to it never notices)."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


class ServerProcess:
    """A server subprocess in its own process group, ready when its health URL answers 200;
    a context manager that always stops it (SIGINT to the group, then SIGKILL)."""

    name = "server"
    stop_timeout = 20.0

    def __init__(self, *, env: dict[str, str] | None = None, log_path: str | os.PathLike | None = None,
                 cwd: str | os.PathLike | None = None) -> None:
        self._env = env
        self._cwd = cwd
        self._log_path = Path(log_path) if log_path else None
        self._log = None
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    @property
    def health_url(self) -> str:
        raise NotImplementedError

    def start(self, timeout: float = 240.0):
        cmd = self.command()
        self._log = open(self._log_path, "w+b") if self._log_path else tempfile.TemporaryFile()
        self.process = subprocess.Popen(exec_with_parent(cmd), env=self._env, cwd=self._cwd, stdout=self._log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with code {self.process.returncode}:\n{self.log_tail()}")
            if self.ready():
                return self
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"{self.name} not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.health_url, timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def log_tail(self, chars: int = 6000) -> str:
        if self._log is None:
            return ""
        self._log.flush()
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace")[-chars:]

    def stop(self) -> None:
        if self.process is not None:
            stop_process_group(self.process, self.stop_timeout)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def ensure_server_compiled_model(env: dict[str, str]) -> None:
    """`ensure_compiled_model` for a server started with `env` (its LLM_* settings); an engine folder of
    one's own (LLM_COMPILED_DIR) is one's own to build."""
    if not env.get("LLM_COMPILED_DIR"):
        ensure_compiled_model(env.get("LLM_MODEL_DIR"), env.get("LLM_RUNTIME"))


def ensure_compiled_model(model_dir: str | os.PathLike | None = None, runtime: str | None = None) -> None:
    """Build the ONNX Runtime engine of `model_dir` (default: the built model) in build/compiled when
    `runtime` (default: the server's) is onnxruntime and the engine is missing or was built from
    other weights; seconds, and at once when current: `make engine`'s step. A TensorRT plan is
    built by `make engine RUNTIME=tensorrt` (minutes, on the GPU) and only checked at load."""
    if (runtime or DEFAULT_RUNTIME) == "onnxruntime":
        from llmserve.export.onnx_export import export_onnx

        export_onnx(model_dir or DEFAULT_MODEL_DIR, force=False)


class TritonServer(ServerProcess):
    """tritonserver on free ports, serving the model repository (its ONNX Runtime engine built first
    when missing: `ensure_server_compiled_model`).

    Open to all by default. `host="127.0.0.1"` listens on the loopback address only; `restrict_admin=True`
    (a key generated here) or `admin_key=...` restricts ADMIN_PROTOCOLS to requests carrying
    `admin_headers(server.admin_key, protocol)`."""

    name = "tritonserver"

    def __init__(self, model_repository: str | os.PathLike = DEFAULT_MODEL_REPOSITORY, *,
                 env: dict[str, str] | None = None, log_path: str | os.PathLike | None = None,
                 host: str | None = None, restrict_admin: bool = False, admin_key: str | None = None) -> None:
        super().__init__(env=server_env(env), log_path=log_path)
        self.model_repository = Path(model_repository)
        self.grpc_port, self.http_port, self.metrics_port = free_ports(3)
        self.host = host
        self.admin_key = admin_key or (new_admin_key() if restrict_admin else None)

    def command(self) -> list[str]:
        return server_command(find_tritonserver(), self.model_repository, self.grpc_port, self.http_port,
                              self.metrics_port, host=self.host, admin_key=self.admin_key)

    def start(self, timeout: float = 240.0):
        ensure_server_compiled_model(self._env)
        return super().start(timeout)

    @property
    def _connect_host(self) -> str:
        return self.host if self.host and self.host not in ("0.0.0.0", "::") else "localhost"

    @property
    def grpc_url(self) -> str:
        return f"{self._connect_host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self._connect_host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._connect_host}:{self.metrics_port}/metrics"

    @property
    def health_url(self) -> str:
        return f"{self.http_url}/v2/health/ready"


def metric(metrics_url: str, name: str, **labels: str) -> float:
    """Sum of a Prometheus metric's samples on the server's metrics endpoint.

    `labels` keeps only the samples carrying all of them, e.g. reason="cancelled".
    """
    with urllib.request.urlopen(metrics_url, timeout=5) as response:
        body = response.read().decode()
    samples = re.findall(rf"^{name}(?:{{([^}}]*)}})? (\S+)$", body, re.MULTILINE)
    values = [float(value) for label_text, value in samples
              if all(f'{key}="{val}"' in label_text for key, val in labels.items())]
    if not values:
        raise KeyError(f"metric {name} {labels or ''} not found")
    return sum(values)


class GatewayServer(ServerProcess):
    """The front end (`python -m llmserve.gateway`) on a free port, in front of a Triton gRPC URL; ready
    when `ready_path` answers 200: /health does only once the ensemble is ready."""

    name = "gateway"
    stop_timeout = 10.0

    def __init__(self, triton_url: str, *, port: int | None = None, host: str = "127.0.0.1",
                 extra_args: list[str] | None = None, ready_path: str = "/health",
                 env: dict[str, str] | None = None, log_path: str | os.PathLike | None = None) -> None:
        super().__init__(env=env, log_path=log_path)
        self.triton_url = triton_url
        self.host = host
        self.port = port or free_port()
        self.extra_args = list(extra_args or [])
        self.ready_path = ready_path

    def command(self) -> list[str]:
        return gateway_command(self.triton_url, self.host, self.port, self.extra_args)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def health_url(self) -> str:
        return f"{self.url}{self.ready_path}"


def gateway_command(triton_url: str, host: str, port: int, extra_args: list[str] | None = None) -> list[str]:
    return [sys.executable, "-m", "llmserve.gateway", "--triton-url", triton_url, "--host", host,
            "--port", str(port), *(extra_args or [])]


def run_together(triton_cmd: list[str], env: dict[str, str], gateway_cmd: list[str]) -> int:
    """tritonserver and the front end in the foreground, their output on this terminal; Ctrl-C (or
    either one exiting) stops both. Returns the exit code of the one that ended first."""
    triton = subprocess.Popen(exec_with_parent(triton_cmd), env=env, start_new_session=True)
    gateway = subprocess.Popen(exec_with_parent(gateway_cmd), start_new_session=True)
    code = 0
    try:
        while triton.poll() is None and gateway.poll() is None:
            time.sleep(0.5)
        ended = triton if triton.poll() is not None else gateway
        code = ended.returncode
        print(f"{'tritonserver' if ended is triton else 'the front end'} exited with code {code}: stopping",
              file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        stop_process_group(gateway, GatewayServer.stop_timeout)
        stop_process_group(triton, TritonServer.stop_timeout)
    return code


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run tritonserver on the model repository (foreground), and "
                                                 "with --openai-port the front end beside it.")
    parser.add_argument("--model-repository", default=str(DEFAULT_MODEL_REPOSITORY))
    parser.add_argument("--model-dir", default=None, help="Hugging Face model folder (default: the built model)")
    parser.add_argument("--runtime", default=None, help="onnxruntime (default), torch or tensorrt")
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--openai-port", type=int, default=None,
                        help="also run the front end (OpenAI, TGI and WebSocket APIs, chat page) on this port; "
                             "tritonserver then listens on 127.0.0.1 only, its admin protocols behind a key")
    parser.add_argument("--openai-host", default="0.0.0.0", help="the front end's address (default: all)")
    parser.add_argument("--open-triton", action="store_true",
                        help="with --openai-port: leave tritonserver on all addresses with every protocol open")
    parser.add_argument("--admin-key-file", default=str(DEFAULT_ADMIN_KEY_FILE),
                        help="where the admin key of a locked-down tritonserver is written, mode 0600 "
                             "(default: %(default)s)")
    parser.add_argument("--api-keys-file", default=None, help="passed on to the front end")
    parser.add_argument("--ssl-certfile", default=None, help="passed on to the front end")
    parser.add_argument("--ssl-keyfile", default=None, help="passed on to the front end")
    args = parser.parse_args(argv)
    gateway_flags = {"--api-keys-file": args.api_keys_file, "--ssl-certfile": args.ssl_certfile,
                     "--ssl-keyfile": args.ssl_keyfile}
    if not args.openai_port and any(gateway_flags.values()):
        parser.error(f"{', '.join(flag for flag, value in gateway_flags.items() if value)} need --openai-port")
    lock_down = bool(args.openai_port) and not args.open_triton
    host = LOOPBACK if lock_down else None
    admin_key = new_admin_key() if lock_down else None
    install = find_tritonserver()
    cmd = server_command(install, Path(args.model_repository).resolve(), args.grpc_port, args.http_port,
                         args.metrics_port, host=host, admin_key=admin_key)
    where = f"{host}:" if host else ":"
    scheme = "https" if args.ssl_certfile else "http"
    print(f"serving gRPC on {where}{args.grpc_port}, HTTP on {where}{args.http_port}, metrics on "
          f"{where}{args.metrics_port}"
          + (f"; the front end on {scheme}://localhost:{args.openai_port}" if args.openai_port else ""),
          file=sys.stderr, flush=True)
    # TensorRT runs on the GPU only: `make serve RUNTIME=tensorrt` needs no LLM_DEVICE=cuda beside it.
    extra = {"device": "cuda"} if args.runtime == "tensorrt" and "LLM_DEVICE" not in os.environ else {}
    env = server_env(model_env(args.model_dir, args.runtime, **extra))
    env.pop(API_KEY_ENV, None)  # the front end's, not tritonserver's
    ensure_server_compiled_model(env)
    if not args.openai_port:
        os.execvpe(cmd[0], cmd, env)
    key_file = None
    if admin_key:
        key_file = write_admin_key(args.admin_key_file, admin_key)
        print(f"tritonserver's admin protocols ({', '.join(ADMIN_PROTOCOLS)}) need the key in {key_file} "
              f"(header '{ADMIN_HEADER}' over HTTP, '{GRPC_ADMIN_HEADER}' over gRPC); --open-triton: none",
              file=sys.stderr, flush=True)
    model_name = Path(args.model_dir or DEFAULT_MODEL_DIR).name
    gateway_args = ["--served-model-name", model_name]
    for flag, value in gateway_flags.items():
        if value:
            gateway_args += [flag, value]
    gateway_cmd = gateway_command(f"{host or 'localhost'}:{args.grpc_port}", args.openai_host, args.openai_port,
                                  gateway_args)
    try:
        code = run_together(cmd, env, gateway_cmd)
    finally:
        if key_file:
            remove_admin_key(key_file, admin_key)
    sys.exit(code)


if __name__ == "__main__":
    main()
