"""The forward step shared by the runners of the decoder graph (llmserve/export/graph.py): ONNX
Runtime's and TensorRT's. A subclass sets up the store, arenas and sizes, and runs the graph
(`_run`); this class decides what the graph gets as past and where present goes:

- The decode batch stays live between steps: when a decode call continues exactly the previous
  decode call (same slots, each one token further), the previous call's present buffers are bound
  as this call's past; nothing is copied outside the graph.
- Otherwise the call's past is packed, left padded, from the per-slot store. A decode call then
  becomes the live batch; a prefill call (several tokens) writes its new K/V to the store and
  leaves the live batch alone: the engine prefills new sequences before each decode pass.
- The live batch's K/V reaches the store lazily: only when a call changes the batch or touches
  one of its slots (`_retire_live`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from llmserve.model_runner import validate_batch, validate_token_ids
from llmserve.runners.kv_store import Arena, SlotStore


@dataclass(slots=True)
class LiveDecode:
    """The decode batch whose K/V lives in an arena between steps."""

    slots: list[int]
    lengths: list[int]  # tokens each row holds: the next call's start positions
    pads: np.ndarray  # [B] int64: position p of row b sits at column p + pads[b]
    stored: list[int]  # positions [0, stored[b]) of row b are also in the store
    width: int  # columns of the present tensors
    arena: int  # index of the arena holding them


class PastPresentRunner:
    """TorchModelRunner's forward contract over a past/present graph. Subclasses set device,
    vocab_size, max_model_len, num_slots, store (SlotStore), _arenas (4 Arenas), _kv_shape
    (heads, head_dim), _live = None and calls = Counter(), and implement `_run`."""

    # Columns of past every call gets at least (masked zero columns when the rows have less):
    # TensorRT's profiles take no zero-size dimension.
    min_past = 0
    packs_prefill = False  # prompts are left padded: the engine groups them by length
    device: torch.device
    # The largest prefill call one run of the graph takes (TensorRT's prefill profile); larger
    # calls run in parts: row sub-batches, then token chunks (chunked prefill). None = no limit.
    max_prefill_rows: int | None = None
    max_prefill_tokens: int | None = None
    vocab_size: int
    max_model_len: int
    num_slots: int
    store: SlotStore
    _arenas: list[Arena]  # 0 and 1: the live decode batch's past/present, alternating; 2 and 3: other calls
    _kv_shape: tuple[int, int]
    _live: LiveDecode | None
    calls: Counter[str]  # "continued", "packed", "retired": how the calls went (tests, profiling)

    @torch.inference_mode()
    def forward(self, slots: Sequence[int], token_ids: Sequence[Sequence[int]],
                start_positions: Sequence[int]) -> torch.Tensor:
        """See TorchModelRunner.forward: same contract, same errors."""
        validate_batch(slots, token_ids, start_positions, num_slots=self.num_slots, max_model_len=self.max_model_len)
        slots, starts = list(slots), list(start_positions)
        lens = [len(tokens) for tokens in token_ids]
        T = max(lens)
        if T > 1 and (len(slots) > (self.max_prefill_rows or len(slots)) or T > (self.max_prefill_tokens or T)):
            return self._forward_in_parts(slots, token_ids, starts, lens)
        ids = torch.tensor([[*[0] * (T - len(t)), *t] for t in token_ids] if min(lens) != T else token_ids)
        validate_token_ids(ids, self.vocab_size)
        live = self._live
        if T == 1 and live is not None and live.slots == slots and live.lengths == starts:
            self.calls["continued"] += 1
            return self._continue_live(live, ids)
        if live is not None and (T == 1 or not set(live.slots).isdisjoint(slots)):
            self.calls["retired"] += 1
            self._retire_live()
        self.calls["packed"] += 1
        return self._run_packed(slots, ids, starts, lens)

    def _forward_in_parts(self, slots: list[int], token_ids: Sequence[Sequence[int]], starts: list[int],
                          lens: list[int]) -> torch.Tensor:
        logits = torch.empty(len(slots), self.vocab_size, device=self.device)
        rows_per_part = self.max_prefill_rows or len(slots)
        chunk = self.max_prefill_tokens or max(lens)
        for first in range(0, len(slots), rows_per_part):
            rows = range(first, min(first + rows_per_part, len(slots)))
            for offset in range(0, max(lens[b] for b in rows), chunk):
                part = [b for b in rows if lens[b] > offset]
                out = self.forward([slots[b] for b in part], [token_ids[b][offset:offset + chunk] for b in part],
                                   [starts[b] + offset for b in part])
                logits[torch.tensor(part, device=self.device)] = out  # a row's last chunk gives its logits
        return logits

    def _continue_live(self, live: LiveDecode, ids: torch.Tensor) -> torch.Tensor:
        B, W = len(live.slots), live.width
        past = self._arenas[live.arena].views((B, *self._kv_head_shape(W)))
        present = self._arenas[1 - live.arena].views((B, *self._kv_head_shape(W + 1)))
        mask = (np.arange(W + 1) >= live.pads[:, None]).astype(np.int64)
        positions = torch.tensor(live.lengths).unsqueeze(1)
        logits = self._run(ids, positions, torch.from_numpy(mask), past, present)
        live.lengths = [n + 1 for n in live.lengths]
        live.width, live.arena = W + 1, 1 - live.arena
        return logits

    def _run_packed(self, slots: list[int], ids: torch.Tensor, starts: list[int], lens: list[int]) -> torch.Tensor:
        B, T = ids.shape
        P = max(*starts, self.min_past)
        decode = T == 1  # becomes the live batch
        first = 0 if decode else 2
        past = self._arenas[first].views((B, *self._kv_head_shape(P)))
        present = self._arenas[first + 1].views((B, *self._kv_head_shape(P + T)))
        self.store.gather(past, slots, starts)
        # Left padding: row b's past ends at column P, its new tokens end at column P + T.
        mask = torch.zeros(B, P + T, dtype=torch.int64)
        positions = torch.zeros(B, T, dtype=torch.int64)
        for b, (start, n) in enumerate(zip(starts, lens)):
            mask[b, P - start:P] = 1
            mask[b, P + T - n:] = 1
            positions[b, T - n:] = torch.arange(start, start + n)
        logits = self._run(ids, positions, mask, past, present)
        if decode:
            pads = np.array([P - s for s in starts], dtype=np.int64)
            self._live = LiveDecode(slots, [s + 1 for s in starts], pads, list(starts), P + 1, first + 1)
        else:
            self.store.scatter(present, slots, starts, lens, [P + T - n for n in lens])
        return logits

    def _retire_live(self) -> None:
        """Write the live batch's K/V the store lacks, then forget the live batch."""
        live, self._live = self._live, None
        B = len(live.slots)
        present = self._arenas[live.arena].views((B, *self._kv_head_shape(live.width)))
        counts = [n - s for n, s in zip(live.lengths, live.stored)]
        columns = [s + int(pad) for s, pad in zip(live.stored, live.pads)]
        self.store.scatter(present, live.slots, live.stored, counts, columns)

    def _kv_head_shape(self, width: int) -> tuple[int, int, int]:
        heads, head_dim = self._kv_shape
        return heads, width, head_dim

    def _run(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, past: list[torch.Tensor],
             present: list[torch.Tensor]) -> torch.Tensor:
        """Run the graph: ids, positions [B, T] and mask [B, P + T] int64 on the CPU; past [B, Hkv, P, D]
        and present [B, Hkv, P + T, D] in the runner's arenas. Returns float32 logits [B, vocab]."""
        raise NotImplementedError
