"""TorchModelRunner: the `Runner` (llmserve/runners/base.py) over our model definitions in PyTorch
(llmserve/models), on any device and dtype torch runs them in.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from llmserve.models import SlotKVCache, load_model, resolve_dtype
from llmserve.models.attention import plan_attention, plan_packed_prefill
from llmserve.models.hf_config import eos_token_ids, read_config
from llmserve.runners.base import capped_model_len, check_sizes, validate_batch, validate_token_ids


class TorchModelRunner:
    """A `Runner` that owns a model and its preallocated KV cache (`num_slots` regions of
    `max_model_len` tokens)."""

    packs_prefill = True  # ragged prompts from empty caches go in one unpadded pass (`_forward_packed`)

    def __init__(self, model_dir: str | os.PathLike, *, num_slots: int, max_model_len: int | None = None,
                 device: str = "cpu", dtype: str = "float32") -> None:
        check_sizes(num_slots, max_model_len)
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype)
        self.model = load_model(model_dir, dtype=self.dtype, device=self.device)
        self.vocab_size: int = self.model.vocab_size
        self.max_model_len: int = capped_model_len(max_model_len, self.model.max_positions)
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
        """See `Runner.forward`: float32 logits [B, vocab] of each sequence's last new token."""
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
        """See `Runner.copy_prefix`."""
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
