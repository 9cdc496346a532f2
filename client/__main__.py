"""Command line: stream a completion to the terminal.

    python -m client "Once upon a time" --max-tokens 64 --temperature 0

Text goes to stdout as it arrives; a stats line goes to stderr at the end.
Exit status: 0 on success, 1 on a client/server error, 2 on bad arguments,
130 when interrupted with Ctrl-C (the request is cancelled on the server).
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
import time

from ._common import DEFAULT_URL
from .errors import ClientError
from .sync_client import Client
from .types import StreamChunk


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def unescape(text: str) -> str:
    r"""`\n`, `\t`, `\r` and `\\` as the characters they name: a shell passes "\n\n" literally."""
    return re.sub(r"\\([ntr\\])", lambda m: _ESCAPES[m.group(1)], text)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m client", description="Stream a completion from the Triton LLM server.")
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--url", default=DEFAULT_URL, help=f"Triton gRPC host:port (default {DEFAULT_URL})")
    p.add_argument("--model", default="ensemble", help="model name (default ensemble)")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens to generate at most (default 128)")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--min-tokens", type=int, help="generate at least this many tokens (EOS ignored before)")
    p.add_argument("--stop", action="extend", nargs="+", metavar="STR", type=unescape,
                   help=r"stop string(s), with backslash escapes: \n newline, \t tab, \r, \\; repeatable")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds for the whole request (default 60)")
    return p


def _stats(last: StreamChunk | None, start: float, first: float | None, end: float) -> str:
    tokens = last.num_output_tokens if last else 0
    elapsed = end - start
    ttft = f"{first - start:.3f}s" if first is not None else "n/a"
    rate = tokens / elapsed if elapsed > 0 else 0.0
    reason = last.finish_reason if last else None
    return f"[{tokens} tokens, finish={reason}, time to first token {ttft}, {rate:.1f} tokens/s, total {elapsed:.2f}s]"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    params = {
        "max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
        "top_k": args.top_k, "seed": args.seed, "stop": args.stop, "min_tokens": args.min_tokens,
    }
    last: StreamChunk | None = None
    first: float | None = None
    start = time.perf_counter()
    try:
        with Client(args.url, model=args.model, timeout=args.timeout) as client:
            # closing(): Ctrl-C anywhere in the loop cancels the request right away.
            with contextlib.closing(client.stream(args.prompt, **params)) as chunks:
                for chunk in chunks:
                    if chunk.text:
                        if first is None:
                            first = time.perf_counter()
                        sys.stdout.write(chunk.text)
                        sys.stdout.flush()
                    last = chunk
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        print("cancelled", file=sys.stderr)
        return 130
    except (ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ClientError as exc:
        sys.stdout.write("\n" if last else "")
        print(f"error: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write("\n")
    sys.stdout.flush()
    print(_stats(last, start, first, time.perf_counter()), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
