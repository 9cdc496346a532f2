"""Export one of our model definitions (llmserve/models) to the decoder ONNX graph of
llmserve/export/graph.py, for ONNX Runtime (and as the TensorRT builder's input).

The graph is traced from the same modules and fused weights the torch runner uses
(`llmserve.export.graph.DecoderGraph`) with the dynamo exporter (`torch.export` + onnxscript).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

from llmserve.export.graph_io import IN_PLACE_DECODE_INPUTS, PREFILL_INPUTS, input_names, output_names, past_names
from llmserve.export.manifest import (COMPILED_ROOT, MANIFEST, default_compiled_dir, model_fingerprint,
                                      read_manifest, write_manifest)

MODEL_FILE = "model.onnx"
PREFILL_FILE = "prefill.onnx"  # the packed-prefill graph (graph.py), ONNX Runtime's compiled model only
DECODE_FILE = "decode.onnx"  # the in-place decode graph (graph.py), ONNX Runtime's compiled model only
# Opset 23 has Attention and RMSNormalization: ONNX Runtime runs each as one fused kernel, a faster
# decode than opset 18's MatMul/Softmax (docs/notes/runners-and-export.md).
DEFAULT_OPSET = 23
PRECISIONS = ("fp32",)
# Bump when the graph the same weights export to changes (graph.py, the models' forward): a
# manifest.json with another version is rebuilt.
GRAPH_VERSION = 2
# Beyond this, weights go to model.onnx.data (protobuf's 2 GiB limit).
EXTERNAL_DATA_BYTES = 1536 << 20
# Sample sizes for tracing: all distinct and > 1, so no dimension is specialised or confused with another.
_SAMPLE_BATCH, _SAMPLE_SEQ, _SAMPLE_PAST = 3, 5, 7
_SAMPLE_PROMPT_LENGTHS = [2, 5, 3]
_SAMPLE_CAPACITY = 11


class ExportError(RuntimeError):
    """A step of the export could not run; the message says which and why."""


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter warns about things that do not apply here (torchvision ops, axis renames)."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        logger.setLevel(level)


def _require_exporter() -> None:
    missing = []
    for module in ("onnx", "onnxscript"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ExportError(f"the ONNX export needs {', '.join(missing)}: install the pinned requirements "
                          "(`make install` or `.venv/bin/pip install -r requirements.txt`)")


def _sample_inputs(model) -> tuple[Any, ...]:
    import torch

    B, T, P = _SAMPLE_BATCH, _SAMPLE_SEQ, _SAMPLE_PAST
    if P + T > model.max_positions:
        raise ExportError(f"the model's context ({model.max_positions}) is too short to trace ({P + T} needed)")
    input_ids = torch.randint(0, model.vocab_size, (B, T))
    position_ids = torch.arange(P, P + T).expand(B, T).contiguous()
    attention_mask = torch.ones(B, P + T, dtype=torch.int64)
    attention_mask[0, :2] = 0  # a left-padded row
    past = tuple(torch.zeros(B, model.num_kv_heads, P, model.head_dim) for _ in range(2 * model.num_layers))
    return (input_ids, position_ids, attention_mask, *past)  # *past: the dynamic shapes see it as one tuple


def _dynamic_shapes(num_layers: int) -> tuple[Any, ...]:
    from torch.export import Dim

    batch, seq, past_seq = Dim("batch"), Dim("seq"), Dim("past_seq")
    # attention_mask's width is past_seq + seq: torch.export derives it from the attention's shapes.
    return ({0: batch, 1: seq}, {0: batch, 1: seq}, {0: batch, 1: Dim.AUTO},
            tuple({0: batch, 2: past_seq} for _ in range(2 * num_layers)))


def _dimension_names(num_layers: int) -> dict[tuple[str, int], str]:
    """(input, axis) -> the interface's name for that dimension (llmserve/export/graph.py)."""
    names = {("input_ids", 0): "batch", ("input_ids", 1): "seq"}
    for name in past_names(num_layers):
        names[(name, 2)] = "past_seq"
    names[("attention_mask", 1)] = "past_seq + seq"
    return names


def _decode_sample_inputs(model) -> tuple[Any, ...]:
    """Rows holding 4, 0 and 9 positions of a capacity of 11 (batch 3, capacity 11: distinct)."""
    import torch

    held = torch.tensor([4, 0, 9], dtype=torch.int32)
    past = tuple(torch.zeros(len(held), model.num_kv_heads, _SAMPLE_CAPACITY, model.head_dim)
                 for _ in range(2 * model.num_layers))
    return (torch.randint(0, model.vocab_size, (len(held), 1)), held.long().unsqueeze(1), held,
            (held.max() + 1).to(torch.int32), *past)


def _decode_dynamic_shapes(num_layers: int) -> tuple[Any, ...]:
    from torch.export import Dim

    batch, capacity = Dim("batch"), Dim("capacity")
    return ({0: batch}, {0: batch}, {0: batch}, None, tuple({0: batch, 2: capacity} for _ in range(2 * num_layers)))


