"""The projector: each patch's ImageNet class posterior, written with the LM's own word embeddings.

No weights are trained. The classifier head of the vision tower is linear after average pooling, so applying it to
each cell of the feature map gives a per-patch class posterior (whose mean over patches is the image's logits).
Patches on the object carry its class, the others whatever they look like, so the visual information stays local to
the tokens, as in a real VLM. Two readings (docs/mini-vlm.md gives the measurements behind each):

- `weighted=True` (SmolLM2's mini-VLM): a patch token is the LM input embedding of the patch's most likely class
  name, scaled by that class's probability (more generally, the posterior-weighted sum over the top-k classes, not
  renormalised): a confident patch reads as the word, an unsure background patch fades towards zero.
- `weighted=False` (Gemma 3's): the most likely class name's embedding at full size, whatever its probability: every
  patch reads as a word. Gemma 3 270M loses track of a long prompt among faded (near-zero) patches.
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


@torch.no_grad()
def class_name_embeddings(
    embeddings: nn.Module, tokenizer: PreTrainedTokenizerBase, word: str = "mean"
) -> torch.Tensor:
    """[1000, D] float32: each class's first lemma as the LM reads it inside a sentence (leading space).

    Args:
        embeddings: the LM's input embedding layer (its output, so that a scaled embedding such as Gemma's is
            written as the LM itself would write the word).
        tokenizer: the LM's tokenizer.
        word: "mean", the mean embedding of the lemma's tokens (" Egyptian cat" -> mean of " Egyptian", " cat");
            "head", its last token (" cat"), a token the LM has actually seen, as a noun phrase's head usually is.
    """
    if word not in ("mean", "head"):
        raise ValueError(f"word must be 'mean' or 'head', got {word!r}")
    rows = []
    weight = next(embeddings.parameters())
    for name in class_names():
        ids = tokenizer(" " + name.split(", ")[0], add_special_tokens=False).input_ids
        if word == "head":
            ids = ids[-1:]
        rows.append(embeddings(torch.tensor(ids, device=weight.device)).float().mean(0))
    return torch.stack(rows)


class ClassPosteriorProjector(nn.Module):
    """Patch features [B, 1280, h, w] -> LM input embeddings [B, h*w, D] (row-major patches).

    Args:
        classifier: the vision tower's ImageNet head (1280 -> 1000).
        name_embeddings: [1000, D] from `class_name_embeddings`.
        top_k: classes summed per patch.
        weighted: each class's embedding scaled by its posterior probability; False: the top class's embedding as it
            is (top_k must be 1).
    """

    def __init__(self, classifier: nn.Linear, name_embeddings: torch.Tensor, top_k: int = 1, weighted: bool = True):
        super().__init__()
        if classifier.in_features != NUM_FEATURES or classifier.out_features != name_embeddings.shape[0]:
            raise ValueError(
                f"the classifier maps {classifier.in_features} -> {classifier.out_features}, expected "
                f"{NUM_FEATURES} -> {name_embeddings.shape[0]} (one name embedding per class)"
            )
        if top_k < 1 or (not weighted and top_k != 1):
            raise ValueError(f"top_k must be >= 1, and 1 without weighting; got {top_k} (weighted={weighted})")
        self.classifier = classifier
        self.register_buffer("name_embeddings", name_embeddings, persistent=False)
        self.top_k = top_k
        self.weighted = weighted

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(features.flatten(2).transpose(1, 2))  # [B, h*w, 1000]
        if not self.weighted:
            return self.name_embeddings[logits.argmax(-1)]
        top = logits.softmax(-1).topk(self.top_k, dim=-1)
        return (top.values[..., None] * self.name_embeddings[top.indices]).sum(-2)
