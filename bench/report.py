"""results.json -> results.md (tables, ratios, targets) and results.png (throughput and TTFT vs concurrency)."""

from __future__ import annotations

import math
from pathlib import Path

SYSTEM_NAMES = {"triton": "this server (ensemble, gRPC)", "naive": "naive server (FastAPI + WebSocket)",
                "engine": "engine in-process (no server)",
                "gateway": "the front end (OpenAI SSE) in front of this server",
                "llm-direct": "llm model called directly (token ids, no ensemble)",
                "llama.cpp": "llama.cpp llama-server", "vllm": "vLLM (CPU build)",
                "transformers": "transformers serve --continuous-batching"}
PEER_NAMES = ("llama.cpp", "vllm", "transformers")
# Against the best peer at each concurrency, this server through its front end (the OpenAI endpoint).
PEER_TARGETS = {"vs_best_peer": 1.2, "ttft_p50_vs_best_peer": 1.0}


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def ratios(results: dict) -> dict:
    levels = results["config"]["concurrency"]
    systems = results["systems"]
    out: dict = {"per_concurrency": []}

    def tps(system: str, c: int) -> float | None:
        return systems.get(system, {}).get(str(c), {}).get("output_tokens_per_s")

    def ttft_p50(system: str, c: int) -> float | None:
        return systems.get(system, {}).get(str(c), {}).get("ttft_ms_p50")

    for c in levels:
        ours, naive, engine, direct = tps("triton", c), tps("naive", c), tps("engine", c), tps("llm-direct", c)
        row = {
            "concurrency": c,
            "vs_naive": ours / naive if ours and naive else None,
            "vs_engine": ours / engine if ours and engine else None,
            "llm_direct_vs_engine": direct / engine if direct and engine else None,
        }
        peers = {name: tps(name, c) for name in PEER_NAMES if tps(name, c)}
        front, front_ttft = tps("gateway", c), ttft_p50("gateway", c)
        if peers and front:
            best = max(peers, key=peers.get)
            fastest = min((n for n in peers if ttft_p50(n, c) is not None), key=lambda n: ttft_p50(n, c))
            row.update(best_peer=best, vs_best_peer=front / peers[best], first_token_peer=fastest,
                       ttft_p50_vs_best_peer=front_ttft / ttft_p50(fastest, c) if front_ttft else None)
        out["per_concurrency"].append(row)
    by_c = {row["concurrency"]: row for row in out["per_concurrency"]}
    triton = systems.get("triton", {})
    if 32 in by_c:
        out["vs_naive_c32"] = by_c[32]["vs_naive"]
        out["vs_engine_c32"] = by_c[32]["vs_engine"]
    if "ttft_ms_p50" in triton.get("1", {}) and results.get("prefill_ms") is not None:
        out["ttft_c1_minus_prefill_ms"] = triton["1"]["ttft_ms_p50"] - results["prefill_ms"]
    for system, key in (("triton", "ttft_p95_c32_over_c1"), ("llm-direct", "llm_direct_ttft_p95_c32_over_c1")):
        levels_of = systems.get(system, {})
        if "ttft_ms_p95" in levels_of.get("1", {}) and "ttft_ms_p95" in levels_of.get("32", {}):
            out[key] = levels_of["32"]["ttft_ms_p95"] / levels_of["1"]["ttft_ms_p95"]
    gateway = systems.get("gateway", {})
    if tps("gateway", 32) and tps("triton", 32):
        out["gateway_vs_triton_c32"] = tps("gateway", 32) / tps("triton", 32)
    if "ttft_ms_p50" in gateway.get("1", {}) and "ttft_ms_p50" in triton.get("1", {}):
        out["gateway_ttft_c1_minus_triton_ms"] = gateway["1"]["ttft_ms_p50"] - triton["1"]["ttft_ms_p50"]
    if 32 in by_c and by_c[32]["llm_direct_vs_engine"] is not None:
        out["llm_direct_vs_engine_c32"] = by_c[32]["llm_direct_vs_engine"]
    return out


