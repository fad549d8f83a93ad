"""Methods ("presses"), chosen by name with `get_press`."""

from dataclasses import fields

from modalkv.presses.adakv import AdaKVPress
from modalkv.presses.base import PrefillInputs, Press
from modalkv.presses.chunkkv import ChunkKVPress
from modalkv.presses.expected_attention import ExpectedAttentionPress
from modalkv.presses.full import FullPress
from modalkv.presses.h2o import H2OPress
from modalkv.presses.keydiff import KeyDiffPress
from modalkv.presses.knorm import KnormPress
from modalkv.presses.kvzip import KVzipPress
from modalkv.presses.lookm import LookMPress
from modalkv.presses.madakv import MadaKVPress
from modalkv.presses.pyramidkv import PyramidKVPress
from modalkv.presses.random_press import RandomPress
from modalkv.presses.retentivekv import RetentiveKVPress
from modalkv.presses.snapkv import SnapKVPress
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
    )
}
# Presses that wrap a scoring press, named `<wrapper>:<press>` (`<wrapper>` alone wraps SnapKV).
WRAPPERS: dict[str, type[Press]] = {press.name: press for press in (AdaKVPress, ChunkKVPress)}
# Every method by name, for grids over all of them: each press, and each wrapper around SnapKV.
METHODS: list[str] = [*PRESSES, *(f"{wrapper}:snapkv" for wrapper in WRAPPERS)]


def get_press(name: str, budget: float | int = 1.0, **params) -> Press:
    """Builds the press registered as `name` (see `PRESSES`), e.g. `get_press("snapkv", budget=0.2)`.

    `<wrapper>:<name>` (a name of `WRAPPERS`: `adakv`, `chunkkv`) wraps a scoring press (the wrapper alone wraps
    SnapKV); parameters go to the wrapper if they are its own (`alpha_safeguard`, `chunk_length`), else to the inner
    press.
    """
    wrapper, _, inner = name.partition(":")
    if wrapper in WRAPPERS:
        press = WRAPPERS[wrapper]
        own_names = {f.name for f in fields(press)} - {f.name for f in fields(Press)} - {"press"}
        own = {key: params.pop(key) for key in own_names if key in params}
        return press(budget=budget, press=get_press(inner or "snapkv", budget=budget, **params), **own)
    if name not in PRESSES:
        wrappers = ", ".join(f"{w}:<method>" for w in WRAPPERS)
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(sorted(PRESSES))}, {wrappers}")
    return PRESSES[name](budget=budget, **params)


__all__ = [
    "METHODS",
    "PRESSES",
    "WRAPPERS",
    "AdaKVPress",
    "ChunkKVPress",
    "ExpectedAttentionPress",
    "FullPress",
    "H2OPress",
    "KVzipPress",
    "KeyDiffPress",
    "KnormPress",
    "LookMPress",
    "MadaKVPress",
    "PrefillInputs",
    "Press",
    "PyramidKVPress",
    "RandomPress",
    "RetentiveKVPress",
    "SnapKVPress",
    "StreamingLLMPress",
    "TOVAPress",
    "get_press",
]
