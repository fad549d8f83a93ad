"""Peak memory of one prefill, measured in a fresh process (`python -m modalkv.prefill_memory ...`).

In a long-lived process the allocator keeps what earlier runs freed, so peaks of successive runs cannot be told
apart; a fresh process per measurement can. Resident memory is sampled every 2 ms during the prefill; the figure is
the peak minus the resident memory just before it (weights and libraries excluded). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading

import torch
from transformers import DynamicCache

from modalkv.cache import CompressedCache
from modalkv.compat import CACHE_KWARG
from modalkv.models import load_model, parse_dtype
from modalkv.presses import get_press


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def prefill_peak(model, press, context: int) -> dict:
    """Peak resident memory added by one prefill of `context` random tokens (press None: DynamicCache)."""
    prompt = torch.randint(0, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(prompt[:, :8])  # load kernels and thread pools before the baseline reading
    cache = DynamicCache() if press is None else CompressedCache(press)
    before = resident_bytes()
    peak, stop = before, threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.wait(0.002):
            peak = max(peak, resident_bytes())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    with torch.no_grad(), press.attach(model) if press is not None else torch.no_grad():
        # Logits for the last position only, as generate() asks: [S, vocab] logits would dwarf the cache.
        model(prompt, **{CACHE_KWARG: cache}, use_cache=True, logits_to_keep=1)
    stop.set()
    sampler.join()
    peak = max(peak, resident_bytes())
    if press is None:
        held = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    else:
        held = cache.cache_bytes()
    return {"context": context, "prefill_peak_mib": (peak - before) / 2**20, "cache_mib": held / 2**20}


def measure_in_subprocess(model: str, dtype: str, method: str, budget: float | int, context: int) -> dict:
    """Runs `prefill_peak` in a fresh Python process; `method` "dynamic_cache" is the uncompressed baseline."""
    command = [sys.executable, "-m", "modalkv.prefill_memory", model, dtype, method, str(budget), str(context)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"memory measurement failed ({method}, {context} tokens): {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    for name in ("model", "dtype", "method", "budget", "context"):
        parser.add_argument(name)
    args = parser.parse_args()
    torch.set_num_threads(1)  # memory, not speed: one thread keeps per-thread scratch buffers out of the figure
    model, _ = load_model(args.model, dtype=parse_dtype(args.dtype))
    budget = float(args.budget)
    press = (
        None if args.method == "dynamic_cache" else get_press(args.method, budget=int(budget) if budget > 1 else budget)
    )
    print(json.dumps(prefill_peak(model, press, int(args.context))))


if __name__ == "__main__":
    main()
