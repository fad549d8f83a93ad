"""What differs between the supported transformers versions (pyproject: >=5.23,<5.40). Imports no modalkv module.

`CACHE_KWARG`: the keyword that hands a cache to a model's forward() and to generate(). transformers 5.24 renamed
`past_key_values` to `cache` (the old name still works there, with a FutureWarning on every call, and forward()
drops it in 5.40); 5.23 knows only `past_key_values`. So: `model(ids, **{CACHE_KWARG: cache})`.
"""

from __future__ import annotations

import transformers
from packaging.version import Version

CACHE_KWARG: str = "cache" if Version(transformers.__version__).release >= (5, 24) else "past_key_values"

__all__ = ["CACHE_KWARG"]
