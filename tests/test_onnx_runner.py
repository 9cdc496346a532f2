"""OnnxRuntimeRunner: the Runner interface and TorchModelRunner's results, and the engine on either runtime.

Runner checks compare logits with the torch runner (atol/rtol 1e-4, float32) through the paths
either decode batch takes (the in-place decode graph's, and the live past/present batch's of a
compiled model without it): continued decode, joins and leaves (holes), reordering, a reused slot,
a prefill beside the batch, chunked prefill, copied prefixes, and each reason to repack or compact. Engine checks compare greedy token ids exactly.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from llmserve.engine.config import EngineConfig, SamplingParams
from llmserve.engine.llm_engine import LLMEngine
from llmserve.runners.torch_runner import TorchModelRunner
from llmserve.runners import create_runner
from llmserve.runners.base import Runner
from llmserve.runners.kv_store import SlotStore
from llmserve.runners.onnxruntime_runner import OnnxRuntimeRunner
from tests.runner_contract import BAD_SIZES, bad_forward_calls

VOCAB = 2048


def _runner_pairs(model_dir, compiled_dir):
    def make(num_slots: int = 8, **kwargs):
        return (TorchModelRunner(model_dir, num_slots=num_slots, **kwargs),
                OnnxRuntimeRunner(model_dir, num_slots=num_slots, compiled_dir=compiled_dir, num_threads=1, **kwargs))

    return make


@pytest.fixture(scope="module")
def runners(default_model_dir, onnx_compiled_dir, tmp_path_factory):
    """Pairs whose ONNX runner decodes through the live past/present batch (TensorRT's way, and ONNX
    Runtime's for a compiled model without decode.onnx)."""
    past_present = tmp_path_factory.mktemp("past-present") / "compiled"
    shutil.copytree(onnx_compiled_dir, past_present, ignore=shutil.ignore_patterns("decode.onnx"))
    return _runner_pairs(default_model_dir, past_present)


@pytest.fixture(scope="module")
def in_place_runners(default_model_dir, onnx_compiled_dir):
    """Pairs whose ONNX runner decodes through the in-place decode graph (the default export)."""
    return _runner_pairs(default_model_dir, onnx_compiled_dir)


class Pair:
    """Drives a torch and an ONNX Runtime runner with the same calls and checks every result."""

    def __init__(self, torch_runner, onnx_runner):
        self.torch, self.onnx = torch_runner, onnx_runner
        self.cached: dict[int, int] = {}
        self.calls = 0

    def forward(self, slots, token_ids, starts=None) -> torch.Tensor:
        starts = [self.cached.get(s, 0) for s in slots] if starts is None else starts
        expected = self.torch.forward(slots, token_ids, starts)
        got = self.onnx.forward(slots, token_ids, starts)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
        for slot, start, tokens in zip(slots, starts, token_ids):
            self.cached[slot] = start + len(tokens)
        self.calls += 1
        return expected

    def decode(self, slots, steps: int = 1) -> None:
        for _ in range(steps):
            self.forward(slots, [[(7 * self.cached[s] + s) % VOCAB] for s in slots])


def test_live_batch_paths_match_torch(runners):
    pair = Pair(*runners())
    pair.forward([0, 1, 2], [[5, 6, 7, 8, 9], [20, 21], [30, 31, 32, 33]], [0, 0, 0])
    # Ragged prompts: one unpadded pass of the prefill graph. Decode: packed once, then continued
    # from the live present buffers.
    pair.decode([0, 1, 2], steps=5)
    live = pair.onnx._live
    assert live is not None and live.rows == [0, 1, 2]
    assert pair.onnx.calls == {"packed_prefill": 1, "packed": 1, "continued": 4}
    pair.forward([4], [[40, 41, 42]], [0])  # a prefill beside the live batch leaves it alone
    assert pair.onnx._live is live and live.rows == [0, 1, 2]
    pair.decode([0, 1, 2, 4], steps=3)  # a join: a new row
    assert live.rows == [0, 1, 2, 4] and pair.onnx.calls["joined"] == 1
    pair.decode([0, 4], steps=3)  # leaves: holes
    assert live.rows == [0, None, None, 4] and pair.onnx.calls["left"] == 2
    pair.decode([4, 0], steps=2)  # reorder
    pair.forward([0], [[9, 8, 7, 6]], [0])  # slot 0 reused by a new sequence while live
    assert live.rows == [None, None, None, 4]
    pair.decode([4, 0], steps=3)  # the new sequence joins into a hole
    assert live.rows == [0, None, None, 4]
    pair.forward([3], [[1]], [0])  # a one-token prompt: a prefill, though decode-shaped
    pair.decode([0, 3, 4], steps=2)
    assert live.rows == [0, 3, None, 4]
    # Chunked prefill of slot 5 alongside decodes of the live batch.
    pair.forward([5], [[11, 12, 13, 14, 15, 16]], [0])
    pair.forward([5, 0], [[17, 18, 19], [3]])  # slot 0's K/V goes to the store, its row is left
    pair.decode([0, 3, 4, 5], steps=4)
    assert pair.onnx._live is live and pair.onnx.calls["repacked"] == 0
    assert pair.onnx.calls["packed"] + pair.onnx.calls["continued"] + pair.onnx.calls["packed_prefill"] == pair.calls


def test_packed_prefill_beside_a_live_batch_matches_torch(runners):
    pair = Pair(*runners())
    pair.forward([0, 1], [[5, 6, 7], [20, 21, 22]], [0, 0])  # same lengths: the padded graph
    pair.decode([0, 1], steps=3)
    live = pair.onnx._live
    # Ragged prompts, one of them reusing live slot 1: its row leaves the batch unstored.
    pair.forward([1, 4, 6, 3], [[9, 8, 7, 6, 5, 4, 3], [40], [60, 61, 62, 63], [30, 31]], [0, 0, 0, 0])
    assert pair.onnx.calls["packed_prefill"] == 1 and live.rows == [0, None]
    pair.decode([0, 1, 3, 4, 6], steps=4)
    assert pair.onnx.calls["packed_prefill"] == 1


def test_copied_prefixes_continue_as_if_computed(runners):
    """The prefix cache's copies: a prompt cached but for its last token joins the live batch, one
    with a longer rest runs it from the copy; both give the logits of the prompt prefilled whole."""
    pair = Pair(*runners())
    prompt = [5, 6, 7, 8, 9, 10, 11]
    whole = pair.forward([0], [prompt], [0])
    pair.decode([0], steps=2)  # slot 0 is live, its prompt's K/V in the store
    for runner in (pair.torch, pair.onnx):
        runner.copy_prefix(0, 1, 6)
        runner.copy_prefix(0, 2, 3)
    joined = pair.forward([0, 1], [[3], prompt[6:]], [pair.cached[0], 6])
    torch.testing.assert_close(joined[1], whole[0], atol=1e-4, rtol=1e-4)
    assert pair.onnx.calls["joined"] == 1
    rest = pair.forward([2], [prompt[3:]], [3])
    torch.testing.assert_close(rest[0], whole[0], atol=1e-4, rtol=1e-4)
    pair.decode([0, 1, 2], steps=3)


def test_in_place_decode_paths_match_torch(in_place_runners):
    pair = Pair(*in_place_runners())
    batch = pair.onnx._in_place
    assert pair.onnx._live is None and batch is not None
    pair.forward([0, 1, 2], [[5, 6, 7, 8, 9], [20, 21], [30, 31, 32, 33]], [0, 0, 0])
    pair.decode([0, 1, 2], steps=5)  # rows of different lengths, no padding
    assert batch.rows == [0, 1, 2] and batch.lengths == [10, 7, 9]
    assert pair.onnx.calls == {"packed_prefill": 1, "in_place": 5, "joined": 3}
    pair.forward([4], [[40, 41, 42]], [0])  # a prefill beside the batch leaves it alone
    assert batch.rows == [0, 1, 2]
    pair.decode([0, 1, 2, 4], steps=3)  # a join: a new row
    assert batch.rows == [0, 1, 2, 4] and pair.onnx.calls["joined"] == 4
    pair.decode([0, 4], steps=3)  # leaves: holes (their K/V stored: they may come back)
    assert batch.rows == [0, None, None, 4] and pair.onnx.calls["left"] == 2
    pair.decode([4, 0], steps=2)  # reorder
    pair.forward([0], [[9, 8, 7, 6]], [0])  # slot 0 reused by a new sequence while in the batch
    assert batch.rows == [None, None, None, 4]
    pair.decode([4, 0], steps=3)  # the new sequence joins into a hole
    assert batch.rows == [0, None, None, 4]
    pair.forward([3], [[1]], [0])  # a one-token prompt: a prefill, though decode-shaped
    pair.decode([0, 3, 4], steps=2)
    assert batch.rows == [0, 3, None, 4]
    pair.decode([1, 2, 0, 3, 4], steps=2)  # the sequences that left come back from the store
    # Chunked prefill of slot 5 alongside decodes of the batch.
    pair.forward([5], [[11, 12, 13, 14, 15, 16]], [0])
    pair.forward([5, 0], [[17, 18, 19], [3]])  # slot 0's K/V goes to the store, its row is left
    pair.decode([0, 3, 4, 5], steps=4)
    assert pair.onnx.calls["packed"] + pair.onnx.calls["in_place"] + pair.onnx.calls["packed_prefill"] == pair.calls


def test_in_place_release_compaction_and_copied_prefixes(in_place_runners):
    pair = Pair(*in_place_runners(num_slots=16))
    batch, store = pair.onnx._in_place, pair.onnx.store
    pair.forward(list(range(12)), [[5 + i] * (2 + i) for i in range(12)], [0] * 12)
    pair.decode(list(range(12)), steps=2)
    before = [t[11].clone() for t in store.tensors]
    for slot in range(6, 12):  # finished: holes, nothing written to the store
        pair.onnx.release(slot)
        pair.torch.release(slot)
        del pair.cached[slot]
    assert all(torch.equal(t[11], b) for t, b in zip(store.tensors, before))
    assert batch.rows == [0, 1, 2, 3, 4, 5]  # holes at the end are dropped
    pair.decode([0, 5])  # 4 holes for 2 sequences stay (4 + 2 // 4 allowed)
    assert batch.rows == [0, None, None, None, None, 5] and pair.onnx.calls["compacted"] == 0
    pair.decode([5])  # 5 holes for 1: the last row moves into the first hole
    assert batch.rows == [5] and pair.onnx.calls["compacted"] == 1
    pair.decode([0, 1, 5], steps=2)
    prompt = [5, 6, 7, 8, 9, 10, 11]
    whole = pair.forward([6], [prompt], [0])
    for runner in (pair.torch, pair.onnx):
        runner.copy_prefix(6, 7, 6)
    joined = pair.forward([0, 7], [[3], prompt[6:]], [pair.cached[0], 6])  # cached but for its last token
    torch.testing.assert_close(joined[1], whole[0], atol=1e-4, rtol=1e-4)
    pair.decode([0, 1, 5, 7], steps=3)


def test_in_place_decode_holds_twice_the_store(in_place_runners):
    _, runner = in_place_runners(num_slots=2, max_model_len=16)
    assert runner.kv_cache_bytes == 2 * (2 * 4 * 2 * 2 * 16 * 48 * 4)  # the store and the batch's rows


def test_a_compiled_model_without_the_prefill_graph_pads_prompts(default_model_dir, onnx_compiled_dir, tmp_path):
    """A compiled model exported before prefill.onnx existed (or with it removed) still serves."""
    old = tmp_path / "compiled"
    shutil.copytree(onnx_compiled_dir, old, ignore=shutil.ignore_patterns("prefill.onnx"))
    runner = OnnxRuntimeRunner(default_model_dir, num_slots=4, compiled_dir=old, num_threads=1)
    assert not runner.packs_prefill
    expected = TorchModelRunner(default_model_dir, num_slots=4).forward([0, 1], [[5, 6, 7], [20]], [0, 0])
    torch.testing.assert_close(runner.forward([0, 1], [[5, 6, 7], [20]], [0, 0]), expected, atol=1e-4, rtol=1e-4)
    assert runner.calls == {"packed": 1}


def test_a_released_slot_leaves_the_live_batch_without_being_stored(runners):
    pair = Pair(*runners())
    pair.forward([0, 1, 2], [[5, 6, 7], [20, 21], [30, 31, 32, 33]], [0, 0, 0])
    pair.decode([0, 1, 2], steps=4)
    live, store = pair.onnx._live, pair.onnx.store
    before = [t[1].clone() for t in store.tensors]
    pair.onnx.release(1)  # its sequence finished: the row becomes a hole, the store is not written
    assert live.rows == [0, None, 2] and pair.onnx.calls["left"] == 1
    assert all(torch.equal(t[1], b) for t, b in zip(store.tensors, before))
    pair.onnx.release(7)  # not in the live batch: nothing to do
    pair.torch.release(1)
    del pair.cached[1]
    pair.forward([1], [[9, 8, 7, 6, 5]], [0])  # the slot's next sequence
    pair.decode([0, 1, 2], steps=3)  # joins into the hole
    assert pair.onnx._live is live and live.rows == [0, 1, 2]
    pair.decode([0, 2])  # a sequence not in the call still has its K/V stored (it may come back)
    assert not torch.equal(store.tensors[0][1], before[0])
    pair.decode([0, 1, 2], steps=2)


@pytest.mark.parametrize("num_rows", [1, 3, 4, 9])
def test_store_copies_match_elementwise(num_rows):
    """gather/scatter copy row by row (few rows) or by index (many): both against a plain loop."""
    store = SlotStore(num_tensors=2, num_slots=12, num_kv_heads=2, max_len=10, head_dim=3)
    for t in store.tensors:
        t.copy_(torch.randn_like(t))
    slots, lengths = [11, 2, 5, 0, 7, 3, 9, 1, 4][:num_rows], [4, 0, 7, 1, 6, 2, 5, 3, 7][:num_rows]
    rows = [num_rows - 1 - b for b in range(num_rows)]  # reversed: rows are not the call order
    out = [torch.full((num_rows, 2, 8, 3), float("nan")) for _ in store.tensors]
    store.gather(out, slots, lengths, rows=rows)
    for dst, src in zip(out, store.tensors):
        for b, (slot, n) in enumerate(zip(slots, lengths)):
            assert torch.equal(dst[rows[b], :, 8 - n:], src[slot, :, :n])
            assert not dst[rows[b], :, :8 - n].any()
    firsts, columns = [n // 2 for n in lengths], [1] * num_rows
    counts = [min(3, 10 - f) for f in firsts]
    expected = [t.clone() for t in store.tensors]
    for dst, src in zip(expected, out):
        for b, slot in enumerate(slots):
            dst[slot, :, firsts[b]:firsts[b] + counts[b]] = src[rows[b], :, 1:1 + counts[b]]
    store.scatter(out, slots, firsts, counts, columns, rows=rows)
    for got, want in zip(store.tensors, expected):
        assert torch.equal(got, want)


def test_live_batch_repacks_when_in_place_would_waste(runners):
    pair = Pair(*runners(num_slots=16))
    pair.forward(list(range(12)), [[5 + i] * (2 + i) for i in range(12)], [0] * 12)
    pair.decode(list(range(12)), steps=2)
    first = pair.onnx._live
    six = [0, 1, 2, 3, 4, 5]
    pair.decode(six + [11])  # 5 leave: 5 holes for 7 sequences (4 + 7 // 4 allowed) stay in place
    assert pair.onnx._live is first and pair.onnx.calls["repacked"] == 0
    pair.decode(six)  # 6 holes for 6 sequences: repacked
    second = pair.onnx._live
    assert second is not first and second.rows == six and pair.onnx.calls["repacked"] == 1
    pair.forward([12], [[9] * 40], [0])
    assert second.width == 11
    pair.decode(six + [12])  # the 40-token prompt does not fit left of the batch's 11 columns
    third = pair.onnx._live
    assert third is not second and pair.onnx.calls["repacked"] == 2
    pair.decode(six + [12], steps=2)
    pair.decode(six)  # it leaves 43 columns for sequences of at most 14 tokens: repacked to their width
    assert pair.onnx._live is not third and pair.onnx.calls["repacked"] == 3
    assert pair.onnx._live.width == max(pair.cached[s] for s in six)
    pair.decode(six, steps=2)


def test_same_metadata_and_errors_as_torch(runners):
    torch_runner, onnx_runner = runners(num_slots=2, max_model_len=16)
    assert isinstance(torch_runner, Runner) and isinstance(onnx_runner, Runner)
    for name in ("vocab_size", "max_model_len", "num_slots", "eos_token_ids", "device", "dtype"):
        assert getattr(onnx_runner, name) == getattr(torch_runner, name), name
    assert onnx_runner.kv_cache_bytes == 2 * 4 * 2 * 2 * 16 * 48 * 4  # K and V, 4 layers, 2 slots, 2 heads, fp32
    bad_calls = bad_forward_calls(VOCAB, max_model_len=16)
    for message, args in bad_calls.items():
        for runner in (torch_runner, onnx_runner):
            with pytest.raises(ValueError, match=message):
                runner.forward(*args)
    onnx_runner.forward([0], [[1] * 16], [0])  # exactly full is fine
    for message, kwargs in BAD_SIZES.items():
        with pytest.raises(ValueError, match=message):
            OnnxRuntimeRunner("unused", compiled_dir="unused", **kwargs)
    with pytest.raises(ValueError, match="float32 on the CPU"):
        OnnxRuntimeRunner("unused", num_slots=1, dtype="float16", compiled_dir="unused")
    with pytest.raises(TypeError, match="compiled_dir"):  # the runner is told where its compiled model is
        OnnxRuntimeRunner("unused", num_slots=1)


def test_missing_or_stale_compiled_model_says_how_to_build(default_model_dir, onnx_compiled_dir, tmp_path):
    config = EngineConfig(model_dir=str(default_model_dir), runtime="onnxruntime", compiled_dir=str(tmp_path / "none"))
    with pytest.raises(FileNotFoundError, match="make engine RUNTIME=onnxruntime MODEL_DIR="):
        create_runner(config)
    # The same compiled model, claimed by a model with other weights.
    other = tmp_path / "other-model"
    shutil.copytree(default_model_dir, other)
    config_json = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config_json, "rms_norm_eps": 1e-5}))
    config = EngineConfig(model_dir=str(other), runtime="onnxruntime", compiled_dir=str(onnx_compiled_dir))
    with pytest.raises(ValueError, match=r"built from .*default.*make engine RUNTIME=onnxruntime"):
        create_runner(config)


