"""Per-model head statistics measured once by a calibration pass (`modalkv calibrate`), read by SparseMM and MixKV.

- `visual` [L, H] (query heads): SparseMM's visual score of each head -- how often, while the model says what a
  picture shows, the head's strongest attention lands on that picture's region (a vision-language model only).
- `redundancy` [L, H_kv]: MixKV's head-wise redundancy -- the mean pairwise cosine similarity of a KV head's keys
  over a prompt, averaged over the calibration prompts.

A calibration is a JSON file, by default `cache_dir()/calibration/<model key>.json` (`statistics_path`), carrying the
model's shape, so a file made for another model is refused rather than misread.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import PretrainedConfig

from modalkv.pretrained import EMBEDDED_MODELS, MINI_VLM, MINI_VLMS, cache_dir

__all__ = ["CalibrationError", "HeadStatistics", "head_shape", "load_statistics", "model_key", "statistics_path"]

_MINI_VLM_TYPE = "modalkv-mini-vlm"  # the mini-VLM's config.model_type (modalkv.vlm)


class CalibrationError(ValueError):
    """A method needs head statistics that are missing or made for another model."""


def head_shape(config: PretrainedConfig) -> tuple[int, int, int]:
    """(layers, query heads, KV heads) of the language model of `config` (no GQA: KV heads = query heads)."""
    text = config.get_text_config()
    heads = text.num_attention_heads
    return text.num_hidden_layers, heads, getattr(text, "num_key_value_heads", None) or heads


@dataclass(frozen=True)
class HeadStatistics:
    """What a calibration measured on one model (see the module docstring)."""

    model: str  # `model_key` of the model measured
    num_layers: int
    num_heads: int
    num_kv_heads: int
    redundancy: list[list[float]]  # [L][H_kv]
    visual: list[list[float]] | None  # [L][H]; None for a text-only model
    examples: int  # prompts the statistics average over
    source: str  # what the prompts were, and the command that made them

    def visual_scores(self) -> torch.Tensor:
        """[L, H] float32 visual scores; CalibrationError when the model was calibrated without pictures."""
        if self.visual is None:
            raise CalibrationError(
                f"the calibration of {self.model} has no visual-head scores (it was made on text): SparseMM "
                "allocates by visual heads, which only a vision-language model calibrated on pictures has"
            )
        return torch.tensor(self.visual, dtype=torch.float32)

    def finds_no_visual_head(self) -> bool:
        """Pictures were calibrated, yet every visual score is 0: no head's strongest attention fell on the named
        photo in any prompt (the Gemma 3 mini-VLM, whose strongest logit is the first token). SparseMM then splits its
        budget evenly, as its inner method does alone."""
        return self.visual is not None and not any(score > 0 for scores in self.visual for score in scores)

    def no_visual_head_warning(self) -> str | None:
        """What `modalkv calibrate` and SparseMM tell a user when `finds_no_visual_head()`; None otherwise."""
        if not self.finds_no_visual_head():
            return None
        return (
            f"every visual score in the calibration of {self.model} is 0 (no head's strongest attention fell on the "
            "named photo in any prompt): SparseMM splits its budget evenly over the heads, as its inner method does "
            "alone"
        )

    def redundancy_scores(self) -> torch.Tensor:
        """[L, H_kv] float32 mean key similarity per KV head."""
        return torch.tensor(self.redundancy, dtype=torch.float32)

    def check(self, config: PretrainedConfig) -> None:
        """CalibrationError unless the statistics were made on a model of `config`'s shape."""
        shape = head_shape(config)
        if shape != (self.num_layers, self.num_heads, self.num_kv_heads):
            raise CalibrationError(
                f"the head statistics were measured on {self.model} ({self.num_layers} layers, {self.num_heads} "
                f"heads, {self.num_kv_heads} KV heads), not on this model {shape}: run `modalkv calibrate` on it"
            )

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        tmp.replace(path)
        return path


def model_key(config: PretrainedConfig) -> str:
    """A file-name-safe name for the model of `config`: the embedded name ("smollm2-135m", "mini-vlm",
    "mini-vlm-gemma3") where it is one, else its folder name or hub id."""
    if config.model_type == _MINI_VLM_TYPE:
        return config.name_or_path or MINI_VLM
    source = config.name_or_path or config.model_type
    if Path(source).parent == cache_dir():  # an embedded model's converted folder, "<name>-<dtype>"
        return next((name for name in EMBEDDED_MODELS if Path(source).name.startswith(f"{name}-")), Path(source).name)
    return Path(source).name if Path(source).is_dir() else source.replace("/", "--")


def statistics_path(config: PretrainedConfig) -> Path:
    """Where `modalkv calibrate` stores the statistics of the model of `config`."""
    return cache_dir() / "calibration" / f"{model_key(config)}.json"


def load_statistics(config: PretrainedConfig, path: str | Path | None = None) -> HeadStatistics:
    """The head statistics of the model of `config` (from `path`, else its default place), checked against its
    shape; CalibrationError naming the command when there are none."""
    file = Path(path) if path else statistics_path(config)
    if not file.is_file():
        name = model_key(config)
        model = name if name in (*EMBEDDED_MODELS, *MINI_VLMS) else config.name_or_path or name
        raise CalibrationError(
            f"no head statistics for {name} at {file}: run `modalkv calibrate --model {model}` once (SparseMM and "
            "MixKV read them)"
        )
    statistics = HeadStatistics(**json.loads(file.read_text()))
    statistics.check(config)
    return statistics
