"""KVzip: query-agnostic eviction, each token scored by how much the model attends to it while repeating the prompt.

Kim et al., "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction", https://arxiv.org/abs/2505.23416
(code github.com/snu-mllab/KVzip). Semantics and defaults as kvpress 0.5.5 (`kvzip_press.py`).

How it fits the engine: the engine compresses each layer inside the prefill, but a token's KVzip score needs the
attention of *later* tokens (the repetition) at every layer, so the scores come first, from a reconstruction pass
(`reconstruction.py`), and the prefill then keeps what they choose. The scores are the press's `prompt_state`: a
forward pre-hook that `using()` installs on the model for the block of `attach()` and `generate()` makes them when a
forward starts a prefill on a `CompressedCache` of this press; a replayed prefill (`SharedPrefill.replay`) makes them
once for every budget, since they do not depend on it.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from modalkv.cache import CompressedCache
from modalkv.modality import TEXT, modality_from_input_ids
from modalkv.presses.base import PrefillInputs, Press, Selection, selection_from_mask, tokens_for_budget
from modalkv.presses.reconstruction import reconstruction_prompt, reconstruction_scores
from modalkv.presses.scoring import keeps_everything, sink_tokens


@dataclass
class KVzipPress(Press):
    """KVzip: keeps the tokens the model attends to most while repeating the context (query-agnostic).

    As kvpress 0.5.5 (defaults `layerwise=False`, `n_sink=4`, `chunk_size=2048`): after the chat template's opening,
    the prompt is repeated chunk by chunk after "Repeat the previous context exactly." (later chunks: "... starting
    with" and the previous chunk's last 8 tokens) and the chat suffix; a token's score in a KV head is the largest
    attention any repeating query of the head's group pays it, softmax over the sinks, the chunk and the repetition
    itself. The first `n_sink` tokens are kept; the template's opening (never repeated) scores 0. By default the
    kept tokens are the top L * H_kv * budget scores over all layers and KV heads together (ragged per layer and head);
    `layerwise=True`: the top H_kv * budget per layer. `tokenizer`: where to load the tokenizer that words the request
    (default: the model's own folder or hub id, `config.name_or_path`).

    Our resolutions: a prompt that does not start with the template's opening (e.g. `--raw`) has none, so all of it is
    repeated (kvpress assumes the opening); rows of a batch are repeated one by one, without their padding; every KV
    head keeps at least its first token; kvpress's `kvzip_plus_normalization` (off by default) is not implemented;
    prompts with image or video tokens are refused (the repetition is text). Cost: one reconstruction forward of about
    twice the prompt per 2048-token chunk before the prefill (kvpress: 2-3 times the prefill).
    """

    layerwise: bool = False
    n_sink: int = 4
    chunk_size: int = 2048
    tokenizer: str | None = None
    name = "kvzip"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_sink < 0:
            raise ValueError(f"n_sink must be >= 0, got {self.n_sink}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")

    @contextmanager
    def using(self, model: PreTrainedModel) -> Iterator[None]:
        """Runs the reconstruction pass before every prefill of a cache of this press, within the block."""
        handle = model.register_forward_pre_hook(functools.partial(self._before_forward, model), with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    def _before_forward(self, model: PreTrainedModel, module, args: tuple, kwargs: dict) -> None:
        cache = next((v for v in kwargs.values() if isinstance(v, CompressedCache)), None)
        if cache is None or cache.press is not self or cache.get_seq_length() > 0:
            return  # not a prefill of ours (e.g. the reconstruction's own forwards)
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        shape = (input_ids if input_ids is not None else kwargs["inputs_embeds"]).shape[:2]
        is_real = torch.ones(shape, dtype=torch.bool, device=model.device) if mask is None else mask.bool()
        cache.press_state.update(self.prompt_state(model, input_ids, is_real, cache.modality))

    def prompt_state(
        self,
        model: PreTrainedModel,
        input_ids: torch.Tensor | None,
        is_real: torch.Tensor,
        modality: torch.Tensor | None,
    ) -> dict:
        """{"kvzip": [L, B, H_kv, S] scores} from the reconstruction pass; {} when the budget keeps every token."""
        if keeps_everything(self.budget, is_real):
            return {}
        if modality is None and input_ids is not None:
            modality = modality_from_input_ids(model.config, input_ids)
        if modality is not None and bool((modality != TEXT).any()):
            raise ValueError("kvzip reconstructs the context as text: prompts with image or video tokens are refused")
        if input_ids is None:
            raise ValueError("kvzip repeats the prompt's tokens: give input_ids, not inputs_embeds")
        prompt = reconstruction_prompt(self.tokenizer or model.config.name_or_path)
        return {"kvzip": reconstruction_scores(model, input_ids, is_real, prompt, self.n_sink, self.chunk_size)}

    def select(self, inputs: PrefillInputs) -> Selection:
        if keeps_everything(self.budget, inputs.is_real):
            return Press.select(self, inputs)
        state = inputs.state
        if "kvzip" in state:  # the first layer: choose for every layer at once
            state["kvzip.keep"] = self.choose(state.pop("kvzip"), inputs.is_real)
        if "kvzip.keep" not in state:
            raise ValueError(
                "kvzip scores the prompt by reconstructing it before the prefill: use press.generate(model, ...) or "
                "`with press.attach(model):` (they run the reconstruction)"
            )
        keep = state["kvzip.keep"][inputs.layer_idx] | sink_tokens(inputs.is_real, 1)[:, None]
        if inputs.layer_idx == len(state["kvzip.keep"]) - 1:
            del state["kvzip.keep"]
        return selection_from_mask(keep)

    def choose(self, scores: torch.Tensor, is_real: torch.Tensor) -> torch.Tensor:
        """[L, B, H_kv, S] keep mask: per row the top L * H_kv * budget scores (layerwise: H_kv * budget per layer)."""
        layers, batch, heads, seq = scores.shape
        if (batch, seq) != tuple(is_real.shape):
            raise ValueError(f"kvzip scored a {batch} x {seq} prompt but the prefill is {tuple(is_real.shape)}")
        kept = tokens_for_budget(self.budget, is_real.sum(-1)) * heads  # [B] per layer
        by_row = scores.permute(1, 0, 2, 3)  # [B, L, H, S]
        if not self.layerwise:
            by_row, kept = by_row.reshape(batch, 1, -1), kept * layers
        flat = by_row.reshape(batch, by_row.shape[1], -1)
        top = flat.topk(int(kept.max()), dim=-1).indices
        keep = torch.zeros_like(flat, dtype=torch.bool)
        in_budget = torch.arange(top.shape[-1], device=top.device) < kept[:, None, None]
        keep.scatter_(-1, top, in_budget.expand_as(top))
        return keep.view(batch, layers, heads, seq).permute(1, 0, 2, 3)
