"""`python -m bench.openloop` (`make bench-openloop`): every system over its OpenAI `/v1/completions`,
on realistic workloads, open loop at a sweep of request rates (vLLM `bench serve`'s `--request-rate`):
TTFT, ITL, TPOT and latency p50/p95/p99, output tokens/s and goodput under an SLO, per workload,
rate and system. Results: build/bench/openloop.{json,md} and openloop-<workload>.png.

All systems are up for the whole run and measured in turn at each rate (the others idle). Every
request's output length is fixed (greedy; `min_tokens`, or what fixes it on that server), the same
on every system.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import sys
from pathlib import Path

from bench import workloads
from bench.goodput import Slo, goodput
from bench.loadgen import run_open_loop
from bench.metrics import summarize
from bench.peers import PEERS, available_peers
from bench.records import RequestRecord
from llmserve.engine.config import DEFAULT_MAX_NUM_SEQS
from llmserve.paths import BUILD_DIR, DEFAULT_MODEL_DIR, REPO_ROOT
from measure.prompts import Prompt

WORKLOADS = {"distinct": workloads.distinct, "shared-prefix": workloads.shared_prefix}
DEFAULT_SYSTEMS = "llmserve,llmserve[no-prefix-cache],llama.cpp,vllm,transformers"


class ThisServer:
    """tritonserver and the front end before it; `settings`: `llm` settings (LLM_<KEY>)."""

    def __init__(self, model_dir: str, out: Path, name: str = "llmserve", settings: dict[str, str] | None = None):
        from llmserve.triton.launcher import GatewayServer, TritonServer, model_env

        self.name = name
        self.model = "default"
        self._triton = TritonServer(env=model_env(model_dir, **(settings or {})), log_path=out / f"{name}-triton.log")
        self._gateway_factory = lambda url: GatewayServer(url, log_path=out / f"{name}-gateway.log",
                                                          extra_args=["--log-level", "warning"])
        self._gateway = None

    def __enter__(self) -> ThisServer:
        self._triton.start()
        self._gateway = self._gateway_factory(self._triton.grpc_url).start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._gateway is not None:
            self._gateway.stop()
        self._triton.stop()

    @property
    def url(self) -> str:
        return self._gateway.url

    @staticmethod
    def fixed_length_fields(n: int) -> dict:
        return {"max_tokens": n, "min_tokens": n, "temperature": 0}


class OpenAIClient:
    """One system's requests, on its own aiohttp session (made inside the running loop)."""

    def __init__(self, system) -> None:
        self.system = system
        self.session = None

    async def request(self, prompt: Prompt, text_parts: list[str] | None = None) -> RequestRecord:
        from bench.openai_driver import fixed_length_request, new_session

        if self.session is None:
            self.session = new_session(getattr(self.system, "reuses_connections", True))
        return await fixed_length_request(self.session, self.system, prompt.text, prompt.max_tokens,
                                          text_parts=text_parts)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


def _rates(text: str) -> list[float]:
    return [float(r) for r in text.split(",") if r]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", default=str(DEFAULT_MODEL_DIR))
    parser.add_argument("--workloads", default="distinct,shared-prefix", help=f"any of {', '.join(WORKLOADS)}")
    parser.add_argument("--request-rate", type=_rates, default=[4, 8, 16, 32, 64],
                        help="requests/s, Poisson arrivals; `inf` sends them all at once")
    parser.add_argument("--num-requests", type=int, default=100, help="per workload, rate and system")
    parser.add_argument("--slo", type=Slo.parse, default=Slo(), help="goodput's SLO: ttft:MS,itl:MS "
                                                                     "(default ttft:200,itl:50)")
    parser.add_argument("--systems", default=DEFAULT_SYSTEMS,
                        help="llmserve (this server through its front end), llmserve[no-prefix-cache] (the same, "
                             f"prefix caching off) and the peers {', '.join(PEERS)} (set up on first use under "
                             "build/peers/; one that cannot be had is reported and skipped)")
    parser.add_argument("--seed", type=int, default=workloads.DEFAULT_SEED)
    parser.add_argument("--out", type=Path, default=BUILD_DIR / "bench")
    return parser.parse_args(argv)


