"""Build a TensorRT plan from the decoder ONNX (TensorRT 10 Python API).

`build/compiled/tensorrt/<name>/onnx/model.onnx` (`build_for_model` exports it there) ->
`build/compiled/tensorrt/<name>/model.plan` + `manifest.json` (what it was built from, for which
GPU and TensorRT, with which profiles). A plan is tied to one GPU model and one TensorRT version,
so `manifest.json` is checked before every reuse.

Two optimization profiles, because TensorRT sizes a context's activation memory for the largest
shapes of its profile and attention's scratch grows as batch x seq x (past + seq):
- 0 "decode": batch 1..max_batch_size, seq 1, past 1..max_model_len
- 1 "prefill": batch 1..max_prefill_batch, seq 1..max_num_tokens, past 1..max_model_len
`past` is never 0 (the runner passes one masked zero column instead): zero-size dimensions are
fragile in TensorRT profiles.

Precision: fp32, fp16 (default; normalization, reductions and softmax kept in fp32), int8
(entropy calibration on the model's own tokenizer output; needs fast INT8 on the GPU) or fp8
(compute capability >= 8.9 and an explicitly quantized ONNX). Graph inputs and outputs stay in
their ONNX types: logits and present K/V are float32 in every precision.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llmserve.engine.config import DEFAULT_MAX_NUM_SEQS
from llmserve.export.graph_io import PAST_PREFIX, is_past_name, past_names
from llmserve.export.manifest import COMPILED_ROOT, MANIFEST, default_compiled_dir, manifest_or_empty, write_manifest
from llmserve.export.tensorrt_env import (PLAN_FILE, PLAN_FORMAT, GpuInfo, current_gpu, import_tensorrt,
                                          onnx_fingerprint, plan_mismatch, read_plan_info)

PRECISIONS = ("fp32", "fp16", "int8", "fp8")
DEFAULT_MAX_BATCH_SIZE = DEFAULT_MAX_NUM_SEQS  # a plan's batch holds the engine's slots
DEFAULT_MAX_PREFILL_BATCH = 8
DEFAULT_WORKSPACE_BYTES = 4 << 30
FP8_MIN_CAPABILITY = (8, 9)  # Ada, Hopper and later
TENSORRT_ONNX_OPSET = 18
CALIBRATION_SHAPE = (4, 32)  # (batch, seq) of each INT8 calibration batch
CALIBRATION_TEXTS = (
    "Once upon a time there was a little girl who lived in a small house near the woods.",
    "The quick brown fox jumps over the lazy dog while the sun sets behind the hills.",
    "In the morning, the children went to school and learned about numbers and letters.",
    "She opened the box and found a red ball, a blue kite and a letter from her friend.",
    "The weather was cold, so they stayed inside, read books and drank warm milk.",
    "He asked his mother why the sky is blue, and she told him a story about light.",
    "After dinner, the family played a game and laughed until it was time for bed.",
    "The old man walked to the market every day to buy bread, apples and fresh fish.",
)


class TensorRTBuildError(RuntimeError):
    """The plan could not be built from this ONNX for this GPU."""


@dataclass(slots=True, frozen=True)
class BuildSettings:
    precision: str = "fp16"
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_model_len: int = 1024
    max_num_tokens: int | None = None  # longest prefill chunk; None = max_model_len
    max_prefill_batch: int = DEFAULT_MAX_PREFILL_BATCH
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        for name in ("max_batch_size", "max_prefill_batch", "workspace_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_model_len <= 1:
            raise ValueError(f"max_model_len must be > 1, got {self.max_model_len}")
        if self.max_num_tokens is not None and self.max_num_tokens <= 0:
            raise ValueError(f"max_num_tokens must be > 0, got {self.max_num_tokens}")

    @property
    def prefill_tokens(self) -> int:
        return min(self.max_num_tokens or self.max_model_len, self.max_model_len)

    def recorded(self) -> dict[str, Any]:
        """The settings a plan's manifest records and its reuse must match (`plan_mismatch`)."""
        return {"precision": self.precision, "max_batch_size": self.max_batch_size,
                "max_model_len": self.max_model_len, "max_num_tokens": self.prefill_tokens,
                "max_prefill_batch": min(self.max_prefill_batch, self.max_batch_size)}


