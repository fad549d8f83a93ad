"""Methods ("presses"), chosen by name with `get_press`."""

from modalkv.presses.base import PrefillInputs, Press
from modalkv.presses.full import FullPress
from modalkv.presses.snapkv import SnapKVPress
from modalkv.presses.streaming_llm import StreamingLLMPress

PRESSES: dict[str, type[Press]] = {press.name: press for press in (FullPress, StreamingLLMPress, SnapKVPress)}


def get_press(name: str, budget: float | int = 1.0, **params) -> Press:
    """Builds the press registered as `name` (see `PRESSES`), e.g. `get_press("snapkv", budget=0.2)`."""
    if name not in PRESSES:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(sorted(PRESSES))}")
    return PRESSES[name](budget=budget, **params)


__all__ = ["PRESSES", "FullPress", "PrefillInputs", "Press", "SnapKVPress", "StreamingLLMPress", "get_press"]
