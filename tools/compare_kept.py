"""Overlap of two kept-position dumps (`modalkv inspect --dump-kept`, tools/kvpress_reference.py).

    python tools/compare_kept.py ours.json kvpress.json [--min-overlap 0.95]

Prints, per layer, the mean Jaccard overlap |A & B| / |A | B| of the kept sets over KV heads, how many heads keep
identical sets, and the mean kept count of each side; then the overall mean over layers and heads, the number of
identical (layer, head) sets, and the number of nested ones (one set contains the other: both sides rank tokens alike
and differ only in how many they keep). Exits 0, or 1 with --min-overlap when the overall mean is below it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def jaccard(a: set[int], b: set[int]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def load(path: Path) -> dict:
    record = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(record.get("layers"), list):
        raise SystemExit(f"{path}: no 'layers' list; not a kept-position dump")
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    parser.add_argument("--min-overlap", type=float, help="exit 1 if the overall mean Jaccard is below this")
    args = parser.parse_args()
    first, second = load(args.first), load(args.second)

    if first.get("prompt_tokens") != second.get("prompt_tokens"):
        print(f"warning: prompt_tokens differ: {first.get('prompt_tokens')} vs {second.get('prompt_tokens')}")
    if len(first["layers"]) != len(second["layers"]):
        raise SystemExit(f"layer counts differ: {len(first['layers'])} vs {len(second['layers'])}")

    print(f"{args.first}: {first.get('method')} budget {first.get('budget')}, {first.get('prompt_tokens')} tokens")
    print(f"{args.second}: {second.get('method')} budget {second.get('budget')}, {second.get('prompt_tokens')} tokens")
    print("layer  mean_jaccard  identical  kept_first  kept_second")
    overlaps: list[float] = []
    identical = nested = 0
    for index, (heads_a, heads_b) in enumerate(zip(first["layers"], second["layers"], strict=True)):
        if len(heads_a) != len(heads_b):
            raise SystemExit(f"layer {index}: KV head counts differ: {len(heads_a)} vs {len(heads_b)}")
        pairs = [(set(a), set(b)) for a, b in zip(heads_a, heads_b, strict=True)]
        layer = [jaccard(a, b) for a, b in pairs]
        same = sum(a == b for a, b in pairs)
        overlaps += layer
        identical += same
        nested += sum(a <= b or b <= a for a, b in pairs)
        kept_a = sum(len(a) for a, _ in pairs) / len(pairs)
        kept_b = sum(len(b) for _, b in pairs) / len(pairs)
        layer_mean = sum(layer) / len(layer)
        print(f"{index:5d}  {layer_mean:12.4f}  {same:4d}/{len(pairs):<4d}  {kept_a:10.1f}  {kept_b:11.1f}")

    mean = sum(overlaps) / len(overlaps)
    print(
        f"overall mean Jaccard {mean:.4f}; (layer, head) sets identical: {identical}/{len(overlaps)}, nested: {nested}"
    )
    if args.min_overlap is not None and mean < args.min_overlap:
        print(f"below --min-overlap {args.min_overlap}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
