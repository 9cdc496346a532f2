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
    from llmserve.launcher import ServerProcess, free_port

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
