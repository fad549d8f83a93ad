"""Where RetentiveKV's retention score R puts a haystack's pass key, layer by layer, against attention alone.

    python tools/retention_ranks.py --tokens 2000 --example 0 --budget 0.5

Runs one `haystack/needle` example of the Gemma 3 mini-VLM through `retentivekv` (its own prefill), keeps what the
press computed at each compressed layer (each token's window attention alpha and entropy term H, for the first KV
head), and prints: the first token's share of the window's attention, the median rank of the text candidates under R,
and the rank of each of the key's digit tokens under R and under alpha alone, beside how many candidates fit beside
the window. Then the answers with `readout` on and off and with `attention_weight=1`. What `docs/retentivekv.md`
reads from it is one prompt: an illustration of the mechanism, not a rate.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import torch

from modalkv.eval.tasks import build_task, encode_example
from modalkv.modality import TEXT
from modalkv.models import load_model
from modalkv.policy import PrefillInputs
from modalkv.presses import get_press, parse_method
from modalkv.presses.retentivekv import RetentiveKVPress


@dataclass
class RecordingRetentiveKV(RetentiveKVPress):
    """RetentiveKV that keeps, per compressed layer, the inputs of its entropy term and the term itself."""

    layers: list[tuple[PrefillInputs, torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def entropy(self, inputs: PrefillInputs, alpha: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        entropy = super().entropy(inputs, alpha, candidates)
        self.layers.append((inputs, alpha, entropy, candidates))
        return entropy


def ranks(scores: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    """[S] rank of each position (0 = highest) among `members`; the others rank after them."""
    order = scores.masked_fill(~members, float("-inf")).argsort(descending=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    return rank


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--example", type=int, default=0, help="which needle example (0 = the first)")
    parser.add_argument("--budget", type=float, default=0.5)
    args = parser.parse_args()
    model, processor = load_model("mini-vlm-gemma3")
    task = build_task("haystack", {"tokens": str(args.tokens), "samples": str(args.example + 1), "families": "needle"})
    example = task.load(processor)[0][args.example]
    ids = encode_example(model, processor, example)[0]["input_ids"][0].tolist()
    tokenizer = processor.tokenizer
    press = RecordingRetentiveKV(budget=args.budget)
    answer = task.evaluate(model, processor, press, example).prediction
    digits = [
        i
        for i, token in enumerate(ids[: -press.window_size])
        if tokenizer.decode([token]).strip() in set(example.reference)
    ]
    print(f"{example.id}: key {example.reference}, {len(ids)} tokens, key digit tokens at {digits}")
    print(
        "| layer | first token's alpha | text candidates | median text rank by R | fit beside the window |"
        " key digits' ranks by R | by alpha alone |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for inputs, alpha, entropy, candidates in press.layers:
        row_alpha, row_candidates = alpha[0, 0], candidates[0]
        by_retention = ranks(press.retention(alpha, entropy, candidates)[0, 0], row_candidates)
        by_alpha = ranks(row_alpha, row_candidates)
        text = row_candidates & (inputs.modality[0] == TEXT)
        fit = int(press.num_kept(inputs)[0, 0]) - press.window_size
        print(
            f"| {inputs.layer_idx} | {float(row_alpha[0]):.3f} | {int(text.sum())} of {int(row_candidates.sum())} |"
            f" {int(by_retention[text].median())} | {fit} | {by_retention[digits].tolist()} |"
            f" {by_alpha[digits].tolist()} |"
        )
    print(f"\nanswer with readout: {answer!r}")
    for spec in ("retentivekv(readout=false)", "retentivekv(attention_weight=1)"):
        name, params = parse_method(spec)
        other = get_press(name, budget=args.budget, **params)
        print(f"answer of {spec}: {task.evaluate(model, processor, other, example).prediction!r}")


if __name__ == "__main__":
    main()
