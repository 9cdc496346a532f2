"""Engine and per-request sampling configuration, validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from llmserve.errors import InvalidRequestError

RUNTIMES = ("torch", "onnxruntime", "tensorrt")
DTYPES = ("float32", "float16", "bfloat16")
# The defaults of every place that sizes an engine (the Triton model's settings, the bench, tests):
# config.pbtxt leaves them empty. On CPU the ONNX Runtime runner is the fastest (docs/runtimes.md).
DEFAULT_RUNTIME = "onnxruntime"
DEFAULT_MAX_NUM_SEQS = 64
# Alternatives reported per generated token at most (OpenAI's own cap for top_logprobs).
MAX_TOP_LOGPROBS = 20
INT32_MIN, INT32_MAX = -2**31, 2**31 - 1


@dataclass(slots=True, frozen=True)
class EngineConfig:
    """How the engine is sized. `max_model_len=None` takes the model's own context."""

    model_dir: str
    runtime: str = DEFAULT_RUNTIME
    # The compiled model's folder (onnxruntime, tensorrt; relative = from the repository root);
    # None = build/compiled/<onnx|tensorrt>/<model folder name>, where `make engine` builds it.
    compiled_dir: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS
    max_model_len: int | None = None
    # Prompt tokens prefilled per step: bounds how long one step can stall decodes.
    max_num_batched_tokens: int = 2048
    # Requests allowed to wait for a slot before new ones are refused as overload.
    max_queued_requests: int = 256
    # torch intra-op threads (ONNX Runtime's pool); None = torch's default. A server shares the cores
    # with tritonserver, the other models and often the clients: it sets half of them.
    num_threads: int | None = None
    prefill_num_threads: int | None = None  # None = num_threads
    # A prompt starts from the K/V of an earlier prompt sharing its beginning (llmserve/engine/prefix_cache.py).
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {RUNTIMES}, got {self.runtime!r}")
        if self.compiled_dir is not None and not self.compiled_dir.strip():
            raise ValueError("compiled_dir must be a folder path or None, got an empty string")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_queued_requests"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("num_threads", "prefill_num_threads"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_model_len is not None and self.max_model_len <= 1:
            raise ValueError(f"max_model_len must be > 1, got {self.max_model_len}")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise InvalidRequestError(message)


@dataclass(slots=True)
class SamplingParams:
    """Per-request generation parameters (TensorRT-LLM backend names in comments)."""

    max_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # 1 = no nucleus filter
    top_k: int = 0  # 0 = no top-k filter
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_tokens: int = 0  # EOS and stop strings are ignored before this many tokens
    seed: int | None = None
    end_id: int | None = None  # None = the model's EOS ids
    stop: tuple[str, ...] = field(default_factory=tuple)  # stop_words, matched on text
    bad_words: tuple[str, ...] = field(default_factory=tuple)
    logprobs: bool = False  # return_log_probs: each generated token's log probability
    top_logprobs: int = 0  # num_top_log_probs: that many most likely tokens per position (implies logprobs)
    # Not a sampling field: the scheduler's, carried with the request's parameters. Lower is served
    # first (the waiting queue's order; a running sequence of a higher number may be preempted for it).
    priority: int = 0

    def __post_init__(self) -> None:
        _require(isinstance(self.max_tokens, int) and self.max_tokens > 0,
                 f"max_tokens must be a positive integer, got {self.max_tokens}")
        _require(math.isfinite(self.temperature) and self.temperature >= 0,
                 f"temperature must be >= 0, got {self.temperature}")
        _require(math.isfinite(self.top_p) and 0 < self.top_p <= 1,
                 f"top_p must be in (0, 1], got {self.top_p}")
        _require(self.top_k >= 0, f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        _require(math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0,
                 f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _require(math.isfinite(value) and -2 <= value <= 2,
                     f"{name} must be in [-2, 2], got {value}")
        _require(self.min_tokens >= 0, f"min_tokens must be >= 0, got {self.min_tokens}")
        _require(self.min_tokens <= self.max_tokens,
                 f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        _require(self.seed is None or 0 <= self.seed < 2**64, f"seed must be a uint64, got {self.seed}")
        _require(self.end_id is None or self.end_id >= 0, f"end_id must be >= 0, got {self.end_id}")
        _require(0 <= self.top_logprobs <= MAX_TOP_LOGPROBS,
                 f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}")
        _require(isinstance(self.priority, int) and not isinstance(self.priority, bool)
                 and INT32_MIN <= self.priority <= INT32_MAX,
                 f"priority must be an integer in [{INT32_MIN}, {INT32_MAX}] (INT32, lower is served first), "
                 f"got {self.priority!r}")
        self.logprobs = bool(self.logprobs or self.top_logprobs)
        self.stop = tuple(s for s in self.stop if s)
        self.bad_words = tuple(s for s in self.bad_words if s)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)
