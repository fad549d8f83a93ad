"""modalkv and NVIDIA kvpress side by side: decode speed-up of SnapKV over each one's own DynamicCache, in one run.

Run it with the project's python; kvpress runs in a subprocess under its own environment (docs/reference-check.md):

    taskset -c 0,1 python tools/peer_bench.py --peer-python /tmp/kvpress-venv/bin/python \\
        --context 8192 --threads 2 --decode-tokens 48 --rounds 2 --out peer.json

Each round runs, for each context, modalkv's cells in-process (transformers' DynamicCache, `full` and `snapkv` at
`--budget`, timed by modalkv.bench.measure) and one subprocess of tools/kvpress_speed.py (its own DynamicCache and
SnapKVPress), kvpress first in even rounds and modalkv first in odd ones, so that a slow spell hits both. Both tools
time the same prompt (the first `--context` tokens of `--text-file`, checked by a digest of the ids), the same way
(prefill, then each decoded token timed alone; median over the steps after 2 warm-up steps), with the same threads.
Prints a markdown table (medians over the rounds; each speed-up is against the DynamicCache of the same tool and
environment: transformers 5.23 for modalkv, 5.2 for kvpress) and writes every run to `--out`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch
import transformers

from modalkv.bench import measure
from modalkv.eval.fidelity import TEXT
from modalkv.models import EMBEDDED_MODELS, embedded_model_path, load_model, parse_dtype
from modalkv.presses import get_press

KVPRESS_SPEED = Path(__file__).with_name("kvpress_speed.py")


def kvpress_runs(args: argparse.Namespace, model_dir: Path, context: int) -> list[dict]:
    """One subprocess of tools/kvpress_speed.py: its DynamicCache and SnapKV records."""
    command = [
        str(args.peer_python), str(KVPRESS_SPEED), "--model-dir", str(model_dir), "--text-file", str(args.text_file),
        "--context", str(context), "--dtype", args.dtype, "--threads", str(torch.get_num_threads()),
        "--decode-tokens", str(args.decode_tokens), "--budget", str(args.budget),
    ]  # fmt: skip
    if args.decode_in_press:
        command.append("--decode-in-press")
    done = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def modalkv_runs(model, prompt: torch.Tensor, args: argparse.Namespace) -> list[dict]:
    """modalkv.bench.measure for DynamicCache, `full` and `snapkv`; the greedy tokens are read off the LM head."""
    tokens: list[int] = []
    hook = model.lm_head.register_forward_hook(lambda _m, _i, out: tokens.append(int(out[0, -1].argmax())))
    records = []
    try:
        for press in [None, get_press("full", budget=1.0), get_press("snapkv", budget=args.budget)]:
            tokens.clear()
            run = asdict(measure(model, press, prompt, args.decode_tokens))
            records.append(run | {"tool": "modalkv", "tokens": tokens[:]})
    finally:
        hook.remove()
    return records


def summarise(runs: list[dict]) -> list[dict]:
    """Median over rounds per (context, tool, method), with the speed-up over the same tool's DynamicCache."""
    cells: dict[tuple, list[dict]] = {}
    for run in runs:
        cells.setdefault((run["context"], run["tool"], run["method"]), []).append(run)
    rows = []
    for (context, tool, method), cell in cells.items():
        ms = statistics.median(r["decode_ms_per_token"] for r in cell)
        baseline = statistics.median(r["decode_ms_per_token"] for r in cells[(context, tool, "dynamic_cache")])
        peer_of = "snapkv" if "snapkv" in method else method  # kvpress's cell -> modalkv's cell
        ours = None if tool == "modalkv" else cells.get((context, "modalkv", peer_of))
        rows.append({
            "context": context, "tool": tool, "method": method, "budget": cell[0]["budget"],
            "decode_ms_per_token": ms, "per_round_ms": [r["decode_ms_per_token"] for r in cell],
            "speedup_over_own_dynamic_cache": baseline / ms,
            "prefill_seconds": statistics.median(r["prefill_seconds"] for r in cell),
            "cache_ratio": cell[0]["cache_bytes"] / cell[0]["full_cache_bytes"],
            "same_tokens_as_modalkv": None if ours is None else sum(
                a == b for a, b in zip(cell[0]["tokens"], ours[0]["tokens"], strict=True)
            ),
            "tokens": len(cell[0]["tokens"]),
        })  # fmt: skip
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| context | tool | method | budget | ms/token (median) | per round | speed-up over own DynamicCache "
        "| prefill s | cache / uncompressed | greedy tokens = modalkv's |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        rounds = ", ".join(f"{ms:.1f}" for ms in r["per_round_ms"])
        same = "" if r["same_tokens_as_modalkv"] is None else f"{r['same_tokens_as_modalkv']}/{r['tokens']}"
        lines.append(
            f"| {r['context']} | {r['tool']} | {r['method']} | {r['budget']} | {r['decode_ms_per_token']:.1f} "
            f"| {rounds} | {r['speedup_over_own_dynamic_cache']:.2f}x | {r['prefill_seconds']:.1f} "
            f"| {r['cache_ratio']:.3f} | {same} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peer-python", type=Path, required=True, help="python of the kvpress environment")
    parser.add_argument("--model", default="smollm2-135m", help="embedded model name or checkpoint folder")
    parser.add_argument("--text-file", type=Path, default=TEXT, help="the prompt is its first --context tokens")
    parser.add_argument("--context", default="8192", help="comma-separated prompt lengths (tokens)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads, both tools (default: torch's)")
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--budget", type=float, default=0.2, help="kept ratio for both SnapKVs")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds")
    parser.add_argument("--decode-in-press", action="store_true", help="also time kvpress decoding inside its hooks")
    parser.add_argument("--out", type=Path, default=Path("peer_bench.json"))
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    dtype = parse_dtype(args.dtype)
    model_dir = embedded_model_path(args.model, dtype) if args.model in EMBEDDED_MODELS else Path(args.model)
    model, tokenizer = load_model(str(model_dir), dtype=dtype)
    ids = tokenizer(args.text_file.read_text(encoding="utf-8"), add_special_tokens=False, return_tensors="pt")
    contexts = [int(n) for n in args.context.split(",")]
    if ids.input_ids.shape[1] < max(contexts):
        raise SystemExit(f"{args.text_file} has {ids.input_ids.shape[1]} tokens, fewer than {max(contexts)}")

    runs: list[dict] = []
    for round_index in range(args.rounds):
        for context in contexts:
            prompt = ids.input_ids[:, :context]
            # The digest kvpress_speed.ids_digest computes: both tools must time the same prompt ids.
            digest = hashlib.sha256(",".join(map(str, prompt[0].tolist())).encode()).hexdigest()[:16]
            steps = [partial(kvpress_runs, args, model_dir, context), partial(modalkv_runs, model, prompt, args)]
            for step in steps if round_index % 2 == 0 else steps[::-1]:
                for run in step():
                    if run["tool"] == "kvpress" and run["prompt_sha256"] != digest:
                        raise SystemExit(f"kvpress timed another prompt ({run['prompt_sha256']} != {digest})")
                    runs.append(run | {"round": round_index})
                    print(
                        f"round {round_index}, {context} tokens, {run['tool']} {run['method']}: "
                        f"{run['decode_ms_per_token']:.1f} ms/token",
                        file=sys.stderr,
                        flush=True,
                    )

    rows = summarise(runs)
    settings = {k: str(v) for k, v in vars(args).items()} | {"threads": torch.get_num_threads()}
    args.out.write_text(json.dumps({"settings": settings, "rows": rows, "runs": runs}, indent=1))
    print(f"{args.model}, {args.dtype}, {torch.get_num_threads()} threads, {args.decode_tokens} decoded tokens, "
          f"{args.rounds} rounds; wrote {args.out}")  # fmt: skip
    print(table(rows))


if __name__ == "__main__":
    main()
