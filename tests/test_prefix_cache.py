"""The prefix cache's index and slot choice (no model), and the engine reusing cached prompts."""

import pytest

from llmserve.engine.config import SamplingParams
from llmserve.engine.slots import SlotAllocator
from llmserve.engine.prefix_cache import PrefixCache, PrefixHit

FREE = lambda slot: True  # noqa: E731
BUSY = lambda slot: False  # noqa: E731


def test_indexed_lengths_are_whole_blocks_and_all_but_the_last_token():
    cache = PrefixCache(num_slots=2, block_size=4)
    assert cache.cacheable_lengths(1) == []
    assert cache.cacheable_lengths(2) == [1]
    assert cache.cacheable_lengths(5) == [4]
    assert cache.cacheable_lengths(11) == [4, 8, 10]


def test_longest_prefix_wins_and_the_last_token_is_never_matched():
    cache = PrefixCache(num_slots=4, block_size=4)
    prompt = list(range(100, 111))  # 11 tokens: indexed at 4, 8 and 10
    cache.register(2, prompt)
    assert cache.match(prompt, FREE) == PrefixHit(2, 10)  # the same prompt: all but its last token
    assert cache.match(prompt[:9] + [7, 7, 7], FREE) == PrefixHit(2, 8)  # shares two whole blocks
    assert cache.match(prompt[:6] + [7], FREE) == PrefixHit(2, 4)
    assert cache.match(prompt[:3] + [7, 7, 7, 7, 7], FREE) is None  # no whole block in common
    assert cache.match(prompt[:10], FREE) == PrefixHit(2, 8)  # a shorter prompt: 9 is not indexed
    assert cache.match([1] + prompt[1:], FREE) is None  # blocks chain: a different start matches nothing


def test_a_free_holder_is_preferred_to_one_in_use():
    cache = PrefixCache(num_slots=4, block_size=4)
    prompt = list(range(9))
    cache.register(0, prompt)
    cache.register(3, prompt)
    assert cache.match(prompt, lambda slot: slot == 3).slot == 3
    assert cache.match(prompt, lambda slot: slot == 0).slot == 0
    assert cache.match(prompt, BUSY).slot in (0, 3)  # in use: the engine copies it


def test_forget_drops_what_the_next_sequence_overwrites():
    cache = PrefixCache(num_slots=2, block_size=4)
    prompt = list(range(13))  # indexed at 4, 8, 12
    cache.register(0, prompt)
    cache.forget(0, keep=8)  # the slot's next sequence keeps 8 tokens and writes past them
    assert cache.match(prompt, FREE) == PrefixHit(0, 8)
    cache.forget(0)
    assert cache.match(prompt, FREE) is None and cache.num_entries == 0
    cache.register(1, prompt)
    cache.clear()
    assert cache.match(prompt, FREE) is None and cache.num_entries == 0


def test_a_hash_collision_is_not_a_hit(monkeypatch):
    import llmserve.engine.prefix_cache as module

    cache = PrefixCache(num_slots=2, block_size=4)
    monkeypatch.setattr(module, "_prefix_keys", lambda ids, lengths, block_size: [0] * len(lengths))
    cache.register(0, [1, 2, 3, 4, 5])
    assert cache.match([9, 9, 9, 9, 9], FREE) is None  # same keys, other tokens
    assert cache.match([1, 2, 3, 4, 5], FREE) == PrefixHit(0, 4)


def test_slots_given_out_empty_first_then_least_recently_used():
    cache = PrefixCache(num_slots=4, block_size=4)
    slots = SlotAllocator(4)
    for slot, prompt in ((0, [1] * 9), (1, [2] * 9), (2, [3] * 9)):
        assert slots.allocate(rank=cache.eviction_rank) == slot
        cache.register(slot, prompt)
    for slot in (0, 1, 2):
        slots.free(slot)
    assert slots.allocate(rank=cache.eviction_rank) == 3  # holds nothing
    cache.match([1] * 9, slots.is_free)  # slot 0 used again: now the most recent
    assert slots.allocate(rank=cache.eviction_rank) == 1
    assert slots.allocate(2) == 2
    with pytest.raises(ValueError, match="not free"):
        slots.allocate(2)


# -- the engine ---------------------------------------------------------------------------------

BASE = ("Once upon a time there was a little girl named Lily. She loved to play in the park with her "
        "friends, and every day she")
PARAMS = SamplingParams(max_tokens=12, min_tokens=12)


def _engine(engine_factory, onnx_compiled_dir, runtime, **overrides):
    extra = {"compiled_dir": str(onnx_compiled_dir)} if runtime == "onnxruntime" else {}
    return engine_factory(runtime=runtime, num_threads=1, **extra, **overrides)


def _generate(engine, waves: list[list[str]], params=PARAMS) -> list[list[int]]:
    """Each wave's prompts added together, run to completion; the output tokens of every request."""
    outputs = []
    for wave in waves:
        seqs = [engine.add_request("p", engine.encode(p), params) for p in wave]
        while engine.has_unfinished():
            engine.step()
        outputs += [s.output_ids for s in seqs]
    return outputs


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_cached_prompts_give_the_tokens_of_full_prefills(engine_factory, onnx_compiled_dir, runtime):
    waves = [
        [BASE],
        [BASE, BASE, BASE + " ran to the river"],  # its own slot, a copy of it, a shared block prefix
        [BASE + " ran to the river", "The dog barked", BASE],  # the same again, beside a fresh prompt
    ]
    expected = _generate(_engine(engine_factory, onnx_compiled_dir, runtime, enable_prefix_caching=False), waves)
    engine = _engine(engine_factory, onnx_compiled_dir, runtime, max_num_seqs=4)
    copies = []
    copy_prefix = engine.runner.copy_prefix
    engine.runner.copy_prefix = lambda *args: (copies.append(args), copy_prefix(*args))
    assert _generate(engine, waves) == expected
    assert copies and all(length >= 16 for _, _, length in copies)
    base, extended = len(engine.encode(BASE)), len(engine.encode(BASE + " ran to the river"))
    assert 16 < base < 32 < extended
    # Wave 2: BASE all but its last token twice, the extended prompt its first whole block; wave 3:
    # both prompts all but their last token.
    assert engine.stats.prefix_cached_tokens == 3 * (base - 1) + 16 + (extended - 1)
    if runtime == "onnxruntime":  # cached prompts joined the decode pass
        assert engine.runner.calls["joined"] + engine.runner.calls["repacked"] >= 1


def test_a_reused_slot_no_longer_serves_its_old_prompt(engine_factory):
    engine = engine_factory(max_num_seqs=1)
    other = "The sun was shining and the birds were singing when the children went out to play in the big"
    _generate(engine, [[BASE], [other]])  # the one slot now holds `other`
    cached = engine.stats.prefix_cached_tokens
    again = _generate(engine, [[BASE]])
    assert engine.stats.prefix_cached_tokens == cached  # no hit: BASE's K/V was overwritten
    assert again == _generate(engine_factory(enable_prefix_caching=False), [[BASE]])


def test_sampled_requests_and_reset(engine_factory):
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=7)
    plain = _generate(engine_factory(enable_prefix_caching=False), [[BASE], [BASE]], params)
    engine = engine_factory()
    assert _generate(engine, [[BASE], [BASE]], params) == plain
    assert engine.stats.prefix_cached_tokens > 0
    engine.reset_prefix_cache()
    before = engine.stats.prefix_cached_tokens
    _generate(engine, [[BASE]], params)
    assert engine.stats.prefix_cached_tokens == before
