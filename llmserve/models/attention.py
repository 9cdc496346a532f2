"""Slot-based KV cache and the attention op that reads and writes it.

Every sequence owns one slot: a private region `[num_kv_heads, max_len, head_dim]` of each
layer's K and V tensors. A forward call appends its new tokens' K/V at their positions, then
attends over positions `[0, kv_len)` of the batch's slots, where `kv_len` is the longest
context in the batch; per-sequence lengths and causality are enforced by a boolean mask.

Each slot has one scratch position past `max_len`. Padding tokens of a ragged batch write
their K/V there, so the write has a fixed shape (no data-dependent `nonzero`, hence no
device sync) and never touches a position that is ever read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F


class SlotKVCache:
    """Preallocated per-layer K and V tensors, each `[num_slots, num_kv_heads, max_len + 1, head_dim]`."""

    def __init__(self, *, num_layers: int, num_slots: int, num_kv_heads: int, max_len: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str) -> None:
        shape = (num_slots, num_kv_heads, max_len + 1, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_slots = num_slots
        self.max_len = max_len

    @property
    def scratch_position(self) -> int:
        return self.max_len

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))


class Attention(Protocol):
    """How the layers of one forward call attend: the runner's slot-cache layout (`AttentionBatch`)
    or the ONNX export's past/present layout (`llmserve.export.graph`)."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, scale: float) -> torch.Tensor:
        """Store this layer's new k, v [B, T, Hkv, D], attend q [B, T, H, D]; returns [B, T, H*D]."""
        ...


@dataclass(slots=True)
class AttentionBatch:
    """Per-call layout, computed once and shared by every layer.

    B sequences, each padded to T new tokens.
    """

    read_slots: slice | torch.Tensor  # slot selector: a slice when slots are a contiguous ascending run
    write_slots: torch.Tensor  # [B*T] slot of every new token
    write_positions: torch.Tensor  # [B*T] cache position of every new token (scratch for padding)
    kv_len: int  # keys attended: positions [0, kv_len) of each slot
    # Boolean "may attend" mask broadcastable to [B, num_kv_heads, T*q_per_kv, kv_len]; None = all.
    mask: torch.Tensor | None

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, scale: float) -> torch.Tensor:
        return cached_attention(q, k, v, k_cache, v_cache, self, scale)


def plan_attention(*, slots: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor | None,
                   first_slot: int | None, kv_len: int, needs_mask: bool, q_per_kv: int,
                   scratch_position: int) -> AttentionBatch:
    """Build the layout for one call.

    slots [B]; positions [B, T] (padding clamped to the sequence's last position);
    valid [B, T] marks real tokens (None: no padding);
    first_slot is set when slots are `first_slot, first_slot+1, ...` (read through a slice).
    """
    B, T = positions.shape
    write_positions = positions if valid is None else torch.where(valid, positions, scratch_position)
    write_positions = write_positions.reshape(-1)
    write_slots = slots.unsqueeze(1).expand(B, T).reshape(-1)
    read_slots = slice(first_slot, first_slot + B) if first_slot is not None else slots
    mask = None
    if needs_mask:
        keys = torch.arange(kv_len, device=positions.device)
        mask = keys <= positions.unsqueeze(-1)  # [B, T, kv_len]: causal within the slot's context
        # One query a row (T == 1): its mask broadcasts over the folded heads unrepeated.
        mask = fold_mask(mask, q_per_kv if T > 1 else 1, T)
    return AttentionBatch(read_slots, write_slots, write_positions, kv_len, mask)


def fold_mask(mask: torch.Tensor, q_per_kv: int, num_queries: int) -> torch.Tensor:
    """A "may attend" mask [B, T, K] as `grouped_query_attention` takes it, [B, 1, T*q_per_kv, K]:
    each query's row repeated for the q_per_kv query heads folded into the query axis.
    `num_queries` is T, from the caller: an ONNX trace knows it better than the mask's shape."""
    if q_per_kv > 1:
        B, _, K = mask.shape
        mask = mask.unsqueeze(2).expand(B, num_queries, q_per_kv, K).reshape(B, num_queries * q_per_kv, K)
    return mask.unsqueeze(1)


def fold_query_heads(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """q [B, T, H, D] -> [B, Hkv, T*q_per_kv, D]: the H // Hkv query heads of each KV head folded
    into the query-length axis, so attention needs no repeated K/V (grouped-query attention)."""
    B, T, H, D = q.shape
    rep = H // kv_heads
    return q.reshape(B, T, kv_heads, rep, D).transpose(1, 2).reshape(B, kv_heads, T * rep, D)


def unfold_query_heads(out: torch.Tensor, q_shape: tuple[int, int, int, int]) -> torch.Tensor:
    """`fold_query_heads` undone on attention's output [B, Hkv, T*q_per_kv, D] for queries of
    `q_shape` (B, T, H, D): [B, T, Hkv, q_per_kv, D], to reshape to [..., H*D]."""
    B, T, H, D = q_shape
    kv_heads = out.shape[1]
    return out.reshape(B, kv_heads, T, H // kv_heads, D).transpose(1, 2)


def grouped_query_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
                            scale: float) -> torch.Tensor:
    """q [B, T, H, D] attends keys and values [B, Hkv, K, D] under `mask` (from `fold_mask`; None:
    all), its heads folded (`fold_query_heads`); returns [B, T, H*D]."""
    B, T, H, D = q.shape
    out = F.scaled_dot_product_attention(fold_query_heads(q, keys.shape[1]), keys, values, attn_mask=mask,
                                         scale=scale)
    return unfold_query_heads(out, q.shape).reshape(B, T, H * D)


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, batch: AttentionBatch, scale: float) -> torch.Tensor:
    """Store k, v [B, T, Hkv, D] in the cache, attend q [B, T, H, D] to it (`grouped_query_attention`);
    returns [B, T, H*D]."""
    B, T, _, D = q.shape
    kv_heads = k.shape[2]
    k_cache[batch.write_slots, :, batch.write_positions] = k.reshape(B * T, kv_heads, D)
    v_cache[batch.write_slots, :, batch.write_positions] = v.reshape(B * T, kv_heads, D)
    if isinstance(batch.read_slots, slice):
        keys = k_cache[batch.read_slots, :, : batch.kv_len]  # a view, no copy
        values = v_cache[batch.read_slots, :, : batch.kv_len]
    else:
        keys = k_cache[:, :, : batch.kv_len].index_select(0, batch.read_slots)
        values = v_cache[:, :, : batch.kv_len].index_select(0, batch.read_slots)
    return grouped_query_attention(q, keys, values, batch.mask, scale)


