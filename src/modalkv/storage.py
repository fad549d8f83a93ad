"""Ragged per-row storage of one layer's kept tokens, as blocks of similar-length rows.

A "row" is one (batch row, KV head) pair. After compression each row holds its own number of tokens. Rows of
similar length share one padded buffer (a `RowBlock`), so a layer costs a handful of tensors, decode attention costs
one `sdpa` call per block, and the padding is bounded:

* within a block, a row's length is at least 8/9 of the longest row's minus 16 tokens (`_BLOCK_SLACK`);
* each block reserves `GROWTH_MIN` free slots after compression and grows by 1/8 when full, so decoding never
  copies the cache per token (amortised growth).

A block stores, per slot, the key, the value, the token's sequence column (int32; what lets several new tokens
attend causally to a compressed past) and, for presses that keep one, a float32 running score. Slot order carries
no meaning -- attention over a set is order-free -- which lets decode-time eviction swap the last token into the
evicted slot instead of shifting the row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GROWTH_MIN = 16  # free slots reserved per block after compression, and the least a block grows by
_BLOCK_SLACK = 8  # a block accepts rows down to 1/(1 + 1/_BLOCK_SLACK) of its longest row (minus GROWTH_MIN)


@dataclass
class RowBlock:
    """Rows of one layer that share padded buffers; only the first `lengths[i]` slots of row i are valid."""

    rows: torch.Tensor  # [n] long, indices into batch * kv_heads, ascending
    slots: dict[str, torch.Tensor]  # "keys", "values": [n, capacity, D]; "columns": [n, capacity]; "scores"?
    lengths: torch.Tensor  # [n] long
    limits: torch.Tensor | None  # [n] long: decode-time eviction keeps each row at most this long; None: no eviction
    max_length: int  # lengths.max() and lengths.min(), kept as ints to slice and branch without a sync
    min_length: int
    span: slice | None  # the rows as a slice when they are consecutive: views instead of gathers and scatters

    @property
    def index(self) -> slice | torch.Tensor:
        """What selects this block's rows from a [batch * kv_heads, ...] tensor."""
        return self.span if self.span is not None else self.rows

    @property
    def keys(self) -> torch.Tensor:
        return self.slots["keys"]

    @property
    def values(self) -> torch.Tensor:
        return self.slots["values"]

    @property
    def columns(self) -> torch.Tensor:
        return self.slots["columns"]

    @property
    def capacity(self) -> int:
        return self.keys.shape[1]

    def nbytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for t in self.slots.values())

    def grow(self, needed: int) -> None:
        """Reallocates with room for at least `needed` slots per row (amortised: +1/8, at least GROWTH_MIN)."""
        capacity = needed + max(GROWTH_MIN, needed // 8)
        for name, old in self.slots.items():
            # Zeroed, not empty: padding slots are masked out, but 0 * NaN garbage would still poison the output.
            new = old.new_zeros((old.shape[0], capacity, *old.shape[2:]))
            new[:, : self.max_length] = old[:, : self.max_length]
            self.slots[name] = new

    def append(self, new: dict[str, torch.Tensor]) -> None:
        """Appends q tokens to every row. new["keys"/"values"]: [n, q, D]; new["columns"]: [q]; scores start at 0."""
        q = new["keys"].shape[1]
        if self.max_length + q > self.capacity:
            self.grow(self.max_length + q)
        if self.min_length == self.max_length:  # every row ends at the same slot: plain slice writes
            where = (slice(None), slice(self.max_length, self.max_length + q))
        else:
            where = (
                torch.arange(len(self.rows), device=self.keys.device)[:, None],
                self.lengths[:, None] + torch.arange(q, device=self.keys.device),
            )
        for name, buffer in self.slots.items():
            buffer[where] = new.get(name, 0)
        self.lengths += q
        self.max_length += q
        self.min_length += q

    def excess(self) -> tuple[int, int]:
        """The fewest and the most tokens any row holds over its limit (one host sync; (0, 0) without limits)."""
        if self.limits is None:
            return 0, 0
        fewest, most = torch.stack((self.lengths - self.limits).clamp(min=0).aminmax()).tolist()
        return fewest, most

    def over_limit(self, scores: torch.Tensor, fewest: int, most: int) -> torch.Tensor:
        """The slots each row must lose to get back to its limit: its lowest-scoring ones.

        Args:
            scores: [n, max_length] keep-scores per slot (slots beyond a row's length are ignored).
            fewest, most: `excess()`, passed in so that the caller can skip scoring when no row is over.

        Returns:
            [n, most] slot indices per row, lowest score first, -1 where a row loses fewer.
        """
        if self.min_length < self.max_length:  # rows end at different slots: what lies past a row's end never goes
            past_end = torch.arange(scores.shape[1], device=scores.device) >= self.lengths[:, None]
            scores = scores.masked_fill(past_end, float("inf"))
        # One token in, one token out (the steady state of decode-time eviction) is an argmin; lowest score first.
        lowest = scores.argmin(-1, keepdim=True) if most == 1 else scores.topk(most, -1, largest=False).indices
        if fewest < most:
            excess = (self.lengths - self.limits).clamp(min=0)
            lowest = lowest.masked_fill(torch.arange(most, device=scores.device) >= excess[:, None], -1)
        return lowest

    def remove(self, ordered: torch.Tensor, every_row: bool = False) -> None:
        """Removes slots [n, m] (per row, -1 for none, as `over_limit` gives) in one move for all m: the tokens kept
        among each row's last slots fill the holes the removed ones leave below the new end.

        Each buffer is addressed as a flat [n * capacity, ...] table, so the move is one index_select and one
        index_copy_ per buffer. `every_row`: no -1 entries (every row loses m slots), so the lengths shift without
        a host sync."""
        rows, most = ordered.shape
        if most == 0:
            return
        leaving = ordered >= 0
        count = leaving.sum(-1)
        new_lengths = self.lengths - count
        steps = torch.arange(most, device=ordered.device)
        tail = new_lengths[:, None] + steps  # [n, m]: the slots from the new end on, `count` of them real
        tail_stays = (steps < count[:, None]) & ~(tail[:, :, None] == ordered[:, None, :]).any(-1)
        past = self.capacity  # sorts after every slot
        sources = torch.where(tail_stays, tail, past).sort(dim=-1).values
        holes = torch.where(leaving & (ordered < new_lengths[:, None]), ordered, past).sort(dim=-1).values
        # As many holes as staying tail tokens per row; the rest of the pairs copy a row's last slot onto itself.
        idle = (self.lengths - 1)[:, None]
        offsets = torch.arange(rows, device=ordered.device)[:, None] * self.capacity
        real = holes < past
        target = (offsets + torch.where(real, holes, idle)).flatten()
        source = (offsets + torch.where(real, sources, idle)).flatten()
        for buffer in self.slots.values():
            flat = buffer.view(-1, *buffer.shape[2:])
            flat.index_copy_(0, target, flat.index_select(0, source))
        self.lengths -= count
        if every_row:
            self.min_length -= most
            self.max_length -= most
        else:
            low, high = self.lengths.aminmax()
            self.min_length, self.max_length = int(low), int(high)

    def take_rows(self, local: torch.Tensor, rows: torch.Tensor) -> RowBlock:
        """A block made of this block's rows `local` (repeats allowed), renumbered as `rows` (ascending)."""
        lengths = self.lengths[local]
        return RowBlock(
            rows=rows,
            slots={name: buffer[local] for name, buffer in self.slots.items()},
            lengths=lengths,
            limits=None if self.limits is None else self.limits[local],
            max_length=int(lengths.max()),
            min_length=int(lengths.min()),
            span=span_of(rows.tolist()),
        )


def group_rows(lengths: torch.Tensor) -> list[torch.Tensor]:
    """Splits rows into blocks of similar length (see module docstring). Returns ascending row indices per block."""
    order = torch.argsort(lengths, stable=True).tolist()
    values = lengths.tolist()
    groups: list[list[int]] = []
    for row in order:
        if groups and values[row] <= values[groups[-1][0]] * (1 + 1 / _BLOCK_SLACK) + GROWTH_MIN:
            groups[-1].append(row)
        else:
            groups.append([row])
    return [torch.tensor(sorted(g), dtype=torch.long) for g in groups]


def span_of(rows: list[int]) -> slice | None:
    """`rows` (ascending) as a slice when they are consecutive, else None."""
    return slice(rows[0], rows[-1] + 1) if rows[-1] - rows[0] + 1 == len(rows) else None


def build_blocks(kept: dict[str, torch.Tensor], lengths: torch.Tensor, limits: torch.Tensor | None) -> list[RowBlock]:
    """Blocks holding the first `lengths[r]` entries of each row of `kept` ({name: [rows, K, ...]})."""
    blocks = []
    for rows in group_rows(lengths.cpu()):
        span = span_of(rows.tolist())
        rows = rows.to(lengths.device)
        block_lengths = lengths[rows]
        longest = int(block_lengths.max())
        slots = {}
        for name, data in kept.items():
            buffer = data.new_zeros((len(rows), longest + GROWTH_MIN, *data.shape[2:]))
            buffer[:, :longest] = data[span if span is not None else rows][:, :longest]
            slots[name] = buffer
        blocks.append(
            RowBlock(
                rows=rows,
                slots=slots,
                lengths=block_lengths.clone(),
                limits=None if limits is None else limits[rows],
                max_length=longest,
                min_length=int(block_lengths.min()),
                span=span,
            )
        )
    return blocks
