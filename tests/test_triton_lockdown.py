"""With the front end beside it (`make serve`), tritonserver listens on 127.0.0.1 only and its admin
protocols (model repository, model config, shared memory, statistics, trace, logging) answer only a
client with the generated admin key; health, metadata and inference stay open.

One launcher (tritonserver and the front end, as `make serve` runs them) for the whole module."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from llmserve.triton.launcher import (ADMIN_HEADER, ADMIN_PROTOCOLS, GRPC_ADMIN_HEADER, admin_headers, free_ports,
                                      restricted_protocol_flags, server_command, TritonInstall)

pytestmark = pytest.mark.e2e


def _status(url: str, headers: dict[str, str] | None = None) -> int | None:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except (urllib.error.URLError, OSError):
        return None


FRONT_END_KEY = "sk-lockdown-front-end-5150"


class Served:
    def __init__(self, grpc: int, http: int, metrics: int, openai: int, key_file: Path, log: Path) -> None:
        self.grpc_port, self.http_port, self.metrics_port, self.openai_port = grpc, http, metrics, openai
        self.grpc_url = f"127.0.0.1:{grpc}"
        self.http_url = f"127.0.0.1:{http}"
        self.gateway_url = f"http://127.0.0.1:{openai}"
        self.key_file = key_file
        self.log = log
        self.pid: int | None = None  # the launcher's, its process group's

    @property
    def admin_key(self) -> str:
        return self.key_file.read_text().strip()


@pytest.fixture(scope="module")
def served(default_model_dir, tmp_path_factory):
    """`python -m llmserve.triton.launcher --openai-port ...` (locked down: the default), stopped at the end."""
    tmp = tmp_path_factory.mktemp("lockdown")
    grpc, http, metrics, openai = free_ports(4)
    served = Served(grpc, http, metrics, openai, tmp / "run" / "admin-key", tmp / "serve.log")
    log = open(served.log, "w+b")
    launcher = subprocess.Popen(
        [sys.executable, "-m", "llmserve.triton.launcher", "--model-dir", str(default_model_dir),
         "--grpc-port", str(grpc), "--http-port", str(http), "--metrics-port", str(metrics),
         "--openai-port", str(openai), "--openai-host", "127.0.0.1", "--admin-key-file", str(served.key_file)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "LLMSERVE_API_KEY": FRONT_END_KEY})  # as `make serve API_KEY=...` passes it
    served.pid = launcher.pid
    try:
        deadline = time.monotonic() + 240
        while _status(f"{served.gateway_url}/health") != 200:
            if launcher.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"the front end never became ready:\n{log.read().decode()[-4000:]}")
            time.sleep(0.25)
        yield served
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGINT)  # Ctrl-C: the launcher stops both
            try:
                launcher.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(launcher.pid, signal.SIGKILL)  # its servers end with it (PR_SET_PDEATHSIG)
                launcher.wait()
        log.close()
    # The key is the started server's only: gone with it.
    assert not served.key_file.exists()


# -- the launcher's command line ---------------------------------------------------------------------

def test_server_command_binds_and_restricts_only_when_asked(tmp_path):
    install = TritonInstall(tmp_path / "tritonserver", tmp_path / "backends")
    open_cmd = server_command(install, tmp_path, 1, 2, 3)
    assert not [arg for arg in open_cmd if "address" in arg or "restricted" in arg]
    cmd = server_command(install, tmp_path, 1, 2, 3, host="127.0.0.1", admin_key="k-_9")
    protocols = ",".join(ADMIN_PROTOCOLS)
    for flag in ("--grpc-address=127.0.0.1", "--http-address=127.0.0.1", "--metrics-address=127.0.0.1",
                 f"--grpc-restricted-protocol={protocols}:admin-key=k-_9",
                 f"--http-restricted-api={protocols}:admin-key=k-_9"):
        assert flag in cmd
    assert not {"health", "metadata", "inference"} & set(ADMIN_PROTOCOLS)
    with pytest.raises(ValueError):
        restricted_protocol_flags("a,b:c=d")


# -- the key file and the addresses ------------------------------------------------------------------

def test_admin_key_file_is_the_users_alone_and_the_log_names_it_not_the_key(served):
    mode = stat.S_IMODE(served.key_file.stat().st_mode)
    assert mode == 0o600, oct(mode)
    key = served.admin_key
    assert len(key) >= 40
    log = served.log.read_text(errors="replace")
    assert str(served.key_file) in log
    assert key not in log


def _listening(port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The local addresses of this network namespace's TCP sockets listening on `port` (/proc/net)."""
    found = []
    for name, ipv6 in (("tcp", False), ("tcp6", True)):
        path = Path("/proc/net") / name
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            address, port_hex = fields[1].split(":")
            if fields[3] != "0A" or int(port_hex, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(address)
            # Each 32-bit word in host (little-endian) order.
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            found.append(ipaddress.ip_address(raw))
    return found


def _loopback(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads the listening sockets from /proc/net (Linux)")
def test_triton_listens_on_loopback_only(served):
    for port in (served.grpc_port, served.http_port, served.metrics_port):
        addresses = _listening(port)
        assert addresses, f"nothing listens on port {port}"
        assert all(_loopback(address) for address in addresses), (port, addresses)
    # The front end is where it was asked to be.
    assert all(_loopback(address) for address in _listening(served.openai_port))


def _outward_address() -> str | None:
    """An address of this host other than loopback (the one a route out leaves by), if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: nothing is sent
            address = probe.getsockname()[0]
        except OSError:
            return None
    if ipaddress.ip_address(address).is_loopback or address == "0.0.0.0":
        return None
    with socket.socket() as local:
        try:
            local.bind((address, 0))  # one of this host's own addresses, not a translated one
        except OSError:
            return None
    return address


def test_triton_refuses_connections_to_another_address_of_this_host(served):
    address = _outward_address()
    if address is None:
        pytest.skip("this host has no address but loopback")
    for port in (served.grpc_port, served.http_port, served.metrics_port):
        with pytest.raises((ConnectionRefusedError, TimeoutError)):  # refused, or dropped by a firewall
            socket.create_connection((address, port), timeout=5).close()


# -- refused without the key, allowed with it --------------------------------------------------------

@pytest.fixture
def shm_region():
    import tritonclient.utils.shared_memory as shm

    key = f"/llmserve-lockdown-{os.getpid()}"
    handle = shm.create_shared_memory_region("lockdown", key, 64)
    yield key
    shm.destroy_shared_memory_region(handle)


def _refused(call) -> str:
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as error:
        call()
    message = str(error.value)
    assert "restricted" in message, message
    return message


def _admin_refused(triton, protocol: str, shm_region: str) -> None:
    """Every admin call of a tritonclient (gRPC or HTTP: the same methods) refused without the key."""
    message = _refused(lambda: triton.register_system_shared_memory("lockdown", shm_region, 64))
    assert (GRPC_ADMIN_HEADER if protocol == "grpc" else ADMIN_HEADER) in message
    _refused(lambda: triton.get_system_shared_memory_status())
    _refused(lambda: triton.unload_model("ensemble"))
    _refused(lambda: triton.load_model("ensemble"))
    _refused(lambda: triton.get_model_repository_index())
    _refused(lambda: triton.get_inference_statistics())
    _refused(lambda: triton.get_model_config("ensemble"))
    _refused(lambda: triton.get_trace_settings())
    if protocol == "grpc":
        _refused(lambda: triton.update_log_settings({"log_verbose_level": 1}))
    else:
        _refused(lambda: triton.get_log_settings())
    # A wrong key is no key.
    _refused(lambda: triton.get_model_repository_index(headers=admin_headers("not-the-key", protocol)))
    assert triton.is_model_ready("ensemble")  # the unload did not happen


def test_grpc_admin_protocols_refused_without_the_key(served, shm_region):
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(served.grpc_url) as triton:
        _admin_refused(triton, "grpc", shm_region)


def test_http_admin_apis_refused_without_the_key(served, shm_region):
    import tritonclient.http as httpclient

    triton = httpclient.InferenceServerClient(served.http_url)
    try:
        _admin_refused(triton, "http", shm_region)
    finally:
        triton.close()
    # curl's view: 403.
    assert _status(f"http://{served.http_url}/v2/models/stats") == 403


def test_admin_protocols_allowed_with_the_key_from_the_file(served, shm_region):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    grpc_headers = admin_headers(served.admin_key, "grpc")
    with grpcclient.InferenceServerClient(served.grpc_url) as triton:
        index = triton.get_model_repository_index(headers=grpc_headers, as_json=True)
        assert "ensemble" in {model["name"] for model in index["models"]}
        stats = triton.get_inference_statistics("ensemble", headers=grpc_headers, as_json=True)
        assert stats["model_stats"][0]["name"] == "ensemble"
        triton.register_system_shared_memory("lockdown", shm_region, 64, headers=grpc_headers)
        try:
            status = triton.get_system_shared_memory_status(headers=grpc_headers, as_json=True)
            assert "lockdown" in status["regions"]
        finally:
            triton.unregister_system_shared_memory("lockdown", headers=grpc_headers)
    http_headers = admin_headers(served.admin_key)
    triton = httpclient.InferenceServerClient(served.http_url)
    try:
        assert "ensemble" in {model["name"] for model in triton.get_model_repository_index(headers=http_headers)}
        assert triton.get_model_config("ensemble", headers=http_headers)["name"] == "ensemble"
    finally:
        triton.close()
    # What the docs tell an operator to run: curl -H "admin-key: $(cat build/run/triton-admin-key)" ...
    assert _status(f"http://{served.http_url}/v2/models/stats", {ADMIN_HEADER: served.admin_key}) == 200


# -- what the front end and the clients use still works ----------------------------------------------

def test_health_metadata_and_metrics_stay_open(served):
    import tritonclient.grpc as grpcclient

    http = f"http://{served.http_url}"
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/ensemble/ready", "/v2", "/v2/models/ensemble"):
        assert _status(http + path) == 200, path
    with grpcclient.InferenceServerClient(served.grpc_url) as triton:
        assert triton.is_server_live() and triton.is_server_ready() and triton.is_model_ready("ensemble")
        assert triton.get_server_metadata().version
        assert triton.get_model_metadata("ensemble").name == "ensemble"
    with urllib.request.urlopen(f"http://127.0.0.1:{served.metrics_port}/metrics", timeout=5) as response:
        assert b"llm_generated_tokens_total" in response.read()


def test_inference_through_the_clients_and_the_front_end(served, default_model_dir):
    import asyncio

    from client import AsyncClient, Client

    with Client(served.grpc_url) as client:
        assert client.health()
        completion = client.generate("Once upon a time", max_tokens=4)
        assert completion.finish_reason == "length"
        for _chunk in client.stream("Once upon a time", max_tokens=64):
            break  # leaving early stops the request on the server (inference only)
        assert client.generate("The little dog", max_tokens=2).text

    async def async_health() -> bool:
        async with AsyncClient(served.grpc_url) as client:
            return await client.health()

    assert asyncio.run(async_health())
    body = json.dumps({"model": default_model_dir.name, "prompt": "Once upon a time", "max_tokens": 4}).encode()
    request = urllib.request.Request(f"{served.gateway_url}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {FRONT_END_KEY}"})
    with urllib.request.urlopen(request, timeout=60) as response:
        assert json.loads(response.read())["usage"]["completion_tokens"] == 4


def test_the_front_end_takes_its_key_from_the_environment_not_the_command_line(served):
    """`make serve API_KEY=...`: the key reaches the front end as $LLMSERVE_API_KEY, so it is required
    there and appears in no process's command line."""
    request = urllib.request.Request(f"{served.gateway_url}/v1/models")
    assert _status_of(request) == 401
    request.add_header("Authorization", f"Bearer {FRONT_END_KEY}")
    assert _status_of(request) == 200
    family = _descendants(served.pid)
    assert len(family) >= 3  # the launcher, tritonserver, the front end (and the Python backend's stubs)
    for pid in family:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            assert FRONT_END_KEY.encode() not in cmdline.read()


def _descendants(root: int) -> set[int]:
    """`root` and every process below it (parents read from /proc/PID/stat)."""
    parents = {}
    for name in os.listdir("/proc"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open(f"/proc/{name}/stat") as stat_file:
                parents[int(name)] = int(stat_file.read().rsplit(")", 1)[1].split()[1])
    family, grown = {root}, True
    while grown:
        children = {pid for pid, parent in parents.items() if parent in family} - family
        family |= children
        grown = bool(children)
    return family


def _status_of(request: urllib.request.Request) -> int:
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
