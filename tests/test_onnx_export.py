"""Parity of the exported decoder graph under ONNX Runtime with our PyTorch model.

The graph (llmserve/export/graph.py) is driven directly through its I/O: a ragged left-padded
prefill from no past, decode steps fed their own `present` back as `past`, and a chunked prefill
(several new tokens on top of a past); the packed-prefill graph (prompts end to end, no
padding); and the in-place decode graph (K/V written into buffers bound as both past and present). Reference: TorchModelRunner on the same weights.
Tolerance: |onnx - torch| <= 1e-4 + 1e-4*|torch| on float32 logits.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from llmserve.export.__main__ import main as export_cli  # noqa: E402
from llmserve.export.manifest import model_fingerprint  # noqa: E402
from llmserve.export.onnx_export import ExportError, export_onnx  # noqa: E402
from llmserve.runners.torch_runner import TorchModelRunner  # noqa: E402
from llmserve.models.attention import packed_layout  # noqa: E402

ATOL = RTOL = 1e-4
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [20, 21, 22], [30, 31, 32, 33, 34, 35]]


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A tiny random GPT-2 (learned positions, LayerNorm, biases, gelu_new, MHA) built locally."""
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=300, n_positions=128,
                                     initializer_range=0.1)
    model_dir = tmp_path_factory.mktemp("gpt2")
    transformers.GPT2LMHeadModel(config).save_pretrained(model_dir)
    return model_dir


@pytest.fixture(scope="module")
def gpt2_compiled_dir(gpt2_dir, tmp_path_factory):
    return export_onnx(gpt2_dir, out_dir=tmp_path_factory.mktemp("compiled") / "gpt2")


@pytest.fixture(params=["default", "gpt2"])
def exported(request, default_model_dir, onnx_compiled_dir, gpt2_dir, gpt2_compiled_dir):
    """(model_dir, compiled_dir) of the default Llama-style model and of the tiny GPT-2."""
    if request.param == "default":
        return default_model_dir, onnx_compiled_dir
    return gpt2_dir, gpt2_compiled_dir


class Graph:
    """The ONNX graph on ONNX Runtime, fed as the interface describes (left padding)."""

    def __init__(self, compiled_dir):
        self.manifest = json.loads((compiled_dir / "manifest.json").read_text())
        self.session = ort.InferenceSession(str(compiled_dir / "model.onnx"), providers=["CPUExecutionProvider"])
        self.outputs = [o.name for o in self.session.get_outputs()]

    def empty_past(self, batch: int) -> list[np.ndarray]:
        m = self.manifest
        return [np.zeros((batch, m["num_kv_heads"], 0, m["head_dim"]), np.float32)] * (2 * m["num_layers"])

    def run(self, ids: np.ndarray, positions: np.ndarray, mask: np.ndarray, past: list[np.ndarray]):
        feeds = {"input_ids": ids, "position_ids": positions, "attention_mask": mask}
        feeds.update(zip(self.manifest["inputs"][3:], past))
        logits, *present = self.session.run(self.outputs, feeds)
        return logits, present


