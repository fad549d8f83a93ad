"""Kept positions of NVIDIA kvpress's presses on one prompt, written in modalkv's `inspect --dump-kept` schema.

Standalone: it does not import modalkv. kvpress 0.5.5 needs transformers < 5.3, so run it with the python of a
separate virtual environment (set-up in docs/reference-check.md):

    /tmp/kvpress-venv/bin/python tools/kvpress_reference.py --model-dir ~/.cache/modalkv/smollm2-135m-float32 \\
        --method snapkv --budget 0.2 --prompt-file prompt.txt --raw --dump-kept kvpress.json

then compare with modalkv's own choice (`modalkv inspect ... --dump-kept ours.json`) using tools/compare_kept.py.

The prompt is encoded as modalkv's `encode_prompt` does: one user turn of the chat template with
`add_generation_prompt=True`, or with `--raw` the text as is without special tokens. The prefill runs once, batch 1,
in float32 with sdpa attention, inside kvpress's own context manager (`with press(model)`), so kvpress's forward hook
scores and prunes every layer exactly as it would in kvpress.

How the kept positions are recovered: the press's `compress` method is wrapped. The wrapper sees the keys the hook
passes in (the layer's full prefill keys, RoPE applied) and the keys `compress` returns. kvpress prunes with
`gather`, so every kept key is a bit-exact copy of one input key; each is mapped back to its position as the nearest
input key (L2), and the script then checks that the match is exact and that no position is used twice (keys are
rotated by their position, so distinct positions have distinct keys). Presses that mask instead of pruning (AdaKV,
KVzip: `module.masked_key_indices`, cache left at full length) keep every position except the masked ones; KVzip
sets them for every layer when its `with` block ends, without calling `compress`, so they are read there. A press that
alters keys (e.g. KeyRerotationPress, merging) fails the exactness check and the script stops with an error.
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import kvpress
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

# modalkv name -> kvpress class; "adakv:<name>" and "chunkkv:<name>" (modalkv's spelling; the wrapper alone wraps
# snapkv) wrap the scorer press in AdaKVPress (head-wise budgets) or ChunkKVPress (whole chunks).
METHODS: dict[str, type[kvpress.BasePress]] = {
    "snapkv": kvpress.SnapKVPress,
    "streaming_llm": kvpress.StreamingLLMPress,
    "knorm": kvpress.KnormPress,
    "tova": kvpress.TOVAPress,
    "pyramidkv": kvpress.PyramidKVPress,
    "random": kvpress.RandomPress,
    "expected_attention": kvpress.ExpectedAttentionPress,
    "observed_attention": kvpress.ObservedAttentionPress,  # needs --attn eager
    "keydiff": kvpress.KeyDiffPress,
    "kvzip": kvpress.KVzipPress,  # scores after the prefill, by reconstruction; masks (AdaKV-style) all layers at once
    "lagkv": kvpress.LagKVPress,
    "cur": kvpress.CURPress,
    "leverage": kvpress.LeverageScorePress,
}
WRAPPERS: dict[str, type[kvpress.BasePress]] = {"adakv": kvpress.AdaKVPress, "chunkkv": kvpress.ChunkKVPress}
WRAPPER_PARAMS = {"adakv": ("alpha_safeguard",), "chunkkv": ("chunk_length",)}
# modalkv parameter names that kvpress spells differently.
PARAM_ALIASES = {"num_sinks": "n_sink"}


def parse_value(text: str) -> int | float | bool | str:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def make_press(method: str, budget: float, params: list[str]) -> kvpress.BasePress:
    """The kvpress press for a modalkv method name; `budget` is the kept ratio (compression_ratio = 1 - budget)."""
    fields = {}
    for item in params:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--param takes KEY=VALUE, got {item!r}")
        fields[PARAM_ALIASES.get(key, key)] = parse_value(value)
    wrapper, _, inner = method.partition(":")
    name = (inner or "snapkv") if wrapper in WRAPPERS else method
    if name not in METHODS:
        raise SystemExit(f"unknown method {method!r}; known: {', '.join(METHODS)}, adakv:<name>, chunkkv:<name>")
    if wrapper in WRAPPERS:
        own = {key: fields.pop(key) for key in WRAPPER_PARAMS[wrapper] if key in fields}
        return WRAPPERS[wrapper](press=METHODS[name](compression_ratio=1 - budget, **fields), **own)
    return METHODS[name](compression_ratio=1 - budget, **fields)


def match_positions(full: torch.Tensor, kept: torch.Tensor) -> list[list[int]]:
    """Positions in `full` [H, S, D] of the keys in `kept` [H, K, D], per head, ascending; exact copies only."""
    heads = []
    for head_full, head_kept in zip(full, kept, strict=True):
        index = torch.cdist(head_kept.double(), head_full.double()).argmin(dim=-1)
        if not torch.equal(head_full[index], head_kept) or index.unique().numel() != index.numel():
            raise RuntimeError("a kept key is not an exact, unique copy of a prefill key: this press alters keys")
        heads.append(sorted(index.tolist()))
    return heads


def unmasked_positions(module, num_keys: int, num_heads: int) -> list[list[int]]:
    """The positions a masking press (AdaKV, KVzip: `module.masked_key_indices`, batch 1) leaves per KV head."""
    _, head_index, seq_index = module.masked_key_indices
    return [sorted(set(range(num_keys)) - set(seq_index[head_index == h].tolist())) for h in range(num_heads)]


def record_kept(press: kvpress.BasePress, num_layers: int) -> list[list[list[int]] | None]:
    """Wraps `press.compress` so that each call stores the kept positions of its layer in the returned list."""
    layers: list[list[list[int]] | None] = [None] * num_layers
    compress = press.compress

    @functools.wraps(compress)
    def wrapper(module, hidden_states, keys, values, attentions, kwargs):
        new_keys, new_values = compress(module, hidden_states, keys, values, attentions, kwargs)
        if keys.shape[0] != 1:
            raise RuntimeError("batch size 1 only")
        masked = getattr(module, "masked_key_indices", None)
        if new_keys.shape == keys.shape and masked is not None:  # AdaKV-style: masked, not pruned
            layers[module.layer_idx] = unmasked_positions(module, keys.shape[2], keys.shape[1])
        else:
            layers[module.layer_idx] = match_positions(keys[0], new_keys[0])
        return new_keys, new_values

    press.compress = wrapper
    return layers


def encode(tokenizer, text: str, raw: bool) -> dict[str, torch.Tensor]:
    """As modalkv's `encode_prompt`: the text as is (raw), else one user turn of the chat template."""
    if raw or tokenizer.chat_template is None:
        return dict(tokenizer(text, add_special_tokens=False, return_tensors="pt"))
    messages = [{"role": "user", "content": text}]
    return dict(
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True, help="transformers checkpoint folder")
    parser.add_argument("--method", required=True, help=f"one of {', '.join(METHODS)}, adakv:<name>, chunkkv:<name>")
    parser.add_argument("--budget", type=float, required=True, help="kept ratio in (0, 1]")
    parser.add_argument("--prompt-file", type=Path, required=True)
    parser.add_argument("--raw", action="store_true", help="no chat template, no special tokens")
    parser.add_argument("--param", action="append", default=[], help="press field KEY=VALUE (repeatable)")
    parser.add_argument("--attn", default="sdpa", help="attention implementation (observed_attention: eager)")
    parser.add_argument("--dump-kept", type=Path, required=True, help="output JSON")
    args = parser.parse_args()
    if not 0 < args.budget <= 1:
        raise SystemExit(f"--budget is a kept ratio in (0, 1], got {args.budget}")

    press = make_press(args.method, args.budget, args.param)
    model = AutoModelForCausalLM.from_pretrained(
        args.model_dir.expanduser(), dtype=torch.float32, attn_implementation=args.attn
    )
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir.expanduser())
    inputs = encode(tokenizer, args.prompt_file.read_text(encoding="utf-8"), args.raw)
    num_layers = model.config.num_hidden_layers
    layers = record_kept(press, num_layers)
    with torch.no_grad(), press(model):
        model(**inputs, past_key_values=DynamicCache(), use_cache=True)
    if isinstance(press, kvpress.KVzipPress):  # masks every layer when its block ends, without calling compress()
        num_keys, num_heads = inputs["input_ids"].shape[1], model.config.num_key_value_heads
        layers = [unmasked_positions(layer.self_attn, num_keys, num_heads) for layer in model.model.layers]
    if any(layer is None for layer in layers):
        raise RuntimeError("the press did not call compress() on every layer; kept positions are unknown")

    record = {
        "method": args.method,
        "budget": args.budget,
        "prompt_tokens": inputs["input_ids"].shape[1],
        "layers": layers,
    }
    args.dump_kept.write_text(json.dumps(record))
    kept = sum(len(head) for layer in layers for head in layer)
    print(f"wrote {args.dump_kept}: {type(press).__name__}, {record['prompt_tokens']} prompt tokens, {kept} kept")


if __name__ == "__main__":
    main()