@dataclass(slots=True)
class PackedPrefill:
    """Prompts starting from empty caches, packed end to end into one row [1, N]: no padding.

    The projections and MLPs (most of the work) run on the packed tokens; attention alone
    scatters them into a padded [B, T] layout, where each prompt attends causally to itself
    (B*T^2 scores, not N^2 under a block-diagonal mask). Keys come from the fresh k/v:
    nothing needs reading back from the cache.
    """

    write_slots: torch.Tensor  # [N] slot of every token
    write_positions: torch.Tensor  # [N] its position in its own prompt
    padded_index: torch.Tensor  # [N] where each token sits in the padded [B*T] layout
    batch_size: int  # B prompts
    max_len: int  # T, the longest prompt
    mask: torch.Tensor  # [B, 1, T*q_per_kv, T] causal "may attend", query heads folded (`fold_mask`)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, scale: float) -> torch.Tensor:
        k_cache[self.write_slots, :, self.write_positions] = k[0]
        v_cache[self.write_slots, :, self.write_positions] = v[0]
        return packed_prompt_attention(q, k, v, self.padded_index, self.batch_size, self.max_len, self.mask, scale)


def packed_prompt_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, padded_index: torch.Tensor,
                            batch_size: int, max_len: int, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Prompts packed end to end, q [1, N, H, D] and k, v [1, N, Hkv, D]: each prompt attends
    causally to itself in a padded [B, T] layout (`padded_index` [N]: each token's place in
    [B*T]; `mask` from `prompt_causal_mask`). Returns [1, N, H*D]. Shared by the torch runner
    and the ONNX packed-prefill graph."""
    H, D = q.shape[2:]
    B, T = batch_size, max_len

    def padded(x: torch.Tensor) -> torch.Tensor:  # [1, N, heads, D] -> [B, T, heads, D]
        out = x.new_zeros(B * T, x.shape[2], D)
        out[padded_index] = x[0]
        return out.view(B, T, x.shape[2], D)

    # grouped_query_attention's steps, q folded before k and v are padded: the order of the
    # exported prefill graph's nodes.
    queries = fold_query_heads(padded(q), k.shape[2])
    out = F.scaled_dot_product_attention(queries, padded(k).transpose(1, 2), padded(v).transpose(1, 2),
                                         attn_mask=mask, scale=scale)
    return unfold_query_heads(out, (B, T, H, D)).reshape(B * T, H * D)[padded_index].unsqueeze(0)


def prompt_causal_mask(valid: torch.Tensor, q_per_kv: int) -> torch.Tensor:
    """The "may attend" mask [B, 1, T*q_per_kv, T] of prompts padded to [B, T] (`valid`: the real
    tokens): causal within each prompt; padding queries (past a prompt's end) still see its real
    keys, so no row is empty. Query heads sharing a KV head are folded (`fold_mask`)."""
    T = valid.shape[1]
    offsets = torch.arange(T, device=valid.device)
    return fold_mask((offsets <= offsets.unsqueeze(1)) & valid.unsqueeze(1), q_per_kv, T)  # from [B, T, T]


@dataclass(slots=True, frozen=True)
class PackedLayout:
    """Where the tokens of prompts packed end to end sit (N tokens, B prompts, longest T)."""

    segment: torch.Tensor  # [N] the prompt of each token
    positions: torch.Tensor  # [N] each token's position in its own prompt
    padded_index: torch.Tensor  # [N] where each token sits in the padded [B*T] layout
    valid: torch.Tensor  # [B, T] bool: the real tokens of the padded layout
    firsts: torch.Tensor  # [B] each prompt's first token among the N
    last_index: torch.Tensor  # [B] each prompt's last token among the N


def packed_layout(lengths: torch.Tensor, total: int, max_len: int) -> PackedLayout:
    """The layout of prompts of `lengths` [B]; `total` and `max_len` (their sum and max) come from
    the host: no device sync."""
    device = lengths.device
    firsts = torch.cumsum(lengths, 0) - lengths
    segment = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths, output_size=total)
    positions = torch.arange(total, device=device) - firsts[segment]
    valid = torch.arange(max_len, device=device) < lengths.unsqueeze(1)
    return PackedLayout(segment, positions, segment * max_len + positions, valid, firsts, firsts + lengths - 1)


def plan_packed_prefill(*, slots: torch.Tensor, lengths: torch.Tensor, total: int, max_len: int,
                        q_per_kv: int) -> tuple[PackedPrefill, torch.Tensor]:
    """The layout for prompts of `lengths` [B] into `slots` [B] (see `packed_layout`). Also returns
    each token's position [1, total]."""
    layout = packed_layout(lengths, total, max_len)
    batch = PackedPrefill(slots[layout.segment], layout.positions, layout.padded_index, len(lengths), max_len,
                          prompt_causal_mask(layout.valid, q_per_kv))
    return batch, layout.positions.unsqueeze(0)
