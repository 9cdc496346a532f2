"""`make bench` works end to end on a tiny sweep (the real sweep is never part of `make test`)."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.e2e


def test_bench_tiny_sweep_writes_results(default_model_dir, tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--model-dir", str(default_model_dir), "--concurrency", "1,2",
         "--max-tokens", "8", "--requests-per-worker", "1", "--repeats", "2", "--out", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    for system in ("engine", "triton", "naive"):
        for level in ("1", "2"):
            summary = results["systems"][system][level]
            assert summary["errors"] == 0 and summary["runs"] == 2
            assert summary["output_tokens"] == 2 * 8 * int(level)  # min_tokens = max_tokens: all the same length
            assert summary["output_tokens_per_s"] > 0 and summary["ttft_ms_p50"] > 0
    assert results["prefill_ms"] > 0
    assert results["ratios"]["per_concurrency"][0]["vs_naive"] > 0
    assert (tmp_path / "results.png").stat().st_size > 10_000
    assert "| triton | 2 |" in (tmp_path / "results.md").read_text()
    assert "this server / naive" in run.stdout