def test_config_runtimes_and_compiled_dir(default_model_dir):
    with pytest.raises(ValueError, match="runtime must be one of"):
        EngineConfig(model_dir="x", runtime="onnx")
    with pytest.raises(ValueError, match="compiled_dir"):
        EngineConfig(model_dir="x", runtime="onnxruntime", compiled_dir=" ")


def _run_in_flight(engine: LLMEngine, schedule: dict[int, list[tuple[str, int]]]) -> dict[str, list[int]]:
    """Requests join at the steps `schedule` names, each with a fixed length (min_tokens = max_tokens),
    so sequences join and leave the running batch at fixed steps; returns each one's token ids."""
    seqs = {}
    step = 0
    while step <= max(schedule) or engine.has_unfinished():
        for prompt, length in schedule.get(step, []):
            params = SamplingParams(max_tokens=length, min_tokens=length)
            seqs[f"{step}:{prompt}"] = engine.add_request(prompt, engine.encode(prompt), params, stream=False)
        engine.step()
        step += 1
    return {name: seq.ids[seq.num_prompt_tokens:] for name, seq in seqs.items()}


def test_greedy_output_identical_across_runtimes(default_model_dir, onnx_compiled_dir, engine_factory, tmp_path):
    schedule = {
        0: [("Once upon a time", 24), ("The little dog", 10), ("She said", 30)],
        3: [("In the morning the children went to school and", 12)],
        5: [("Tom and his mother", 20), ("A", 8)],
        14: [("The sun was shining", 15)],
    }
    past_present = tmp_path / "past-present"
    shutil.copytree(onnx_compiled_dir, past_present, ignore=shutil.ignore_patterns("decode.onnx"))
    results = {}
    for name, runtime, extra in (("torch", "torch", {}),
                                 ("in-place", "onnxruntime", {"compiled_dir": str(onnx_compiled_dir)}),
                                 ("past-present", "onnxruntime", {"compiled_dir": str(past_present)})):
        engine = engine_factory(runtime=runtime, num_threads=1, max_num_seqs=8, **extra)
        assert type(engine.runner).__name__ == {"torch": "TorchModelRunner",
                                                 "onnxruntime": "OnnxRuntimeRunner"}[runtime]
        results[name] = _run_in_flight(engine, schedule)
        if runtime == "onnxruntime":  # sequences joined and left the decode batch in place
            calls = engine.runner.calls
            assert calls["joined"] >= 3 and calls["left"] >= 3
            assert calls["in_place" if name == "in-place" else "continued"] >= 10
            assert calls["packed_prefill"] >= 1  # the ragged prompts of step 0
    assert results["in-place"] == results["torch"] and results["past-present"] == results["torch"]
    assert sorted(map(len, results["torch"].values())) == [8, 10, 12, 15, 20, 24, 30]
