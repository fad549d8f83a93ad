"""Prefill time of a hybrid model (sliding-window + global layers) under transformers' sdpa and under modalkv's
attention, whose sliding layers attend in blocks of their window (`modalkv.attention.windowed_attention`).

    python tools/sliding_prefill_speed.py --model gemma3-270m --tokens 4000,8000

For each length the two implementations alternate (sdpa, modalkv, sdpa, modalkv) in one process, so that a slow spell
hits both; the forward is `use_cache=False`, so only the attention function differs. Prints the best time of each,
their ratio and the largest difference of the last logits.
"""

from __future__ import annotations

import argparse
import time

import torch

from modalkv.attention import ATTENTION_NAME, register
from modalkv.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--tokens", default="4000,8000", help="comma-separated prompt lengths")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    register()
    model, _ = load_model(args.model)
    lengths = [int(n) for n in args.tokens.split(",")]
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(10, vocab, (1, max(lengths)), generator=torch.Generator().manual_seed(0))
    print("| tokens | transformers sdpa s | modalkv s | speed-up | max logit difference |")
    print("| --- | --- | --- | --- | --- |")
    for length in lengths:
        seconds: dict[str, list[float]] = {"sdpa": [], ATTENTION_NAME: []}
        logits = {}
        for _ in range(args.rounds):
            for implementation in seconds:
                model.set_attn_implementation(implementation)
                start = time.perf_counter()
                with torch.no_grad():
                    logits[implementation] = model(input_ids=ids[:, :length], use_cache=False, logits_to_keep=1).logits
                seconds[implementation].append(time.perf_counter() - start)
        theirs, ours = min(seconds["sdpa"]), min(seconds[ATTENTION_NAME])
        difference = (logits["sdpa"] - logits[ATTENTION_NAME]).abs().max().item()
        print(f"| {length:,} | {theirs:.1f} | {ours:.1f} | {theirs / ours:.2f}x | {difference:.1e} |", flush=True)


if __name__ == "__main__":
    main()
