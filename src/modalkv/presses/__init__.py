"""Methods ("presses"), chosen by name with `get_press`."""

from dataclasses import fields

from modalkv.presses.adakv import AdaKVPress
from modalkv.presses.base import PrefillInputs, Press
from modalkv.presses.cam import CAMPress
from modalkv.presses.chunkkv import ChunkKVPress
from modalkv.presses.expected_attention import ExpectedAttentionPress
from modalkv.presses.full import FullPress
from modalkv.presses.h2o import H2OPress
from modalkv.presses.keydiff import KeyDiffPress
from modalkv.presses.knorm import KnormPress
from modalkv.presses.kvzip import KVzipPress
from modalkv.presses.lookm import LookMPress
from modalkv.presses.madakv import MadaKVPress
from modalkv.presses.mixkv import MixKVPress
from modalkv.presses.pyramidkv import PyramidKVPress
from modalkv.presses.random_press import RandomPress
from modalkv.presses.retentivekv import RetentiveKVPress
from modalkv.presses.snapkv import SnapKVPress
from modalkv.presses.sparsemm import SparseMMPress
from modalkv.presses.streaming_llm import StreamingLLMPress
from modalkv.presses.tova import TOVAPress

PRESSES: dict[str, type[Press]] = {
    press.name: press
    for press in (
        FullPress,
        StreamingLLMPress,
        H2OPress,
        SnapKVPress,
        PyramidKVPress,
        TOVAPress,
        KnormPress,
        RandomPress,
        LookMPress,
        MadaKVPress,
        RetentiveKVPress,
        KeyDiffPress,
        ExpectedAttentionPress,
        KVzipPress,
        MixKVPress,
        CAMPress,
    )
}
# Presses that wrap a scoring press, named `<wrapper>:<press>` (`<wrapper>` alone wraps SnapKV).
WRAPPERS: dict[str, type[Press]] = {press.name: press for press in (AdaKVPress, ChunkKVPress, SparseMMPress)}
# Every method by name, for grids over all of them: each press, each wrapper around SnapKV, and MixKV on SparseMM's
# budgets (the MixKV paper's own pairing).
METHODS: list[str] = [*PRESSES, *(f"{wrapper}:snapkv" for wrapper in WRAPPERS), "sparsemm:mixkv"]


def get_press(name: str, budget: float | int = 1.0, **params) -> Press:
    """Builds the press registered as `name` (see `PRESSES`), e.g. `get_press("snapkv", budget=0.2)`.

    `<wrapper>:<name>` (a name of `WRAPPERS`: `adakv`, `chunkkv`, `sparsemm`) wraps a scoring press (the wrapper
    alone wraps SnapKV); parameters go to the wrapper if they are its own (`alpha_safeguard`, `chunk_length`,
    `ratio`), else to the inner press (`calibration` to both); the wrapper's `inner_defaults` (SparseMM's 32-token
    window) apply to the inner press where it has them and they are not given.
    """
    wrapper, _, inner = name.partition(":")
    if wrapper in WRAPPERS:
        press = WRAPPERS[wrapper]
        inner = inner or "snapkv"
        inner_names = {f.name for f in fields(PRESSES[inner])} if inner in PRESSES else set()
        own_names = {f.name for f in fields(press) if f.init} - {f.name for f in fields(Press)} - {"press"}
        own = {key: params[key] for key in own_names if key in params}
        defaults = {k: v for k, v in getattr(press, "inner_defaults", {}).items() if k in inner_names}
        inner_params = defaults | {k: v for k, v in params.items() if k not in own or k in inner_names}
        return press(budget=budget, press=get_press(inner, budget=budget, **inner_params), **own)
    if name not in PRESSES:
        wrappers = ", ".join(f"{w}:<method>" for w in WRAPPERS)
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(sorted(PRESSES))}, {wrappers}")
    return PRESSES[name](budget=budget, **params)


def parse_value(text: str) -> bool | int | float | str:
    """A parameter value as written on the command line: true/false, an int, a float, else the text."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def split_methods(text: str) -> list[str]:
    """'snapkv,madakv(ends=1, mpa=false)' -> ['snapkv', 'madakv(ends=1, mpa=false)']: commas inside parentheses
    belong to the method."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text + ","):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    if depth:
        raise ValueError(f"unbalanced parentheses in the methods {text!r}")
    return [part for part in parts if part]


def parse_method(spec: str) -> tuple[str, dict[str, bool | int | float | str]]:
    """'madakv(ends=1, mpa=false)' -> ('madakv', {'ends': 1, 'mpa': False}): a press's label (`Press.label`) read
    back, so that one run can hold several settings of a method."""
    name, paren, rest = spec.partition("(")
    if not paren:
        return spec.strip(), {}
    if not rest.endswith(")"):
        raise ValueError(f"a method with parameters is written name(key=value, ...), got {spec!r}")
    params = {}
    for item in filter(None, (part.strip() for part in rest[:-1].split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"method parameters are key=value, got {item!r} in {spec!r}")
        params[key.strip()] = parse_value(value.strip())
    return name.strip(), params


__all__ = [
    "METHODS",
    "PRESSES",
    "WRAPPERS",
    "AdaKVPress",
    "CAMPress",
    "ChunkKVPress",
    "ExpectedAttentionPress",
    "FullPress",
    "H2OPress",
    "KVzipPress",
    "KeyDiffPress",
    "KnormPress",
    "LookMPress",
    "MadaKVPress",
    "MixKVPress",
    "PrefillInputs",
    "Press",
    "PyramidKVPress",
    "RandomPress",
    "RetentiveKVPress",
    "SnapKVPress",
    "SparseMMPress",
    "StreamingLLMPress",
    "TOVAPress",
    "get_press",
    "parse_method",
    "parse_value",
    "split_methods",
]
