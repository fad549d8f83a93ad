"""modalkv: KV-cache compression for multimodal and text LLMs on Hugging Face transformers.

Importing modalkv changes nothing in transformers: the `modalkv` attention is registered when a press is attached.
"""

from modalkv.cache import CompressedCache
from modalkv.models import DEFAULT_MODEL, load_model
from modalkv.presses import PRESSES, FullPress, Press, SnapKVPress, StreamingLLMPress, get_press

__all__ = [
    "DEFAULT_MODEL",
    "PRESSES",
    "CompressedCache",
    "FullPress",
    "Press",
    "SnapKVPress",
    "StreamingLLMPress",
    "get_press",
    "load_model",
]
