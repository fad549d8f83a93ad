"""The projector: each patch's ImageNet class posterior, written with the LM's own word embeddings.

No weights are trained. The classifier head of the vision tower is linear after average pooling, so applying it to
each cell of the feature map gives a per-patch class posterior (whose mean over patches is the image's logits). A
patch token is the LM input embedding of the patch's most likely class name, scaled by that class's probability
(more generally, the posterior-weighted sum over the top-k classes, not renormalised): a confident patch reads as
the word, an unsure background patch fades towards zero instead of adding a random word. Patches on the object
carry its class, the others whatever they look like, so the visual information stays local to the tokens, as in a
real VLM. docs/mini-vlm.md gives the measurements behind top_k=1 and the scaling.
"""

from __future__ import annotations

from importlib import resources

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from modalkv.vlm.encoder import NUM_FEATURES


def class_names() -> list[str]:
    """ImageNet-1k class names in class-id order, each the WordNet lemmas of its synset ("tabby, tabby cat")."""
    text = resources.files("modalkv.vlm").joinpath("imagenet_classes.txt").read_text()
    return text.splitlines()


def class_name_embeddings(embeddings: torch.Tensor, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """[1000, D] the mean LM input embedding of each class's first lemma, as a word inside a sentence (leading space).

    Args:
        embeddings: [V, D] the LM's input embedding matrix.
        tokenizer: the LM's tokenizer.
    """
    rows = []
    for name in class_names():
        ids = tokenizer(" " + name.split(", ")[0], add_special_tokens=False).input_ids
        rows.append(embeddings[ids].mean(0))
    return torch.stack(rows)


class ClassPosteriorProjector(nn.Module):
    """Patch features [B, 1280, h, w] -> LM input embeddings [B, h*w, D] (row-major patches).

    Args:
        classifier: the vision tower's ImageNet head (1280 -> 1000).
        name_embeddings: [1000, D] from `class_name_embeddings`.
        top_k: classes summed per patch, each weighted by its posterior probability.
    """

    def __init__(self, classifier: nn.Linear, name_embeddings: torch.Tensor, top_k: int = 1):
        super().__init__()
        if classifier.in_features != NUM_FEATURES or classifier.out_features != name_embeddings.shape[0]:
            raise ValueError(
                f"the classifier maps {classifier.in_features} -> {classifier.out_features}, expected "
                f"{NUM_FEATURES} -> {name_embeddings.shape[0]} (one name embedding per class)"
            )
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.classifier = classifier
        self.register_buffer("name_embeddings", name_embeddings, persistent=False)
        self.top_k = top_k

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        posterior = self.classifier(features.flatten(2).transpose(1, 2)).softmax(-1)  # [B, h*w, 1000]
        top = posterior.topk(self.top_k, dim=-1)
        return (top.values[..., None] * self.name_embeddings[top.indices]).sum(-2)
