from dataclasses import dataclass

import torch

from modalkv.presses.base import PrefillInputs, Press


@dataclass
class RandomPress(Press):
    """Random baseline: keeps a uniformly random subset of each KV head's tokens.

    The reference point every scoring rule should beat (kvpress 0.5 `random_press.py`; no paper). Default
    `seed=None` as kvpress: a fresh random choice at every call. With a seed every call (hence every layer, as in
    kvpress, which reseeds on each call) draws the same scores for the same shape. GQA: each KV head draws its own
    scores.

    Unlike kvpress, which calls `torch.manual_seed`, the scores come from a local `torch.Generator` (on the CPU, so
    a seed gives the same tokens on every device): the global RNG, and so sampling in `generate()`, is untouched.
    """

    seed: int | None = None
    name = "random"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.seed is not None and type(self.seed) is not int:
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")

    def score(self, inputs: PrefillInputs) -> torch.Tensor:
        generator = torch.Generator()
        if self.seed is None:
            generator.seed()  # nondeterministic, from OS entropy
        else:
            generator.manual_seed(self.seed)
        return torch.rand(inputs.keys.shape[:3], generator=generator).to(inputs.keys.device)  # [B, H_kv, S]
