"""The projector: each patch's ImageNet class posterior, written with the LM's own word embeddings.

No weights are trained. The classifier head of the vision tower is linear after average pooling, so applying it to
each cell of the feature map gives a per-patch class posterior (whose mean over patches is the image's logits). A
patch token is then the posterior-weighted mean of the LM's input embeddings of its top-k class names: a soft
"word" that the language model already reads. Patches on the object carry its class; background patches carry
whatever they look like, so the visual information stays local to the tokens, as in a real VLM.
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
        top_k: classes mixed per patch; the rest of the posterior is dropped (it only blurs the word).
        temperature: divides the logits before the softmax over the top-k.
    """

    def __init__(self, classifier: nn.Linear, name_embeddings: torch.Tensor, top_k: int = 1, temperature: float = 1.0):
        super().__init__()
        if classifier.in_features != NUM_FEATURES or classifier.out_features != name_embeddings.shape[0]:
            raise ValueError(
                f"the classifier maps {classifier.in_features} -> {classifier.out_features}, expected "
                f"{NUM_FEATURES} -> {name_embeddings.shape[0]} (one name embedding per class)"
            )
        if top_k < 1 or temperature <= 0:
            raise ValueError(f"top_k must be >= 1 and temperature > 0, got {top_k} and {temperature}")
        self.classifier = classifier
        self.register_buffer("name_embeddings", name_embeddings, persistent=False)
        self.top_k, self.temperature = top_k, temperature

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(features.flatten(2).transpose(1, 2))  # [B, h*w, 1000]
        top = logits.topk(self.top_k, dim=-1)
        weights = (top.values / self.temperature).softmax(-1)  # [B, h*w, k]
        return (weights[..., None] * self.name_embeddings[top.indices]).sum(-2)
