"""The past/present runners' KV memory (ONNX Runtime's on the CPU, TensorRT's on the GPU): each
slot's K/V at rest (`SlotStore`) and the growing buffers a decode batch's past/present live in
between steps (`Arena`).

The decoder graph takes past K/V as dense left-padded tensors [B, Hkv, past, D] and returns
present = concat(past, new). A slot's K/V is at rest in the store; a batch is packed from it
(`SlotStore.gather`) and its new K/V written back (`SlotStore.scatter`). Position p of a row
sits at column p + pad of that row's tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _runs(slots: Sequence[int], first_positions: Sequence[int], counts: Sequence[int],
          first_columns: Sequence[int], batch_rows: Sequence[int] | None = None,
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flattened (row, slot, position, column) of every element of each entry's run of `counts[b]`
    positions starting at `first_positions[b]` / column `first_columns[b]`, in batch row
    `batch_rows[b]` (default b)."""
    counts_t = torch.tensor(counts)
    total = int(counts_t.sum())
    batch_rows_t = torch.arange(len(counts)) if batch_rows is None else torch.tensor(batch_rows)
    entries = torch.repeat_interleave(torch.arange(len(counts)), counts_t, output_size=total)
    rows = batch_rows_t[entries]
    offsets = torch.arange(total) - torch.repeat_interleave(torch.cumsum(counts_t, 0) - counts_t, counts_t,
                                                           output_size=total)
    slots_t = torch.tensor(slots)[entries]
    positions = torch.tensor(first_positions)[entries] + offsets
    columns = torch.tensor(first_columns)[entries] + offsets
    return rows, slots_t, positions, columns


# Up to this many rows, gather/scatter copy row by row (two slices per tensor); beyond, one indexed
# copy per tensor for all rows, whose fixed cost pays off only past a few rows (docs/notes/runners-and-export.md).
SLICE_COPY_MAX_ROWS = 3


class SlotStore:
    """Per graph K/V input, a [num_slots, Hkv, max_len, D] float32 tensor."""

    def __init__(self, *, num_tensors: int, num_slots: int, num_kv_heads: int, max_len: int, head_dim: int,
                 device: str | torch.device = "cpu") -> None:
        shape = (num_slots, num_kv_heads, max_len, head_dim)
        self.tensors = [torch.zeros(shape, device=device) for _ in range(num_tensors)]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)

    def gather(self, out: Sequence[torch.Tensor], slots: Sequence[int], lengths: Sequence[int],
               rows: Sequence[int] | None = None) -> None:
        """Pack positions [0, lengths[b]) of slots[b] right-aligned into row rows[b] (default b) of
        out[i] [B, Hkv, P, D] (P >= max(lengths)). The padding columns are zeroed: they are masked
        out, but attention still multiplies them by a 0 weight, and the arenas are not initialised
        (0 * NaN is NaN)."""
        width = out[0].shape[2]
        if width == 0:
            return
        if len(slots) <= SLICE_COPY_MAX_ROWS:
            for row, slot, n in zip(range(len(slots)) if rows is None else rows, slots, lengths):
                for dst, src in zip(out, self.tensors):
                    dst[row, :, :width - n] = 0
                    dst[row, :, width - n:] = src[slot, :, :n]
            return
        pads = [width - n for n in lengths]
        data_rows, slots_t, positions, columns = _runs(slots, [0] * len(slots), lengths, pads, rows)
        pad_rows, _, _, pad_columns = _runs(slots, [0] * len(slots), pads, [0] * len(slots), rows)
        for dst, src in zip(out, self.tensors):
            dst[data_rows, :, columns] = src[slots_t, :, positions]
            dst[pad_rows, :, pad_columns] = 0

    def scatter(self, src: Sequence[torch.Tensor], slots: Sequence[int], first_positions: Sequence[int],
                counts: Sequence[int], first_columns: Sequence[int], rows: Sequence[int] | None = None) -> None:
        """Store columns first_columns[b] .. +counts[b] of src[i]'s row rows[b] (default b) as
        positions first_positions[b] .. of slots[b]."""
        if not any(counts):
            return
        if len(slots) <= SLICE_COPY_MAX_ROWS:
            for row, slot, first, n, column in zip(range(len(slots)) if rows is None else rows, slots,
                                                   first_positions, counts, first_columns):
                if not n:
                    continue
                for store, tensor in zip(self.tensors, src):
                    store[slot, :, first:first + n] = tensor[row, :, column:column + n]
            return
        src_rows, slots_t, positions, columns = _runs(slots, first_positions, counts, first_columns, rows)
        for store, tensor in zip(self.tensors, src):
            store[slots_t, :, positions] = tensor[src_rows, :, columns]


class Arena:
    """One growable float32 buffer per graph K/V input; `views(shape)` are contiguous tensors over
    their start, so the runtime reads and writes them in place. Not initialised (zero-filling every
    growth slowed each step: docs/notes/runners-and-export.md): `SlotStore.gather` zeroes the
    padding it leaves, and the graph writes every column of present."""

    def __init__(self, num_tensors: int, device: str | torch.device = "cpu") -> None:
        self._device = device
        self._buffers = [torch.empty(0, device=device) for _ in range(num_tensors)]

    def views(self, shape: tuple[int, ...], keep: bool = False) -> list[torch.Tensor]:
        """Tensors of `shape` over the buffers' start; `keep`: what the buffers hold survives a growth."""
        need = 1
        for n in shape:
            need *= n
        if need > self._buffers[0].numel():
            grown = max(need, self._buffers[0].numel() * 3 // 2)
            old, self._buffers = self._buffers, [torch.empty(grown, device=self._device) for _ in self._buffers]
            if keep:
                for new, held in zip(self._buffers, old):
                    new[:held.numel()] = held
        return [b[:need].view(shape) for b in self._buffers]

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers)
