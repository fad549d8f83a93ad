"""Methods ("presses"), chosen by name with `get_press`."""

from modalkv.presses.adakv import AdaKVPress
from modalkv.presses.base import PrefillInputs, Press
from modalkv.presses.full import FullPress
from modalkv.presses.h2o import H2OPress
from modalkv.presses.knorm import KnormPress
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
    )
}


def get_press(name: str, budget: float | int = 1.0, **params) -> Press:
    """Builds the press registered as `name` (see `PRESSES`), e.g. `get_press("snapkv", budget=0.2)`.

    `adakv:<name>` wraps a scoring press in AdaKV's head-wise budgets (`adakv` alone wraps SnapKV); parameters go to
    AdaKV if they are its own (`alpha_safeguard`), else to the inner press.
    """
    if name.startswith("adakv"):
        inner = name.partition(":")[2] or "snapkv"
        own = {key: params.pop(key) for key in ("alpha_safeguard",) if key in params}
        return AdaKVPress(budget=budget, press=get_press(inner, budget=budget, **params), **own)
    if name not in PRESSES:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(sorted(PRESSES))}, adakv:<method>")
    return PRESSES[name](budget=budget, **params)


__all__ = [
    "PRESSES",
    "AdaKVPress",
    "FullPress",
    "H2OPress",
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
