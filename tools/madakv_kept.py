"""What MadaKV keeps of a `haystack/image` prompt: the decisive picture and its code, against the others.

    python tools/madakv_kept.py --tokens 2000 --examples 5 --budget 0.5

Runs `haystack/image` examples of the Gemma 3 mini-VLM through `madakv` (and SnapKV beside it, `--compare`), keeps
each compressed layer's selection, and prints per example and layer, over the KV heads: the visual share MPA gives
(the mean visual preference of the heads), the share of the decisive picture's patches kept, of its code line's text
tokens kept, and the same two shares over every other picture; then, per token of the decisive code line, the share of
the heads that keep it, and each method's answer. A picture's code line is
the text between it and the next picture (" Code: 48213.\n"); the repeated picture at the end of the prompt is the
query, not counted. What `docs/madakv.md` reads from it is a handful of prompts: an illustration, not a rate.
"""

from __future__ import annotations

import argparse
import itertools
from dataclasses import dataclass, field

import torch

from modalkv.eval.haystack import IMAGE_LINE
from modalkv.eval.tasks import build_task
from modalkv.modality import TEXT
from modalkv.models import load_model
from modalkv.policy import PrefillInputs, Selection
from modalkv.presses import get_press
from modalkv.presses.madakv import MadaKVPress


def recording(base: type) -> type:
    """`base` that keeps, per compressed layer, the kept-token mask [H_kv, S] of batch row 0 and the heads' mean
    visual preference (what MadaKV leaves in the prefill's state for `modalkv heads`), and the prompt's modality map."""

    @dataclass
    class Recording(base):
        kept: dict[int, torch.Tensor] = field(default_factory=dict)
        preference: dict[int, float] = field(default_factory=dict)
        modality: torch.Tensor | None = None  # [S] the prompt's modality map, as the press read it

        def select(self, inputs: PrefillInputs) -> Selection:
            selection = super().select(inputs)
            self.modality = inputs.modality[0]
            mask = torch.zeros(inputs.keys.shape[1], inputs.keys.shape[2], dtype=torch.bool)
            for head, (indices, length) in enumerate(zip(selection.indices[0], selection.lengths[0], strict=True)):
                mask[head, indices[:length]] = True
            self.kept[inputs.layer_idx] = mask
            if inputs.layer_idx in inputs.state.get("heads", {}):
                self.preference[inputs.layer_idx] = float(inputs.state["heads"][inputs.layer_idx][0][0].mean())
            return selection

    return Recording


def pictures_and_codes(modality: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per picture of the haystack (the query picture at the end left out): its patch positions and its code line's."""
    visual = (modality != TEXT).tolist()
    runs, start = [], None
    for position, is_visual in enumerate([*visual, False]):
        if is_visual and start is None:
            start = position
        elif not is_visual and start is not None:
            runs.append((start, position))
            start = None
    pairs = list(itertools.pairwise(runs))  # each haystack picture and the next picture (the last: the query's)
    line = pairs[0][1][0] - pairs[0][0][1]  # every code line has as many tokens (5-digit codes); the last one is
    return [(torch.arange(start, end), torch.arange(end, end + line)) for (start, end), _ in pairs]  # then the question


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--examples", type=int, default=5)
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--compare", default="snapkv", help="a second method to print beside (its answer only)")
    args = parser.parse_args()
    model, processor = load_model("mini-vlm-gemma3")
    task = build_task("haystack", {"tokens": str(args.tokens), "samples": str(args.examples), "families": "image"})
    examples = task.load(processor)[0][: args.examples]
    print(
        "| example | layer | MPA visual preference | decisive picture's patches kept | its code kept |"
        " other pictures' patches kept | their codes kept |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    answers, details = [], []
    tokenizer = processor.tokenizer
    for example in examples:
        press = recording(MadaKVPress)(budget=args.budget)
        outcome = task.evaluate(model, processor, press, example)
        items = pictures_and_codes(press.modality)
        target = example.info["target_index"]
        patches, code = items.pop(target)
        other_patches = torch.cat([picture for picture, _ in items])
        other_codes = torch.cat([line for _, line in items])
        line = IMAGE_LINE.format(key=example.reference)
        labels = tokenizer.convert_ids_to_tokens(tokenizer(line, add_special_tokens=False).input_ids)
        for layer, kept in press.kept.items():
            print(
                f"| {example.id} | {layer} | {press.preference[layer]:.2f} | {kept[:, patches].float().mean():.2f} |"
                f" {kept[:, code].float().mean():.2f} | {kept[:, other_patches].float().mean():.2f} |"
                f" {kept[:, other_codes].float().mean():.2f} |"
            )
            shares = kept[:, code].float().mean(0).tolist()  # heads keeping each token of the decisive code line
            details.append(f"{example.id}, layer {layer}: " + " ".join(
                f"{label!r}:{share:.2f}" for label, share in zip(labels, shares, strict=False)
            ))  # fmt: skip
        other = get_press(args.compare, budget=args.budget)
        compared = task.evaluate(model, processor, other, example).prediction
        answers.append(f"{example.id}: key {example.reference}; madakv {outcome.prediction!r}; "
                       f"{args.compare} {compared!r}")  # fmt: skip
    print("\nShare of the heads keeping each token of the decisive code line:")
    print("\n".join(details))
    print()
    print("\n".join(answers))


if __name__ == "__main__":
    main()
