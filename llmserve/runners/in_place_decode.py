"""The decode batch of a graph that writes K/V in place (the in-place decode graph of
llmserve/export/graph.py, `decode.onnx`): ONNX Runtime's runner decodes through it when the
compiled model has one.

Each row of the batch owns `capacity` positions of every K/V tensor, both the graph's past and its
present: a step writes one new position per row and copies nothing else, whatever the contexts'
lengths (the past/present graph copies the whole batch each step). Rows are right padded: a row's
positions [0, length) are real, so rows of different lengths need no common width.

- A sequence joins by taking a hole (or a new row), its K/V copied in from the store once.
- A sequence that leaves (finished: `release`; touched by another call: `leave`) makes a hole;
  its K/V goes to the store only when it may come back (`leave` with a start > 0).
- A hole runs on as token 0 at position 0 (it attends itself only) until a sequence takes it;
  when holes outnumber the slack, live rows from the end move into them (`_compact`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

import torch

from llmserve.runners.kv_store import Arena, SlotStore

# Holes kept before the batch is compacted: more than this beyond a quarter of its sequences. A
# hole costs one token's compute per step; a compaction copies the moved rows' K/V once.
IN_PLACE_SLACK_ROWS = 4

# run(ids [B, 1], positions [B, 1] int64, seqlens_k [B] int32, total_sequence_length int32 scalar,
#     kv [B, Hkv, capacity, D] per graph K/V input) -> logits [B, vocab]
RunInPlace = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]], torch.Tensor]


class InPlaceDecode:
    """The rows of the in-place decode batch and their K/V (an `Arena` of rows of `capacity`)."""

    def __init__(self, store: SlotStore, run: RunInPlace, *, capacity: int, kv_shape: tuple[int, int],
                 calls: Counter[str], device: str | torch.device = "cpu") -> None:
        self.store = store
        self._run = run
        self._row_shape = (kv_shape[0], capacity, kv_shape[1])
        self._arena = Arena(len(store.tensors), device=device)
        self._kv(store.tensors[0].shape[0], keep=False)  # as many rows as slots: never grown (paged in when written)
        self.rows: list[int | None] = []  # each row's slot; None = a hole
        self.lengths: list[int] = []  # positions each row holds (a hole: 0)
        self.stored: list[int] = []  # positions [0, stored[r]) of row r are also in the store
        self.calls = calls

    @property
    def nbytes(self) -> int:
        return self._arena.nbytes

    def _kv(self, num_rows: int, keep: bool = True) -> list[torch.Tensor]:
        return self._arena.views((num_rows, *self._row_shape), keep=keep)

    def step(self, slots: Sequence[int], ids: torch.Tensor, starts: Sequence[int]) -> torch.Tensor:
        """Decode one token (ids [B, 1]) for each slot, whose K/V holds starts[i] positions; the
        logits [B, vocab] in call order."""
        row_of = {slot: row for row, slot in enumerate(self.rows) if slot is not None}
        order: list[int] = []
        joining: list[tuple[int, int, int]] = []  # (index in the call, slot, start)
        for i, (slot, start) in enumerate(zip(slots, starts)):
            row = row_of.pop(slot, None)
            if row is not None and self.lengths[row] != start:  # not what the row holds: from the store
                self._store_rows([row])
                self._make_holes([row])
                row = None
            order.append(-1 if row is None else row)
            if row is None:
                joining.append((i, slot, start))
        self._store_rows(list(row_of.values()))  # rows not in this call may come back: keep their K/V
        self._make_holes(list(row_of.values()))
        self._join(joining, order)
        if len(self.rows) - len(slots) > IN_PLACE_SLACK_ROWS + len(slots) // 4:
            order = self._compact(order)
        B = len(self.rows)
        in_order = order == list(range(B))
        if not in_order:  # holes get token 0; rows in call order are picked out of the logits below
            tokens = torch.zeros(B, 1, dtype=torch.int64)
            tokens[order] = ids
            ids = tokens
        held = torch.tensor(self.lengths, dtype=torch.int32)
        logits = self._run(ids, held.long().unsqueeze(1), held, held.max() + 1, self._kv(B))
        self.lengths = [n + 1 if slot is not None else 0 for n, slot in zip(self.lengths, self.rows)]
        self.calls["in_place"] += 1
        return logits if in_order else logits[torch.tensor(order, device=logits.device)]

    def release(self, slot: int) -> None:
        """The slot's sequence finished: its row becomes a hole, nothing stored."""
        if slot in self.rows:
            self._make_holes([self.rows.index(slot)])

    def leave(self, slots: Sequence[int], starts: Sequence[int]) -> None:
        """Another call touches these slots: their rows leave, their K/V stored where the call
        continues it (start > 0)."""
        row_of = {slot: row for row, slot in enumerate(self.rows) if slot is not None}
        touched = [(row_of[slot], start > 0) for slot, start in zip(slots, starts) if slot in row_of]
        if touched:
            self._store_rows([row for row, keep in touched if keep])
            self._make_holes([row for row, _ in touched])

    def _join(self, joining: list[tuple[int, int, int]], order: list[int]) -> None:
        """Give each joining sequence a hole or a new row, its K/V copied in from the store."""
        if not joining:
            return
        holes = iter([row for row, slot in enumerate(self.rows) if slot is None])
        placed = []
        for i, slot, start in joining:
            row = next(holes, None)
            if row is None:
                row = len(self.rows)
                self.rows.append(None)
                self.lengths.append(0)
                self.stored.append(0)
            order[i] = row
            self.rows[row], self.lengths[row], self.stored[row] = slot, start, start
            placed.append((row, slot, start))
        kv = self._kv(len(self.rows))
        for row, slot, start in placed:  # left aligned (`SlotStore.gather` right-aligns for past/present)
            for dst, src in zip(kv, self.store.tensors):
                dst[row, :, :start] = src[slot, :, :start]
        self.calls["joined"] += len(placed)

    def _make_holes(self, rows: list[int]) -> None:
        if not rows:
            return
        for row in rows:
            self.rows[row], self.lengths[row], self.stored[row] = None, 0, 0
        self.calls["left"] += len(rows)
        self._drop_trailing_holes()

    def _drop_trailing_holes(self) -> None:
        while self.rows and self.rows[-1] is None:
            self.rows.pop()
            self.lengths.pop()
            self.stored.pop()

    def _store_rows(self, rows: list[int]) -> None:
        """Write the K/V these rows hold and the store lacks."""
        rows = [row for row in rows if self.lengths[row] > self.stored[row]]
        if not rows:
            return
        firsts = [self.stored[row] for row in rows]
        self.store.scatter(self._kv(len(self.rows)), [self.rows[row] for row in rows], firsts,
                           [self.lengths[row] - first for row, first in zip(rows, firsts)], firsts, rows=rows)
        for row in rows:
            self.stored[row] = self.lengths[row]

    def _compact(self, order: list[int]) -> list[int]:
        """Move live rows from the end into the holes; `order` (call index -> row) updated."""
        kv = self._kv(len(self.rows))
        moved: dict[int, int] = {}
        holes = [row for row, slot in enumerate(self.rows) if slot is None]
        for hole in holes:
            last = len(self.rows) - 1
            while last > hole and self.rows[last] is None:
                last -= 1
            if last <= hole:
                break
            n = self.lengths[last]
            for tensor in kv:
                tensor[hole, :, :n] = tensor[last, :, :n]
            self.rows[hole], self.lengths[hole], self.stored[hole] = self.rows[last], n, self.stored[last]
            self.rows[last], self.lengths[last], self.stored[last] = None, 0, 0
            moved[last] = hole
        self._drop_trailing_holes()
        self.calls["compacted"] += 1
        return [moved.get(row, row) for row in order]
