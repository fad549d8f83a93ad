"""Decode speed, throughput and memory of the main methods at the papers' scale, on a machine without the embedded
weights (a lent GPU box): one prepared command.

Builds a language model from its shape with random weights: `--shape llama-2-7b` (LLaVA-1.5-7B's language model,
Vicuna-7B = Llama-2-7B: 32 layers, 32 query and 32 KV heads, head dim 128), `qwen2-vl-7b` (Qwen2-VL-7B's: 28 layers,
28 query / 4 KV heads; plain RoPE instead of M-RoPE, the same cost), `smollm2-135m`, `tiny` (a smoke test), or
`--config DIR`. Decode cost does not depend on the weight values: every method keeps the same number of tokens
either way, so the figures stand for the real checkpoints' speed and memory, not their accuracy. Prompts are random
tokens, distinct per row. Every ratio is to transformers' DynamicCache measured in the same run.

    python tools/device_bench.py --shape llama-2-7b --device cuda --dtype bfloat16 \
        --context 8192,16384,32768 --compile --serving --time-budget 540 --out result.json

Phases, in this order, each skipped (and said so) when `--time-budget` seconds would be exceeded:
1. `--check`: the engine's equivalences on the device for every method, fp32 and bf16, on a small model of the
   same family (keeping everything equals DynamicCache; decoding after eviction equals a DynamicCache holding the
   kept tokens).
2. Batch 1, every context (longest first), DynamicCache, the floor and every method at every budget, eager.
3. `--compile`: at the longest context, budget 0.2: every method eager and compiled, StaticCache + compile.
4. `--serving`, per context (longest first): the largest batch DynamicCache fits in `--memory-fraction` of the
   device (found by measurement, `modalkv.peak_memory`), every method's tokens/s at that batch; then each method's
   own largest batch under the same limit and its tokens/s there.
On CUDA every peak is the allocator's own (exact). On a CPU phase 4 measures in this one process (a smoke test of the
script: freed memory stays with the allocator); CPU figures come from `modalkv bench --memory-limit`, one fresh
process per trial.

`--profile METHOD` instead prefills one prompt with METHOD at budget 0.2 and prints torch.profiler's tables (by
device time and by host time, with input shapes) over 5 decoding steps: the first thing to run when a method is
slow on one device and not on another (MadaKV on the H100, docs/benchmark.md).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, LlamaConfig, Qwen2Config

from modalkv import PRESSES as METHODS
from modalkv import CompressedCache, get_press
from modalkv.bench import Prompts, run_grid
from modalkv.compat import CACHE_KWARG
from modalkv.models import parse_dtype
from modalkv.peak_memory import DISTINCT_PROMPTS, largest_batch, prefill_peak, serving_peak
from modalkv.presses import Press
from modalkv.presses.base import CalibratedPress

POSITIONS = 40960  # the shapes' position limit, raised where needed for 32k prompts (random weights: no scaling)
SHAPES = {
    "llama-2-7b": lambda: LlamaConfig(
        vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, rms_norm_eps=1e-5, max_position_embeddings=POSITIONS,
    ),
    "qwen2-vl-7b": lambda: Qwen2Config(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=POSITIONS,
    ),
    "smollm2-135m": lambda: LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, rms_norm_eps=1e-5, rope_theta=1e5, max_position_embeddings=8192,
        tie_word_embeddings=True,
    ),
    "tiny": lambda: LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048,
    ),
}  # fmt: skip
MAIN_METHODS = "full,snapkv,madakv,retentivekv"


def build_model(config, dtype: torch.dtype, device: str):
    """Random weights of `config`, made directly on `device` (a 7B model in bf16 takes seconds on a GPU)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


