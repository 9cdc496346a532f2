"""Where compiled models live and what they were built from (`manifest.json`).

Pure Python (no torch, no onnx): the runners check a compiled model against its model before loading it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from llmserve.paths import COMPILED_ROOT

MANIFEST = "manifest.json"
# The folder under the compiled models' root each runtime's compiled model is built into.
RUNTIME_FOLDERS = {"onnxruntime": "onnx", "tensorrt": "tensorrt"}
_SAMPLE = 1 << 20  # bytes hashed at each end of a large weight file
_FULL_HASH_LIMIT = 64 << 20
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".index.json")


def default_compiled_dir(runtime: str, model_dir: str | Path, root: str | Path = COMPILED_ROOT) -> Path:
    """`<root>/<runtime folder>/<model folder name>`; root defaults to the checkout's build/compiled,
    so the path does not depend on the working directory (tritonserver's model stubs run elsewhere)."""
    try:
        folder = RUNTIME_FOLDERS[runtime]
    except KeyError:
        raise ValueError(f"no compiled model for runtime {runtime!r} "
                         f"(compiled models: {', '.join(RUNTIME_FOLDERS)})") from None
    return Path(root) / folder / Path(model_dir).resolve().name


def sha256_file(path: Path, *, sampled_above: int | None = None, chunk: int = 1 << 22) -> str:
    """sha256 (hex) of the file's content. With `sampled_above`: of its size, then its content, or
    for a file larger than that its first and last MiB (a retrained or re-saved checkpoint
    changes its header and data, and hashing gigabytes would take minutes)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        if sampled_above is not None:
            size = path.stat().st_size
            digest.update(str(size).encode())
            if size > sampled_above:
                digest.update(f.read(_SAMPLE))
                f.seek(size - _SAMPLE)
                digest.update(f.read(_SAMPLE))
                return digest.hexdigest()
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def model_fingerprint(model_dir: str | Path) -> str:
    """Fingerprint of a HF model folder: config.json and the weight files (names, sizes, content)."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir / 'config.json'} not found: not a Hugging Face model folder")
    files = sorted(p for p in model_dir.iterdir()
                   if p.is_file() and (p.name == "config.json" or p.name.endswith(_WEIGHT_SUFFIXES)))
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}:{sha256_file(path, sampled_above=_FULL_HASH_LIMIT)}\n".encode())
    return digest.hexdigest()


def read_manifest(compiled_dir: str | Path) -> dict[str, Any]:
    path = Path(compiled_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    return json.loads(path.read_text())


def manifest_or_empty(compiled_dir: str | Path) -> dict[str, Any]:
    """The folder's manifest, or {} where it has none."""
    path = Path(compiled_dir) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else {}


def write_manifest(compiled_dir: str | Path, manifest: dict[str, Any]) -> Path:
    path = Path(compiled_dir) / MANIFEST
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(path)  # a reader never sees half a manifest
    return path


def build_command(runtime: str, model_dir: str | Path) -> str:
    return f"make engine RUNTIME={runtime} MODEL_DIR={model_dir}"


def check_compiled_model(runtime: str, compiled_dir: str | Path, model_dir: str | Path, artifact: str) -> dict[str, Any]:
    """The manifest of the compiled model in `compiled_dir`, after checking it exists and was built
    from `model_dir`'s current weights; FileNotFoundError / ValueError telling how to (re)build it."""
    compiled_dir, model_dir = Path(compiled_dir), Path(model_dir)
    rebuild = f"build it with `{build_command(runtime, model_dir)}`"
    if not (compiled_dir / artifact).is_file() or not (compiled_dir / MANIFEST).is_file():
        raise FileNotFoundError(f"no {runtime} compiled model at {compiled_dir} ({artifact} and {MANIFEST} "
                                f"expected): {rebuild}")
    manifest = read_manifest(compiled_dir)
    if manifest.get("fingerprint") != model_fingerprint(model_dir):
        raise ValueError(f"the {runtime} compiled model at {compiled_dir} was built from {manifest.get('source_model_dir')}, "
                         f"not from the current weights of {model_dir.resolve()}: re{rebuild}")
    return manifest