def markdown(results: dict) -> str:
    cfg = results["config"]
    lines = [
        f"Model `{cfg['model']}`, runtime {cfg.get('runtime', 'torch')}, {cfg['cpus']} CPUs, max_tokens = min_tokens = {cfg['max_tokens']} (greedy), "
        f"{cfg['requests_per_worker']} requests per worker and at least {cfg.get('min_requests', 0)} per run, "
        f"each after {cfg.get('warmup_requests_per_worker', 0)} unrecorded warm-up request(s) per worker, "
        f"{cfg.get('repeats', 1)} runs per level, "
        f"{len(cfg['prompts'])} prompts; {results['date']}.",
        "",
        "| system | conc. | output tok/s | TTFT p50 / p95 / p99 ms | ITL p50 / p95 ms | TPOT p50 ms "
        "| latency p50 / p95 ms | prompt tokens from the prefix cache | errors |",
        "|---|---:|---:|---|---|---:|---|---:|---:|",
    ]
    for system, levels in results["systems"].items():
        for c, s in levels.items():
            cached = s.get("prefix_cached_share")
            cached = "n/a" if cached is None else f"{cached:.0%}"
            if "output_tokens_per_s" not in s:
                lines.append(f"| {system} | {c} | n/a | | | | | {cached} | {s['errors']} |")
                continue
            lines.append(
                f"| {system} | {c} | {_fmt(s['output_tokens_per_s'], 0)} | {_fmt(s['ttft_ms_p50'])} / "
                f"{_fmt(s['ttft_ms_p95'])} / {_fmt(s['ttft_ms_p99'])} | {_fmt(s['itl_ms_p50'], 2)} / "
                f"{_fmt(s['itl_ms_p95'], 2)} | {_fmt(s['tpot_ms_p50'], 2)} | {_fmt(s['latency_ms_p50'], 0)} / "
                f"{_fmt(s['latency_ms_p95'], 0)} | {cached} | {s['errors']} |")
    r = results["ratios"]
    direct = any(row.get("llm_direct_vs_engine") is not None for row in r["per_concurrency"])
    lines += ["", "| concurrency | this server / naive (tok/s) | this server / in-process engine (tok/s) |"
              + (" llm called directly / in-process engine (tok/s) |" if direct else ""),
              "|---:|---:|---:|" + ("---:|" if direct else "")]
    for row in r["per_concurrency"]:
        lines.append(f"| {row['concurrency']} | {_fmt(row['vs_naive'], 2)} | {_fmt(row['vs_engine'], 2)} |"
                     + (f" {_fmt(row.get('llm_direct_vs_engine'), 2)} |" if direct else ""))
    peer_rows = [row for row in r["per_concurrency"] if "best_peer" in row]
    if peer_rows:
        lines += ["", "This server through its front end (OpenAI SSE) against the best peer at each concurrency "
                      "(targets: tok/s >= 1.2x the best peer's, TTFT p50 no worse than the best peer's):", "",
                  "| concurrency | best peer (tok/s) | front end / it (tok/s) | best peer (TTFT p50) | front end / it "
                  "(TTFT p50) | met |", "|---:|---|---:|---|---:|---|"]
        for row in peer_rows:
            met = (row["vs_best_peer"] >= PEER_TARGETS["vs_best_peer"] and row["ttft_p50_vs_best_peer"] is not None
                   and row["ttft_p50_vs_best_peer"] <= PEER_TARGETS["ttft_p50_vs_best_peer"])
            lines.append(f"| {row['concurrency']} | {row['best_peer']} | {_fmt(row['vs_best_peer'], 2)} | "
                         f"{row['first_token_peer']} | {_fmt(row['ttft_p50_vs_best_peer'], 2)} | "
                         f"{'yes' if met else 'NO'} |")
    if results.get("greedy_text_matches"):
        lines += ["", "Greedy text the same as the front end's on the first prompts: " + ", ".join(
            f"{name} {'yes' if ok else 'NO'}" for name, ok in results["greedy_text_matches"].items()) + "."]
    for name, reason in (results.get("unavailable") or {}).items():
        lines += ["", f"{name}: not run ({reason})."]
    lines += ["", f"Prefill time alone (median, in-process, the prompt not cached): {_fmt(results.get('prefill_ms'), 2)} ms.", "",
              "| target | measured | goal |", "|---|---:|---|"]
    # The engine ratio and the burst TTFT ratio are context, not targets: even the in-process engine's
    # burst ratio is about 5x (docs/benchmarking.md).
    goals = {"vs_naive_c32": ">= 10x", "vs_engine_c32": "(context)",
             "ttft_c1_minus_prefill_ms": "<= 15 ms", "ttft_p95_c32_over_c1": "(context)",
             "gateway_vs_triton_c32": ">= 0.85x", "gateway_ttft_c1_minus_triton_ms": "<= 3 ms"}
    labels = {"vs_naive_c32": "throughput vs naive at c=32", "vs_engine_c32": "throughput vs engine at c=32",
              "ttft_c1_minus_prefill_ms": "TTFT p50 at c=1 minus prefill (ms)",
              "ttft_p95_c32_over_c1": "TTFT p95 at c=32 / at c=1",
              "gateway_vs_triton_c32": "front end (SSE) vs this server over gRPC: throughput at c=32",
              "gateway_ttft_c1_minus_triton_ms": "front end (SSE) minus gRPC: TTFT p50 at c=1 (ms)"}
    for key, label in labels.items():
        if key in r:
            lines.append(f"| {label} | {_fmt(r[key], 2)} | {goals[key]} |")
    floors = {"llm_direct_vs_engine_c32": "llm called directly: throughput vs engine at c=32",
              "llm_direct_ttft_p95_c32_over_c1": "llm called directly: TTFT p95 at c=32 / at c=1"}
    for key, label in floors.items():  # the floor the ensemble's figures are measured against
        if r.get(key) is not None:
            lines.append(f"| {label} (floor, no target) | {_fmt(r[key], 2)} | |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (tput, ttft) = plt.subplots(1, 2, figsize=(12, 4.5))
    for system, levels in results["systems"].items():
        cs = [int(c) for c, s in levels.items() if "output_tokens_per_s" in s]
        stats = [levels[str(c)] for c in cs]
        label = SYSTEM_NAMES.get(system, system)
        line, = tput.plot(cs, [s["output_tokens_per_s"] for s in stats], marker="o", label=label)
        ttft.plot(cs, [s["ttft_ms_p50"] for s in stats], marker="o", color=line.get_color(), label=f"{system} p50")
        ttft.plot(cs, [s["ttft_ms_p95"] for s in stats], marker="x", linestyle="--", color=line.get_color(),
                  label=f"{system} p95")
    for ax, title, ylabel in ((tput, "Output throughput", "output tokens/s"),
                              (ttft, "Time to first token", "TTFT (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    ttft.set_yscale("log")
    tput.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
