"""KVzip's context reconstruction: each prompt token scored by the attention the model pays it while repeating the
prompt (`presses/kvzip.py` keeps the top scores).

Kim et al., "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction", https://arxiv.org/abs/2505.23416.
As kvpress 0.5.5 (`kvzip_press.py`): each row is run once per chunk as [row ; question ; chat suffix ; chunk] on a
throw-away cache whose press (`ReconstructionRecorder`) records, at each layer, the repetition's attention to the
chunk and stores a single token per KV head. One pass over [row ; repetition] is exactly kvpress's two (the row's
prefill, then the repetition attending to its cache): in both, the repetition's hidden states at each layer come from
full attention to the whole row at the layers below. Peak memory: one layer at about twice the row's length.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from transformers import AutoTokenizer, PreTrainedModel

from modalkv import api
from modalkv.cache import CompressedCache
from modalkv.compat import CACHE_KWARG
from modalkv.presses.base import PrefillInputs, Press, Selection

PREVIOUS_TOKENS = 8  # tokens of the previous chunk quoted in a later chunk's question (kvpress's prev_postfix_size)


@dataclass(frozen=True)
class ReconstructionPrompt:
    """Token ids of kvpress's repetition request, from a tokenizer and its chat template."""

    first: list[int]  # question before the first chunk
    later: list[int]  # question before a later chunk (followed by the previous chunk's last tokens)
    suffix: list[int]  # the chat template's end of the user turn and start of the answer
    prefix: list[int]  # the chat template's start of a user turn (never repeated)


@functools.cache
def reconstruction_prompt(tokenizer_path: str) -> ReconstructionPrompt:
    """The repetition request in the tokenizer at `tokenizer_path` (a local folder or hub id), as kvpress words it."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"kvzip writes its repetition request with the model's tokenizer; none at {tokenizer_path!r}: "
            "pass tokenizer=<folder or hub id>"
        ) from error
    prefix_text, suffix_text = "", "\n"
    if tokenizer.chat_template is not None:  # the text around a user turn's content, as kvpress finds it
        dummy, separator = "dummy context", "\n" + "#" * len("dummy context")
        message = [{"role": "user", "content": dummy + separator}]
        text = tokenizer.apply_chat_template(message, add_generation_prompt=True, tokenize=False, enable_thinking=False)
        context, suffix_text = text.split(separator)
        prefix_text = context.split(dummy)[0]

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    return ReconstructionPrompt(
        first=encode("\n\nRepeat the previous context exactly."),
        later=encode("\n\nRepeat the part of the previous context exactly, starting with"),
        suffix=encode(suffix_text),
        prefix=encode(prefix_text),
    )


@dataclass
class ReconstructionRecorder(Press):
    """Records, per layer, the repetition's attention to the chunk [start, end) of a row of `length` tokens; keeps one
    token per KV head (its cache is thrown away)."""

    length: int = 1
    start: int = 0
    end: int = 1
    n_sink: int = 4
    scores: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [H_kv, end - start]
    name = "kvzip-reconstruction"

    def select(self, inputs: PrefillInputs) -> Selection:
        _, num_heads, _, dim = inputs.queries.shape
        heads = inputs.num_kv_heads
        sink = min(self.n_sink, self.start)
        keys = inputs.keys[0].float()  # [H_kv, S, D]
        keys = torch.cat([keys[:, :sink], keys[:, self.start : self.end], keys[:, self.length :]], dim=1)
        queries = inputs.queries[0, :, self.length :].float().reshape(heads, -1, dim)  # [H_kv, G * r, D]
        logits = queries @ keys.transpose(-1, -2) / dim**0.5  # kvpress: 1 / sqrt(head_dim), whatever the scaling
        repeat = queries.shape[1] // (num_heads // heads)
        causal = torch.ones(repeat, repeat, dtype=torch.bool, device=keys.device).triu(1).repeat(num_heads // heads, 1)
        logits[..., -repeat:] = logits[..., -repeat:].masked_fill(causal, float("-inf"))
        chunk = logits.softmax(dim=-1)[..., sink : sink + self.end - self.start]
        self.scores[inputs.layer_idx] = chunk.amax(dim=1)  # max over the group's heads and the repetition
        lengths = torch.ones(inputs.keys.shape[:2], dtype=torch.long, device=keys.device)
        return Selection(torch.zeros_like(lengths)[..., None], lengths)


@torch.no_grad()
def reconstruction_scores(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    is_real: torch.Tensor,
    prompt: ReconstructionPrompt,
    n_sink: int = 4,
    chunk_size: int = 2048,
) -> torch.Tensor:
    """[L, B, H_kv, S] each prompt token's KVzip score (the first `n_sink`: the row's top + 1; padding: -inf).

    input_ids, is_real: [B, S]. Each row is repeated without its padding, chunk by chunk, after the template's
    opening if it starts with it."""
    rows = []
    for ids, real in zip(input_ids, is_real, strict=True):
        ids = ids[real].tolist()
        opening = len(prompt.prefix) if ids[: len(prompt.prefix)] == prompt.prefix else 0
        layers: dict[int, list[torch.Tensor]] = {}
        for start in range(opening, len(ids), chunk_size):
            end = min(start + chunk_size, len(ids))
            quoted = ids[max(start - PREVIOUS_TOKENS, start - chunk_size) : start]  # the previous chunk's last tokens
            question = prompt.first if start == opening else prompt.later + quoted
            recorder = ReconstructionRecorder(length=len(ids), start=start, end=end, n_sink=n_sink)
            sequence = torch.tensor([ids + question + prompt.suffix + ids[start:end]], device=input_ids.device)
            with api.attach(recorder, model):
                model(sequence, **{CACHE_KWARG: CompressedCache(recorder)}, use_cache=True, logits_to_keep=1)
            for layer, scores in recorder.scores.items():
                layers.setdefault(layer, []).append(scores)
        scores = torch.stack([torch.cat(layers[layer], dim=-1) for layer in sorted(layers)])  # [L, H, S - opening]
        scores = torch.nn.functional.pad(scores, (opening, 0))
        scores[..., :n_sink] = scores.max() + 1
        rows.append(torch.full((*scores.shape[:2], len(real)), float("-inf"), device=scores.device))
        rows[-1][..., real] = scores
    return torch.stack(rows, dim=1)
