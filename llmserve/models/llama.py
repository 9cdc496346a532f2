"""Llama-family decoder (Llama, Mistral, Qwen2): RMSNorm, RoPE, grouped-query attention, SwiGLU.

The q/k/v projections and the gate/up projections are fused into one matmul each at load
time: fewer, larger GEMMs make the decode step cheaper.

Sliding-window attention (Mistral, Qwen2 with `use_sliding_window`) is not implemented as a
mask; instead `max_positions` is capped to the window. Within the window, full causal
attention and sliding-window attention are identical, so results are exact, and a sequence
can never grow past the point where they would differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from llmserve.models.attention import Attention, SlotKVCache
from llmserve.models.base import ArchConfig, DecoderLM, make_lm_head
from llmserve.models.hf_config import rope_settings
from llmserve.models.layers import RMSNorm, RotaryEmbedding, get_activation, rope_linear_factor
from llmserve.models.weights import assign_parameters, strip_prefix


def _sliding_window(config: dict[str, Any]) -> int | None:
    window = config.get("sliding_window")
    if window is None:
        return None
    if "layer_types" in config:  # transformers 5.x lists each layer's attention kind
        return window if "sliding_attention" in config["layer_types"] else None
    if config["model_type"] == "qwen2":
        uses_window = config.get("use_sliding_window", False) and (
            config.get("max_window_layers", 0) < config["num_hidden_layers"])
        return window if uses_window else None
    return window


@dataclass(slots=True, frozen=True)
class LlamaArchConfig(ArchConfig):
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_linear_factor: float
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    hidden_act: str

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> LlamaArchConfig:
        num_heads = config["num_attention_heads"]
        max_positions = config["max_position_embeddings"]
        window = _sliding_window(config)
        if window is not None:
            max_positions = min(max_positions, window)
        rope_theta, rope_scaling = rope_settings(config)
        is_qwen2 = config["model_type"] == "qwen2"
        # Llama's attention_bias covers q/k/v and o; Qwen2 always has q/k/v bias and never o bias.
        attention_bias = bool(config.get("attention_bias", False))
        return cls(
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=config.get("num_key_value_heads") or num_heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // num_heads,
            max_positions=max_positions,
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_linear_factor=rope_linear_factor(rope_scaling),
            qkv_bias=is_qwen2 or attention_bias,
            o_bias=attention_bias and not is_qwen2,
            mlp_bias=bool(config.get("mlp_bias", False)),
            hidden_act=config.get("hidden_act", "silu"),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        )


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaArchConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, q_size + 2 * kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(q_size, cfg.hidden_size, bias=cfg.o_bias)
        self.scale = cfg.head_dim**-0.5

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, batch: Attention) -> torch.Tensor:
        B, T, _ = x.shape
        heads, kv_heads, D = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x)
        # q and k are rotated together: one set of elementwise ops instead of two.
        qk_size = (heads + kv_heads) * D
        qk = RotaryEmbedding.apply(qkv[..., :qk_size].view(B, T, heads + kv_heads, D), cos, sin)
        q, k = qk.split([heads, kv_heads], dim=2)
        v = qkv[..., qk_size:].view(B, T, kv_heads, D)
        return self.o_proj(batch.attend(q, k, v, k_cache, v_cache, self.scale))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: LlamaArchConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.act = get_activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaArchConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, batch: Attention) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, k_cache, v_cache, batch)
        return x + self.mlp(self.post_attention_layernorm(x))


def _fuse(tensors: dict[str, torch.Tensor], fused: str, parts: list[str]) -> None:
    """Concatenate the checkpoint's separate projections into our fused one (rows = outputs)."""
    if all(p in tensors for p in parts):
        tensors[fused] = torch.cat([tensors.pop(p) for p in parts])


class LlamaForCausalLM(DecoderLM):
    def __init__(self, cfg: LlamaArchConfig) -> None:
        super().__init__()
        self._take_sizes(cfg)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = make_lm_head(cfg.hidden_size, cfg.vocab_size, cfg.tie_word_embeddings)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_linear_factor)

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> LlamaForCausalLM:
        return cls(LlamaArchConfig.from_hf(config))

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        tensors = strip_prefix(tensors, "model.")
        for i in range(self.num_layers):
            attn, mlp = f"layers.{i}.self_attn.", f"layers.{i}.mlp."
            for kind in ("weight", "bias"):
                _fuse(tensors, f"{attn}qkv_proj.{kind}", [f"{attn}{p}_proj.{kind}" for p in "qkv"])
                _fuse(tensors, f"{mlp}gate_up_proj.{kind}", [f"{mlp}{p}_proj.{kind}" for p in ("gate", "up")])
        assign_parameters(self, tensors, ["rotary_emb.inv_freq", *self.unused_checkpoint_keys()])

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv: SlotKVCache,
                batch: Attention) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary.cos_sin(positions, x.dtype)
        for layer, k_cache, v_cache in zip(self.layers, kv.k, kv.v):
            x = layer(x, cos, sin, k_cache, v_cache, batch)
        return self.norm(x)

    def input_embedding(self) -> nn.Embedding:
        return self.embed_tokens
