"""Sub-batches: the samples that share one decoder-layer call, holding only the tokens they still keep.

A sample that withdraws its visual tokens leaves the full-length sub-batch and joins a compact, left-padded one
with its text tokens only, so later layers compute on fewer tokens rather than masking them.
"""

from dataclasses import dataclass

import torch


@dataclass
class SubBatch:
    rows: torch.Tensor  # [b] sample index in the full batch
    hidden: torch.Tensor  # [b, n, d]
    index: torch.Tensor  # [b, n] position of each slot in the input sequence, -1 for padding
    cos: torch.Tensor  # [b, n, head_dim] rotary of each slot's original position
    sin: torch.Tensor

    @property
    def valid(self) -> torch.Tensor:
        return self.index >= 0

    def __len__(self) -> int:
        return self.rows.shape[0]

    def slots_of(self, position_mask: torch.Tensor) -> torch.Tensor:
        """[b, n] which slots hold a position marked in the batch-level `position_mask` [B, T]."""
        return position_mask[self.rows[:, None], self.index.clamp(min=0)] & self.valid

    def select(self, keep_rows: torch.Tensor) -> "SubBatch":
        """Rows `keep_rows`, without the left-padding columns that only the dropped rows needed."""
        used = self.valid[keep_rows].any(dim=0).nonzero()
        start = int(used[0]) if used.numel() else self.index.shape[1]
        return SubBatch(
            self.rows[keep_rows],
            self.hidden[keep_rows, start:],
            self.index[keep_rows, start:],
            self.cos[keep_rows, start:],
            self.sin[keep_rows, start:],
        )

    def compact(self, keep_rows: torch.Tensor, keep_slots: torch.Tensor) -> "SubBatch":
        """Rows `keep_rows` with only their `keep_slots`, in order, packed to the right (left padding)."""
        keep_slots = keep_slots[keep_rows] & self.valid[keep_rows]
        counts = keep_slots.sum(dim=1)
        length = int(counts.max()) if counts.numel() else 0
        row, slot = keep_slots.nonzero(as_tuple=True)
        target = (length - counts)[row] + keep_slots.long().cumsum(dim=1)[row, slot] - 1
        b = counts.shape[0]

        def move(t: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
            out = t.new_full((b, length, *t.shape[2:]), fill)
            out[row, target] = t[keep_rows][row, slot]
            return out

        return SubBatch(
            self.rows[keep_rows], move(self.hidden), move(self.index, -1), move(self.cos), move(self.sin)
        )

    @staticmethod
    def concat(parts: list["SubBatch"]) -> "SubBatch":
        """One sub-batch from several, each left-padded to the longest."""
        length = max(p.index.shape[1] for p in parts)

        def pad(t: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
            extra = length - t.shape[1]
            return torch.cat([t.new_full((t.shape[0], extra, *t.shape[2:]), fill), t], dim=1) if extra else t

        return SubBatch(
            torch.cat([p.rows for p in parts]),
            torch.cat([pad(p.hidden) for p in parts]),
            torch.cat([pad(p.index, -1) for p in parts]),
            torch.cat([pad(p.cos) for p in parts]),
            torch.cat([pad(p.sin) for p in parts]),
        )


def attention_mask(valid: torch.Tensor, dtype: torch.dtype, query_length: int | None = None) -> torch.Tensor:
    """Additive 4-D mask [b, 1, q, k] for causal attention over the valid keys, the last `q` slots as queries.

    Padding queries attend to themselves only, so their (unused) outputs stay finite and never poison a
    softmax with NaN.
    """
    b, k = valid.shape
    q = k if query_length is None else query_length
    key_pos = torch.arange(k, device=valid.device)
    query_pos = key_pos[k - q :]
    causal = key_pos[None, :] <= query_pos[:, None]
    allowed = (causal[None] & valid[:, None, :]) | (key_pos[None, None, :] == query_pos[None, :, None])
    mask = torch.zeros(b, 1, q, k, dtype=dtype, device=valid.device)
    return mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
