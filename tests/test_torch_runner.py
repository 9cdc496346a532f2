"""Parity of TorchModelRunner with the HF reference models on tiny random checkpoints.

Each architecture is saved with `save_pretrained` and compared with the HF model
(eager attention, float32). Tolerance: |ours - HF| <= 1e-4 + 1e-4*|HF| on the logits.
"""

from __future__ import annotations

import functools
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built locally; never reach for the hub

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from llmserve.runners.torch_runner import TorchModelRunner  # noqa: E402
from llmserve.models import load_model  # noqa: E402
from llmserve.runners.base import Runner  # noqa: E402
from tests.runner_contract import BAD_SIZES, bad_forward_calls  # noqa: E402

ATOL = RTOL = 1e-4
VOCAB = 300
LLAMA_DIMS = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=128)

CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=128),
    # GQA, biases on q/k/v/o, linear RoPE scaling.
    "llama": lambda: transformers.LlamaConfig(
        **LLAMA_DIMS, attention_bias=True,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
    # q/k/v bias (always, for Qwen2), tied embeddings.
    "qwen2": lambda: transformers.Qwen2Config(**LLAMA_DIMS, tie_word_embeddings=True),
    # A sliding window below max_position_embeddings caps max_model_len to it.
    "mistral": lambda: transformers.MistralConfig(**LLAMA_DIMS, sliding_window=64),
}
PROMPT_LENS = (5, 11, 8)


