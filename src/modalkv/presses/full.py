from dataclasses import dataclass

import torch

from modalkv.presses.base import PrefillInputs, Press


@dataclass
class FullPress(Press):
    """Keeps every token, through the same engine as every other press: the reference the others are judged by."""

    name = "full"

    def __post_init__(self) -> None:
        if self.budget != 1.0:
            raise ValueError(f"the full press keeps everything; its budget is 1.0, got {self.budget!r}")

    def num_kept(self, inputs: PrefillInputs) -> torch.Tensor:
        return inputs.is_real.sum(-1)[:, None].expand(-1, inputs.num_kv_heads)
