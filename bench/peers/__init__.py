"""Peers for `make bench`: the servers users would pick instead, each set up the way a new user would
(its own venv or build, cached under build/peers/<name>/), served on a free port and driven over its
OpenAI `/v1/completions` endpoint like this server's front end.

Each peer module has `setup(model_dir) -> str | None` (builds or installs what is missing; returns why
the peer cannot be had here, or None) and a `ServerProcess` subclass with `.url` (http://host:port,
the OpenAI base without /v1), `.model` (the `model` to send) and `.fixed_length_fields(n)` (the body
fields that make the output exactly n tokens on that server).
"""

from __future__ import annotations

from llmserve.paths import BUILD_DIR

PEERS_DIR = BUILD_DIR / "peers"


def run_logged(steps: list[list[str]], log_path, what: str) -> str | None:
    """Run each command in turn, their output to `log_path`; why it failed (naming the log), or None."""
    import subprocess

    with open(log_path, "w") as log:
        for step in steps:
            log.write(f"$ {' '.join(step)}\n")
            log.flush()
            if subprocess.run(step, stdout=log, stderr=subprocess.STDOUT).returncode != 0:
                return f"{what} failed: see {log_path}"
    return None


# name in --systems -> (module, server class, how many sequences at once its constructor is given by)
PEERS = {
    "llama.cpp": ("bench.peers.llama_cpp", "LlamaServer", "parallel"),
    "vllm": ("bench.peers.vllm_cpu", "VllmServer", "max_num_seqs"),
    "transformers": ("bench.peers.transformers_serve", "TransformersServer", None),
}


def available_peers(names: list[str], model_dir, slots: int, log_dir, unavailable: dict[str, str],
                    log_prefix: str = "") -> dict:
    """name -> server (not started) for each peer in `names` that can be had here, in their order;
    why each other one cannot, in `unavailable` (and on stderr)."""
    import sys

    servers = {}
    for name in names:
        print(f"setting up {name}", file=sys.stderr, flush=True)
        server, reason = make_peer(name, model_dir, slots, log_dir / f"{log_prefix}{name}.log")
        if reason:
            print(f"  {name} skipped: {reason}", file=sys.stderr, flush=True)
            unavailable[name] = reason
        else:
            servers[name] = server
    return servers


def make_peer(name: str, model_dir, slots: int, log_path):
    """(the peer's server, not started, None) or (None, why it cannot be had here): set up first,
    which builds or installs what is missing (minutes the first time, cached under build/peers/)."""
    import importlib

    module_name, class_name, slots_arg = PEERS[name]
    module = importlib.import_module(module_name)
    try:
        reason = module.setup(model_dir)
    except Exception as exc:  # noqa: BLE001 - a peer that cannot be set up is reported, the bench goes on
        reason = f"setup raised {type(exc).__name__}: {exc}"
    if reason:
        return None, reason
    kwargs = {slots_arg: slots} if slots_arg else {}
    return getattr(module, class_name)(model_dir, log_path=log_path, **kwargs), None
