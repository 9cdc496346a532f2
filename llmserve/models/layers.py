"""Building blocks shared by the model definitions: norms, activations, rotary embeddings."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Llama-style RMSNorm; normalises in float32 and scales in the input dtype, as HF does."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "relu": F.relu,
    # HF "gelu_new" / "gelu_pytorch_tanh" / "gelu_fast" are all the tanh approximation.
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
}


def get_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise NotImplementedError(
            f"activation {name!r} is not supported (supported: {sorted(_ACTIVATIONS)})"
        ) from None


class RotaryEmbedding:
    """Rotary position embeddings in the HF "rotate_half" layout.

    `linear_factor` > 1 implements `rope_scaling={"type": "linear"}` (positions divided by it).
    Not an nn.Module: it has no weights, and models are built on the meta device, so the
    frequency table is created lazily on the device of the first positions it sees.
    """

    def __init__(self, head_dim: int, theta: float, linear_factor: float = 1.0) -> None:
        if head_dim % 2:
            raise ValueError(f"rotary head_dim must be even, got {head_dim}")
        self.head_dim = head_dim
        self.theta = theta
        self.linear_factor = linear_factor
        self._inv_freq: torch.Tensor | None = None

    def _inv_freq_on(self, device: torch.device) -> torch.Tensor:
        if self._inv_freq is None or self._inv_freq.device != device:
            exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim
            inv_freq = 1.0 / (self.theta**exponents) / self.linear_factor
            self._inv_freq = inv_freq.to(device)
        return self._inv_freq

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sign-folded sin for `positions` [B, T], shaped [B, T, 1, head_dim].

        The sin table has its first half negated, so `apply` needs one roll instead of
        rotate_half's slice-negate-concatenate.
        """
        freqs = positions.float().unsqueeze(-1) * self._inv_freq_on(positions.device)
        cos, sin = freqs.cos(), freqs.sin()
        cos = torch.cat((cos, cos), dim=-1)
        sin = torch.cat((-sin, sin), dim=-1)
        return cos.to(dtype).unsqueeze(2), sin.to(dtype).unsqueeze(2)

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate x [B, T, heads, head_dim]: x*cos + rotate_half(x)*sin."""
        return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


def rope_linear_factor(rope: dict | None) -> float:
    """The position divisor for a HF rope config dict; only default and linear RoPE are supported."""
    if not rope:
        return 1.0
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    partial = rope.get("partial_rotary_factor", 1.0)
    if not math.isclose(partial, 1.0):
        raise NotImplementedError(f"partial_rotary_factor={partial} is not supported")
    if rope_type == "default":
        return 1.0
    if rope_type == "linear":
        return float(rope["factor"])
    raise NotImplementedError(
        f"rope scaling type {rope_type!r} is not supported (supported: 'default', 'linear')"
    )
