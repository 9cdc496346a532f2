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