def _left_padded(seqs: list[list[int]], starts: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ids, positions and the new tokens' mask columns for new tokens `seqs` after `starts` cached."""
    T = max(map(len, seqs))
    ids = np.zeros((len(seqs), T), np.int64)
    positions = np.zeros((len(seqs), T), np.int64)
    mask = np.zeros((len(seqs), T), np.int64)
    for b, (seq, start) in enumerate(zip(seqs, starts)):
        ids[b, T - len(seq):] = seq
        positions[b, T - len(seq):] = np.arange(start, start + len(seq))
        mask[b, T - len(seq):] = 1
    return ids, positions, mask


def _close(onnx_logits: np.ndarray, torch_logits: torch.Tensor) -> None:
    torch.testing.assert_close(torch.from_numpy(onnx_logits), torch_logits, atol=ATOL, rtol=RTOL)


def test_prefill_and_decode_steps_match_torch(exported):
    model_dir, compiled_dir = exported
    graph = Graph(compiled_dir)
    runner = TorchModelRunner(model_dir, num_slots=len(PROMPTS))
    slots = list(range(len(PROMPTS)))
    expected = runner.forward(slots, PROMPTS, [0] * len(PROMPTS))
    ids, positions, mask = _left_padded(PROMPTS, [0] * len(PROMPTS))
    logits, present = graph.run(ids, positions, mask, graph.empty_past(len(PROMPTS)))
    assert logits.shape == (len(PROMPTS), graph.manifest["vocab_size"]) and logits.dtype == np.float32
    _close(logits, expected)
    # Decode: present comes back as past, one more real column per step.
    lengths = [len(p) for p in PROMPTS]
    for _ in range(6):
        next_ids = expected.argmax(-1).tolist()
        expected = runner.forward(slots, [[t] for t in next_ids], lengths)
        step_ids, step_positions, step_mask = _left_padded([[t] for t in next_ids], lengths)
        mask = np.concatenate([mask, step_mask], axis=1)
        logits, present = graph.run(step_ids, step_positions, mask, present)
        lengths = [n + 1 for n in lengths]
        _close(logits, expected)
    assert present[0].shape[2] == max(map(len, PROMPTS)) + 6


def test_chunked_prefill_on_a_past_matches_torch(exported):
    """Several new tokens on top of a left-padded past: padding both in the past and in the new tokens."""
    model_dir, compiled_dir = exported
    graph = Graph(compiled_dir)
    runner = TorchModelRunner(model_dir, num_slots=2)
    first = [PROMPTS[0][:4], PROMPTS[1][:2]]
    second = [PROMPTS[0][4:], PROMPTS[1][2:]]
    runner.forward([0, 1], first, [0, 0])
    starts = [len(c) for c in first]
    expected = runner.forward([0, 1], second, starts)
    ids, positions, mask = _left_padded(first, [0, 0])
    _, past = graph.run(ids, positions, mask, graph.empty_past(2))
    ids, positions, new_mask = _left_padded(second, starts)
    logits, _ = graph.run(ids, positions, np.concatenate([mask, new_mask], axis=1), past)
    _close(logits, expected)


def test_packed_prefill_graph_matches_torch(exported):
    """prefill.onnx: the prompts packed end to end in one row, driven through its own I/O; its
    present K/V, fed to model.onnx as past (left padded), continues each prompt as torch does."""
    model_dir, compiled_dir = exported
    session = ort.InferenceSession(str(compiled_dir / "prefill.onnx"), providers=["CPUExecutionProvider"])
    lengths = torch.tensor([len(p) for p in PROMPTS])
    layout = packed_layout(lengths, int(lengths.sum()), int(lengths.max()))
    feeds = {"input_ids": np.array([[t for p in PROMPTS for t in p]]), "position_ids": layout.positions[None].numpy(),
             "padded_index": layout.padded_index.numpy(), "prompt_mask": layout.valid.long().numpy(),
             "last_index": layout.last_index.numpy()}
    logits, *present = session.run([o.name for o in session.get_outputs()], feeds)
    runner = TorchModelRunner(model_dir, num_slots=len(PROMPTS))
    slots = list(range(len(PROMPTS)))
    expected = runner.forward(slots, PROMPTS, [0] * len(PROMPTS))
    _close(logits, expected)
    # One decode step on model.onnx from the packed K/V, left padded into a past.
    P, firsts = int(lengths.max()), layout.firsts.tolist()
    past = [np.zeros((len(PROMPTS), *t.shape[1:2], P, t.shape[3]), np.float32) for t in present]
    mask = np.zeros((len(PROMPTS), P), np.int64)
    for b, (first, n) in enumerate(zip(firsts, lengths.tolist())):
        for dst, src in zip(past, present):
            dst[b, :, P - n:] = src[0, :, first:first + n]
        mask[b, P - n:] = 1
    next_ids = expected.argmax(-1).tolist()
    expected = runner.forward(slots, [[t] for t in next_ids], lengths.tolist())
    ids, positions, step_mask = _left_padded([[t] for t in next_ids], lengths.tolist())
    logits, _ = Graph(compiled_dir).run(ids, positions, np.concatenate([mask, step_mask], axis=1), past)
    _close(logits, expected)


def test_in_place_decode_graph_matches_torch(exported):
    """decode.onnx: rows right padded in buffers of `capacity` positions bound as both past and
    present; each step writes one position per row in place (the rest stays NaN: never read) and
    gives torch's logits."""
    model_dir, compiled_dir = exported
    session = ort.InferenceSession(str(compiled_dir / "decode.onnx"), providers=["CPUExecutionProvider"])
    runner = TorchModelRunner(model_dir, num_slots=len(PROMPTS))
    slots, lengths = list(range(len(PROMPTS))), [len(p) for p in PROMPTS]
    next_ids = runner.forward(slots, PROMPTS, [0] * len(PROMPTS)).argmax(-1).tolist()
    capacity = max(lengths) + 4
    cache = runner.kv_cache
    kv = []
    for k, v in zip(cache.k, cache.v):
        for layer in (k, v):
            buffer = torch.full((len(PROMPTS), layer.shape[1], capacity, layer.shape[3]), float("nan"))
            for b, n in enumerate(lengths):
                buffer[b, :, :n] = layer[b, :, :n]
            kv.append(buffer)
    names = [o.name for o in session.get_outputs()]
    for _ in range(3):
        expected = runner.forward(slots, [[t] for t in next_ids], lengths)
        held = torch.tensor(lengths, dtype=torch.int32)
        logits = torch.empty(len(PROMPTS), expected.shape[1])
        binding = session.io_binding()
        feeds = [torch.tensor([[t] for t in next_ids]), held.long()[:, None], held, held.max() + 1, *kv]  # kept alive
        for name, tensor in zip([i.name for i in session.get_inputs()], feeds):
            binding.bind_input(name, "cpu", 0, tensor.numpy().dtype, tuple(tensor.shape), tensor.data_ptr())
        binding.bind_output("logits", "cpu", 0, np.float32, tuple(logits.shape), logits.data_ptr())
        for name, tensor in zip(names[1:], kv):  # present is past: written in place
            binding.bind_output(name, "cpu", 0, np.float32, tuple(tensor.shape), tensor.data_ptr())
        session.run_with_iobinding(binding)
        _close(logits.numpy(), expected)
        lengths = [n + 1 for n in lengths]
        for tensor in kv:
            for b, n in enumerate(lengths):
                assert not tensor[b, :, :n].isnan().any() and tensor[b, :, n:].isnan().all()
        next_ids = expected.argmax(-1).tolist()


def test_manifest_records_the_source(default_model_dir, onnx_compiled_dir):
    manifest = json.loads((onnx_compiled_dir / "manifest.json").read_text())
    assert manifest["source_model_dir"] == str(default_model_dir.resolve())
    assert manifest["fingerprint"] == model_fingerprint(default_model_dir)
    assert (manifest["num_layers"], manifest["num_kv_heads"], manifest["head_dim"], manifest["vocab_size"]) == (
        4, 2, 48, 2048)
    assert manifest["files"] == ["decode.onnx", "model.onnx", "prefill.onnx"] and manifest["dtype"] == "float32"
    assert (manifest["prefill_model"], manifest["decode_model"]) == ("prefill.onnx", "decode.onnx")
    assert manifest["model_type"] == "llama" and manifest["opset"] == 23
    proto = onnx.load(onnx_compiled_dir / "model.onnx", load_external_data=False)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    assert dims["input_ids"] == ["batch", "seq"]
    assert dims["past_key_values.0.key"] == ["batch", 2, "past_seq", 48]
    assert dims["attention_mask"] == ["batch", "past_seq + seq"]
    proto = onnx.load(onnx_compiled_dir / "prefill.onnx", load_external_data=False)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    assert dims == {"input_ids": [1, "tokens"], "position_ids": [1, "tokens"], "padded_index": ["tokens"],
                    "prompt_mask": ["prompts", "longest"], "last_index": ["prompts"]}
    proto = onnx.load(onnx_compiled_dir / "decode.onnx", load_external_data=False)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    assert dims["seqlens_k"] == ["batch"] and dims["total_sequence_length"] == []
    assert dims["past_key_values.0.key"] == ["batch", 2, "capacity", 48]
    assert sum(node.op_type == "GroupQueryAttention" for node in proto.graph.node) == 4


def test_export_is_skipped_when_current_and_redone_when_forced(gpt2_dir, gpt2_compiled_dir):
    before = (gpt2_compiled_dir / "manifest.json").stat().st_mtime_ns
    assert export_onnx(gpt2_dir, out_dir=gpt2_compiled_dir, force=False) == gpt2_compiled_dir
    assert (gpt2_compiled_dir / "manifest.json").stat().st_mtime_ns == before


def test_export_errors_name_the_problem(tmp_path, gpt2_dir):
    with pytest.raises(ExportError, match="fp32 only"):
        export_onnx(gpt2_dir, out_dir=tmp_path / "x", precision="fp16")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ExportError, match="cannot load the model.*'bert'"):
        export_onnx(tmp_path / "bert", out_dir=tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_cli(tmp_path, gpt2_dir, capsys):
    export_cli(["--runtime", "torch", "--model-dir", str(gpt2_dir)])
    assert "no compiled model to build" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="not a Hugging Face model folder"):
        export_cli(["--runtime", "onnxruntime", "--model-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="fp32 only"):
        export_cli(["--runtime", "onnxruntime", "--model-dir", str(gpt2_dir), "--precision", "int8"])
    export_cli(["--runtime", "onnxruntime", "--model-dir", str(gpt2_dir), "--out", str(tmp_path / "compiled")])
    assert (tmp_path / "compiled" / "onnx" / gpt2_dir.name / "model.onnx").is_file()
