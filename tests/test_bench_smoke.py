"""`make bench` works end to end on a tiny sweep (the real sweep is never part of `make test`)."""

import json
import subprocess
import sys

import pytest

from llmserve.engine.tokenizer import encode_prompt, load_tokenizer
from measure.prompts import BENCH_PROMPTS
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.e2e


def test_bench_tiny_sweep_writes_results(default_model_dir, tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--model-dir", str(default_model_dir), "--concurrency", "1,2",
         "--max-tokens", "8", "--requests-per-worker", "1", "--min-requests", "3", "--repeats", "2",
         "--systems", "engine,triton,gateway,naive,llm-direct", "--out", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    for system in ("engine", "triton", "gateway", "naive", "llm-direct"):
        for level, per_run in (("1", 3), ("2", 4)):  # at least 3 requests a run: 3 x 1 worker, 2 x 2 workers
            summary = results["systems"][system][level]
            assert summary["errors"] == 0 and summary["runs"] == 2 and summary["requests"] == 2 * per_run
            assert summary["output_tokens"] == 2 * 8 * per_run  # min_tokens = max_tokens: all the same length
            assert summary["output_tokens_per_s"] > 0 and summary["ttft_ms_p50"] > 0
    tokenizer = load_tokenizer(default_model_dir)
    for system in ("engine", "triton", "llm-direct"):  # the prompts repeat (and warm-up ran some): cache hits
        assert 0 < results["systems"][system]["2"]["prefix_cached_share"] < 1
        for level, per_run in (("1", 3), ("2", 4)):  # each run sends BENCH_PROMPTS[0:per_run]
            # the server's counters, read after each run, hold exactly that run's prompts: not its
            # warm-up's, not missing its last step's
            expected = 2 * sum(len(encode_prompt(tokenizer, prompt)) for prompt in BENCH_PROMPTS[:per_run])
            assert results["systems"][system][level]["prompt_tokens"] == expected
    assert "prefix_cached_share" not in results["systems"]["naive"]["2"]
    assert results["prefill_ms"] > 0
    assert results["config"]["warmup_requests_per_worker"] == 1  # before every run, not counted above
    assert results["ratios"]["per_concurrency"][0]["vs_naive"] > 0
    assert results["ratios"]["per_concurrency"][0]["llm_direct_vs_engine"] > 0
    assert (tmp_path / "results.png").stat().st_size > 10_000
    table = (tmp_path / "results.md").read_text()
    assert "| triton | 2 |" in table and "| llm-direct | 2 |" in table
    assert "llm called directly / in-process engine" in table
    assert "this server / naive" in run.stdout


def test_engine_limit_with_transit_delays_replacements(engine_factory):
    from bench.engine_limit import run_level

    engine = engine_factory(max_num_seqs=4, num_threads=1)
    prompts = ["Once upon a time", "The little dog"]
    direct = run_level(engine, prompts, 2, 3, max_tokens=4)
    delayed = run_level(engine, prompts, 2, 3, max_tokens=4, transit_s=(0.02, 0.03))
    for records in (direct, delayed):
        assert len(records) == 6 and all(r.num_output_tokens == 4 and r.chunks for r in records)
    # Each replacement starts 20-30 ms after the request it replaces ended (the first two start at once).
    starts = sorted(r.start for r in delayed)[2:]
    ends = sorted(r.end for r in delayed)[:4]
    assert all(start - end >= 0.02 for start, end in zip(starts, ends))
    assert not engine.has_unfinished()


def test_llm_direct_client_records_a_failed_request_and_goes_on(triton_server, default_model_dir):
    import asyncio

    from bench.llm_direct_driver import LlmDirectClient

    async def run():
        client = LlmDirectClient(triton_server.grpc_url, str(default_model_dir))
        try:
            good = await client.request("Once upon a time", 6, 6)
            bad = await client.request("Once upon a time", 10**9, 1)  # past the context: refused
            again = await client.request("Once upon a time", 6, 6)
        finally:
            await client.close()
        return good, bad, again

    good, bad, again = asyncio.run(run())
    for record in (good, again):
        assert record.error is None and record.num_output_tokens == 6 and record.chunks
        assert record.chunks[-1][1] == 6 and record.ttft > 0
    assert bad.error and "max_tokens" in bad.error and not bad.chunks
