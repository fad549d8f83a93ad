"""Decode speed of NVIDIA kvpress's SnapKV next to transformers' DynamicCache, timed as `modalkv bench` times it.

Standalone: it does not import modalkv. kvpress 0.5.5 needs transformers < 5.3, so run it with the python of a
separate virtual environment (set-up in docs/reference-check.md); tools/peer_bench.py runs it beside modalkv:

    /tmp/kvpress-venv/bin/python tools/kvpress_speed.py --model-dir ~/.cache/modalkv/smollm2-135m-float32 \\
        --text-file src/modalkv/eval/data/python_reference.txt --context 8192 --threads 2 --decode-tokens 48

The prompt is the first `--context` tokens of the text (no special tokens, no chat template). Cells, in this order:

- `dynamic_cache`: transformers' DynamicCache, greedy, exactly as modalkv.bench.measure runs its baseline;
- `kvpress_snapkv`: SnapKVPress(compression_ratio=1 - budget). The prefill runs inside `with press(model)`, as
  kvpress's pipeline does, and the decode loop after it, outside the context manager, with explicit `position_ids`,
  as the pipeline's `generate_answer` does: a compressed DynamicCache reports the kept length, not the tokens seen,
  so positions must be given. The hooks are then gone: this is kvpress's own fastest decode path;
- `kvpress_snapkv_hooked` (only with `--decode-in-press`): the same, but decoding inside `with press(model)`, as the
  kvpress README's `with press(model): model.generate(...)` does (every layer's hook runs on every step and returns).

Timing as modalkv.bench.measure: `torch.set_num_threads(--threads)`, the prefill timed with the last position's
logits only (`logits_to_keep=1`), then `--decode-tokens` steps each timed alone; decode ms/token is the median
over the steps after 2 warm-up steps.
`cache_bytes` is what the cache holds after decoding; `full_cache_bytes` what an uncompressed one would hold.
Prints one JSON object per line.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import json
import statistics
import time
from pathlib import Path

import kvpress
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WARMUP = 2


def prompt_ids(tokenizer, text_file: Path, context: int) -> torch.Tensor:
    """[1, context] ids: the text's first `context` tokens, tokenised without special tokens."""
    ids = tokenizer(text_file.read_text(encoding="utf-8"), add_special_tokens=False, return_tensors="pt").input_ids
    if ids.shape[1] < context:
        raise SystemExit(f"{text_file} has {ids.shape[1]} tokens, fewer than --context {context}")
    return ids[:, :context]


def ids_digest(ids: torch.Tensor) -> str:
    """sha256 of the prompt ids, so that two tools can check they timed the same prompt."""
    return hashlib.sha256(",".join(map(str, ids[0].tolist())).encode()).hexdigest()[:16]


@torch.no_grad()
def measure(model, prompt: torch.Tensor, decode_tokens: int, press=None, decode_in_press: bool = False) -> dict:
    """Greedy prefill + `decode_tokens` steps; `press=None` is the DynamicCache baseline."""
    cache = DynamicCache()
    context = prompt.shape[1]
    with contextlib.nullcontext() if press is None else press(model):
        start = time.perf_counter()
        logits = model(prompt, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        prefill = time.perf_counter() - start
    tokens, steps = [logits.argmax(-1)], []
    with press(model) if decode_in_press else contextlib.nullcontext():
        for step in range(decode_tokens):
            # The baseline's cache holds every token, so transformers' default positions are right (as in modalkv's
            # bench); a compressed one needs them given, as kvpress's pipeline gives them.
            positions = None if press is None else torch.tensor([[context + step]])
            start = time.perf_counter()
            logits = model(tokens[-1], past_key_values=cache, use_cache=True, position_ids=positions).logits[:, -1:]
            steps.append(time.perf_counter() - start)
            tokens.append(logits.argmax(-1))
    layers = cache.layers
    per_token = layers[0].keys.element_size() * layers[0].keys.shape[1] * layers[0].keys.shape[3] * 2 * len(layers)
    return {
        "prefill_seconds": prefill,
        "decode_ms_per_token": 1000 * statistics.median(steps[WARMUP:] or steps),
        "cache_bytes": sum(layer.keys.nbytes + layer.values.nbytes for layer in layers),
        "full_cache_bytes": per_token * (context + decode_tokens),
        "kept_tokens_layer0": layers[0].keys.shape[2],
        "tokens": [int(t) for t in tokens],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True, help="transformers checkpoint folder")
    parser.add_argument("--text-file", type=Path, required=True, help="the prompt is its first --context tokens")
    parser.add_argument("--context", type=int, required=True, help="prompt length in tokens")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--budget", type=float, default=0.2, help="kept ratio: SnapKVPress(compression_ratio=1 - it)")
    parser.add_argument("--decode-in-press", action="store_true", help="also time decoding inside `with press(model)`")
    args = parser.parse_args()
    if args.decode_tokens <= WARMUP:
        raise SystemExit(f"--decode-tokens must exceed the {WARMUP} warm-up steps")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    transformers.utils.logging.disable_progress_bar()
    model_dir = args.model_dir.expanduser()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[args.dtype], attn_implementation="sdpa")
    model.eval()
    prompt = prompt_ids(AutoTokenizer.from_pretrained(model_dir), args.text_file, args.context)
    common = {
        "tool": "kvpress",
        "context": args.context,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "decode_tokens": args.decode_tokens,
        "prompt_sha256": ids_digest(prompt),
        "versions": {
            "kvpress": importlib.metadata.version("kvpress"),
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
    }
    press = kvpress.SnapKVPress(compression_ratio=1 - args.budget)
    cells = [("dynamic_cache", 1.0, None, False), ("kvpress_snapkv", args.budget, press, False)]
    if args.decode_in_press:
        cells.append(("kvpress_snapkv_hooked", args.budget, press, True))
    for method, budget, cell_press, hooked in cells:
        result = measure(model, prompt, args.decode_tokens, cell_press, hooked)
        print(json.dumps({"method": method, "budget": budget} | common | result), flush=True)


if __name__ == "__main__":
    main()
