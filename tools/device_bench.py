"""Decode speed and prefill memory of the main methods on a machine without the embedded weights (a lent GPU box).

Builds SmolLM2-135M's architecture from its config with random weights (decode cost does not depend on the weight
values: every method keeps the same number of tokens either way) and runs `modalkv.bench.run_grid` on random-token
prompts, every number a ratio measured in the same run. On CUDA it also reports the prefill's peak GPU memory per
method (the allocator's own peak, exact), next to transformers' DynamicCache.

    python tools/device_bench.py --config DIR --device cuda --dtype bfloat16 --context 8192 --compile --out result.json

`--compile` adds every method with a compiled decoding step (CUDA graphs on a GPU) and transformers' StaticCache +
compile as a peer. `--check` first runs the engine's equivalences on the device, for every method in fp32 and bf16:
keeping everything equals DynamicCache (greedy tokens), and decoding after eviction equals a DynamicCache holding
exactly the kept tokens (logits); they have otherwise only run on CPU (tests/).

`--profile METHOD` instead prefills one prompt with METHOD at budget 0.2 and prints torch.profiler's tables (by
device time and by host time, with input shapes) over 5 decoding steps: the first thing to run when a method is
slow on one device and not on another (MadaKV on the H100, docs/benchmark.md).
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

from modalkv import PRESSES as METHODS
from modalkv import CompressedCache, get_press
from modalkv.bench import run_grid
from modalkv.compat import CACHE_KWARG
from modalkv.models import parse_dtype

PRESSES = [
    ("full", 1.0, {}),
    ("snapkv", 0.2, {}),
    ("madakv", 0.2, {}),
    ("retentivekv", 0.2, {}),
    ("retentivekv", 0.2, {"readout": False}),
]


@torch.no_grad()
def gpu_prefill_peak(model, press, prompt: torch.Tensor) -> int:
    """Bytes the prefill adds at its peak on the GPU, weights excluded (press None: DynamicCache)."""
    cache = DynamicCache() if press is None else CompressedCache(press)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    if press is None:
        model(prompt, **{CACHE_KWARG: cache}, use_cache=True, logits_to_keep=1)
    else:
        with press.attach(model):
            model(prompt, **{CACHE_KWARG: cache}, use_cache=True, logits_to_keep=1)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


@torch.no_grad()
def profile_decode(model, press, prompt: torch.Tensor, steps: int = 5) -> None:
    """Prints where `steps` decoding steps after a compressed prefill spend host and device time."""
    from torch.profiler import ProfilerActivity, profile

    cache = CompressedCache(press)
    with press.attach(model):
        token = model(prompt, **{CACHE_KWARG: cache}, use_cache=True, logits_to_keep=1).logits.argmax(-1)
        for _ in range(3):  # warm-up: kernels chosen, buffers grown
            token = model(token, **{CACHE_KWARG: cache}, use_cache=True).logits.argmax(-1)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if prompt.is_cuda else [])
        with profile(activities=activities, record_shapes=True) as profiler:
            for _ in range(steps):
                token = model(token, **{CACHE_KWARG: cache}, use_cache=True).logits.argmax(-1)
            if prompt.is_cuda:
                torch.cuda.synchronize()
    ragged = sum(layer.rows.uniform_length is None for layer in cache.layers)
    print(f"{press.label()}: {ragged} of {len(cache.layers)} layers with ragged (paged) rows; {steps} steps profiled")
    averages = profiler.key_averages(group_by_input_shape=True)
    if prompt.is_cuda:
        print(averages.table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=60))
    print(averages.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))


@torch.no_grad()
def check_equivalences(model, prompt: torch.Tensor) -> dict[str, float | None]:
    """Per method: the largest logit gap to a DynamicCache holding exactly the kept prompt tokens, over 6 greedy
    steps, keeping everything (budget 1.0) and after eviction (0.3); None where heads keep different numbers."""
    gaps = {}
    for name in METHODS:
        for budget in (1.0,) if name == "full" else (1.0, 0.3):
            gaps[f"{name}@{budget}"] = eviction_gap(model, prompt, get_press(name, budget=budget, evict_every=0))
    return gaps


def eviction_gap(model, prompt: torch.Tensor, press) -> float | None:
    """Max |logit| difference over 6 greedy steps between the compressed cache and a DynamicCache holding exactly
    the prompt tokens it kept; None when heads keep different numbers (no single DynamicCache can hold them)."""
    cache = CompressedCache(press)
    with press.attach(model):
        logits = [model(prompt, **{CACHE_KWARG: cache}).logits[:, -1]]
        kept = [layer[0] for layer in cache.kept_positions()]  # [layer][head] -> positions, batch row 0
        for _ in range(6):
            logits.append(model(logits[-1].argmax(-1, keepdim=True), **{CACHE_KWARG: cache}).logits[:, -1])
    if any(len({len(head) for head in heads}) > 1 for heads in kept):
        return None
    reference = DynamicCache()
    model(prompt, **{CACHE_KWARG: reference})
    for layer, heads in zip(reference.layers, kept, strict=True):
        index = torch.tensor(heads, device=prompt.device)[None, :, :, None].expand(1, -1, -1, layer.keys.shape[-1])
        layer.keys, layer.values = layer.keys.gather(2, index), layer.values.gather(2, index)
    expected = []
    for step in range(6):
        position = torch.tensor([[prompt.shape[1] + step]], device=prompt.device)
        token = logits[step].argmax(-1, keepdim=True)
        expected.append(model(token, **{CACHE_KWARG: reference}, position_ids=position).logits[:, -1])
    return float((torch.stack(logits[1:]) - torch.stack(expected)).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="folder with SmolLM2's config.json")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--context", default="8192")
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", help="JSON file for the results (required unless --profile)")
    parser.add_argument("--profile", metavar="METHOD", help="profile decoding with METHOD at 0.2 instead")
    parser.add_argument("--compile", action="store_true", help="also compiled decoding, and StaticCache + compile")
    parser.add_argument("--check", action="store_true", help="first check the engine's equivalences on the device")
    args = parser.parse_args()
    if not args.out and not args.profile:
        parser.error("--out is required (or --profile METHOD)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(args.config)
    model = AutoModelForCausalLM.from_config(config, dtype=parse_dtype(args.dtype), attn_implementation="sdpa")
    model = model.to(args.device).eval()
    generator = torch.Generator().manual_seed(0)

    def prompt_of_length(length: int) -> torch.Tensor:
        return torch.randint(0, config.vocab_size, (1, length), generator=generator).to(args.device)

    contexts = [int(c) for c in args.context.split(",")]
    checks = {}
    if args.check:
        for dtype, tolerance in (("float32", 1e-3), ("bfloat16", 0.1)):
            checked = AutoModelForCausalLM.from_config(config, dtype=parse_dtype(dtype), attn_implementation="sdpa")
            gaps = check_equivalences(checked.to(args.device).eval(), prompt_of_length(96))
            checks[dtype] = gaps
            failed = {k: g for k, g in gaps.items() if g is not None and g > tolerance}
            print(f"equivalences, {dtype}: {len(gaps) - len(failed)}/{len(gaps)} within {tolerance} {failed or ''}")
            print("  " + ", ".join(f"{k} {'n/a' if g is None else f'{g:.1e}'}" for k, g in gaps.items()))
    if args.profile:
        profile_decode(model, get_press(args.profile, budget=0.2), prompt_of_length(contexts[-1]))
        return
    presses = [get_press(name, budget, **params) for name, budget, params in PRESSES]

    def report(run) -> None:
        print(f"{run.context} tokens, {run.method}: {run.decode_ms_per_token:.2f} ms/token", flush=True)

    rows = run_grid(
        model, prompt_of_length, presses, contexts, args.decode_tokens, args.repeats, report, compile=args.compile
    )
    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU, {args.threads} threads"
    result = {"device": device_name, "dtype": args.dtype, "rows": rows, "equivalence_gaps": checks}
    print(f"{device_name}, {args.dtype}")
    print("| context | method | budget | ms/token | DynamicCache ms/token | speed-up | vs floor | cache ratio | ops |")
    for row in rows:
        ops = row["ops_per_layer_step"]
        print(
            f"| {row['context']} | {row['method']} | {row['budget']} | {row['decode_ms_per_token']:.2f} | "
            f"{row['baseline_ms_per_token']:.2f} | {row['decode_speedup']:.2f}x | {row['vs_floor']:.2f} | "
            f"{row['cache_ratio']:.3f} | {'' if ops is None else f'{ops:.1f}'} |"
        )
    if args.device == "cuda":
        prompt = prompt_of_length(contexts[-1])
        peaks = {"dynamic_cache": gpu_prefill_peak(model, None, prompt)}
        peaks |= {press.label(): gpu_prefill_peak(model, press, prompt) for press in presses}
        result["gpu_prefill_peak_bytes"] = peaks
        for label, peak in peaks.items():
            print(f"prefill peak GPU memory at {contexts[-1]} tokens, {label}: {peak / 2**20:.0f} MiB")
    with open(args.out, "w") as file:
        json.dump(result, file, indent=1)


if __name__ == "__main__":
    main()
