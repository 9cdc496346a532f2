"""The interface every model definition implements for the runner."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llmserve.models.attention import Attention, SlotKVCache


@dataclass(slots=True, frozen=True)
class ArchConfig:
    """The sizes every architecture has, read from its HF config; subclasses add their own."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_positions: int  # longest context the model supports
    tie_word_embeddings: bool


def make_lm_head(hidden_size: int, vocab_size: int, tied: bool) -> nn.Linear | None:
    """The LM head, or None when tied: `compute_logits` then reuses the input embedding."""
    return None if tied else nn.Linear(hidden_size, vocab_size, bias=False)


class DecoderLM(nn.Module):
    """A decoder-only LM that reads and writes a `SlotKVCache`.

    Subclasses set the shape attributes in `__init__` (`_take_sizes`). They are built on the meta device
    and filled by `load_weights`, so `__init__` must not compute anything from parameters.
    """

    vocab_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_positions: int  # longest context the model supports
    lm_head: nn.Linear | None  # None when tied to the input embedding

    def _take_sizes(self, cfg: ArchConfig) -> None:
        """Set `cfg` and the shape attributes from it (first thing in a subclass's `__init__`)."""
        self.cfg = cfg
        self.vocab_size, self.num_layers = cfg.vocab_size, cfg.num_layers
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.max_positions = cfg.max_positions

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> DecoderLM:
        raise NotImplementedError

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        """Fill the parameters from a HF checkpoint's tensors (checkpoint names)."""
        raise NotImplementedError

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv: SlotKVCache,
                batch: Attention) -> torch.Tensor:
        """Hidden states after the final norm, [B, T, hidden], for input_ids/positions [B, T].

        Appends each token's K/V to the cache as laid out by `batch`.
        """
        raise NotImplementedError

    def input_embedding(self) -> nn.Embedding:
        raise NotImplementedError

    def unused_checkpoint_keys(self) -> list[str]:
        """Checkpoint keys to skip: a tied model's checkpoint may still carry lm_head.weight."""
        return ["lm_head.weight"] if self.lm_head is None else []

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM-head logits for hidden states [..., hidden] (in the model dtype)."""
        head = self.input_embedding() if self.lm_head is None else self.lm_head
        return F.linear(hidden, head.weight)
