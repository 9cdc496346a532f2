"""GPT-2: learned position embeddings, pre-LayerNorm blocks, fused qkv, gelu_new MLP, tied LM head.

HF stores GPT-2's projections as Conv1D weights shaped [in, out]; they are transposed once at
load time so every projection is a plain nn.Linear.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from llmserve.models.attention import Attention, SlotKVCache
from llmserve.models.base import ArchConfig, DecoderLM, make_lm_head
from llmserve.models.layers import get_activation
from llmserve.models.weights import assign_parameters, strip_prefix

_CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


@dataclass(slots=True, frozen=True)
class GPT2ArchConfig(ArchConfig):
    inner_size: int
    layer_norm_eps: float
    activation: str
    scale_attn_weights: bool
    scale_attn_by_inverse_layer_idx: bool

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> GPT2ArchConfig:
        hidden, heads = config["n_embd"], config["n_head"]
        return cls(
            vocab_size=config["vocab_size"],
            hidden_size=hidden,
            inner_size=config.get("n_inner") or 4 * hidden,
            num_layers=config["n_layer"],
            num_heads=heads,
            num_kv_heads=heads,  # multi-head attention
            head_dim=hidden // heads,
            max_positions=config["n_positions"],
            layer_norm_eps=config.get("layer_norm_epsilon", 1e-5),
            activation=config.get("activation_function", "gelu_new"),
            scale_attn_weights=config.get("scale_attn_weights", True),
            scale_attn_by_inverse_layer_idx=config.get("scale_attn_by_inverse_layer_idx", False),
            tie_word_embeddings=config.get("tie_word_embeddings", True),
        )


class GPT2Attention(nn.Module):
    def __init__(self, cfg: GPT2ArchConfig, layer_idx: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.c_attn = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.c_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        scale = self.head_dim**-0.5 if cfg.scale_attn_weights else 1.0
        if cfg.scale_attn_by_inverse_layer_idx:
            scale /= layer_idx + 1
        self.scale = scale

    def forward(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                batch: Attention) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).view(B, T, 3, self.num_heads, self.head_dim).unbind(2)
        return self.c_proj(batch.attend(q, k, v, k_cache, v_cache, self.scale))


class GPT2MLP(nn.Module):
    def __init__(self, cfg: GPT2ArchConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.hidden_size, cfg.inner_size)
        self.c_proj = nn.Linear(cfg.inner_size, cfg.hidden_size)
        self.act = get_activation(cfg.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, cfg: GPT2ArchConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = GPT2Attention(cfg, layer_idx)
        self.ln_2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = GPT2MLP(cfg)

    def forward(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                batch: Attention) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), k_cache, v_cache, batch)
        return x + self.mlp(self.ln_2(x))


class GPT2LMHeadModel(DecoderLM):
    def __init__(self, cfg: GPT2ArchConfig) -> None:
        super().__init__()
        self._take_sizes(cfg)
        self.wte = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.wpe = nn.Embedding(cfg.max_positions, cfg.hidden_size)
        self.h = nn.ModuleList(GPT2Block(cfg, i) for i in range(cfg.num_layers))
        self.ln_f = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.lm_head = make_lm_head(cfg.hidden_size, cfg.vocab_size, cfg.tie_word_embeddings)

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> GPT2LMHeadModel:
        return cls(GPT2ArchConfig.from_hf(config))

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        tensors = {
            name: t.t() if name.endswith(_CONV1D_WEIGHTS) and t.dim() == 2 else t
            for name, t in strip_prefix(tensors, "transformer.").items()
        }
        # Old checkpoints carry the causal-mask buffers `attn.bias` / `attn.masked_bias`.
        assign_parameters(self, tensors, [".attn.bias", ".attn.masked_bias", *self.unused_checkpoint_keys()])

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv: SlotKVCache,
                batch: Attention) -> torch.Tensor:
        x = self.wte(input_ids) + self.wpe(positions)
        for block, k_cache, v_cache in zip(self.h, kv.k, kv.v):
            x = block(x, k_cache, v_cache, batch)
        return self.ln_f(x)

    def input_embedding(self) -> nn.Embedding:
        return self.wte