def _randomize_norms_and_biases(model: torch.nn.Module) -> None:
    """HF initialises biases to 0 and norm weights to 1; perturb them so they are tested."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.1)
            elif "norm" in name or ".ln_" in name:
                param.normal_(1.0, 0.1)


@pytest.fixture(scope="module")
def make_arch(tmp_path_factory):
    """name -> (name, model_dir, HF reference model), each built once."""

    @functools.cache
    def make(name: str):
        torch.manual_seed(0)
        config = CONFIGS[name]()
        config.initializer_range = 0.1  # larger than default, so logits are not all near zero
        model = transformers.AutoModelForCausalLM.from_config(config)
        _randomize_norms_and_biases(model)
        model_dir = tmp_path_factory.mktemp(name)
        model.save_pretrained(model_dir)
        ref = transformers.AutoModelForCausalLM.from_pretrained(
            model_dir, attn_implementation="eager", dtype=torch.float32).eval()
        return name, model_dir, ref

    return make


@pytest.fixture(scope="module", params=list(CONFIGS))
def arch(request, make_arch):
    return make_arch(request.param)


@pytest.fixture(scope="module")
def llama(make_arch):
    """For checks that do not depend on the architecture."""
    return make_arch("llama")


def _prompts(seed: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in PROMPT_LENS]


def _hf_logits(ref, tokens: list[int]) -> torch.Tensor:
    """HF logits at every position of `tokens`, [len, vocab]."""
    with torch.no_grad():
        return ref(input_ids=torch.tensor([tokens])).logits[0].float()


def _assert_close(ours: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=RTOL)


def test_prefill_ragged_batch_matches_hf(arch):
    _, model_dir, ref = arch
    runner = TorchModelRunner(model_dir, num_slots=4)
    prompts = _prompts()
    logits = runner.forward([0, 1, 2], prompts, [0, 0, 0])
    assert logits.shape == (3, VOCAB) and logits.dtype == torch.float32
    for row, prompt in zip(logits, prompts):
        _assert_close(row, _hf_logits(ref, prompt)[-1])
    # Padding of the shorter prompts wrote nothing past their ends.
    for slot, n in zip([0, 1, 2], PROMPT_LENS):
        assert not runner.kv_cache.k[0][slot, :, n:runner.max_model_len].any()


def test_decode_steps_match_hf(arch):
    _, model_dir, ref = arch
    runner = TorchModelRunner(model_dir, num_slots=4)
    seqs = _prompts()
    logits = runner.forward([0, 1, 2], seqs, [0, 0, 0])
    steps = []
    for _ in range(5):
        next_ids = logits.argmax(-1).tolist()
        starts = [len(s) for s in seqs]
        seqs = [s + [t] for s, t in zip(seqs, next_ids)]
        logits = runner.forward([0, 1, 2], [[t] for t in next_ids], starts)
        steps.append(logits)
    for i, seq in enumerate(seqs):
        expected = _hf_logits(ref, seq)[-5:]
        _assert_close(torch.stack([step[i] for step in steps]), expected)


def test_decode_with_equal_contexts_matches_hf(arch):
    """Equal context lengths take the unmasked decode path."""
    _, model_dir, ref = arch
    runner = TorchModelRunner(model_dir, num_slots=2)
    seqs = [p[:5] for p in _prompts()[:2]]
    logits = runner.forward([0, 1], seqs, [0, 0])
    for _ in range(2):
        next_ids = logits.argmax(-1).tolist()
        logits = runner.forward([0, 1], [[t] for t in next_ids], [len(seqs[0])] * 2)
        seqs = [s + [t] for s, t in zip(seqs, next_ids)]
    for row, seq in zip(logits, seqs):
        _assert_close(row, _hf_logits(ref, seq)[-1])


def test_chunked_prefill_matches_one_shot(arch):
    _, model_dir, ref = arch
    runner = TorchModelRunner(model_dir, num_slots=4)
    other, long, _ = _prompts()
    one_shot = runner.forward([3], [long], [0])[0]
    # Chunk 1 of `long` alongside another prompt; chunk 2 alongside that prompt's first decode.
    first = runner.forward([0, 1], [long[:6], other], [0, 0])
    decode_id = int(first[1].argmax())
    second = runner.forward([0, 1], [long[6:], [decode_id]], [6, len(other)])
    _assert_close(second[0], one_shot)
    _assert_close(second[0], _hf_logits(ref, long)[-1])
    _assert_close(second[1], _hf_logits(ref, other + [decode_id])[-1])


def test_noncontiguous_slots_match_contiguous(arch):
    _, model_dir, _ = arch
    results = []
    for slots in ([0, 1, 2], [5, 1, 3]):
        runner = TorchModelRunner(model_dir, num_slots=6)
        seqs = _prompts()
        logits = [runner.forward(slots, seqs, [0, 0, 0])]
        for _ in range(2):
            next_ids = logits[-1].argmax(-1).tolist()
            logits.append(runner.forward(slots, [[t] for t in next_ids], [len(s) for s in seqs]))
            seqs = [s + [t] for s, t in zip(seqs, next_ids)]
        results.append(torch.stack(logits))
    torch.testing.assert_close(results[0], results[1], atol=1e-5, rtol=1e-5)


def test_reused_slot_ignores_stale_cache(arch):
    _, model_dir, ref = arch
    runner = TorchModelRunner(model_dir, num_slots=2)
    short, long, _ = _prompts()
    runner.forward([1], [long], [0])  # leaves stale K/V in slot 1 past len(short)
    _assert_close(runner.forward([1], [short], [0])[0], _hf_logits(ref, short)[-1])


def test_max_model_len_and_overlong_errors(arch):
    name, model_dir, _ = arch
    limit = 64 if name == "mistral" else 128  # Mistral: capped to its sliding window
    assert TorchModelRunner(model_dir, num_slots=1).max_model_len == limit
    assert TorchModelRunner(model_dir, num_slots=1, max_model_len=10_000).max_model_len == limit
    runner = TorchModelRunner(model_dir, num_slots=2, max_model_len=16)
    assert runner.max_model_len == 16
    runner.forward([0], [[1] * 16], [0])  # exactly full is fine
    with pytest.raises(ValueError, match="max_model_len"):
        runner.forward([0], [[1] * 17], [0])
    with pytest.raises(ValueError, match="max_model_len"):
        runner.forward([0, 1], [[1], [2]], [3, 16])


def test_invalid_arguments_raise(llama):
    _, model_dir, _ = llama
    runner = TorchModelRunner(model_dir, num_slots=2)
    bad_calls = bad_forward_calls(VOCAB)
    for message, args in bad_calls.items():
        with pytest.raises(ValueError, match=message):
            runner.forward(*args)
    for message, kwargs in BAD_SIZES.items():
        with pytest.raises(ValueError, match=message):
            TorchModelRunner(model_dir, **kwargs)


def test_runner_metadata(arch):
    name, model_dir, _ = arch
    runner = TorchModelRunner(model_dir, num_slots=3, max_model_len=32)
    assert isinstance(runner, Runner)
    assert runner.vocab_size == VOCAB and runner.num_slots == 3
    kv_heads = 4 if name == "gpt2" else 2
    # K and V, 2 layers, one scratch position per slot, float32, head_dim 16.
    assert runner.kv_cache_bytes == 2 * 2 * 3 * kv_heads * 33 * 16 * 4
    expected_eos = {"gpt2": [50256], "qwen2": []}.get(name, [2])
    assert runner.eos_token_ids == expected_eos


def test_eos_ids_from_generation_config(tmp_path, llama):
    _, model_dir, _ = llama
    for file in model_dir.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 2, 9]}))
    assert TorchModelRunner(tmp_path, num_slots=1).eos_token_ids == [7, 2, 9]


@pytest.mark.parametrize(("dtype", "tolerance"), [("bfloat16", 0.1), ("float16", 0.02)])
def test_half_precision_close_to_float32(llama, dtype, tolerance):
    _, model_dir, _ = llama
    prompts = _prompts()
    expected = TorchModelRunner(model_dir, num_slots=3).forward([0, 1, 2], prompts, [0, 0, 0])
    runner = TorchModelRunner(model_dir, num_slots=3, dtype=dtype)
    assert runner.kv_cache.k[0].dtype == getattr(torch, dtype)
    logits = runner.forward([0, 1, 2], prompts, [0, 0, 0])
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, expected, atol=tolerance, rtol=0)


def test_sharded_and_bin_checkpoints_load_the_same(tmp_path, arch):
    _, model_dir, ref = arch
    prompt = _prompts()[1]
    expected = TorchModelRunner(model_dir, num_slots=1).forward([0], [prompt], [0])
    sharded, bin_dir = tmp_path / "sharded", tmp_path / "bin"
    ref.save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    bin_dir.mkdir()
    (bin_dir / "config.json").write_bytes((model_dir / "config.json").read_bytes())
    torch.save(ref.state_dict(), bin_dir / "pytorch_model.bin")
    for directory in (sharded, bin_dir):
        logits = TorchModelRunner(directory, num_slots=1).forward([0], [prompt], [0])
        torch.testing.assert_close(logits, expected)


def test_load_model_rejects_unsupported_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(ValueError, match=r"'bert'.*gpt2, llama, mistral, qwen2"):
        load_model(tmp_path, dtype="float32", device="cpu")


def test_unsupported_rope_scaling_raises(tmp_path):
    config = {"model_type": "llama", **LLAMA_DIMS, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(NotImplementedError, match="yarn"):
        load_model(tmp_path, dtype="float32", device="cpu")
