from dataclasses import dataclass

import torch

from modalkv.presses.base import DecodeView, LeavingTokens, PrefillInputs, Selection
from modalkv.presses.scoring import add_decode_attention
from modalkv.presses.streaming_llm import StreamingLLMPress


@dataclass
class CAMPress(StreamingLLMPress):
    """CaM, cache merging: StreamingLLM whose leaving tokens are merged into the kept ones instead of dropped.

    Zhang et al., "CaM: Cache Merging for Memory-efficient LLMs Inference", ICML 2024,
    https://proceedings.mlr.press/v235/zhang24n.html. Each decoding step the oldest token of the recent window
    leaves; with probability min(1, A(leaving) / mean A(its merge window)) its value, divided by the window's size,
    is added to the values of its merge window: the `merge_count` kept tokens that follow it. A is a token's attention
    accumulated over the decoding steps (averaged over a KV group's query heads), one draw per KV head.

    As kvpress 0.5.5 (`cam_press.py`, with `compression_interval=1`, which its docstring calls the original per-step
    CaM) where the authors' code (https://github.com/zyxxmu/cam, `kv_cache_cam.py`) is ambiguous: the window is 32
    tokens (the authors' streaming cache: 16), A counts the decoding steps only (the prompt's attention is not in
    it), and the share is divided by the tokens actually in the window. Differences, by design of this engine:
    * the policy is the authors' sinks + recent window (kvpress wraps any scorer and evicts in bulk every 512 steps);
    * the prompt is compressed at prefill as StreamingLLM does, without merging (kvpress's CAM leaves the prompt whole
      and compresses only while decoding; the authors' `evict_for_space` drops without merging too). So on a prompt
      followed by a short answer CAM is StreamingLLM up to the few tokens that left meanwhile: it is a method for
      long generations.
    * the draws come from a generator seeded with `seed` at the prefill and kept per cache, so a run repeats and the
      global RNG (sampling in `generate()`) is untouched; like `random`'s, they depend on the batch's shape.
    """

    merge_count: int = 32
    seed: int = 0
    name = "cam"
    needs_decode_attention = True
    absorbs_leaving = True
    batch_invariant = False  # its merge draws come from one generator over the batch

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.evict_every < 1:
            raise ValueError("cam merges the tokens that leave while decoding: evict_every must be >= 1")
        if self.merge_count < 1:
            raise ValueError(f"merge_count must be >= 1, got {self.merge_count}")

    def select(self, inputs: PrefillInputs) -> Selection:
        # StreamingLLM's "scores" (0, +inf for the sinks, which never leave nor merge) become the running sums.
        inputs.state.setdefault("cam.generator", torch.Generator(inputs.keys.device).manual_seed(self.seed))
        return super().select(inputs)

    def observe(self, view: DecodeView) -> None:
        add_decode_attention(view)

    def decode_scores(self, view: DecodeView) -> torch.Tensor:
        return view.slot("columns").float().masked_fill(view.slot("scores").isinf(), float("inf"))

    def absorb(self, view: DecodeView, tokens: LeavingTokens) -> None:
        """Merges each leaving token's value into the next `merge_count` columns of its row (a window is contiguous in
        columns, so no search: a comparison per slot), with the Bernoulli draw above. No host sync."""
        slots, rows = view.rows.slots, view.rows.num_rows
        leaving_column = view.by_page(slots["columns"].index_select(0, tokens.slot))[:, None]  # [pages, 1]
        columns, attention = view.slot("columns"), view.slot("scores")
        targets = (columns > leaving_column) & (columns <= leaving_column + self.merge_count)  # [pages, width]
        target_attention = view.sum_by_row(torch.where(targets, attention, 0).sum(-1))  # [R]
        target_count = view.sum_by_row(targets.sum(-1)).clamp(min=1)
        probability = slots["scores"].index_select(0, tokens.slot) * target_count / target_attention  # [R]
        draw = torch.rand(rows, device=probability.device, generator=view.state["cam.generator"])  # set by select()
        merged = draw < probability.nan_to_num(0.0)  # a probability over 1 always merges
        if tokens.leaving is not None:
            merged &= tokens.leaving
        share = tokens.values * (merged / target_count)[:, None].to(tokens.values.dtype)  # [R, D]
        view.slot("values").add_(targets[..., None] * view.by_page(share)[:, None, :])
