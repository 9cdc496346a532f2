"""The decoder as an ONNX graph: our model definitions with a past/present attention layout
instead of the runner's slot cache. This is the interface of every compiled model (the ONNX
export for ONNX Runtime, and the TensorRT plan built from it); its tensors are named by
`llmserve.export.graph_io`:

- inputs: `input_ids` int64 [batch, seq]; `position_ids` int64 [batch, seq]; `attention_mask`
  int64 [batch, past_seq + seq] (1 = a real key, past or new; 0 = padding); and
  `past_key_values.{i}.key` / `.value` float32 [batch, num_kv_heads, past_seq, head_dim].
- outputs: `logits` float32 [batch, vocab] of the LAST position only (ragged batches are left
  padded, so position seq-1 is every row's last real token); `present.{i}.key` / `.value`
  [batch, num_kv_heads, past_seq + seq, head_dim] = concat(past, new).
- mask: query t (column past_seq + t) attends key j iff (attention_mask[b, j] and j <= past_seq + t)
  or j == past_seq + t; the "or itself" keeps padding queries from seeing no key at all (NaN in
  their K/V would poison later steps: NaN times a zero weight is NaN).
- past_seq may be 0 for ONNX Runtime; the TensorRT runner always passes at least one (masked)
  column. Dynamic axes: batch, seq, past_seq.

Same modules, same fused weights as `TorchModelRunner`; only `Attention.attend` differs: each
layer concatenates its past K/V with the new tokens' K/V (its `present` output) and attends
over it under that mask rule.

ONNX Runtime's compiled model has a second graph, `PackedPrefillGraph` (`prefill.onnx`), for prompts
from empty caches: packed end to end into one row, no padding (the torch runner's
`PackedPrefill` layout):

- inputs: `input_ids`, `position_ids` int64 [1, tokens] (positions restart at 0 for each prompt);
  `padded_index` int64 [tokens] (where each token sits in the prompts' padded [prompts * longest]
  layout); `prompt_mask` int64 [prompts, longest] (1 = a real token of that prompt);
  `last_index` int64 [prompts] (each prompt's last token among the packed ones).
- outputs: `logits` float32 [prompts, vocab]; `present.{i}.key` / `.value`
  [1, num_kv_heads, tokens, head_dim], the packed tokens' K/V in input order.

And a third, `InPlaceDecodeGraph` (`decode.onnx`), for the decode batch: each row's K/V lives in a
buffer of `capacity` positions that is both past and present (bound to the same memory), and each
layer writes its new token's K/V there in place (llmserve/export/in_place_attention.py):

- inputs: `input_ids`, `position_ids` int64 [batch, 1]; `seqlens_k` int32 [batch] (positions each
  row holds before this token; its token goes at that position); `total_sequence_length` int32
  scalar (max(seqlens_k) + 1); `past_key_values.{i}.key` / `.value` [batch, num_kv_heads,
  capacity, head_dim], right padded: row b's positions [0, seqlens_k[b]) are real.
- outputs: `logits` [batch, vocab]; `present.{i}.key` / `.value`, the same shape as past (bind
  them to past's memory).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llmserve.export.in_place_attention import in_place_gqa
from llmserve.models import DecoderLM
from llmserve.models.attention import fold_mask, grouped_query_attention, packed_prompt_attention, prompt_causal_mask


@dataclass(slots=True)
class PastKV:
    """Stands in for the runner's `SlotKVCache`: the models only iterate its per-layer `k` and `v`."""

    k: list[torch.Tensor | None]  # [B, Hkv, past_seq, D] each (None: no past, the packed prefill)
    v: list[torch.Tensor | None]


class PastPresentAttention:
    """`Attention` over concat(past, new); collects every layer's present K and V in order."""

    def __init__(self, attention_mask: torch.Tensor, past_len: torch.Tensor | int, seq_len: int,
                 q_per_kv: int) -> None:
        total = attention_mask.shape[1]
        cols = torch.arange(total, device=attention_mask.device)
        query_cols = cols[-seq_len:]  # query t sits at absolute column past_len + t
        causal = cols.unsqueeze(0) <= query_cols.unsqueeze(1)  # [T, total]
        itself = cols.unsqueeze(0) == query_cols.unsqueeze(1)
        # A padding query still sees itself: no row without a visible key, so no NaN anywhere.
        self.mask = fold_mask(((attention_mask.unsqueeze(1) != 0) & causal) | itself, q_per_kv, seq_len)  # [B, T, total]
        self.presents: list[torch.Tensor] = []

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_past: torch.Tensor,
               v_past: torch.Tensor, scale: float) -> torch.Tensor:
        keys = torch.cat((k_past, k.transpose(1, 2)), dim=2)
        values = torch.cat((v_past, v.transpose(1, 2)), dim=2)
        self.presents += (keys, values)
        return grouped_query_attention(q, keys, values, self.mask, scale)


