"""KeyDiffPress on hand-made tensors: kvpress 0.5.5's score, and padding left out of the anchor."""

import torch
import torch.nn.functional as F
from prefill import kept_sets, make_inputs

from modalkv import get_press


def kvpress_keydiff_scores(keys: torch.Tensor) -> torch.Tensor:
    """kvpress 0.5.5 KeyDiffPress.score: minus the cosine to the mean unit key."""
    anchor = F.normalize(keys, p=2, dim=-1).mean(dim=2, keepdim=True)
    return -F.cosine_similarity(keys, anchor, dim=-1)


def test_scores_and_kept_sets_are_kvpress_ones():
    inputs = make_inputs(seq=40, dim=8)
    press = get_press("keydiff", budget=0.25)
    reference = kvpress_keydiff_scores(inputs.keys)
    assert torch.allclose(press.score(inputs), reference, atol=1e-6)
    expected = [sorted(head.topk(10).indices.tolist()) for head in reference[0]]
    assert kept_sets(press, inputs) == [expected]


def test_padding_is_not_in_the_anchor():
    alone = make_inputs(seq=30, seed=3)
    padded = make_inputs(seq=36, seed=3, is_real=torch.tensor([[False] * 6 + [True] * 30]))
    padded.keys[:, :, 6:] = alone.keys
    padded.keys[:, :, :6] = 50.0  # large padding keys would pull a padded anchor towards them
    press = get_press("keydiff", budget=0.3)
    shifted = [[[p + 6 for p in head] for head in row] for row in kept_sets(press, alone)]
    assert kept_sets(press, padded) == shifted
