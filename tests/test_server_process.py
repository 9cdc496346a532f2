"""ServerProcess: a server never outlives the process that started it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

START_AND_HANG = textwrap.dedent("""
    import sys, time
    from llmserve.triton.launcher import ServerProcess, free_port

    class HttpServer(ServerProcess):
        name = "http.server"

        def __init__(self):
            super().__init__()
            self.port = free_port()

        def command(self):
            return [sys.executable, "-m", "http.server", str(self.port), "--bind", "127.0.0.1"]

        @property
        def health_url(self):
            return f"http://127.0.0.1:{self.port}/"

    server = HttpServer().start(timeout=30)
    print(server.process.pid, flush=True)
    time.sleep(600)
""")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie is dead, only not yet reaped
        return stat.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_server_stops_when_its_starter_is_killed():
    starter = subprocess.Popen([sys.executable, "-c", START_AND_HANG], stdout=subprocess.PIPE, text=True)
    try:
        server_pid = int(starter.stdout.readline())
        assert _alive(server_pid)
        starter.send_signal(signal.SIGKILL)  # no cleanup code runs in the starter
        starter.wait()
        deadline = time.monotonic() + 10
        while _alive(server_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(server_pid), "the server outlived the process that started it"
    finally:
        starter.kill()


def test_stop_leaves_no_process_of_the_server_behind(tmp_path):
    """Like a model stub that outlives its tritonserver: a child that ignores the stop signal."""
    from llmserve.triton.launcher import ServerProcess, free_port

    pid_file = tmp_path / "child.pid"
    stubborn = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(600)"
    port = free_port()
    script = (f"import subprocess, sys; child = subprocess.Popen([sys.executable, '-c', {stubborn!r}]); "
              f"open({str(pid_file)!r}, 'w').write(str(child.pid)); "
              f"import runpy; sys.argv = ['http.server', '{port}', '--bind', '127.0.0.1']; "
              f"runpy.run_module('http.server', run_name='__main__')")

    class Server(ServerProcess):
        def command(self):
            return [sys.executable, "-c", script]

        @property
        def health_url(self):
            return f"http://127.0.0.1:{port}/"

    with Server():
        child = int(pid_file.read_text())
        assert _alive(child)
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child), "a process of the server's group outlived stop()"