def profile_shapes(settings: BuildSettings, num_layers: int, num_kv_heads: int,
                   head_dim: int) -> dict[str, dict[str, list[list[int]]]]:
    """{profile name: {input name: [min, opt, max] shapes}} for the graph of llmserve/export/graph.py."""
    L = settings.max_model_len
    decode_batch = settings.max_batch_size
    prefill_batch = min(settings.max_prefill_batch, settings.max_batch_size)
    seq = settings.prefill_tokens
    # (batch, seq, past) as (min, opt, max) each
    dims = {
        "decode": ((1, min(decode_batch, 32), decode_batch), (1, 1, 1), (1, L // 2, L)),
        "prefill": ((1, 1, prefill_batch), (1, min(seq, 128), seq), (1, 1, L)),
    }
    profiles = {}
    for name, (batch, tokens, past) in dims.items():
        shapes = {
            "input_ids": [[b, t] for b, t in zip(batch, tokens)],
            "position_ids": [[b, t] for b, t in zip(batch, tokens)],
            "attention_mask": [[b, p + t] for b, t, p in zip(batch, tokens, past)],
        }
        for past_name in past_names(num_layers):
            shapes[past_name] = [[b, num_kv_heads, p, head_dim] for b, p in zip(batch, past)]
        profiles[name] = shapes
    return profiles


def _network_layout(network) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim) read off the parsed network's past inputs."""
    past = [network.get_input(i) for i in range(network.num_inputs) if is_past_name(network.get_input(i).name)]
    if not past:
        raise TensorRTBuildError(f"the ONNX has no {PAST_PREFIX}* inputs: not the decoder graph of "
                                 "llmserve/export/graph.py")
    _, heads, _, head_dim = past[0].shape
    if heads <= 0 or head_dim <= 0:
        raise TensorRTBuildError(f"past_key_values inputs need static kv-head and head_dim axes, got {past[0].shape}")
    return len(past) // 2, heads, head_dim


def _check_precision(trt, builder, precision: str, gpu: GpuInfo) -> None:
    if precision == "int8":
        fast = getattr(builder, "platform_has_fast_int8", gpu.compute_capability >= (6, 1))
        if not fast:
            raise TensorRTBuildError(f"int8 needs fast INT8 support, which {gpu.describe()} lacks: use fp16")
        if not hasattr(trt, "IInt8EntropyCalibrator2"):
            raise TensorRTBuildError(f"TensorRT {trt.__version__} has no INT8 calibration (implicit "
                                     f"quantization): int8 needs an explicitly quantized (Q/DQ) ONNX there")
    if precision == "fp8" and gpu.compute_capability < FP8_MIN_CAPABILITY:
        raise TensorRTBuildError(f"fp8 needs compute capability >= {FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]} "
                                 f"(Ada, Hopper or later); {gpu.describe()} is older: use fp16 or int8")
    flag = {"fp16": "FP16", "int8": "INT8", "fp8": "FP8"}.get(precision)
    if flag and not hasattr(trt.BuilderFlag, flag):
        raise TensorRTBuildError(f"TensorRT {trt.__version__} has no BuilderFlag.{flag} (weakly typed "
                                 f"precision): export the ONNX in the wanted precision instead")


def _keep_sensitive_layers_fp32(trt, network, config) -> int:
    """Normalization statistics, reductions and softmax in fp32 under fp16/int8: their sums and
    squares overflow or lose too much in half precision. Returns how many layers were pinned."""
    pinned = {trt.LayerType.REDUCE, trt.LayerType.SOFTMAX}
    if hasattr(trt.LayerType, "NORMALIZATION"):
        pinned.add(trt.LayerType.NORMALIZATION)
    count = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        is_pow = False
        if layer.type == trt.LayerType.ELEMENTWISE:
            layer.__class__ = trt.IElementWiseLayer  # get_layer returns the base class: downcast to read `op`
            is_pow = layer.op == trt.ElementWiseOperation.POW
        if layer.type in pinned or is_pow:
            layer.precision = trt.float32
            for out in range(layer.num_outputs):
                if layer.get_output_type(out) in (trt.float16, trt.float32):
                    layer.set_output_type(out, trt.float32)
            count += 1
    if count:
        config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
    return count


def _calibration_batches(model_dir: Path, shapes: dict[str, list[int]]) -> list[dict[str, Any]]:
    """Calibration inputs at the calibration profile's fixed shape: the model's own tokenizer on
    plain sentences, no past (one masked zero column), every token attended."""
    import torch

    from llmserve.engine.tokenizer import encode_text, load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    batch, seq = shapes["input_ids"]
    stream = [t for text in CALIBRATION_TEXTS for t in encode_text(tokenizer, " " + text)]
    need = batch * seq
    stream = (stream * (need // max(len(stream), 1) + 1))[: need * 4]
    batches = []
    for start in range(0, len(stream) - need + 1, need):
        ids = torch.tensor(stream[start:start + need], dtype=torch.int64, device="cuda").view(batch, seq)
        mask = torch.ones(batch, 1 + seq, dtype=torch.int64, device="cuda")
        mask[:, 0] = 0
        inputs = {"input_ids": ids, "attention_mask": mask,
                  "position_ids": torch.arange(seq, device="cuda").expand(batch, seq).contiguous()}
        for name, shape in shapes.items():
            if is_past_name(name):
                inputs[name] = torch.zeros(shape, dtype=torch.float32, device="cuda")
        batches.append(inputs)
    return batches


def _make_calibrator(trt, batches: list[dict[str, Any]]):
    class Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            super().__init__()
            self._batches = iter(batches)

        def get_batch_size(self) -> int:
            return 1  # explicit batch: the shapes come from the calibration profile

        def get_batch(self, names):
            inputs = next(self._batches, None)
            return None if inputs is None else [int(inputs[n].data_ptr()) for n in names]

        def read_calibration_cache(self):
            return None  # always calibrate: a plan is only rebuilt when the model or settings changed

        def write_calibration_cache(self, cache) -> None:
            pass

    return Calibrator()


def _has_quantize_layers(trt, network) -> bool:
    return any(network.get_layer(i).type == trt.LayerType.QUANTIZE for i in range(network.num_layers))


def build_tensorrt(onnx_dir: str | os.PathLike, out_dir: str | os.PathLike, *, precision: str = "fp16",
                   max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, max_model_len: int | None = None,
                   max_num_tokens: int | None = None, max_prefill_batch: int = DEFAULT_MAX_PREFILL_BATCH,
                   workspace_bytes: int = DEFAULT_WORKSPACE_BYTES, model_dir: str | os.PathLike | None = None,
                   force: bool = False, log=print) -> Path:
    """Build `out_dir/model.plan` + `out_dir/manifest.json` from `onnx_dir/model.onnx`; returns out_dir.

    Returns at once when the plan there was built from this ONNX, for this GPU and TensorRT,
    with these settings (unless `force`). Raises TensorRTUnavailableError without TensorRT or a
    GPU, TensorRTBuildError when TensorRT cannot build it: never a plan of another precision.
    """
    trt = import_tensorrt()
    gpu = current_gpu()
    onnx_dir, out_dir = Path(onnx_dir).resolve(), Path(out_dir).resolve()
    onnx_path = onnx_dir / "model.onnx"
    if not onnx_path.is_file():
        raise FileNotFoundError(f"no ONNX export at {onnx_path}: `make engine RUNTIME=tensorrt` exports the "
                                f"model for TensorRT and builds the plan (build_for_model)")
    export_info = manifest_or_empty(onnx_dir)
    if max_model_len is None:
        max_model_len = int(export_info.get("max_positions") or 0) or 1024
    settings = BuildSettings(precision, max_batch_size, max_model_len, max_num_tokens, max_prefill_batch,
                             workspace_bytes)
    source = onnx_fingerprint(onnx_dir)
    wanted = settings.recorded()
    reason = plan_mismatch(read_plan_info(out_dir), trt_version=trt.__version__, gpu=gpu, source=source, **wanted)
    if reason is None and not force:
        log(f"TensorRT plan up to date: {out_dir / PLAN_FILE}")
        return out_dir
    log(f"building TensorRT plan ({reason}): {onnx_path} -> {out_dir / PLAN_FILE}, {precision} "
        f"on {gpu.describe()}, TensorRT {trt.__version__}")

    started = time.monotonic()
    built = _build_plan(trt, gpu, onnx_path, settings, export_info, model_dir)
    num_layers, num_kv_heads, head_dim = built.layout
    info = {
        "format": PLAN_FORMAT,
        "runtime": "tensorrt",
        "plan": PLAN_FILE,
        "source": source,
        "fingerprint": source["model_fingerprint"],  # of the HF model: manifest.check_compiled_model compares it
        "onnx_dir": str(onnx_dir),
        "source_model_dir": export_info.get("source_model_dir") or (str(Path(model_dir).resolve()) if model_dir else None),
        "gpu": {"name": gpu.name, "compute_capability": gpu.sm},
        "tensorrt_version": trt.__version__,
        **wanted,
        "profiles": built.profiles,
        "layers_pinned_fp32": built.layers_pinned_fp32,
        "layout": {"num_layers": num_layers, "num_kv_heads": num_kv_heads, "head_dim": head_dim},
        "build_settings": asdict(settings),
        "build_seconds": round(time.monotonic() - started, 1),
        "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    _write_plan(out_dir, built.plan, info)
    log(f"TensorRT plan written in {info['build_seconds']} s: {out_dir / PLAN_FILE}")
    return out_dir


@dataclass(slots=True, frozen=True)
class _BuiltPlan:
    plan: bytes  # the serialized plan
    profiles: dict[str, dict[str, list[list[int]]]]
    layers_pinned_fp32: int
    layout: tuple[int, int, int]  # (num_layers, num_kv_heads, head_dim)


def _build_plan(trt, gpu: GpuInfo, onnx_path: Path, settings: BuildSettings, export_info: dict[str, Any],
                model_dir) -> _BuiltPlan:
    """Parse the ONNX, set the profiles and the precision, build. Every TensorRT object lives until
    the plan's bytes are copied out (the parser holds the network's weights)."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    _check_precision(trt, builder, settings.precision, gpu)
    network = builder.create_network(0)  # explicit batch: the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # finds model.onnx.data beside it
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TensorRTBuildError(f"TensorRT's ONNX parser rejected {onnx_path}:\n{errors}")
    layout = _network_layout(network)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
    profiles = _add_profiles(builder, config, network, settings, layout)
    pinned, calibrator = _set_precision(trt, builder, network, config, settings.precision, export_info, model_dir,
                                        layout)
    serialized = builder.build_serialized_network(network, config)
    del calibrator  # TensorRT calls back into it during the build: kept referenced until now
    if serialized is None:
        raise TensorRTBuildError(f"TensorRT could not build a {settings.precision} plan from {onnx_path} for "
                                 f"{gpu.describe()}: see TensorRT's log above")
    return _BuiltPlan(bytes(serialized), profiles, pinned, layout)


def _add_profiles(builder, config, network, settings: BuildSettings,
                  layout: tuple[int, int, int]) -> dict[str, dict[str, list[list[int]]]]:
    """Add the decode and prefill optimization profiles (`profile_shapes`) to `config`; returns them."""
    profiles = profile_shapes(settings, *layout)
    graph_inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    if graph_inputs != set(profiles["decode"]):
        raise TensorRTBuildError(f"the ONNX inputs {sorted(graph_inputs)} are not those of llmserve/export/graph.py "
                                 f"({sorted(profiles['decode'])})")
    for shapes in profiles.values():
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    return profiles


def _set_precision(trt, builder, network, config, precision: str, export_info: dict[str, Any], model_dir,
                   layout: tuple[int, int, int]):
    """The builder flags of `precision` (see the module docstring). Returns how many layers were
    pinned to fp32, and the int8 calibrator (None for other precisions), which must outlive the build."""
    pinned, calibrator = 0, None
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # on by default: fp32 means fp32 matmuls here
    if precision in ("fp16", "int8", "fp8"):
        config.set_flag(trt.BuilderFlag.FP16)
        pinned = _keep_sensitive_layers_fp32(trt, network, config)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
        calibrator = _int8_calibrator(trt, builder, config, export_info, model_dir, layout)
        config.int8_calibrator = calibrator
    if precision == "fp8":
        if not _has_quantize_layers(trt, network):
            raise TensorRTBuildError("fp8 needs an explicitly quantized ONNX (QuantizeLinear/DequantizeLinear "
                                     "nodes in FP8, e.g. from NVIDIA's TensorRT Model Optimizer); this export "
                                     "has none: use fp16 or int8")
        config.set_flag(trt.BuilderFlag.FP8)
    return pinned, calibrator


def _write_plan(out_dir: Path, plan: bytes, info: dict[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)  # the old manifest must not vouch for the new plan
    tmp = out_dir / (PLAN_FILE + ".tmp")
    tmp.write_bytes(plan)
    os.replace(tmp, out_dir / PLAN_FILE)
    write_manifest(out_dir, info)  # last: a plan without its manifest is never taken as built


def _int8_calibrator(trt, builder, config, export_info, model_dir, layout: tuple[int, int, int]):
    source_model = export_info.get("source_model_dir") or model_dir
    if not source_model or not (Path(source_model) / "config.json").is_file():
        raise TensorRTBuildError("int8 calibration tokenizes text with the model's tokenizer: pass model_dir "
                                 "(the ONNX's manifest.json names no existing model folder)")
    num_layers, num_kv_heads, head_dim = layout
    batch, seq = CALIBRATION_SHAPE
    fixed = {"input_ids": [batch, seq], "position_ids": [batch, seq], "attention_mask": [batch, 1 + seq]}
    for name in past_names(num_layers):
        fixed[name] = [batch, num_kv_heads, 1, head_dim]
    profile = builder.create_optimization_profile()  # calibration runs at one fixed shape
    for name, shape in fixed.items():
        profile.set_shape(name, shape, shape, shape)
    config.set_calibration_profile(profile)
    return _make_calibrator(trt, _calibration_batches(Path(source_model), fixed))


def stderr_log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _serving_setting(key: str) -> int | None:
    """The llm model's LLM_<KEY> override (llmserve.triton.settings), when set: the plan is sized for the
    LLMEngine that will load it."""
    value = os.environ.get(f"LLM_{key.upper()}", "").strip()
    return int(value) if value else None


def build_for_model(model_dir: str | os.PathLike, compiled_root: str | os.PathLike = COMPILED_ROOT, *,
                    precision: str = "fp16", max_batch_size: int | None = None,
                    max_model_len: int | None = None, max_num_tokens: int | None = None,
                    max_prefill_batch: int = DEFAULT_MAX_PREFILL_BATCH, force: bool = False,
                    log=stderr_log) -> Path:
    """`make engine RUNTIME=tensorrt`: the model's decoder ONNX for TensorRT, then its plan, in
    `<compiled_root>/tensorrt/<model folder name>/` (ONNX in its `onnx/` subfolder). Returns the plan's folder.

    max_batch_size and max_model_len default to the serving settings LLM_MAX_NUM_SEQS and
    LLM_MAX_MODEL_LEN when set (else 64 and the model's context): a decode step of the LLMEngine
    runs all its sequences in one batch, so the plan must take max_num_seqs rows.

    TensorRT gets its own export at opset 18 (MatMul/Softmax attention, RMSNorm from Pow and
    ReduceMean): ONNX Runtime's opset 23 graph uses Attention and RMSNormalization nodes, which
    TensorRT's parser reads only partly (Attention) or only from TensorRT 10.15 (RMSNormalization).
    """
    import_tensorrt()  # before the export: no ONNX work on a machine that cannot build a plan
    current_gpu()
    from llmserve.export.onnx_export import export_onnx

    model_dir = Path(model_dir).resolve()
    plan_dir = default_compiled_dir("tensorrt", model_dir, compiled_root)
    onnx_dir = export_onnx(model_dir, out_dir=plan_dir / "onnx", opset=TENSORRT_ONNX_OPSET, force=force,
                           onnxruntime_graphs=False)  # TensorRT builds from model.onnx alone
    return build_tensorrt(onnx_dir, plan_dir, precision=precision,
                          max_batch_size=max_batch_size or _serving_setting("max_num_seqs") or DEFAULT_MAX_BATCH_SIZE,
                          max_model_len=max_model_len or _serving_setting("max_model_len"),
                          max_num_tokens=max_num_tokens, max_prefill_batch=max_prefill_batch,
                          model_dir=model_dir, force=force, log=log)
