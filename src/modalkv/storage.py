"""Ragged per-row storage of one layer's kept tokens: every row of the layer in one set of buffers.

A "row" is one (batch row, KV head) pair; after compression each row holds its own number of tokens. All rows of a
layer share one flat buffer per kind of slot data ("keys", "values", "columns", and what a press keeps per token,
e.g. "scores"): row r owns the consecutive slots [row_start[r], row_start[r] + capacity[r]), and the first
`lengths[r]` of them hold its tokens. The buffers are viewed as pages of `page_size` slots ([num_pages, page_size,
...]); every row owns whole pages. So however ragged the rows are, attention over a layer is one batched product over
its pages and one combine per row (`kernels.py`), and:

* padding is bounded: a row owns fewer than `page_size` slots beyond max(its length, its limit) + `reserve`, and
  `page_size` is at most 1/16 of the mean row (at least 8 slots);
* when all rows hold as many tokens and have the same limit (even budgets: SnapKV, TOVA, H2O on an unpadded batch),
  each row is one page and stays as long as every other: the host then knows the common length (`uniform_length`)
  and attention is a plain sdpa over a slice, with no per-row combine;
* the steady state of decoding (q tokens appended to every row, then each row over its limit losing its lowest slot
  until it is back at it) reads no device value on the host: lengths live on the device, and the host keeps
  `headroom`, a lower bound on every row's free slots, so only a growth (amortised: +1/16 per row, at least
  GROWTH_MIN) reads the lengths back.

A token's column is its position in the sequence (int32; what lets several new tokens attend causally to a
compressed past). In rows that are not alike, a slot that holds no token has the column FREE, larger than any real
one, so one comparison of columns masks both the causal future and the free slots. Slot order within a row carries
no meaning (attention over a set is order-free), which lets removal move the row's last token into the hole instead
of shifting the row.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

GROWTH_MIN = 16  # free slots reserved per row when rows grow while decoding, and the least a row grows by
MIN_PAGE = 8  # smallest page, in slots
MAX_PAGE = 128  # largest page of a ragged layer: a row pads at most this many slots minus one
FREE = torch.iinfo(torch.int32).max  # the column of a slot that holds no token: after every real column


@dataclass
class Layout:
    """Where each row's slots are: `num_pages` pages of `page_size` slots, row r owning pages_of[r] of them."""

    page_size: int
    capacities: list[int]  # slots per row, multiples of page_size
    page_row: torch.Tensor  # [num_pages] long: the row owning each page
    page_offset: torch.Tensor  # [num_pages] long: slots of the same row before the page
    row_start: torch.Tensor  # [R] long: first slot of each row
    constants: dict = field(default_factory=dict)  # tensors that depend only on the layout (see `constant`)

    @classmethod
    def for_rows(cls, needed: list[int], device: torch.device) -> Layout:
        """The layout giving row r at least needed[r] slots: one page per row when all rows need the same."""
        if len(set(needed)) == 1:
            page_size = -(-needed[0] // MIN_PAGE) * MIN_PAGE
        else:
            mean = sum(needed) / len(needed)
            page_size = min(MAX_PAGE, max(MIN_PAGE, 1 << max(int(mean / 16), 1).bit_length() - 1))
        pages = [max(-(-n // page_size), 1) for n in needed]
        first_page = list(itertools.accumulate(pages, initial=0))
        return cls(  # from host lists: nothing read back from the device
            page_size=page_size,
            capacities=[p * page_size for p in pages],
            page_row=torch.tensor([r for r, n in enumerate(pages) for _ in range(n)], device=device),
            page_offset=torch.tensor([i * page_size for n in pages for i in range(n)], device=device),
            row_start=torch.tensor([f * page_size for f in first_page[:-1]], device=device),
        )

    @property
    def one_page_per_row(self) -> bool:
        return len(self.page_row) == len(self.capacities)

    def constant(self, name: str, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """A tensor made once per layout and kept (zeros to add into, expanded indices): a decoding step then
        allocates and launches nothing for it. Callers never write to it."""
        tensor = self.constants.get(name)
        if tensor is None:
            tensor = self.constants[name] = make()
        return tensor


@dataclass
class RaggedRows:
    """One layer's kept tokens, all rows in one set of paged buffers (see the module docstring for the invariants)."""

    slots: dict[str, torch.Tensor]  # name -> [num_slots, ...]: "keys", "values" [S, D]; "columns" [S] int32; extras
    layout: Layout
    row_lengths: torch.Tensor  # [R] long on the device; not kept up to date while rows are alike (see `lengths`)
    limits: torch.Tensor | None  # [R] long: decode-time eviction keeps each row at most this long; None: no eviction
    headroom: int  # free slots every row has at least (host-side bound, see the module docstring)
    evicted_headroom: int  # free slots every row has at least right after an eviction (all rows at their limit)
    uniform_length: int | None  # the length of every row, when all rows are alike and stay so; else None
    uniform_limit: int | None  # their common limit (None: no limits or not alike)
    reserve: int  # free slots each row gets beyond max(length, limit) when built
    unevicted: int = 0  # tokens appended since the last eviction: no row is more than this over its limit
    built_lengths: list[int] | None = None  # the lengths when (re)laid out, while no row has a limit
    appended: int = 0  # tokens appended to every row since: without limits, row r holds built_lengths[r] + appended
    views: dict = field(default_factory=dict, repr=False)  # `window` views of the current buffers, by name

    @classmethod
    def build(
        cls, kept: dict[str, torch.Tensor], lengths: torch.Tensor, limits: torch.Tensor | None, reserve: int
    ) -> RaggedRows:
        """Rows holding the first `lengths[r]` entries of each row of `kept` ({name: [R, K, ...]}). One host read
        of the lengths: this happens once per prefill."""
        lengths_list = lengths.tolist()
        limits_list = lengths_list if limits is None else limits.tolist()
        high = [max(n, m) for n, m in zip(lengths_list, limits_list, strict=True)]
        layout = Layout.for_rows([h + reserve for h in high], lengths.device)
        alike = len(set(lengths_list)) == 1 and len(set(limits_list)) == 1 and layout.one_page_per_row
        positions = torch.arange(kept["keys"].shape[1], device=lengths.device)
        holds = positions < lengths[:, None]  # [R, K]
        target = (layout.row_start[:, None] + positions)[holds]
        slots = {name: _empty_slots(name, data, sum(layout.capacities)) for name, data in kept.items()}
        for name, data in kept.items():
            slots[name][target] = data[holds]
        rows = cls(
            slots=slots,
            layout=layout,
            row_lengths=lengths.clone(),
            limits=limits,
            headroom=0,
            evicted_headroom=0,
            uniform_length=lengths_list[0] if alike else None,
            uniform_limit=limits_list[0] if alike and limits is not None else None,
            reserve=reserve,
        )
        rows.laid_out(lengths_list, limits_list)
        return rows

    # -- views --------------------------------------------------------------------------------------------------

    @property
    def num_rows(self) -> int:
        return len(self.layout.capacities)

    @property
    def lengths(self) -> torch.Tensor:
        """[R] tokens per row, on the device (alike rows: their common length, which the host knows)."""
        if self.uniform_length is None:
            return self.row_lengths
        return torch.full_like(self.row_lengths, self.uniform_length)

    def pages(self, name: str) -> torch.Tensor:
        """The buffer `name` as pages: [num_pages, page_size, ...]."""
        buffer = self.slots[name]
        return buffer.view(-1, self.layout.page_size, *buffer.shape[1:])

    @property
    def width(self) -> int:
        """Slots per page that can hold a token: alike rows' common length, else the page size."""
        return self.uniform_length if self.uniform_length is not None else self.layout.page_size

    def window(self, name: str, head_axis: bool = False, transposed: bool = False) -> torch.Tensor:
        """The buffer `name` as [pages, width, ...] ([pages, 1, width, ...] with `head_axis`, as sdpa takes keys;
        [pages, D, width] `transposed`), a view kept while the buffers and the width stay: in the steady state of
        decoding it costs no operation."""
        width = self.width
        key = (name, head_axis, transposed)
        cached = self.views.get(key)
        if cached is None or cached[0] != width:
            buffer = self.slots[name]
            shape = (-1, 1, self.layout.page_size) if head_axis else (-1, self.layout.page_size)
            view = buffer.view(*shape, *buffer.shape[1:])
            view = view[:, :, :width] if head_axis else view[:, :width]
            cached = self.views[key] = (width, view.mT if transposed else view)
        return cached[1]

    def holds(self) -> torch.Tensor:
        """[num_pages, page_size] bool: which slots hold a token (rows that are not alike)."""
        return self.pages("columns") != FREE

    def nbytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for t in self.slots.values())

    def padded(self) -> dict[str, torch.Tensor]:
        """Every buffer as [R, longest row, ...], each row's tokens first (what lies past a row's length is not its
        own): for accounting and re-layouts, not for decoding (one host read)."""
        lengths = self.lengths
        steps = torch.arange(int(lengths.max()), device=lengths.device)
        index = (self.layout.row_start[:, None] + steps).clamp(max=sum(self.layout.capacities) - 1)
        return {name: buffer[index] for name, buffer in self.slots.items()}

    def select_rows(self, source: torch.Tensor) -> RaggedRows:
        """New rows where row i is a copy of row source[i] (repeats allowed: beam search)."""
        kept = {name: data[source] for name, data in self.padded().items()}
        limits = None if self.limits is None else self.limits[source]
        rows = RaggedRows.build(kept, self.lengths[source], limits, self.reserve)
        rows.unevicted = self.unevicted
        return rows

    def keep_from_column(self, first_column: int) -> RaggedRows:
        """New rows holding only the tokens at columns >= first_column: a sliding window after a forward of several
        tokens drops all that left it at once (one host read) instead of one removal per token."""
        padded = self.padded()
        steps = torch.arange(padded["columns"].shape[1], device=self.row_lengths.device)
        keep = (steps < self.lengths[:, None]) & (padded["columns"] >= first_column)  # [R, longest]
        order = torch.where(keep, steps, steps.numel()).sort(dim=-1).values.clamp(max=steps.numel() - 1)
        rows = torch.arange(self.num_rows, device=order.device)[:, None]
        kept = {name: data[rows, order] for name, data in padded.items()}  # each row's kept tokens first
        return RaggedRows.build(kept, keep.sum(-1), self.limits, self.reserve)

    # -- appending ----------------------------------------------------------------------------------------------

    def append(self, new: dict[str, torch.Tensor], start_column: int, fill: dict[str, float]) -> None:
        """Appends q tokens to every row. new: {name: [R * q, ...]} ("keys", "values"; row-major); their columns
        are start_column, ..., start_column + q - 1; every other buffer gets `fill[name]` (0 if absent)."""
        q = new["keys"].shape[0] // self.num_rows
        if q > self.headroom:
            self.grow(q)
        ends = self.layout.row_start + (self.uniform_length if self.uniform_length is not None else self.row_lengths)
        target = ends if q == 1 else (ends[:, None] + torch.arange(q, device=ends.device)).flatten()
        for name, buffer in self.slots.items():
            if name in new:
                buffer.index_copy_(0, target, new[name])
            elif name == "columns" and q == 1:
                buffer.index_fill_(0, target, start_column)
            elif name == "columns":
                columns = torch.arange(start_column, start_column + q, device=buffer.device, dtype=buffer.dtype)
                buffer.index_copy_(0, target, columns.repeat(self.num_rows))
            else:
                buffer.index_fill_(0, target, fill.get(name, 0))
        self.headroom -= q
        self.unevicted += q
        self.appended += q
        if self.uniform_length is not None:
            self.uniform_length += q
        else:
            self.row_lengths += q

    def grow(self, needed: int) -> None:
        """Re-lays the rows with room for `needed` more tokens each (+1/16, at least GROWTH_MIN): one copy of the
        layer, amortised over the tokens that fit before the next growth. Rows without limits know their lengths
        on the host; rows with limits read them (they grow only when a forward brings more than `reserve` tokens)."""
        self.row_lengths = self.lengths
        if self.built_lengths is not None:
            lengths = [n + self.appended for n in self.built_lengths]
        else:
            lengths = self.row_lengths.tolist()
        limits = lengths if self.limits is None else self.limits.tolist()
        high = [max(n, m) for n, m in zip(lengths, limits, strict=True)]
        old, device = self.layout, self.row_lengths.device
        self.layout = Layout.for_rows([h + needed + max(GROWTH_MIN, h // 16) for h in high], device)
        if not self.layout.one_page_per_row:
            self.uniform_length = self.uniform_limit = None
        # Each held token's row and rank within it, from the host-known total: no boolean indexing.
        total = sum(lengths)
        row = torch.repeat_interleave(torch.arange(self.num_rows, device=device), self.row_lengths, output_size=total)
        rank = torch.arange(total, device=device) - (self.row_lengths.cumsum(0) - self.row_lengths)[row]
        source, target = old.row_start[row] + rank, self.layout.row_start[row] + rank
        for name, buffer in self.slots.items():
            grown = _empty_slots(name, buffer[:, None], sum(self.layout.capacities))
            grown[target] = buffer[source]
            self.slots[name] = grown
        self.views.clear()
        self.laid_out(lengths, limits)

    def laid_out(self, lengths: list[int], limits: list[int]) -> None:
        """The host-side bookkeeping of a new layout, from the rows' lengths and limits (host lists)."""
        capacities = self.layout.capacities
        self.headroom = min(c - n for c, n in zip(capacities, lengths, strict=True))
        self.evicted_headroom = min(c - m for c, m in zip(capacities, limits, strict=True))
        self.built_lengths = lengths if self.limits is None else None
        self.appended = 0

    # -- eviction -----------------------------------------------------------------------------------------------

    def evict(self, scores: torch.Tensor, release: Release | None = None) -> None:
        """Brings every row back to its limit: a row over it loses its lowest-scoring token, as many times as
        tokens were appended since the last eviction (at most that many rows are over), one removal for all rows
        at a time, with no host read. scores: [pages, width] keep-scores (moved along with the tokens).
        `release(slot, leaving)` sees each removal first: slot [R] per row, leaving [R] bool (None: every row)."""
        count = self.unevicted
        if self.uniform_length is not None:  # alike rows are over their (common) limit together
            count = min(count, self.uniform_length - self.uniform_limit)
        if count > 1 and scores.shape[-1] < self.layout.page_size:  # scores follow the moves: as whole pages
            scores = F.pad(scores, (0, self.layout.page_size - scores.shape[-1]), value=float("inf"))
        for step in range(count):
            slot = self.lowest(scores)
            leaving = None if self.uniform_length is not None else self.row_lengths > self.limits
            if release is not None:
                release(slot, leaving)
            self.remove(slot, leaving, scores if step < count - 1 else None)
        self.unevicted = 0
        self.headroom = self.evicted_headroom

    def lowest(self, scores: torch.Tensor) -> torch.Tensor:
        """[R] the slot (flat index) of each row's lowest score among the tokens it holds. scores: [pages, page]."""
        layout = self.layout
        if self.uniform_length is not None:  # one page per row, all rows equally long
            return scores[:, : self.uniform_length].argmin(-1) + layout.row_start
        scores = scores.masked_fill(~self.holds(), float("inf"))
        page_min = scores.amin(-1)
        row_min = page_min.new_full((self.num_rows,), float("inf")).scatter_reduce_(
            0, layout.page_row, page_min, "amin"
        )
        slot = torch.arange(scores.numel(), device=scores.device).view_as(scores)
        at_min = scores == row_min.index_select(0, layout.page_row)[:, None]
        page_pick = torch.where(at_min, slot, -1).amax(-1)
        return page_pick.new_full((self.num_rows,), -1).scatter_reduce_(0, layout.page_row, page_pick, "amax")

    def remove(self, slot: torch.Tensor, leaving: torch.Tensor | None, scores: torch.Tensor | None = None) -> None:
        """Removes slot[r] from every row r where leaving[r] (None: from every row; alike rows), one token per row:
        the row's last token moves into the hole. `scores` ([pages, page], a caller's per-slot scores) follow."""
        buffers = [*self.slots.values(), *([] if scores is None else [scores.view(-1)])]
        if leaving is None:
            last = self.layout.row_start + (self.uniform_length - 1)
            for buffer in buffers:
                buffer.index_copy_(0, slot, buffer.index_select(0, last))
            self.uniform_length -= 1
            return
        last = self.layout.row_start + self.row_lengths - 1
        target = torch.where(leaving, slot, last)  # a row that keeps its tokens copies its last slot onto itself
        for buffer in buffers:
            buffer.index_copy_(0, target, buffer.index_select(0, last))
        columns = self.slots["columns"]
        columns.index_copy_(0, last, torch.where(leaving, FREE, columns.index_select(0, last)))
        self.row_lengths -= leaving.long()


def _empty_slots(name: str, data: torch.Tensor, num_slots: int) -> torch.Tensor:
    """A buffer of `num_slots` slots for per-row data [R, K, ...]: columns FREE (no token), anything else zero (not
    empty: masked-out garbage could still be NaN, and 0 * NaN poisons an output)."""
    if name == "columns":
        return data.new_full((num_slots, *data.shape[2:]), FREE)
    return data.new_zeros((num_slots, *data.shape[2:]))


Release = Callable[[torch.Tensor, torch.Tensor | None], None]
