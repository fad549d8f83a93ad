"""Deferred importance on text: a fact the prompt's last queries ignore, needed only later in decoding.

A passkey sits in a long haystack; the prompt asks to list the facts of the text "starting with the colours", so
the observation window looks at the colour sentences, not at the key. The continuation is teacher-forced: three
colour sentences, then "The pass key is <key>." For each method we measure, at the key's tokens (about 20 tokens
into decoding), whether the compressed model's top-1 prediction is the key token (all of them right = recovered)
and the KL divergence to the full cache, plus the KL over the whole continuation.

    python tools/deferred_importance.py --tokens 2000 --prompts 5 --budget 0.2
"""

from __future__ import annotations

import argparse
import random

import torch
import torch.nn.functional as F

from modalkv import CompressedCache, get_press, load_model
from modalkv.compat import CACHE_KWARG
from modalkv.eval.passkey import passkey_example

ASK = "\nList the facts of the text in order, starting with the colours."
CONTINUATION = " The grass is green. The sky is blue. The sun is yellow. The pass key is {key}."
METHODS = [
    ("snapkv", {}),
    ("madakv", {}),
    ("h2o", {}),
    ("retentivekv", {"readout": False}),
    ("retentivekv", {}),
]


@torch.no_grad()
def teacher_forced(model, ids: torch.Tensor, prompt_len: int, press) -> torch.Tensor:
    """[T, V] log-probabilities predicting ids[prompt_len:], one decoding step per token."""
    if press is None:
        logits = model(ids[:, :-1], logits_to_keep=ids.shape[1] - prompt_len).logits[0]
        return F.log_softmax(logits.float(), -1)
    cache = CompressedCache(press)
    with press.attach(model):
        logits = [model(ids[:, :prompt_len], **{CACHE_KWARG: cache}, logits_to_keep=1).logits[0, -1]]
        for column in range(prompt_len, ids.shape[1] - 1):
            logits.append(model(ids[:, column : column + 1], **{CACHE_KWARG: cache}).logits[0, -1])
    return F.log_softmax(torch.stack(logits).float(), -1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--prompts", type=int, default=5)
    parser.add_argument("--budget", type=float, default=0.2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model("smollm2-135m")
    totals: dict[str, list[float]] = {}
    for seed in range(args.prompts):
        depth = random.Random(seed).uniform(0.1, 0.7)
        example = passkey_example(tokenizer, args.tokens, depth, seed)
        prompt = example.text.rsplit("\nWhat is the pass key?", 1)[0] + ASK
        prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
        continuation = tokenizer(CONTINUATION.format(key=example.answer), add_special_tokens=False).input_ids
        key_tokens = len(tokenizer(f" {example.answer}.", add_special_tokens=False).input_ids)
        ids = torch.tensor([prompt_ids + continuation])
        full = teacher_forced(model, ids, len(prompt_ids), None)
        target = ids[0, len(prompt_ids) :]
        at_key = slice(len(continuation) - key_tokens, len(continuation) - 1)  # the key's tokens, not the "."
        rows = [("full", None)] + [
            (get_press(n, args.budget, **p).label(), get_press(n, args.budget, **p)) for n, p in METHODS
        ]
        for label, press in rows:
            logp = teacher_forced(model, ids, len(prompt_ids), press)
            kl = (full.exp() * (full - logp)).sum(-1)
            recovered = bool((logp[at_key].argmax(-1) == target[at_key]).all())
            for name, value in (("recovered", recovered), ("kl_key", kl[at_key].mean()), ("kl_all", kl.mean())):
                totals.setdefault(f"{label}|{name}", []).append(float(value))
        print(f"prompt {seed}: key {example.answer} at depth {depth:.2f}, {len(prompt_ids)} prompt tokens", flush=True)
    print(f"\n| method (budget {args.budget}) | key recovered | KL at the key | KL over the continuation |")
    print("| --- | --- | --- | --- |")
    for label in dict.fromkeys(key.split("|")[0] for key in totals):
        got = {name: totals[f"{label}|{name}"] for name in ("recovered", "kl_key", "kl_all")}
        n = len(got["recovered"])
        kl_key, kl_all = sum(got["kl_key"]) / n, sum(got["kl_all"]) / n
        print(f"| {label} | {int(sum(got['recovered']))}/{n} | {kl_key:.3f} | {kl_all:.3f} |")


if __name__ == "__main__":
    main()