class DecoderGraph(nn.Module):
    """forward(input_ids, position_ids, attention_mask, past k0, past v0, past k1, ...) ->
    (logits of the last position, present k0, present v0, ...)."""

    def __init__(self, model: DecoderLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        model = self.model
        attention = PastPresentAttention(attention_mask, past[0].shape[2], input_ids.shape[1],
                                         model.num_heads // model.num_kv_heads)
        hidden = model(input_ids, position_ids, PastKV(list(past[0::2]), list(past[1::2])), attention)
        logits = model.compute_logits(hidden[:, -1]).float()
        return (logits, *attention.presents)


class PackedPrefillAttention:
    """Prompts packed into one row attend each to itself (`packed_prompt_attention`); collects
    every layer's present K and V [1, Hkv, tokens, D] in order."""

    def __init__(self, padded_index: torch.Tensor, prompt_mask: torch.Tensor, q_per_kv: int) -> None:
        self.padded_index = padded_index
        self.batch_size, self.max_len = prompt_mask.shape
        self.mask = prompt_causal_mask(prompt_mask != 0, q_per_kv)
        self.presents: list[torch.Tensor] = []

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_past: None, v_past: None,
               scale: float) -> torch.Tensor:
        self.presents += (k.transpose(1, 2), v.transpose(1, 2))
        return packed_prompt_attention(q, k, v, self.padded_index, self.batch_size, self.max_len, self.mask, scale)


class PackedPrefillGraph(nn.Module):
    """forward(input_ids, position_ids, padded_index, prompt_mask, last_index) -> (logits of each
    prompt's last token, present k0, present v0, ...): see the module docstring."""

    def __init__(self, model: DecoderLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, padded_index: torch.Tensor,
                prompt_mask: torch.Tensor, last_index: torch.Tensor) -> tuple[torch.Tensor, ...]:
        model = self.model
        attention = PackedPrefillAttention(padded_index, prompt_mask, model.num_heads // model.num_kv_heads)
        no_past = [None] * model.num_layers
        hidden = model(input_ids, position_ids, PastKV(no_past, no_past), attention)
        logits = model.compute_logits(hidden[0, last_index]).float()
        return (logits, *attention.presents)


class InPlaceAttention:
    """Each layer's new K/V written into its past buffer at each row's length (`in_place_gqa`);
    collects every layer's present K and V in order."""

    def __init__(self, seqlens_k: torch.Tensor, total_sequence_length: torch.Tensor) -> None:
        self.seqlens_k = seqlens_k
        self.total_sequence_length = total_sequence_length
        self.presents: list[torch.Tensor] = []

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_past: torch.Tensor,
               v_past: torch.Tensor, scale: float) -> torch.Tensor:
        B, T, H, D = q.shape
        kv_heads = k.shape[2]
        out, k_present, v_present = in_place_gqa(
            q.reshape(B, T, H * D), k.reshape(B, T, kv_heads * D), v.reshape(B, T, kv_heads * D), k_past, v_past,
            self.seqlens_k, self.total_sequence_length, H, kv_heads, scale)
        self.presents += (k_present, v_present)
        return out


class InPlaceDecodeGraph(nn.Module):
    """forward(input_ids, position_ids, seqlens_k, total_sequence_length, past k0, past v0, ...) ->
    (logits, present k0, present v0, ...): see the module docstring."""

    def __init__(self, model: DecoderLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, seqlens_k: torch.Tensor,
                total_sequence_length: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        model = self.model
        attention = InPlaceAttention(seqlens_k, total_sequence_length)
        hidden = model(input_ids, position_ids, PastKV(list(past[0::2]), list(past[1::2])), attention)
        logits = model.compute_logits(hidden[:, -1]).float()
        return (logits, *attention.presents)