def make_systems(args, unavailable: dict[str, str]) -> dict:
    """name -> system (a context manager with .url, .model, .fixed_length_fields(n)); why each peer
    that cannot be had here is left out, in `unavailable`."""
    factories = {
        "llmserve": lambda: ThisServer(args.model_dir, args.out),
        "llmserve[no-prefix-cache]": lambda: ThisServer(args.model_dir, args.out, "llmserve[no-prefix-cache]",
                                                        {"enable_prefix_caching": "false"}),
    }
    names = args.systems.split(",")
    unknown = [name for name in names if name not in factories and name not in PEERS]
    if unknown:
        raise SystemExit(f"--systems: unknown {', '.join(unknown)} (known: {', '.join([*factories, *PEERS])})")
    # Peers get as many sequences at once as this server's slots.
    peers = available_peers([name for name in names if name in PEERS], args.model_dir, DEFAULT_MAX_NUM_SEQS,
                            args.out, unavailable, log_prefix="openloop-")
    return {name: factories[name]() if name in factories else peers[name] for name in names
            if name in factories or name in peers}


async def _run(client: OpenAIClient, prompts: list[Prompt], rate: float, seed: int) -> list[RequestRecord]:
    return await run_open_loop(client.request, prompts, rate, seed)


def _summary(records: list[RequestRecord], rate: float, slo: Slo) -> dict:
    summary = summarize([records])
    summary["request_rate"] = rate
    summary["goodput_rps"] = goodput(records, slo)
    return summary


def greedy_texts(loop, clients: dict, prompts: list[Prompt]) -> dict[str, list[str]]:
    """Each system's text for the same prompts, one at a time (greedy: they should agree)."""
    texts: dict[str, list[str]] = {}
    for name, client in clients.items():
        texts[name] = []
        for prompt in prompts:
            parts: list[str] = []
            loop.run_until_complete(client.request(prompt, parts))
            texts[name].append("".join(parts))
    return texts


def run(args) -> dict:
    results = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
               "config": {"model": os.path.relpath(args.model_dir, REPO_ROOT), "cpus": os.cpu_count(),
                          "request_rates": args.request_rate, "num_requests": args.num_requests,
                          "slo": {"ttft_ms": args.slo.ttft_ms, "itl_ms": args.slo.itl_ms}, "seed": args.seed},
               "workloads": {}, "unavailable": {}}
    loop = asyncio.new_event_loop()
    systems = make_systems(args, results["unavailable"])
    with contextlib.ExitStack() as stack:
        for name, system in systems.items():
            print(f"starting {name}", file=sys.stderr, flush=True)
            stack.enter_context(system)
        clients = {name: OpenAIClient(system) for name, system in systems.items()}
        stack.callback(lambda: [loop.run_until_complete(c.close()) for c in clients.values()])
        for workload_name in args.workloads.split(","):
            workload = WORKLOADS[workload_name](args.num_requests, args.seed)
            entry = results["workloads"][workload_name] = {"description": workload.description, "systems": {}}
            check = greedy_texts(loop, clients, workload.prompts[:4])  # also each system's warm-up
            reference = next(iter(check.values()))
            entry["greedy_text_matches"] = {name: texts == reference for name, texts in check.items()}
            for rate in args.request_rate:
                for name in systems:
                    records = loop.run_until_complete(_run(clients[name], workload.prompts, rate, args.seed))
                    summary = _summary(records, rate, args.slo)
                    entry["systems"].setdefault(name, []).append(summary)
                    print(f"  {workload_name} {name:24s} rate {rate:5g}/s  {summary.get('output_tokens_per_s', 0):7.1f}"
                          f" tok/s  TTFT p95 {summary.get('ttft_ms_p95', float('nan')):7.1f} ms  goodput "
                          f"{summary['goodput_rps']:5.2f}/s  errors {summary['errors']}", file=sys.stderr, flush=True)
    loop.close()
    return results


