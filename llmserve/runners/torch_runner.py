"""TorchModelRunner: one batched forward step of a decoder-only LM over a slot-based KV cache.

The engine owns scheduling and slot allocation; the runner owns the weights and the cache.
Each call appends new tokens for a set of slots (prefill, chunked prefill and decode are the
same operation with different lengths) and returns the logits of each sequence's last token.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from llmserve.models import SlotKVCache, load_model, resolve_dtype
from llmserve.models.attention import plan_attention, plan_packed_prefill
from llmserve.models.hf_config import eos_token_ids, read_config


def validate_batch(slots: Sequence[int], token_ids: Sequence[Sequence[int]], start_positions: Sequence[int], *,
                   num_slots: int, max_model_len: int) -> None:
    """The `forward` contract every runner enforces, with the same messages (ValueError)."""
    if not len(slots) == len(token_ids) == len(start_positions):
        raise ValueError(f"slots, token_ids and start_positions differ in length: "
                         f"{len(slots)}, {len(token_ids)}, {len(start_positions)}")
    if not slots:
        raise ValueError("empty batch")
    if len(set(slots)) != len(slots):
        raise ValueError(f"a slot appears twice in one call: {list(slots)}")
    for slot, tokens, start in zip(slots, token_ids, start_positions):
        if not 0 <= slot < num_slots:
            raise ValueError(f"slot {slot} out of range [0, {num_slots})")
        if not tokens:
            raise ValueError(f"no new tokens for slot {slot}")
        if start < 0:
            raise ValueError(f"negative start position {start} for slot {slot}")
        if start + len(tokens) > max_model_len:
            raise ValueError(f"slot {slot} would hold {start + len(tokens)} tokens, "
                             f"past max_model_len={max_model_len}")


def validate_token_ids(ids: torch.Tensor, vocab_size: int) -> None:
    """ids: the batch's token ids as a tensor built from the caller's lists (int64 when all are ints)."""
    if ids.dtype != torch.int64 or int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        raise ValueError(f"token ids must be integers in [0, {vocab_size})")


class TorchModelRunner:
    """Owns a model and its preallocated KV cache (`num_slots` regions of `max_model_len` tokens).

    Methods: forward, release, copy_prefix. Public attributes: vocab_size (logits width),
    max_model_len, num_slots, eos_token_ids, kv_cache_bytes, device, dtype.
    """

    packs_prefill = True  # ragged prompts from empty caches go in one unpadded pass (the engine groups by it)

    def __init__(self, model_dir: str | os.PathLike, *, num_slots: int, max_model_len: int | None = None,
                 device: str = "cpu", dtype: str = "float32") -> None:
        if num_slots <= 0:
            raise ValueError(f"num_slots must be > 0, got {num_slots}")
        if max_model_len is not None and max_model_len <= 0:
            raise ValueError(f"max_model_len must be > 0, got {max_model_len}")
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype)
        self.model = load_model(model_dir, dtype=self.dtype, device=self.device)
        self.vocab_size: int = self.model.vocab_size
        self.max_model_len: int = min(max_model_len or self.model.max_positions, self.model.max_positions)
        self.num_slots = num_slots
        self.eos_token_ids: list[int] = eos_token_ids(model_dir, read_config(model_dir))
        self.kv_cache = SlotKVCache(
            num_layers=self.model.num_layers, num_slots=num_slots, num_kv_heads=self.model.num_kv_heads,
            max_len=self.max_model_len, head_dim=self.model.head_dim, dtype=self.dtype, device=self.device,
        )
        self.kv_cache_bytes: int = self.kv_cache.nbytes
        self._q_per_kv = self.model.num_heads // self.model.num_kv_heads

    @torch.inference_mode()
    def forward(self, slots: Sequence[int], token_ids: Sequence[Sequence[int]],
                start_positions: Sequence[int]) -> torch.Tensor:
        """For each i, append token_ids[i] to the KV cache of slot slots[i] at positions
        start_positions[i] .. start_positions[i]+len(token_ids[i])-1 (start_positions[i] is how many
        tokens that slot already has cached; earlier cache content of that slot beyond it is stale
        and ignored), run the model over the new tokens attending to the slot's cached prefix +
        themselves (causal), and return float32 logits [B, vocab] for the LAST new token of each i.

        Raises ValueError for a malformed batch: mismatched lengths, a slot out of range or
        repeated, an empty token list, a negative start, a token id outside the vocabulary, or a
        sequence that would run past max_model_len.
        """
        validate_batch(slots, token_ids, start_positions, num_slots=self.num_slots,
                       max_model_len=self.max_model_len)
        lens = [len(tokens) for tokens in token_ids]
        T = max(lens)
        padded = min(lens) != T
        ends = [start + n for start, n in zip(start_positions, lens)]
        kv_len = max(ends)

        if padded and not any(start_positions):
            return self._forward_packed(slots, token_ids, lens)
        # Built on the CPU (checked there without a device sync), then one copy per tensor.
        ids = torch.tensor([[*t, *[0] * (T - len(t))] for t in token_ids] if padded else token_ids)
        validate_token_ids(ids, self.vocab_size)
        ids = ids.to(self.device)
        slots_t, starts_t, lens_t = torch.tensor([slots, start_positions, lens]).to(self.device).unbind(0)

        if T == 1:
            positions, valid = starts_t.unsqueeze(1), None
        else:
            offsets = torch.arange(T, device=self.device)
            positions = starts_t.unsqueeze(1) + torch.minimum(offsets, lens_t.unsqueeze(1) - 1)
            valid = offsets < lens_t.unsqueeze(1) if padded else None
        first = slots[0]
        contiguous = all(slot == first + i for i, slot in enumerate(slots))
        batch = plan_attention(
            slots=slots_t, positions=positions, valid=valid, first_slot=first if contiguous else None,
            kv_len=kv_len, needs_mask=T > 1 or min(ends) != kv_len, q_per_kv=self._q_per_kv,
            scratch_position=self.kv_cache.scratch_position,
        )
        hidden = self.model(ids, positions, self.kv_cache, batch)
        last = hidden[torch.arange(len(lens), device=self.device), lens_t - 1] if padded else hidden[:, -1]
        return self.model.compute_logits(last).float()

    def release(self, slot: int) -> None:
        """The slot's K/V is no longer needed (the runner contract; nothing to do here: a slot's
        cache is overwritten by its next sequence)."""

    def copy_prefix(self, source: int, destination: int, length: int) -> None:
        """Copy positions [0, length) of slot `source`'s K/V into slot `destination` (the prefix cache)."""
        for cache in (*self.kv_cache.k, *self.kv_cache.v):
            cache[destination, :, :length] = cache[source, :, :length]

    def _forward_packed(self, slots: Sequence[int], token_ids: Sequence[Sequence[int]],
                        lens: list[int]) -> torch.Tensor:
        """Ragged prompts from empty caches: one pass over the prompts packed end to end (see
        PackedPrefill) instead of a padded batch."""
        ids = torch.tensor([t for tokens in token_ids for t in tokens])
        validate_token_ids(ids, self.vocab_size)
        slots_t, lens_t = torch.tensor([slots, lens]).to(self.device).unbind(0)
        batch, positions = plan_packed_prefill(slots=slots_t, lengths=lens_t, total=len(ids), max_len=max(lens),
                                               q_per_kv=self._q_per_kv)
        hidden = self.model(ids.to(self.device).unsqueeze(0), positions, self.kv_cache, batch)
        return self.model.compute_logits(hidden[0, torch.cumsum(lens_t, 0) - 1]).float()
