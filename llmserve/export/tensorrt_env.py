"""What a TensorRT build or run needs from this machine, with a clear error where it is missing.

Shared by the plan builder (`tensorrt_build`) and `TensorRTRunner`. TensorRT and a CUDA GPU are
checked in that order, so a machine with neither is told about TensorRT first: the usual answer
to both is the container (docker/).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from llmserve.export.manifest import MANIFEST, manifest_or_empty, read_manifest, sha256_file

CONTAINER_HINT = ("run it in the container (docker/: `docker compose -f docker/compose.yaml up`), "
                  "see the README's TensorRT section")
PLAN_FILE = "model.plan"
PLAN_FORMAT = "tensorrt-plan-1"


class TensorRTUnavailableError(RuntimeError):
    """TensorRT or a CUDA GPU is missing where a TensorRT build or run was asked for."""


def import_tensorrt() -> ModuleType:
    try:
        import tensorrt
    except ImportError as exc:
        raise TensorRTUnavailableError(
            f"TensorRT is not installed here: the `tensorrt` Python package cannot be imported ({exc}). "
            f"TensorRT builds and runs need NVIDIA's TensorRT and a CUDA GPU: {CONTAINER_HINT}") from None
    return tensorrt


@dataclass(slots=True, frozen=True)
class GpuInfo:
    name: str
    compute_capability: tuple[int, int]
    total_memory: int

    @property
    def sm(self) -> str:
        return f"{self.compute_capability[0]}.{self.compute_capability[1]}"

    def describe(self) -> str:
        return f"{self.name} (compute capability {self.sm})"


def current_gpu(device: int = 0) -> GpuInfo:
    """The CUDA GPU TensorRT will build for / run on, via torch (already a dependency)."""
    import torch

    if not torch.cuda.is_available():
        cuda = torch.version.cuda or "none: this torch is a CPU build"
        raise TensorRTUnavailableError(
            f"no CUDA GPU is visible here (torch.cuda.is_available() is False; torch's CUDA: {cuda}). "
            f"TensorRT plans are built and run on an NVIDIA GPU: {CONTAINER_HINT}")
    props = torch.cuda.get_device_properties(device)
    return GpuInfo(props.name, (props.major, props.minor), props.total_memory)


def onnx_fingerprint(onnx_dir: Path) -> dict[str, Any]:
    """What a plan records of the ONNX it was built from: the graph file's sha256, the sizes of its
    external data files, and the export's own manifest.json fingerprint (of the HF model)."""
    graph = onnx_dir / "model.onnx"
    info = manifest_or_empty(onnx_dir)
    data = {p.name: p.stat().st_size for p in sorted(onnx_dir.iterdir()) if p.name.startswith("model.onnx.")}
    return {"onnx_sha256": sha256_file(graph), "external_data_sizes": data,
            "model_fingerprint": info.get("fingerprint")}


def read_plan_info(plan_dir: Path) -> dict[str, Any] | None:
    """The plan's manifest, or None where the folder lacks the plan or its manifest."""
    if not (plan_dir / MANIFEST).is_file() or not (plan_dir / PLAN_FILE).is_file():
        return None
    return read_manifest(plan_dir)


def plan_mismatch(info: dict[str, Any] | None, *, trt_version: str, gpu: GpuInfo,
                  source: dict[str, Any] | None = None, **wanted: Any) -> str | None:
    """Why a plan (its manifest.json `info`) cannot be used here, or None when it can.

    `source` is the current ONNX fingerprint (None: not checked); `wanted` are build settings
    that must match (precision, max_batch_size, ...), None values skipped.
    """
    if info is None:
        return "no plan has been built yet"
    if info.get("format") != PLAN_FORMAT:
        return f"the plan's manifest.json has format {info.get('format')}, this code reads {PLAN_FORMAT}"
    built_gpu = info.get("gpu", {})
    if (built_gpu.get("name"), built_gpu.get("compute_capability")) != (gpu.name, gpu.sm):
        return (f"the plan was built for {built_gpu.get('name')} (compute capability "
                f"{built_gpu.get('compute_capability')}); this GPU is {gpu.describe()}")
    if info.get("tensorrt_version") != trt_version:
        return f"the plan was built with TensorRT {info.get('tensorrt_version')}; this is TensorRT {trt_version}"
    if source is not None and info.get("source") != source:
        return "the ONNX export (or the model it was exported from) changed since the plan was built"
    for key, value in wanted.items():
        if value is not None and info.get(key) != value:
            return f"the plan was built with {key}={info.get(key)!r}, {value!r} is wanted"
    return None