def peak_goodput(entry: dict) -> dict[str, float]:
    """Each system's best goodput over the rates: up to its capacity within the SLO, goodput follows
    the rate; past it, it falls."""
    return {system: max(r["goodput_rps"] for r in rows) for system, rows in entry["systems"].items()}


def goodput_vs_best_peer(entry: dict) -> tuple[str, float] | None:
    """(the peer with the best peak goodput, llmserve's peak / its peak), where both ran."""
    peak = peak_goodput(entry)
    peers = {name: value for name, value in peak.items() if name in PEERS}
    if "llmserve" not in peak or not peers:
        return None
    best = max(peers, key=peers.get)
    return best, peak["llmserve"] / peers[best] if peers[best] else float("inf")


def markdown(results: dict) -> str:
    slo = results["config"]["slo"]
    lines: list[str] = [f"{name}: not run ({reason})." for name, reason in results.get("unavailable", {}).items()]
    lines += [""] if lines else []
    for name, entry in results["workloads"].items():
        lines += [f"### {name}: {entry['description']}", "",
                  f"Goodput: requests/s with TTFT <= {slo['ttft_ms']:g} ms and their own ITL p95 <= "
                  f"{slo['itl_ms']:g} ms. Greedy text the same as the first system's: "
                  + ", ".join(f"{s} {'yes' if ok else 'NO'}" for s, ok in entry["greedy_text_matches"].items()), "",
                  "| system | rate /s | output tok/s | TTFT p50 / p95 / p99 ms | ITL p50 / p95 ms | TPOT p50 ms "
                  "| latency p50 / p95 ms | goodput /s | errors |", "|---|---:|---:|---|---|---:|---|---:|---:|"]
        for system, rows in entry["systems"].items():
            for r in rows:
                lines.append(f"| {system} | {r['request_rate']:g} | {r.get('output_tokens_per_s', 0):.0f} | "
                             f"{r.get('ttft_ms_p50', float('nan')):.1f} / {r.get('ttft_ms_p95', float('nan')):.1f} / "
                             f"{r.get('ttft_ms_p99', float('nan')):.1f} | {r.get('itl_ms_p50', float('nan')):.2f} / "
                             f"{r.get('itl_ms_p95', float('nan')):.2f} | {r.get('tpot_ms_p50', float('nan')):.2f} | "
                             f"{r.get('latency_ms_p50', float('nan')):.0f} / {r.get('latency_ms_p95', float('nan')):.0f} | "
                             f"{r['goodput_rps']:.2f} | {r['errors']} |")
        peak = peak_goodput(entry)
        lines += ["", "Peak goodput (the best over the rates), requests/s: " + ", ".join(
            f"{system} {value:.2f}" for system, value in peak.items()) + "."]
        ratio = goodput_vs_best_peer(entry)
        if ratio is not None:
            lines.append(f"llmserve / the best peer ({ratio[0]}): {ratio[1]:.2f}x (target >= 1.2x).")
        lines.append("")
    return "\n".join(lines)


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for name, entry in results["workloads"].items():
        figure, (good, ttft) = plt.subplots(1, 2, figsize=(11, 4))
        for system, rows in entry["systems"].items():
            rates = [r["request_rate"] for r in rows]
            good.plot(rates, [r["goodput_rps"] for r in rows], marker="o", label=system)
            ttft.plot(rates, [r.get("ttft_ms_p95", float("nan")) for r in rows], marker="o", label=system)
        good.set(title=f"{name}: goodput", xlabel="request rate (requests/s)", ylabel="requests/s within the SLO")
        ttft.set(title=f"{name}: TTFT p95", xlabel="request rate (requests/s)", ylabel="ms", yscale="log")
        for ax in (good, ttft):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(out / f"openloop-{name}.png", dpi=100)
        plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.workloads.split(","):
        if name not in WORKLOADS:
            raise SystemExit(f"--workloads: unknown {name} (known: {', '.join(WORKLOADS)})")
    results = run(args)
    (args.out / "openloop.json").write_text(json.dumps(results, indent=2))
    table = markdown(results)
    (args.out / "openloop.md").write_text(table)
    plot(results, args.out)
    print(table)


if __name__ == "__main__":
    main()
