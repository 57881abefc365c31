"""Where lsd keeps its files: the cache root (torch-free leaf, read by the cache and the model locator)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root(explicit: str | os.PathLike | None = None) -> Path:
    """``--cache-dir``, else ``LSD_CACHE_DIR``, else platformdirs' user cache dir for ``lsd``."""
    if explicit:
        return Path(explicit)
    if os.environ.get("LSD_CACHE_DIR"):
        return Path(os.environ["LSD_CACHE_DIR"])
    import platformdirs

    return Path(platformdirs.user_cache_dir("lsd"))