def _decode_dimension_names(num_layers: int) -> dict[tuple[str, int], str]:
    names = {("input_ids", 0): "batch"}
    for name in past_names(num_layers):
        names[(name, 2)] = "capacity"
    return names


def _prefill_sample_inputs(model) -> tuple[Any, ...]:
    """Prompts of 2, 5 and 3 tokens: tokens (10), prompts (3) and longest (5) all distinct."""
    import torch

    from llmserve.models.attention import packed_layout

    lengths = torch.tensor(_SAMPLE_PROMPT_LENGTHS)
    layout = packed_layout(lengths, int(lengths.sum()), int(lengths.max()))
    return (torch.randint(0, model.vocab_size, (1, int(lengths.sum()))), layout.positions.unsqueeze(0),
            layout.padded_index, layout.valid.long(), layout.last_index)


def _prefill_dynamic_shapes() -> tuple[Any, ...]:
    from torch.export import Dim

    tokens, prompts, longest = Dim("tokens"), Dim("prompts"), Dim("longest")
    return ({1: tokens}, {1: tokens}, {0: tokens}, {0: prompts, 1: longest}, {0: prompts})


_PREFILL_DIMENSION_NAMES = {("input_ids", 1): "tokens", ("prompt_mask", 0): "prompts", ("prompt_mask", 1): "longest"}


def _name_dimensions(proto, wanted: dict[tuple[str, int], str]) -> None:
    """Give the I/O dimensions the interface's names (`wanted`: (input, axis) -> name) wherever the
    exporter used its own symbols (s0, s1, ...), in every shape of the graph."""
    names: dict[str, str] = {}

    def dims(value):
        return value.type.tensor_type.shape.dim

    inputs = {value.name: value for value in proto.graph.input}
    for (input_name, axis), name in wanted.items():
        names.setdefault(dims(inputs[input_name])[axis].dim_param, name)
    names.pop("", None)
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b") if names else None
    for value in (*proto.graph.input, *proto.graph.output, *proto.graph.value_info):
        for dim in dims(value):
            if pattern and dim.dim_param:
                dim.dim_param = pattern.sub(lambda m: names[m.group(1)], dim.dim_param)


def _export_graph(module, sample: tuple[Any, ...], path: Path, *, input_names: list[str], output_names: list[str],
                  dynamic_shapes: tuple[Any, ...], dimension_names: dict[tuple[str, int], str], opset: int,
                  external_data: bool, model_dir: Path, translations: dict | None = None) -> None:
    """Trace `module` to `path` (a valid ONNX file, dimensions named); ExportError naming the step
    that failed."""
    import onnx
    import torch

    try:
        with torch.no_grad(), _quiet_exporter():
            # One eager run first: tables the model builds lazily (the rotary frequencies) are then
            # real tensors, not fakes of the tracer that a later export would find.
            module(*sample)
            program = torch.onnx.export(
                module, sample, None, dynamo=True, input_names=input_names, output_names=output_names,
                dynamic_shapes=dynamic_shapes, opset_version=opset, optimize=True, verbose=False,
                custom_translation_table=translations)
        program.save(path, external_data=external_data)
    except Exception as exc:  # the exporter's errors are long; keep the cause, name the step
        raise ExportError(f"torch.onnx.export of {path.name} failed for {model_dir} ({type(exc).__name__}): "
                          f"{exc}") from exc
    proto = onnx.load(path, load_external_data=False)
    _name_dimensions(proto, dimension_names)
    onnx.save(proto, path)
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"the exported {path.name} of {model_dir} is not valid ONNX: {exc}") from exc


def is_current(out_dir: Path, model_dir: Path, *, precision: str, opset: int, onnxruntime_graphs: bool = True) -> bool:
    """Whether out_dir holds this export of model_dir's current weights (with the packed-prefill
    and in-place decode graphs when `onnxruntime_graphs`)."""
    if not (out_dir / MODEL_FILE).is_file() or not (out_dir / MANIFEST).is_file():
        return False
    if onnxruntime_graphs and not all((out_dir / name).is_file() for name in (PREFILL_FILE, DECODE_FILE)):
        return False
    manifest = read_manifest(out_dir)
    wanted = {"graph_version": GRAPH_VERSION, "precision": precision, "opset": opset,
              "fingerprint": model_fingerprint(model_dir)}
    return all(manifest.get(key) == value for key, value in wanted.items())


