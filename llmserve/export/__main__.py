"""`python -m llmserve.export --runtime onnxruntime|tensorrt --model-dir DIR [--out build/compiled]
[--precision ...]`: build the compiled model a runtime loads (`make engine`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llmserve.engine.config import DEFAULT_RUNTIME
from llmserve.export.manifest import COMPILED_ROOT

RUNTIMES = ("onnxruntime", "tensorrt")


def build_onnxruntime(args: argparse.Namespace) -> Path:
    from llmserve.export.onnx_export import export_onnx

    return export_onnx(args.model_dir, args.out, precision=args.precision or "fp32", force=args.force)


def build_tensorrt(args: argparse.Namespace) -> Path:
    from llmserve.export import tensorrt_build
    kwargs = {"precision": args.precision} if args.precision else {}
    return tensorrt_build.build_for_model(args.model_dir, args.out, force=args.force, **kwargs)


BUILDERS = {"onnxruntime": build_onnxruntime, "tensorrt": build_tensorrt}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llmserve.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runtime", default=DEFAULT_RUNTIME, choices=(*RUNTIMES, "torch"),
                        help=f"the runtime to compile for (default {DEFAULT_RUNTIME}, the server's)")
    parser.add_argument("--model-dir", required=True, help="Hugging Face model folder")
    parser.add_argument("--out", default=str(COMPILED_ROOT),
                        help="compiled models' root: the compiled model goes to "
                             "<out>/<onnx|tensorrt>/<model folder name>/")
    parser.add_argument("--precision", default=None,
                        help="onnxruntime: fp32 (default); tensorrt: fp32, fp16 (default), int8, fp8")
    parser.add_argument("--force", action="store_true", help="rebuild even when the compiled model is up to date")
    args = parser.parse_args(argv)
    if args.runtime == "torch":
        print("runtime torch loads the Hugging Face weights directly: there is no compiled model to build",
              file=sys.stderr)
        return
    if not (Path(args.model_dir) / "config.json").is_file():
        raise SystemExit(f"error: {args.model_dir} is not a Hugging Face model folder (no config.json)")
    try:
        out = BUILDERS[args.runtime](args)
    except (RuntimeError, ValueError, FileNotFoundError) as exc:  # the builders' errors name the problem
        raise SystemExit(f"error: {exc}") from None
    print(f"{args.runtime} compiled model: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
