"""`make serve`'s launcher: tritonserver and the front end together, both stopped by one Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from llmserve.triton.launcher import free_ports

pytestmark = pytest.mark.e2e


def _status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except (urllib.error.URLError, OSError):
        return None


def test_launcher_runs_triton_and_the_front_end_and_ctrl_c_stops_both(default_model_dir, tmp_path):
    grpc, http, metrics, openai = free_ports(4)
    log = open(tmp_path / "serve.log", "w+b")
    launcher = subprocess.Popen(
        [sys.executable, "-m", "llmserve.triton.launcher", "--model-dir", str(default_model_dir),
         "--grpc-port", str(grpc), "--http-port", str(http), "--metrics-port", str(metrics),
         "--openai-port", str(openai), "--openai-host", "127.0.0.1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    gateway = f"http://127.0.0.1:{openai}"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and launcher.poll() is None:
            status = _status(f"{gateway}/health")
            if status == 200:
                break
            time.sleep(0.2)
        else:
            log.seek(0)
            pytest.fail(f"the front end never became ready:\n{log.read().decode()[-4000:]}")
        # Ready means the ensemble is ready: a request goes through at once.
        assert _status(f"http://127.0.0.1:{http}/v2/models/ensemble/ready") == 200
        body = json.dumps({"model": default_model_dir.name, "prompt": "Once upon a time", "max_tokens": 4}).encode()
        request = urllib.request.Request(f"{gateway}/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            assert json.loads(response.read())["usage"]["completion_tokens"] == 4
        os.killpg(launcher.pid, signal.SIGINT)  # what Ctrl-C in `make serve`'s terminal sends
        assert launcher.wait(timeout=60) is not None
        assert _status(f"{gateway}/health") is None
        assert _status(f"http://127.0.0.1:{http}/v2/health/live") is None
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
        log.close()
