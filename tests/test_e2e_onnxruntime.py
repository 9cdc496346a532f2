"""End to end across runtimes: the default server (onnxruntime: its llm model runs the exported
graph) streams the same greedy text through the ensemble as a server on runtime torch."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.ensemble_requests import run_stream

pytestmark = pytest.mark.e2e

PROMPTS = ["Once upon a time", "The little dog", "One day, Lily went to the park", "Tom and his friend",
           "In the morning", "The sun was"]


@pytest.fixture(scope="module")
def torch_server(default_model_dir, tmp_path_factory):
    from llmserve.triton.launcher import TritonServer, model_env

    env = model_env(str(default_model_dir), "torch")
    with TritonServer(env=env, log_path=tmp_path_factory.mktemp("triton-torch") / "server.log") as server:
        yield server


def _group_maps(pgid: int) -> str:
    """The memory maps of every process in the server's process group (tritonserver and its stubs)."""
    maps = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if os.getpgid(int(proc.name)) == pgid:
                    maps.append((proc / "maps").read_text())
            except (OSError, ProcessLookupError):
                continue
    return "".join(maps)


def test_default_onnxruntime_server_streams_the_torch_servers_text(triton_server, torch_server):
    def both(prompt: str):
        values = dict(text_input=prompt, max_tokens=32, min_tokens=32, stream=True)
        return run_stream(torch_server.grpc_url, **values), run_stream(triton_server.grpc_url, **values)

    with ThreadPoolExecutor(len(PROMPTS)) as pool:  # concurrent: both servers batch them in flight
        results = list(pool.map(both, PROMPTS))
    for torch_result, onnx_result in results:
        assert torch_result.error is None and onnx_result.error is None
        assert len([p for p in onnx_result.pieces if p]) > 1  # streamed
        assert onnx_result.num_output_tokens == 32
        assert onnx_result.text == torch_result.text and onnx_result.text.strip()
    # The default server's llm model really runs ONNX Runtime (its native library is loaded in a stub).
    assert "onnxruntime_pybind11_state" in _group_maps(triton_server.process.pid)
    assert "onnxruntime_pybind11_state" not in _group_maps(torch_server.process.pid)
