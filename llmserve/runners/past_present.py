"""The forward step shared by the runners of the decoder graph (llmserve/export/graph.py): ONNX
Runtime's and TensorRT's. A subclass sets up the store, arenas and sizes, and runs the graph
(`_run`); this class decides what the graph gets as past and where present goes:

- The decode batch stays live between steps: each decode call binds the previous call's present
  buffers as its past; nothing is copied outside the graph.
- Sequences join and leave the live batch in place (in-flight batching): a leaving sequence's
  row becomes a hole, run masked, and a joining sequence takes a hole (or a new row), its K/V
  copied from the store right-aligned into the batch's current width. Only when the batch has
  too many holes, or too many padding columns, or a joining prompt is wider than the batch, is
  it repacked from the store.
- Other calls (prefill) are packed, left padded, from the per-slot store and write their new
  K/V back to it; they leave the live batch alone, except for the rows of the slots they touch.
- The live batch's K/V reaches the store lazily: only for a row that leaves, a slot another call
  touches, or a repack (`_store_rows`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from llmserve.runners.base import validate_batch, validate_token_ids
from llmserve.runners.in_place_decode import InPlaceDecode
from llmserve.runners.kv_store import Arena, SlotStore

# When a decode batch is repacked instead of changed in place: more holes than this (beyond a
# quarter of its sequences), or more all-padding columns than this (beyond a quarter of the longest
# sequence). Holes cost a row of compute each and padding columns a share of attention and of the
# graph's past->present copy; a repack copies every row's K/V out to the store and back.
LIVE_SLACK_ROWS = 4
LIVE_SLACK_COLUMNS = 16


@dataclass(slots=True)
class LiveDecode:
    """The decode batch whose K/V lives in an arena between steps. A hole (slot None) is the row of
    a sequence that left: it runs on, masked (token 0 attending to its own columns only), until a
    joining sequence takes it."""

    rows: list[int | None]  # each row's slot; None = a hole
    lengths: list[int]  # tokens each row holds: the next call's start positions (holes count their own)
    pads: np.ndarray  # [B] int64: position p of row b sits at column p + pads[b]
    stored: list[int]  # positions [0, stored[b]) of row b are also in the store
    width: int  # columns of the present tensors
    arena: int  # index of the arena holding them

    def row_of(self) -> dict[int, int]:
        """slot -> row of the sequences in the batch (holes left out)."""
        return {slot: row for row, slot in enumerate(self.rows) if slot is not None}


@dataclass(slots=True, frozen=True)
class _LivePlan:
    """How a decode call maps onto the live batch."""

    rows: list[int]  # the row of each requested slot, in call order (joins included)
    leaving: list[int]  # rows whose sequence is not in the call: they become holes
    joining: list[tuple[int, int, int]]  # (row, slot, start) of the sequences not in the batch yet
    num_rows: int


class PastPresentRunner:
    """The `Runner` contract (llmserve/runners/base.py) over a past/present graph. Subclasses set
    device, vocab_size, max_model_len and num_slots, then call `_init_kv`, and implement `_run`."""

    # Columns of past every call gets at least (masked zero columns when the rows have less):
    # TensorRT's profiles take no zero-size dimension.
    min_past = 0
    # Whether ragged prompts from empty caches go in one unpadded pass (`_run_packed_prefill`);
    # otherwise they are left padded and the engine groups them by length.
    packs_prefill = False
    device: torch.device
    # The largest prefill call one run of the graph takes (TensorRT's prefill profile); larger
    # calls run in parts: row sub-batches, then token chunks (chunked prefill). None = no limit.
    max_prefill_rows: int | None = None
    max_prefill_tokens: int | None = None
    vocab_size: int
    max_model_len: int
    num_slots: int
    store: SlotStore
    kv_cache_bytes: int
    _arenas: list[Arena]  # 0 and 1: the live decode batch's past/present, alternating; 2 and 3: other calls
    _kv_shape: tuple[int, int]
    _live: LiveDecode | None
    # The decode batch of a graph that writes K/V in place (`_init_in_place`), when the runner has one:
    # then every decode goes through it and `_live` stays None.
    _in_place: InPlaceDecode | None = None
    # How the calls went (tests, profiling): "continued" (live steps), "in_place" (in-place decode steps),
    # "compacted" (in-place batches compacted), "joined" and "left" (sequences
    # that joined or left the live batch in place), "repacked" (live batches rebuilt), "packed",
    # "packed_prefill" (unpadded prompt passes).
    calls: Counter[str]

    @torch.inference_mode()
    def forward(self, slots: Sequence[int], token_ids: Sequence[Sequence[int]],
                start_positions: Sequence[int]) -> torch.Tensor:
        """See `Runner.forward`: same contract, same errors."""
        validate_batch(slots, token_ids, start_positions, num_slots=self.num_slots, max_model_len=self.max_model_len)
        slots, starts = list(slots), list(start_positions)
        lens = [len(tokens) for tokens in token_ids]
        T = max(lens)
        if T > 1 and (len(slots) > (self.max_prefill_rows or len(slots)) or T > (self.max_prefill_tokens or T)):
            return self._forward_in_parts(slots, token_ids, starts, lens)
        if self.packs_prefill and min(lens) != T and not any(starts):
            self._leave_live(slots, starts)
            self.calls["packed_prefill"] += 1
            return self._run_packed_prefill(slots, token_ids, lens)
        ids = torch.tensor([[*[0] * (T - len(t)), *t] for t in token_ids] if min(lens) != T else token_ids)
        validate_token_ids(ids, self.vocab_size)
        if self._in_place is not None:
            if T == 1 and any(starts):
                return self._in_place.step(slots, ids, starts)
            self._in_place.leave(slots, starts)
            self.calls["packed"] += 1
            return self._run_packed(slots, ids, starts, lens, decode=False)
        live = self._live
        decode = T == 1 and (live is None or any(starts))  # one-token prompts (all at 0) are a prefill
        if decode and live is not None:
            plan = self._plan_live(live, slots, starts)
            if plan is not None:
                self.calls["continued"] += 1
                return self._step_live(live, plan, ids)
            self.calls["repacked"] += 1
            self._store_rows(live, list(live.row_of().values()))
            self._live = None
        else:
            self._leave_live(slots, starts)
        self.calls["packed"] += 1
        return self._run_packed(slots, ids, starts, lens, decode)

    def release(self, slot: int) -> None:
        """The slot's K/V is no longer needed (its sequence finished): a live row holding it becomes
        a hole without being written to the store."""
        if self._in_place is not None:
            self._in_place.release(slot)
        live = self._live
        if live is not None and slot in live.rows:
            self._vacate(live, [live.rows.index(slot)], [False])

    def copy_prefix(self, source: int, destination: int, length: int) -> None:
        """See `Runner.copy_prefix`. A prompt's K/V reaches the store with its prefill pass,
        or with the copy it started from, so the store holds any prefix the engine asks for; the
        destination, a slot just given out, has no live row."""
        for tensor in self.store.tensors:
            tensor[destination, :, :length] = tensor[source, :, :length]

    def _init_kv(self, num_tensors: int, kv_shape: tuple[int, int], device: str | torch.device = "cpu") -> None:
        """The K/V memory for `num_tensors` graph K/V inputs of (heads, head_dim) `kv_shape`: the
        per-slot store (sized by num_slots and max_model_len), the arenas; no live batch yet."""
        self._kv_shape = kv_shape
        self.store = SlotStore(num_tensors=num_tensors, num_slots=self.num_slots, num_kv_heads=kv_shape[0],
                               max_len=self.max_model_len, head_dim=kv_shape[1], device=device)
        self.kv_cache_bytes = self.store.nbytes
        self._arenas = [Arena(num_tensors, device=device) for _ in range(4)]
        self._live = None
        self.calls = Counter()

    def _init_in_place(self, capacity: int, device: str | torch.device = "cpu") -> None:
        """Decode through the in-place graph (`_run_in_place`) from now on; after `_init_kv`."""
        self._in_place = InPlaceDecode(self.store, self._run_in_place, capacity=capacity, kv_shape=self._kv_shape,
                                       calls=self.calls, device=device)
        self.kv_cache_bytes = self.store.nbytes + self._in_place.nbytes

    def _leave_live(self, slots: list[int], starts: list[int]) -> None:
        """The rows of the slots a call other than a decode touches leave the live batch (their K/V
        stored when the call continues it)."""
        if self._in_place is not None:
            self._in_place.leave(slots, starts)
        live = self._live
        if live is None:
            return
        row_of = live.row_of()
        touched = [(row_of[slot], start > 0) for slot, start in zip(slots, starts) if slot in row_of]
        if touched:
            self._vacate(live, [row for row, _ in touched], [keep for _, keep in touched])

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

    def _plan_live(self, live: LiveDecode, slots: list[int], starts: list[int]) -> _LivePlan | None:
        """Map a decode call onto the live batch, or None when it should be repacked instead."""
        width = live.width
        if width + 1 > self.max_model_len:
            return None
        row_of = live.row_of()
        rows: list[int] = []
        joining: list[int] = []
        for i, (slot, start) in enumerate(zip(slots, starts)):
            row = row_of.pop(slot, None)
            if row is None:
                if start > width:  # its K/V would not fit left of the batch's new column
                    return None
                joining.append(i)
            elif live.lengths[row] != start:
                return None
            rows.append(-1 if row is None else row)
        leaving = sorted(row_of.values())
        free = sorted([row for row, slot in enumerate(live.rows) if slot is None] + leaving)
        num_rows = len(live.rows) + max(0, len(joining) - len(free))
        active, longest = len(slots), max(starts)
        if (num_rows - active > LIVE_SLACK_ROWS + active // 4 or num_rows > self.num_slots
                or width - longest > LIVE_SLACK_COLUMNS + longest // 4):
            return None
        new_rows = iter(free + list(range(len(live.rows), num_rows)))
        joins = []
        for i in joining:
            rows[i] = next(new_rows)
            joins.append((rows[i], slots[i], starts[i]))
        return _LivePlan(rows, leaving, joins, num_rows)

    def _step_live(self, live: LiveDecode, plan: _LivePlan, ids: torch.Tensor) -> torch.Tensor:
        W = live.width
        if plan.leaving:
            self._vacate(live, plan.leaving, [True] * len(plan.leaving))
        B = plan.num_rows
        if B > len(live.rows):  # new rows go after the others: the rows held keep their place
            added = B - len(live.rows)
            live.rows += [None] * added
            live.lengths += [0] * added
            live.stored += [0] * added
            live.pads = np.concatenate([live.pads, np.full(added, W, dtype=np.int64)])
        past = self._arenas[live.arena].views((B, *self._kv_head_shape(W)), keep=True)
        if plan.joining:
            self.calls["joined"] += len(plan.joining)
            rows, slots, starts = map(list, zip(*plan.joining))
            self.store.gather(past, slots, starts, rows=rows)
            for row, slot, start in plan.joining:
                live.rows[row], live.lengths[row], live.stored[row], live.pads[row] = slot, start, start, W - start
        present = self._arenas[1 - live.arena].views((B, *self._kv_head_shape(W + 1)))
        in_order = plan.rows == list(range(B))
        if not in_order:  # holes get token 0; rows in call order are picked out of the logits below
            tokens = torch.zeros(B, 1, dtype=torch.int64)
            tokens[plan.rows] = ids
            ids = tokens
        mask = (np.arange(W + 1) >= live.pads[:, None]).astype(np.int64)
        positions = torch.tensor(live.lengths).unsqueeze(1)
        logits = self._run(ids, positions, torch.from_numpy(mask), past, present)
        live.lengths = [n + 1 for n in live.lengths]
        live.width, live.arena = W + 1, 1 - live.arena
        return logits if in_order else logits[torch.tensor(plan.rows, device=logits.device)]

    def _run_packed(self, slots: list[int], ids: torch.Tensor, starts: list[int], lens: list[int],
                    decode: bool) -> torch.Tensor:
        """A call packed from the store; a decode call becomes the live batch, another call writes its
        new K/V to the store."""
        B, T = ids.shape
        P = max(*starts, self.min_past)
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
            self._live = LiveDecode(list(slots), [s + 1 for s in starts], pads, list(starts), P + 1, first + 1)
        else:
            self.store.scatter(present, slots, starts, lens, [P + T - n for n in lens])
        return logits

    def _store_rows(self, live: LiveDecode, rows: list[int]) -> None:
        """Write the K/V these live rows hold and the store lacks."""
        if not rows:
            return
        present = self._arenas[live.arena].views((len(live.rows), *self._kv_head_shape(live.width)))
        stored = [live.stored[row] for row in rows]
        counts = [live.lengths[row] - n for row, n in zip(rows, stored)]
        columns = [n + int(live.pads[row]) for row, n in zip(rows, stored)]
        self.store.scatter(present, [live.rows[row] for row in rows], stored, counts, columns, rows=rows)
        for row in rows:
            live.stored[row] = live.lengths[row]

    def _vacate(self, live: LiveDecode, rows: list[int], keep: list[bool]) -> None:
        """These rows' sequences leave the live batch (their K/V stored where `keep`): they become
        holes, whose next token sits at the batch's next column."""
        self.calls["left"] += len(rows)
        self._store_rows(live, [row for row, k in zip(rows, keep) if k])
        for row in rows:
            live.rows[row], live.lengths[row], live.stored[row], live.pads[row] = None, 0, 0, live.width

    def _kv_head_shape(self, width: int) -> tuple[int, int, int]:
        heads, head_dim = self._kv_shape
        return heads, width, head_dim

    def _run_packed_prefill(self, slots: list[int], token_ids: Sequence[Sequence[int]],
                            lens: list[int]) -> torch.Tensor:
        """Ragged prompts from empty caches in one unpadded pass, their K/V written to the store
        (runners whose `packs_prefill` is set). Returns float32 logits [B, vocab]."""
        raise NotImplementedError

    def _run_in_place(self, ids: torch.Tensor, positions: torch.Tensor, seqlens_k: torch.Tensor,
                      total_sequence_length: torch.Tensor, kv: list[torch.Tensor]) -> torch.Tensor:
        """Run the in-place decode graph (runners that call `_init_in_place`): see `RunInPlace`."""
        raise NotImplementedError

    def _run(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, past: list[torch.Tensor],
             present: list[torch.Tensor]) -> torch.Tensor:
        """Run the graph: ids, positions [B, T] and mask [B, P + T] int64 on the CPU; past [B, Hkv, P, D]
        and present [B, Hkv, P + T, D] in the runner's arenas. Returns float32 logits [B, vocab]."""
        raise NotImplementedError
