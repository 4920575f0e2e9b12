"""Where the project keeps what it makes once and reuses: the demo model, the benchmark
payload, the container build's downloads. Nothing here is needed to serve."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/model-serving``, by default ``~/.cache/model-serving``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "model-serving"
