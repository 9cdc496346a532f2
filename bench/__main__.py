"""`python -m bench` (`make bench`): start the servers on free ports, sweep concurrency, write the results.

All systems are up for the whole run; they are measured one at a time (the others
idle), level by level, so each ratio compares measurements taken close together. Each
measured run follows an unrecorded warm-up at its concurrency (`--warmup-requests-per-worker`),
as genai-perf's and AIPerf's warm-up phase does: a server that idled while the others ran
serves its next burst measurably slower, the in-process engine hardly.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import sys
import time
from pathlib import Path

from bench import engine_limit, loadgen, report
from bench.metrics import summarize
from bench.peers import PEERS, available_peers
from llmserve.engine.config import DEFAULT_MAX_NUM_SEQS, DEFAULT_RUNTIME
from llmserve.paths import BUILD_DIR, DEFAULT_MODEL_DIR, REPO_ROOT
from llmserve.triton.gc_freeze import freeze_startup_objects
from measure.prompts import BENCH_PROMPTS


DEFAULT_SYSTEMS = "engine,triton,gateway,naive,llama.cpp,vllm,transformers"
# Prompts whose greedy texts are compared across the systems on the OpenAI endpoint.
GREEDY_CHECK_PROMPTS = 4


def _levels(text: str) -> list[int]:
    return [int(c) for c in text.split(",") if c]


class EngineSystem:
    """The in-process engine: its own limit, no transport (with `transit_ms`, replacement requests
    reach it that many ms after their predecessor ends, drawn uniformly between the two bounds)."""

    def __init__(self, args, transit_ms: tuple[float, float] | None = None) -> None:
        self.args = args
        self.name = "engine" if transit_ms is None else f"engine[transit {transit_ms[0]:g}-{transit_ms[1]:g} ms]"
        self.transit_s = (0.0, 0.0) if transit_ms is None else (transit_ms[0] / 1e3, transit_ms[1] / 1e3)
        # The server's slots: as many sequences at once, and as many prompts kept for the prefix cache.
        self.engine = engine_limit.make_engine(args.model_dir, args.runtime, DEFAULT_MAX_NUM_SEQS)
        freeze_startup_objects()  # as the `llm` model freezes its start-up heap

    def __enter__(self) -> EngineSystem:
        self.warm_up()
        return self

    def warm_up(self) -> None:
        """Every prompt once, as the servers' warm-up does: each system starts with them all cached."""
        engine_limit.run_level(self.engine, BENCH_PROMPTS, 2, -(-len(BENCH_PROMPTS) // 2), 8)

    def __exit__(self, *exc: object) -> None:
        pass

    def run_level(self, concurrency: int, per_worker: int | None = None):
        per_worker = per_worker or requests_per_worker(self.args, concurrency)
        return engine_limit.run_level(self.engine, BENCH_PROMPTS, concurrency, per_worker, self.args.max_tokens,
                                      self.transit_s)

    def prompt_tokens(self) -> tuple[float, float]:
        """(prompt tokens admitted, those whose K/V came from the prefix cache) so far."""
        return self.engine.stats.prompt_tokens, self.engine.stats.prefix_cached_tokens


class _ServedSystem:
    """A server in a subprocess, idle while the other systems are measured, driven over asyncio."""

    def __init__(self, args, name: str, server) -> None:
        self.args, self.name, self.server = args, name, server
        self.loop = asyncio.new_event_loop()
        self.requests_sent = 0

    def __enter__(self):
        self.server.start()
        self.run_level(2)  # warm-up
        return self

    def __exit__(self, *exc: object) -> None:
        self.close_client()
        self.loop.close()
        self.server.stop()

    def run_level(self, concurrency: int, per_worker: int | None = None):
        per_worker = per_worker or requests_per_worker(self.args, concurrency)
        self.requests_sent += concurrency * per_worker
        return self.loop.run_until_complete(loadgen.run_level(self.request, BENCH_PROMPTS, concurrency, per_worker))

    def close_client(self) -> None:
        pass

    def prompt_tokens(self) -> tuple[float, float] | None:
        return None


METRICS_SETTLE_S = 5.0


def _requests_finished(metrics_url: str) -> float:
    from llmserve.triton.launcher import metric

    try:
        return metric(metrics_url, "llm_requests_finished_total")
    except KeyError:  # no request has finished yet: the family has no sample
        return 0.0


class TritonSystem(_ServedSystem):
    def __init__(self, args, name: str = "triton", settings: dict[str, str] | None = None) -> None:
        from llmserve.triton.launcher import TritonServer, model_env

        env = model_env(args.model_dir, **{"runtime": args.runtime, **(settings or {})})
        super().__init__(args, name, TritonServer(env=env, log_path=args.out / f"{name}.log"))
        self.client = None

    async def request(self, prompt: str):
        from bench.triton_driver import triton_request
        from client import AsyncClient

        if self.client is None:  # made inside the loop: a grpc.aio channel belongs to it
            self.client = AsyncClient(self.server.grpc_url, timeout=600)
        return await triton_request(self.client, prompt, self.args.max_tokens, self.args.max_tokens)

    def close_client(self) -> None:
        if self.client is not None:
            self.loop.run_until_complete(self.client.close())

    def prompt_tokens(self) -> tuple[float, float]:
        from llmserve.triton.launcher import metric

        url = self.server.metrics_url
        # `llm` flushes its counters after the step that finishes a request, which can come after the
        # client has the last response: read them once every request sent so far is counted (or after
        # METRICS_SETTLE_S: a request refused before the engine is never counted).
        deadline = time.monotonic() + METRICS_SETTLE_S
        while _requests_finished(url) < self.requests_sent and time.monotonic() < deadline:
            time.sleep(0.01)
        return metric(url, "llm_prompt_tokens_total"), metric(url, "llm_prefix_cache_hit_tokens_total")


class LlmDirectSystem(TritonSystem):
    """This server's `llm` model called directly (token ids in and out, no ensemble, no pre- or
    postprocessing): the floor of serving through Triton with a Python-backend `llm`."""

    def __init__(self, args) -> None:
        super().__init__(args, "llm-direct")

    async def request(self, prompt: str):
        from bench.llm_direct_driver import LlmDirectClient

        if self.client is None:
            self.client = LlmDirectClient(self.server.grpc_url, self.args.model_dir)
        return await self.client.request(prompt, self.args.max_tokens, self.args.max_tokens)


class _OpenAISystem(_ServedSystem):
    """A server driven over its OpenAI `/v1/completions` (SSE), as users' clients reach it: every
    output exactly `--max-tokens` long and greedy, by whatever fields do that on that server."""

    model = "default"
    reuses_connections = True

    def __init__(self, args, name: str, server) -> None:
        super().__init__(args, name, server)
        self.session = None

    @property
    def url(self) -> str:
        return self.server.url

    def fixed_length_fields(self, n: int) -> dict:
        return self.server.fixed_length_fields(n)

    async def request(self, prompt: str, text_parts: list[str] | None = None):
        from bench.openai_driver import fixed_length_request, new_session

        if self.session is None:
            self.session = new_session(self.reuses_connections)
        return await fixed_length_request(self.session, self, prompt, self.args.max_tokens, text_parts=text_parts)

    def greedy_texts(self, prompts: list[str]) -> list[str]:
        """Each prompt's text, one request at a time."""
        texts = []
        for prompt in prompts:
            parts: list[str] = []
            record = self.loop.run_until_complete(self.request(prompt, parts))
            texts.append(f"<error: {record.error}>" if record.error else "".join(parts))
        return texts

    def close_client(self) -> None:
        if self.session is not None:
            self.loop.run_until_complete(self.session.close())


class GatewaySystem(_OpenAISystem):
    """The front end (llmserve.gateway) over SSE, in front of the `triton` system's server: the same
    engine reached through one more hop (HTTP in, gRPC to Triton)."""

    def __init__(self, args, triton: TritonSystem) -> None:
        from llmserve.triton.launcher import GatewayServer

        self.model = Path(args.model_dir).name
        self.triton = triton
        super().__init__(args, "gateway", GatewayServer(triton.server.grpc_url, log_path=args.out / "gateway.log",
                                                        extra_args=["--served-model-name", self.model]))

    def fixed_length_fields(self, n: int) -> dict:
        return {"max_tokens": n, "min_tokens": n, "temperature": 0}

    def run_level(self, concurrency: int, per_worker: int | None = None):
        # The server's finished-request counter counts these too: triton's prompt_tokens waits for it.
        self.triton.requests_sent += concurrency * (per_worker or requests_per_worker(self.args, concurrency))
        return super().run_level(concurrency, per_worker)

    def greedy_texts(self, prompts: list[str]) -> list[str]:
        self.triton.requests_sent += len(prompts)  # counted by the same server, as above
        return super().greedy_texts(prompts)


class PeerSystem(_OpenAISystem):
    """Another server users would pick instead (bench.peers), on its OpenAI endpoint, with as many
    sequences at once as this server's slots."""

    def __init__(self, args, name: str, server) -> None:
        super().__init__(args, name, server)
        self.model = server.model
        self.reuses_connections = getattr(server, "reuses_connections", True)


class NaiveSystem(_ServedSystem):
    def __init__(self, args) -> None:
        from bench.naive_server import NaiveServer

        super().__init__(args, "naive", NaiveServer(args.model_dir, log_path=args.out / "naive.log"))

    async def request(self, prompt: str):
        from bench.naive_client import naive_request

        return await naive_request(self.server.url, prompt, self.args.max_tokens, self.args.max_tokens)


def requests_per_worker(args, concurrency: int) -> int:
    """At least `--min-requests` per run: at low concurrency, 4 requests per worker would make a p95
    out of a dozen samples (the slowest but one), and the TTFT target divides by c=1's p95."""
    return max(args.requests_per_worker, -(-args.min_requests // concurrency))


def _transit(text: str) -> tuple[float, float]:
    low, high = (float(x) for x in text.split(","))
    if not 0 <= low <= high:
        raise argparse.ArgumentTypeError(f"need 0 <= LOW <= HIGH, got {text!r}")
    return low, high


def _variant(text: str) -> tuple[str, dict[str, str]]:
    """NAME:KEY=VALUE,KEY=VALUE -> this server again, with those `llm` settings (LLM_<KEY>)."""
    name, _, assignments = text.partition(":")
    return f"triton[{name}]", dict(a.split("=", 1) for a in assignments.split(",") if a)


def _store(results: dict, system: str, concurrency: int, summary: dict) -> None:
    results["systems"].setdefault(system, {})[str(concurrency)] = summary
    tps = summary.get("output_tokens_per_s", float("nan"))
    print(f"  {system:7s} c={concurrency:<3d} {tps:8.1f} tok/s  TTFT p50 {summary.get('ttft_ms_p50', float('nan')):7.1f} ms"
          f"  errors {summary['errors']}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-dir", default=str(DEFAULT_MODEL_DIR))
    parser.add_argument("--concurrency", type=_levels, default=[1, 8, 32])
    parser.add_argument("--runtime", default=DEFAULT_RUNTIME,
                        help="runtime of the engine and the server (a --variant may set another)")
    parser.add_argument("--max-tokens", type=int, default=64, help="also min_tokens: every request the same length")
    parser.add_argument("--requests-per-worker", type=int, default=4)
    parser.add_argument("--min-requests", type=int, default=32,
                        help="requests per run at least (more per worker at low concurrency)")
    parser.add_argument("--warmup-requests-per-worker", type=int, default=1,
                        help="before each measured run, this many unrecorded requests per worker at the same "
                             "concurrency (0: none): a server that idled serves its next burst slower")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each level per system, interleaved across systems; latencies pooled")
    parser.add_argument("--systems", default=DEFAULT_SYSTEMS,
                        help="any of engine, triton, gateway (the front end over SSE, in front of triton's "
                             "server: needs triton), naive, llm-direct (this server's `llm` model called "
                             f"directly: the transport's floor) and the peers {', '.join(PEERS)} (set up on "
                             "first use under build/peers/; one that cannot be had is reported and skipped)")
    parser.add_argument("--out", type=Path, default=BUILD_DIR / "bench")
    parser.add_argument("--engine-transit-ms", type=_transit, default=None, metavar="LOW,HIGH",
                        help="also run the in-process engine with each replacement request arriving LOW-HIGH ms "
                             "after its predecessor ends (staggered, as through a server), side by side")
    parser.add_argument("--variant", type=_variant, action="append", default=[],
                        help="also run this server with other llm settings, side by side: "
                             "NAME:KEY=VALUE,... (e.g. per-step:max_stream_responses_per_s=none)")
    return parser.parse_args(argv)


def new_results(args) -> dict:
    """results.json before the sweep: when, and with which settings."""
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "config": {"model": os.path.relpath(args.model_dir, REPO_ROOT), "runtime": args.runtime, "cpus": os.cpu_count(),
                   "concurrency": args.concurrency, "max_tokens": args.max_tokens,
                   "requests_per_worker": args.requests_per_worker, "min_requests": args.min_requests,
                   "warmup_requests_per_worker": args.warmup_requests_per_worker,
                   "repeats": args.repeats, "prompts": BENCH_PROMPTS},
        "systems": {},
    }


def make_systems(args, unavailable: dict[str, str] | None = None) -> list:
    """The systems under test, in the order they start and take their turns."""
    factories = {"engine": lambda: EngineSystem(args), "triton": lambda: TritonSystem(args),
                 "naive": lambda: NaiveSystem(args), "llm-direct": lambda: LlmDirectSystem(args)}
    names = args.systems.split(",")
    unknown = [name for name in names if name not in factories and name not in PEERS and name != "gateway"]
    if unknown:
        raise SystemExit(f"--systems: unknown {', '.join(unknown)} "
                         f"(known: {', '.join([*factories, 'gateway', *PEERS])})")
    systems = [factories[name]() for name in names if name in factories]
    if "gateway" in names:
        triton = next((s for s in systems if s.name == "triton"), None)
        if triton is None:
            raise SystemExit("--systems: gateway runs in front of triton's server: list triton too")
        systems.insert(systems.index(triton) + 1, GatewaySystem(args, triton))
    systems += [TritonSystem(args, name, settings) for name, settings in args.variant]
    if args.engine_transit_ms is not None:
        systems.append(EngineSystem(args, args.engine_transit_ms))
    # Peers get as many sequences at once as this server's slots.
    peers = available_peers([name for name in names if name in PEERS], args.model_dir, DEFAULT_MAX_NUM_SEQS,
                            args.out, unavailable if unavailable is not None else {})
    return systems + [PeerSystem(args, name, server) for name, server in peers.items()]


def greedy_text_matches(systems: list) -> dict[str, bool]:
    """Whether each system on the OpenAI endpoint writes the same greedy text as the first of them
    (the front end, where it runs) for the first prompts."""
    openai = [s for s in systems if isinstance(s, _OpenAISystem)]
    texts = {s.name: s.greedy_texts(BENCH_PROMPTS[:GREEDY_CHECK_PROMPTS]) for s in openai}
    reference = next(iter(texts.values()), None)
    for name, got in texts.items():
        if got != reference:
            print(f"  {name}: greedy text differs from {openai[0].name}'s: {got[0][:80]!r} vs "
                  f"{reference[0][:80]!r}", file=sys.stderr, flush=True)
    return {name: got == reference for name, got in texts.items()}


def run_sweep(args, systems: list, results: dict) -> None:
    """Start every system, time the engine's prefill, then measure level by level into `results`."""
    with contextlib.ExitStack() as stack:
        for system in systems:
            print(f"starting {system.name}", file=sys.stderr, flush=True)
            stack.enter_context(system)
        freeze_startup_objects()  # the load generator's own GC pauses would blur every system's figures
        results["greedy_text_matches"] = greedy_text_matches(systems)
        engine = next((s for s in systems if s.name == "engine"), None)
        if engine is not None:
            results["prefill_ms"] = engine_limit.prefill_ms(engine.engine, BENCH_PROMPTS[0])
            engine.warm_up()  # the timing emptied its prefix cache
        for c in args.concurrency:
            for name, summary in measure_level(args, systems, c):
                _store(results, name, c, summary)


def measure_level(args, systems: list, concurrency: int) -> list[tuple[str, dict]]:
    """Every system in turn at one concurrency (the others idle), `--repeats` times with the order
    rotated: ratios compare runs seconds apart, on a machine whose speed drifts. (name, summary)
    of each system, in their order."""
    runs: dict[str, list] = {system.name: [] for system in systems}
    prompt_tokens = {system.name: [0.0, 0.0] for system in systems}  # admitted, from the prefix cache
    for repeat in range(args.repeats):
        for system in systems[repeat % len(systems):] + systems[:repeat % len(systems)]:
            runs[system.name].append(measured_run(args, system, concurrency, prompt_tokens[system.name]))
    return [(system.name, level_summary(runs[system.name], prompt_tokens[system.name])) for system in systems]


def measured_run(args, system, concurrency: int, prompt_tokens: list[float]):
    """One recorded run, after its unrecorded warm-up; adds the prompt tokens the system admitted
    during it (and those whose K/V came from the prefix cache) to `prompt_tokens`."""
    if args.warmup_requests_per_worker:  # unrecorded: it idled while the others ran
        system.run_level(concurrency, args.warmup_requests_per_worker)
    before = system.prompt_tokens()
    records = system.run_level(concurrency)
    if before is not None:
        for i, (old, new) in enumerate(zip(before, system.prompt_tokens())):
            prompt_tokens[i] += new - old
    return records


def level_summary(runs: list, prompt_tokens: list[float]) -> dict:
    """`summarize`'s figures, and the share of the prompt tokens from the prefix cache where counted."""
    summary = summarize(runs)
    admitted, cached = prompt_tokens
    if admitted:
        summary["prompt_tokens"] = admitted
        summary["prefix_cached_share"] = cached / admitted
    return summary


def write_results(results: dict, out: Path) -> None:
    """results.json, results.md (also printed) and results.png, with the ratios and targets."""
    results["ratios"] = report.ratios(results)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    table = report.markdown(results)
    (out / "results.md").write_text(table)
    report.plot(results, out / "results.png")
    print(table)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results = new_results(args)
    results["unavailable"] = {}
    run_sweep(args, make_systems(args, results["unavailable"]), results)
    write_results(results, args.out)


if __name__ == "__main__":
    main()