def export_onnx(model_dir: str | Path, out_root: str | Path = COMPILED_ROOT, *, precision: str = "fp32",
                opset: int = DEFAULT_OPSET, out_dir: str | Path | None = None, force: bool = True,
                onnxruntime_graphs: bool = True) -> Path:
    """Export `model_dir` to `<out_root>/onnx/<model folder name>/` (or `out_dir`): model.onnx
    (+ model.onnx.data for large models), prefill.onnx and decode.onnx (the packed-prefill and
    in-place decode graphs, unless `onnxruntime_graphs` is False: TensorRT builds from model.onnx
    alone) and manifest.json. Returns the
    folder. With force=False, returns at once when the folder already holds this export of the
    model's current weights."""
    if precision not in PRECISIONS:
        raise ExportError(f"the ONNX export for ONNX Runtime is built in {' / '.join(PRECISIONS)} only, not "
                          f"{precision!r} (half precision and int8 are TensorRT's: `--runtime tensorrt`)")
    model_dir = Path(model_dir).resolve()
    out_dir = Path(out_dir) if out_dir is not None else default_compiled_dir("onnxruntime", model_dir, out_root)
    if not force and is_current(out_dir, model_dir, precision=precision, opset=opset, onnxruntime_graphs=onnxruntime_graphs):
        return out_dir  # before the exporter's imports: a server start checks this every time
    _require_exporter()
    model = _load_float32_model(model_dir)
    external_data = sum(p.numel() * p.element_size() for p in model.parameters()) > EXTERNAL_DATA_BYTES
    with _swapped_in_when_done(out_dir) as work:
        _export_graphs(model, work, opset=opset, external_data=external_data, onnxruntime_graphs=onnxruntime_graphs,
                       model_dir=model_dir)
        write_manifest(work, _export_manifest(model, model_dir, work, opset=opset, precision=precision,
                                              onnxruntime_graphs=onnxruntime_graphs))
    return out_dir


def _load_float32_model(model_dir: Path):
    from llmserve.models import load_model

    try:
        return load_model(model_dir, dtype="float32", device="cpu")
    except (FileNotFoundError, ValueError, NotImplementedError) as exc:
        raise ExportError(f"cannot load the model in {model_dir}: {exc}") from exc


@contextlib.contextmanager
def _swapped_in_when_done(out_dir: Path):
    """A fresh work folder beside `out_dir`; it replaces `out_dir` when the block succeeds and is
    removed when it fails: a runner never loads a half-written export."""
    work = out_dir.with_name(f"{out_dir.name}.partial-{os.getpid()}")  # two builds at once never share it
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        yield work
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if out_dir.exists():
        shutil.rmtree(out_dir)
    work.rename(out_dir)


def _export_graphs(model, work: Path, *, opset: int, external_data: bool, onnxruntime_graphs: bool,
                   model_dir: Path) -> None:
    """model.onnx (the decoder graph) and, when `onnxruntime_graphs`, prefill.onnx and decode.onnx into `work`."""
    from llmserve.export.graph import DecoderGraph, InPlaceDecodeGraph, PackedPrefillGraph
    from llmserve.export.in_place_attention import TRANSLATIONS

    L = model.num_layers
    _export_graph(DecoderGraph(model).eval(), _sample_inputs(model), work / MODEL_FILE,
                  input_names=input_names(L), output_names=output_names(L), dynamic_shapes=_dynamic_shapes(L),
                  dimension_names=_dimension_names(L), opset=opset, external_data=external_data,
                  model_dir=model_dir)
    if onnxruntime_graphs:
        _export_graph(PackedPrefillGraph(model).eval(), _prefill_sample_inputs(model), work / PREFILL_FILE,
                      input_names=PREFILL_INPUTS, output_names=output_names(L),
                      dynamic_shapes=_prefill_dynamic_shapes(), dimension_names=_PREFILL_DIMENSION_NAMES,
                      opset=opset, external_data=external_data, model_dir=model_dir)
        _export_graph(InPlaceDecodeGraph(model).eval(), _decode_sample_inputs(model), work / DECODE_FILE,
                      input_names=[*IN_PLACE_DECODE_INPUTS, *past_names(L)], output_names=output_names(L),
                      dynamic_shapes=_decode_dynamic_shapes(L), dimension_names=_decode_dimension_names(L),
                      opset=opset, external_data=external_data, model_dir=model_dir, translations=TRANSLATIONS)


def _export_manifest(model, model_dir: Path, work: Path, *, opset: int, precision: str,
                     onnxruntime_graphs: bool) -> dict[str, Any]:
    """What the export's manifest.json records: its source, the model's sizes, the graphs' I/O."""
    import onnx
    import torch

    from llmserve.models import model_type_of
    from llmserve.models.hf_config import read_config

    L = model.num_layers
    return {
        "format": "onnx",
        "graph_version": GRAPH_VERSION,
        "source_model_dir": str(model_dir),
        "fingerprint": model_fingerprint(model_dir),
        "model_type": model_type_of(read_config(model_dir)),
        "architecture": type(model).__name__,
        "num_layers": L,
        "num_heads": model.num_heads,
        "num_kv_heads": model.num_kv_heads,
        "head_dim": model.head_dim,
        "vocab_size": model.vocab_size,
        "max_positions": model.max_positions,
        "opset": opset,
        "dtype": "float32",
        "precision": precision,
        "inputs": input_names(L),
        "outputs": output_names(L),
        "prefill_model": PREFILL_FILE if onnxruntime_graphs else None,
        "decode_model": DECODE_FILE if onnxruntime_graphs else None,
        "files": sorted(p.name for p in work.iterdir() if p.name != MANIFEST),
        "torch_version": torch.__version__,
        "onnx_version": onnx.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
