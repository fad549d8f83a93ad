"""Attention of new queries over a layer's ragged rows (`storage.RaggedRows`), as a constant number of kernels.

Each row's G query heads are stacked as G * q queries of a single head, so no key is repeated for GQA. Alike rows
(one page each, all as long) are one sdpa call over a slice. Ragged rows are paged attention with a flash-decoding
combine: one batched product of every page with its row's queries, a per-row maximum and sum gathered across the
row's pages (`scatter_reduce`, `index_add`), then one batched product with the values -- the same dozen kernels
whatever the per-row lengths, so uneven heads (MadaKV) cost what even ones do.

Two model features ride on top: a sliding window (several new queries each see only the last `window` columns) and
attention sinks (gpt-oss: one learned logit per query head joins the softmax's denominator and contributes no value,
so the output is scaled by Z / (Z + exp(sink)) = sigmoid(log Z - sink)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from modalkv.storage import RaggedRows

# cuDNN's attention builds an execution plan for every new shape (61-66 ms of host time per call on an H200), and a
# decoding step's key length changes every step: picked for alike rows, it rebuilt a plan per layer and step (MadaKV:
# 1.3 s per token for a 7B model, docs/benchmark.md). The other backends need no plan. Excluding it costs ~10 us of
# host time per call on a CPU, where cuDNN never runs.
DECODE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class AttentionResult:
    output: torch.Tensor  # [R, G * q, D]
    weights: torch.Tensor | None  # [pages, G * q, width] softmax weights over each page's slots, when asked for
    log_mass: torch.Tensor | None  # [R, G * q] float32 log-sum-exp of the scaled logits, when asked for


def ragged_attention(
    rows: RaggedRows,
    queries: torch.Tensor,
    scaling: float,
    query_columns: torch.Tensor | int,
    with_weights: bool = False,
    window: int | None = None,
    sinks: torch.Tensor | None = None,
) -> AttentionResult:
    """Attention of `queries` [R, G * q, D] over `rows` (the new tokens already appended).

    Args:
        query_columns: [G * q] the sequence column of each stacked query, for causal masking among several new
            tokens; or one int, the column of the single new token (everything stored is visible to it).
        with_weights: also return the softmax weights and log-masses (what decode-time scoring reads).
        window: a sliding window: a query at column c sees columns > c - window. Only applied to several queries
            (a tensor `query_columns`): a sliding layer holds no more than the single new token may see.
        sinks: [R, G * q] float32 sink logits of each stacked query (gpt-oss), or None. The log-mass returned then
            includes the sinks.
    """
    if rows.uniform_length is not None:
        result = _alike_rows(rows, queries, scaling, query_columns, with_weights or sinks is not None, window)
        if sinks is None:
            return result
        if not with_weights:  # computed for the log-mass only
            result.weights = None
        return _with_sinks(result, sinks, None)
    page_row = rows.layout.page_row
    zero, row_zeros, output_zeros, by_query = _constants(rows, queries)
    page_queries = queries.index_select(0, page_row)  # [pages, G * q, D]
    logits = torch.baddbmm(zero, page_queries, rows.window("keys", transposed=True), beta=0, alpha=scaling)
    columns = rows.window("columns", head_axis=True)  # [pages, 1, page]
    if torch.is_tensor(query_columns):
        hidden = columns > query_columns[:, None]  # FREE too
        if window is not None:
            hidden |= columns <= query_columns[:, None] - window
    else:
        hidden = columns > query_columns
    logits = logits.float().masked_fill_(hidden, float("-inf"))  # [pages, G * q, page]
    # Every row has a page, so the maximum over its pages replaces the zeros it starts from.
    row_max = row_zeros.scatter_reduce(0, by_query, logits.amax(-1, keepdim=True), "amax", include_self=False)
    exps = (logits - row_max.index_select(0, page_row)).exp_()
    row_sum = row_zeros.index_add(0, page_row, exps.sum(-1, keepdim=True))  # [R, G * q, 1]
    page_out = torch.bmm(exps.to(queries.dtype), rows.window("values"))  # [pages, G * q, D]
    output = (output_zeros.index_add(0, page_row, page_out.float()) / row_sum).to(queries.dtype)
    weights = exps / row_sum.index_select(0, page_row) if with_weights else None
    log_mass = (row_max + row_sum.log())[..., 0] if with_weights or sinks is not None else None
    result = AttentionResult(output, weights, log_mass)
    return result if sinks is None else _with_sinks(result, sinks, page_row)


def _with_sinks(result: AttentionResult, sinks: torch.Tensor, page_row: torch.Tensor | None) -> AttentionResult:
    """The attention with sink logits [R, G * q] in the denominator: output and weights scaled by Z / (Z + exp(sink)),
    the log-mass log(Z + exp(sink)). page_row: each page's row (ragged rows), None for alike rows."""
    log_mass = torch.logaddexp(result.log_mass, sinks)
    share = (result.log_mass - log_mass).exp_()[..., None]  # [R, G * q, 1]
    weights = result.weights
    if weights is not None:
        weights = weights * (share if page_row is None else share.index_select(0, page_row))
    return AttentionResult(result.output * share.to(result.output.dtype), weights, log_mass)


def _constants(rows: RaggedRows, queries: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Made once per layout: a 0-d zero (baddbmm's ignored input), zeros [R, G * q, 1] and [R, G * q, D] that the
    out-of-place reductions start from (never written), and each page's row as an index [pages, G * q, 1]."""
    layout, (num_rows, num_queries, dim) = rows.layout, queries.shape
    zero = layout.constant("zero", lambda: queries.new_zeros(()))
    row_zeros = layout.constant(f"zeros{num_queries}", lambda: zero.new_zeros((num_rows, num_queries, 1)).float())
    output_zeros = layout.constant(f"output{num_queries}", lambda: row_zeros.new_zeros((num_rows, num_queries, dim)))
    by_query = layout.constant(f"rows{num_queries}", lambda: layout.page_row[:, None, None].expand(-1, num_queries, 1))
    return zero, row_zeros, output_zeros, by_query


def _alike_rows(
    rows: RaggedRows,
    queries: torch.Tensor,
    scaling: float,
    query_columns: torch.Tensor | int,
    with_weights: bool,
    window: int | None,
) -> AttentionResult:
    num_rows, num_queries, dim = queries.shape
    visible = None
    if torch.is_tensor(query_columns):
        columns = rows.window("columns", head_axis=True)
        visible = columns <= query_columns[:, None]  # [R, G * q, L]
        if window is not None:
            visible &= columns > query_columns[:, None] - window
    if not with_weights:  # [R, 1, L, D] views of the buffers: no copy, no repeated keys
        keys, values = rows.window("keys", head_axis=True), rows.window("values", head_axis=True)
        mask = None if visible is None else visible[:, None]
        stacked = queries.view(num_rows, 1, num_queries, dim)
        with sdpa_kernel(DECODE_BACKENDS):
            output = F.scaled_dot_product_attention(stacked, keys, values, mask, scale=scaling)
        return AttentionResult(output.view(queries.shape), None, None)
    zero = _constants(rows, queries)[0]
    logits = torch.baddbmm(zero, queries, rows.window("keys", transposed=True), beta=0, alpha=scaling).float()
    if visible is not None:
        logits = logits.masked_fill_(~visible, float("-inf"))
    log_mass = logits.logsumexp(-1)
    weights = (logits - log_mass[..., None]).exp_()
    return AttentionResult(torch.bmm(weights.to(queries.dtype), rows.window("values")), weights, log_mass)
