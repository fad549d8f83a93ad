from dataclasses import dataclass

import torch

from modalkv.presses.base import DecodeView, PrefillInputs, Press


@dataclass
class RandomPress(Press):
    """Random baseline: keeps a uniformly random subset of each KV head's tokens.

    The reference point every scoring rule should beat (kvpress 0.5 `random_press.py`; no paper). Default
    `seed=None` as kvpress: a fresh random choice at every call. With a seed every call (hence every layer, as in
    kvpress, which reseeds on each call) draws the same scores for the same shape. GQA: each KV head draws its own
    scores.

    Unlike kvpress, which calls `torch.manual_seed`, the scores come from a local `torch.Generator` (on the CPU, so
    a seed gives the same tokens on every device): the global RNG, and so sampling in `generate()`, is untouched.
    With `evict_every=N`, random tokens are evicted every N decoding steps.
    """

    seed: int | None = None
    name = "random"
    batch_invariant = False  # one draw over the whole batch

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.seed is not None and type(self.seed) is not int:
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")

    def score(self, inputs: PrefillInputs) -> torch.Tensor:
        return self._draw(inputs.keys.shape[:3], self.seed).to(inputs.keys.device)  # [B, H_kv, S]

    def decode_scores(self, view: DecodeView) -> torch.Tensor:
        # With `evict_every`: a fresh draw per eviction, reproducible from (seed, tokens seen).
        seed = None if self.seed is None else hash((self.seed, view.seen)) % 2**63
        keys = view.slot("keys")
        return self._draw(keys.shape[:2], seed).to(keys.device)

    @staticmethod
    def _draw(shape: tuple[int, ...], seed: int | None) -> torch.Tensor:
        generator = torch.Generator()
        if seed is None:
            generator.seed()  # nondeterministic, from OS entropy
        else:
            generator.manual_seed(seed)
        return torch.rand(shape, generator=generator)
