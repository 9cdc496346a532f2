"""Attention that writes each new token's K/V into its cache in place: ONNX Runtime's
`com.microsoft::GroupQueryAttention`, for the in-place decode graph (llmserve/export/graph.py).

The past/present graph returns present = concat(past, new), so every decode step copies the whole
batch's K/V (that copy grows with the context and dominated the step at long contexts:
docs/benchmarking.md). GroupQueryAttention, given past and present bound to the same buffer of
`capacity` positions, writes the new K/V at each row's own length (`seqlens_k`) and attends over
that row's positions only: rows need no padding to a common width, and nothing else is copied.

The export needs three things this module provides: the op's schema (the `onnx` package has none
for ONNX Runtime's contrib ops), a torch custom op the model's attention calls (with an eager
reference, so the export's eager run and tests have numbers), and its translation to the ONNX node.
"""

from __future__ import annotations

import onnx
import torch
import torch.nn.functional as F
from onnx.defs import OpSchema

DOMAIN = "com.microsoft"
OP_TYPE = "GroupQueryAttention"


def _register_schema() -> None:
    """What the exporter and `onnx.checker` need to know of the node; ONNX Runtime has its own."""
    if onnx.defs.has(OP_TYPE, DOMAIN):
        return
    parameter = OpSchema.FormalParameter
    onnx.defs.register_schema(OpSchema(
        OP_TYPE, DOMAIN, 1,
        inputs=[parameter("query", "T"), parameter("key", "T"), parameter("value", "T"),
                parameter("past_key", "T"), parameter("past_value", "T"), parameter("seqlens_k", "M"),
                parameter("total_sequence_length", "M")],
        outputs=[parameter("output", "T"), parameter("present_key", "T"), parameter("present_value", "T")],
        type_constraints=[("T", ["tensor(float)"], "activations"), ("M", ["tensor(int32)"], "lengths")],
        attributes=[OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, "query heads"),
                    OpSchema.Attribute("kv_num_heads", OpSchema.AttrType.INT, "key/value heads"),
                    OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, "softmax scale")]))


_register_schema()


@torch.library.custom_op("llmserve::in_place_gqa", mutates_args=())
def in_place_gqa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, past_key: torch.Tensor,
                 past_value: torch.Tensor, seqlens_k: torch.Tensor, total_sequence_length: torch.Tensor,
                 num_heads: int, kv_num_heads: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """query [B, T, H*D], key/value [B, T, Hkv*D]; past [B, Hkv, capacity, D] holds row b's first
    seqlens_k[b] + 1 - T positions. Returns (attention [B, T, H*D], present_key, present_value):
    present is past with the new K/V at those rows' next positions. A reference in torch (ONNX
    Runtime's kernel does the same in place); total_sequence_length is only the kernel's."""
    B, T, _ = query.shape
    D = past_key.shape[-1]
    present_key, present_value = past_key.clone(), past_value.clone()
    out = torch.empty_like(query)
    for b in range(B):
        start = int(seqlens_k[b]) + 1 - T
        present_key[b, :, start:start + T] = key[b].view(T, kv_num_heads, D).transpose(0, 1)
        present_value[b, :, start:start + T] = value[b].view(T, kv_num_heads, D).transpose(0, 1)
        repeat = num_heads // kv_num_heads
        keys = present_key[b, :, :start + T].repeat_interleave(repeat, 0)
        values = present_value[b, :, :start + T].repeat_interleave(repeat, 0)
        causal = torch.arange(start + T).unsqueeze(0) <= (torch.arange(T) + start).unsqueeze(1)
        attended = F.scaled_dot_product_attention(query[b].view(T, num_heads, D).transpose(0, 1), keys, values,
                                                  attn_mask=causal, scale=scale)
        out[b] = attended.transpose(0, 1).reshape(T, num_heads * D)
    return out, present_key, present_value


@in_place_gqa.register_fake
def _(query, key, value, past_key, past_value, seqlens_k, total_sequence_length, num_heads, kv_num_heads, scale):
    return torch.empty_like(query), torch.empty_like(past_key), torch.empty_like(past_value)


def in_place_gqa_onnx(query, key, value, past_key, past_value, seqlens_k, total_sequence_length,
                      num_heads: int, kv_num_heads: int, scale: float):
    """The ONNX node for `in_place_gqa` (the exporter's `custom_translation_table`)."""
    from onnxscript.values import Opset

    return Opset(DOMAIN, 1).GroupQueryAttention(query, key, value, past_key, past_value, seqlens_k,
                                                total_sequence_length, num_heads=num_heads,
                                                kv_num_heads=kv_num_heads, scale=scale)


TRANSLATIONS = {torch.ops.llmserve.in_place_gqa.default: in_place_gqa_onnx}