class Deadline:
    """What is left of `--time-budget`; a phase runs only if its estimate fits, else it is recorded as skipped."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds
        self.skipped: list[str] = []

    def allows(self, phase: str, estimate: float = 0.0) -> bool:
        left = self.end - time.monotonic()
        if left < estimate:
            self.skipped.append(f"{phase} (estimated {estimate:.0f} s, {max(left, 0):.0f} s left)")
            print(f"skipped: {self.skipped[-1]}", flush=True)
            return False
        return True


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
        if name == "kvzip":  # it words its repetition request with the model's tokenizer: random weights have none
            continue
        if issubclass(METHODS[name], CalibratedPress):  # head statistics: `modalkv calibrate` on real weights
            continue
        if name == "cam":  # it exists to merge while decoding (evict_every >= 1); its prefill is streaming_llm's
            continue
        for budget in (1.0,) if name == "full" else (1.0, 0.3):
            # RetentiveKV's read-out adds its memory to the attention: the cache itself is checked without it.
            params = {"readout": False} if name == "retentivekv" else {}
            gaps[f"{name}@{budget}"] = eviction_gap(
                model, prompt, get_press(name, budget=budget, evict_every=0, **params)
            )
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


def serving(model, presses: list[Press], prompts_of, context: int, limit: int, args, deadline: Deadline) -> dict:
    """Phase 4 at one context: DynamicCache's largest batch under `limit` bytes and every method's tokens/s at it,
    then each method's own largest batch and tokens/s there (the trials' own decoding steps)."""
    distinct = prompts_of(context, DISTINCT_PROMPTS + 1).input_ids

    def capacity_of(press: Press | None) -> dict:
        measured = {}

        def peak_of(batch: int) -> int:
            measured[batch] = serving_peak(model, press, distinct, batch, args.decode_tokens)
            return measured[batch].peak_bytes

        best, peaks = largest_batch(peak_of, limit)
        name = "dynamic_cache" if press is None else f"{press.label()}@{press.budget}"
        speed = measured[best].tokens_per_second if best else None
        speed_text = "-" if speed is None else f"{speed:.1f}"
        print(
            f"{context} tokens, {name}: at most {best} sequences under {limit / 2**20:.0f} MiB, {speed_text} tokens/s"
        )
        return {"method": name, "max_batch": best, "tokens_per_second": speed, "trials": peaks}

    result = {"context": context, "limit_bytes": limit, "capacity": [capacity_of(None)], "rows": []}
    batch = result["capacity"][0]["max_batch"]
    if batch and deadline.allows(f"serving grid at {context} tokens, batch {batch}", 60):
        result["rows"] = run_grid(model, prompts_of, presses, [context], args.decode_tokens, batches=[batch])
        print_rows(result["rows"])
    for press in presses:
        if press.budget != 1.0 and deadline.allows(f"capacity of {press.label()}@{press.budget} at {context}", 30):
            result["capacity"].append(capacity_of(press))
    baseline = result["capacity"][0]
    for cell in result["capacity"]:
        if baseline["max_batch"] and cell["max_batch"]:
            cell["concurrency_ratio"] = cell["max_batch"] / baseline["max_batch"]
            cell["throughput_ratio"] = cell["tokens_per_second"] / baseline["tokens_per_second"]
    return result


def print_rows(rows: list[dict]) -> None:
    columns = "context | batch | method | budget | ms/step | tokens/s | DynamicCache ms/step | speed-up | vs floor"
    print(f"| {columns} | cache ratio |")
    for row in rows:
        print(
            f"| {row['context']} | {row['batch']} | {row['method']} | {row['budget']} | "
            f"{row['decode_ms_per_token']:.2f} | {row['tokens_per_second']:.1f} | {row['baseline_ms_per_token']:.2f} | "
            f"{row['decode_speedup']:.2f}x | {row['vs_floor']:.2f} | {row['cache_ratio']:.3f} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shape = parser.add_mutually_exclusive_group(required=True)
    shape.add_argument("--shape", choices=sorted(SHAPES), help="a built-in model shape")
    shape.add_argument("--config", help="a folder with a config.json")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--context", default="8192")
    parser.add_argument("--methods", default=MAIN_METHODS)
    parser.add_argument("--budgets", default="0.2,0.05")
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", help="JSON file for the results (required unless --profile)")
    parser.add_argument("--profile", metavar="METHOD", help="profile decoding with METHOD at 0.2 instead")
    parser.add_argument("--compile", action="store_true", help="phase 3: compiled decoding at the longest context")
    parser.add_argument("--check", action="store_true", help="phase 1: the engine's equivalences on the device")
    parser.add_argument("--serving", action="store_true", help="phase 4: the largest batches and their tokens/s")
    parser.add_argument("--memory-fraction", type=float, default=0.8, help="phase 4's limit: this much of the device")
    parser.add_argument("--memory-limit-gib", type=float, help="phase 4's limit instead (needed on a CPU)")
    parser.add_argument("--time-budget", type=float, default=540, help="seconds; later phases are skipped past it")
    args = parser.parse_args()
    if not args.out and not args.profile:
        parser.error("--out is required (or --profile METHOD)")
    deadline = Deadline(args.time_budget)
    torch.set_num_threads(args.threads)
    config = SHAPES[args.shape]() if args.shape else AutoConfig.from_pretrained(args.config)
    dtype = parse_dtype(args.dtype)
    model = build_model(config, dtype, args.device)
    generator = torch.Generator().manual_seed(0)

    def prompts_of(length: int, batch: int) -> Prompts:
        return Prompts(torch.randint(0, config.vocab_size, (batch, length), generator=generator).to(args.device))

    contexts = sorted((int(c) for c in args.context.split(",")), reverse=True)  # the longest first: the goals
    if args.profile:
        profile_decode(model, get_press(args.profile, budget=0.2), prompts_of(contexts[0], 1).input_ids)
        return
    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU, {args.threads} threads"
    result = {"device": device_name, "shape": args.shape or args.config, "dtype": args.dtype, "skipped": []}
    print(f"{device_name}, {result['shape']}, {args.dtype}", flush=True)

    def save() -> None:
        """Written after every phase: a run stopped at a lease's limit keeps what it measured."""
        result["skipped"] = deadline.skipped
        with open(args.out, "w") as file:
            json.dump(result, file, indent=1, default=str)

    if args.check and deadline.allows("equivalence checks", 30):
        result["equivalence_gaps"] = {}
        small = config.__class__(**(config.to_dict() | {"num_hidden_layers": 2}))
        for check_dtype, tolerance in (("float32", 1e-3), ("bfloat16", 0.1)):
            gaps = check_equivalences(
                build_model(small, parse_dtype(check_dtype), args.device), prompts_of(96, 1).input_ids
            )
            result["equivalence_gaps"][check_dtype] = gaps
            failed = {k: g for k, g in gaps.items() if g is not None and g > tolerance}
            print(
                f"equivalences, {check_dtype}: {len(gaps) - len(failed)}/{len(gaps)} within {tolerance} {failed or ''}"
            )
            print("  " + ", ".join(f"{k} {'n/a' if g is None else f'{g:.1e}'}" for k, g in gaps.items()))
        save()
    budgets = [float(b) for b in args.budgets.split(",")]
    methods = args.methods.split(",")
    presses = [get_press(m, budget=1.0) if m == "full" else get_press(m, budget=b) for m in methods for b in budgets]
    presses = list({(p.label(), p.budget): p for p in presses}.values())  # `full` once

    def report(run) -> None:
        print(
            f"{run.context} tokens, batch {run.batch}, {run.method}: {run.decode_ms_per_token:.2f} ms/step", flush=True
        )

    result["rows"] = []
    for context in contexts:  # phase 2
        if deadline.allows(f"batch 1 at {context} tokens", 20):
            rows = run_grid(model, prompts_of, presses, [context], args.decode_tokens, args.repeats, report)
            result["rows"] += rows
            print_rows(rows)
            save()
    if args.compile and deadline.allows(f"compiled cells at {contexts[0]} tokens", 240):  # phase 3
        compiled = [p for p in presses if p.budget in (0.2, 1.0)]
        rows = run_grid(model, prompts_of, compiled, contexts[:1], args.decode_tokens, 1, report, compile=True)
        result["compiled_rows"] = rows
        print_rows(rows)
        save()
    if args.serving:  # phase 4
        if args.memory_limit_gib is not None:
            limit = int(args.memory_limit_gib * 2**30)
        elif args.device == "cuda":
            limit = int(args.memory_fraction * torch.cuda.get_device_properties(0).total_memory)
            limit -= torch.cuda.memory_allocated()  # the weights
        else:
            parser.error("--serving on a CPU needs --memory-limit-gib")
        result["serving"] = []
        for context in contexts:
            if deadline.allows(f"serving at {context} tokens", 60):
                result["serving"].append(serving(model, presses, prompts_of, context, limit, args, deadline))
                save()
    if args.device == "cuda" and deadline.allows("prefill peaks", 20):
        prompt = prompts_of(contexts[0], 1).input_ids
        peaks = {"dynamic_cache": prefill_peak(model, None, prompt)["prefill_peak_mib"]}
        peaks |= {f"{p.label()}@{p.budget}": prefill_peak(model, p, prompt)["prefill_peak_mib"] for p in presses}
        result["gpu_prefill_peak_mib"] = peaks
        for label, peak in peaks.items():
            print(f"prefill peak GPU memory at {contexts[0]} tokens, {label}: {peak:.0f} MiB")
    save()


if __name__ == "__main__":
    main()
