import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from modalkv.policy import attention_windows
from modalkv.presses.base import (
    CalibratedPress,
    PrefillInputs,
    Press,
    Selection,
    WrapperPress,
    selection_from_mask,
    tokens_for_budget,
)
from modalkv.presses.scoring import keeps_everything, share, top_within
from modalkv.presses.snapkv import SnapKVPress


@dataclass
class SparseMMPress(WrapperPress, CalibratedPress):
    """SparseMM: head budgets from each head's visual score, around a scoring press (`sparsemm:<press>`).

    Wang et al., "SparseMM: Head Sparsity Emerges from Visual Concept Responses in MLLMs", https://arxiv.org/abs/2506.05344
    (code github.com/CR400AF-A/SparseMM). As the authors' code: a KV head's visual score is the sum of its query
    heads' (measured once per model by `modalkv calibrate`, their OCR criterion on our pictures: see
    `modalkv.calibrate`), normalised over all heads of all layers. Each head keeps the inner press's window, plus a
    floor of `ratio` of the rest of the per-head budget, plus its share of what remains of the whole model's budget
    (layers x heads x that rest), in proportion to its visual score; within that count it keeps the inner press's top
    scores. Default inner press: SnapKV with a 32-token window, average pooling, kernel 5 (the authors' settings);
    `ratio` 0.1 as their scripts. So all layers and heads together keep exactly L x H_kv x budget tokens.

    Our resolutions: the shares are split exactly (largest remainders, not rounded per head), and a head whose share
    exceeds its prompt passes the excess on to the others in proportion (the authors' code drops it); on a hybrid model
    the budgets spread over the global layers only, by their scores.
    """

    press: Press = field(default_factory=lambda: SnapKVPress(window_size=32))
    ratio: float = 0.1
    name = "sparsemm"
    inner_defaults = {"window_size": 32}  # noqa: RUF012 (class attribute): the authors' window for any inner press

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.ratio <= 1:
            raise ValueError(f"ratio must be in [0, 1], got {self.ratio}")

    @contextmanager
    def using(self, model: PreTrainedModel) -> Iterator[None]:
        with ExitStack() as stack:
            stack.enter_context(CalibratedPress.using(self, model))
            stack.enter_context(self.press.using(model))
            yield

    def head_budgets(self, inputs: PrefillInputs) -> torch.Tensor:
        """[B, L, H_kv] tokens each KV head of each compressed layer keeps (see the class docstring)."""
        statistics = self.statistics()
        if warning := statistics.no_visual_head_warning():  # once per process (the warnings module's default)
            warnings.warn(warning, stacklevel=2)
        visual = statistics.visual_scores().to(inputs.keys.device)  # [L_model, H]
        compressed = [i for i, window in enumerate(attention_windows(inputs.module.config)) if window is None]
        heads = inputs.num_kv_heads
        weights = visual[compressed].view(len(compressed), heads, -1).sum(-1).flatten()  # [L * H_kv]
        num_real = inputs.is_real.sum(-1)
        per_head = tokens_for_budget(self.budget, num_real)  # [B]
        protected = self.press.always_kept(inputs)
        window = per_head.new_zeros(per_head.shape) if protected is None else protected.sum(-1).minimum(per_head)
        floor = ((per_head - window) * self.ratio + 1e-9).floor().long()
        pool = (per_head - window - floor) * weights.numel()
        room = (num_real - window - floor)[:, None].expand(-1, weights.numel())
        extra = share(pool, weights[None].expand_as(room), room)
        return (window + floor)[:, None, None] + extra.view(-1, len(compressed), heads)

    def select(self, inputs: PrefillInputs) -> Selection:
        is_real = inputs.is_real
        if keeps_everything(self.budget, is_real):
            return Press.select(self, inputs)  # nothing to evict: keep all, exactly as every press does
        if inputs.layer_idx == 0:  # the first compressed layer of a prefill: every layer's budgets at once
            inputs.state["sparsemm"] = self.head_budgets(inputs)
        kept = inputs.state["sparsemm"][:, inputs.layer_idx]  # [B, H_kv]
        scores = self.press.ranking(inputs, self.press.score(inputs).float())
        return selection_from_mask(top_within(scores, is_real, kept))
