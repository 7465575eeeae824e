"""Where the project finds the shared offline data and keeps its caches.

The real datasets live beside the checkout in ``../shared/data`` (never copied into the repository);
``EAC_DATA_DIR`` points elsewhere. Built testbeds and covariance statistics go to ``EAC_CACHE_DIR``
(default ``~/.cache/eac_lightning``).
"""

from __future__ import annotations

import os
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """The offline data folder: ``$EAC_DATA_DIR`` or ``<repo>/../shared/data``."""
    env = os.environ.get("EAC_DATA_DIR")
    return Path(env) if env else (_REPO_ROOT.parent / "shared" / "data")


def cache_dir() -> Path:
    """The cache folder for testbeds and statistics: ``$EAC_CACHE_DIR`` or ``~/.cache/eac_lightning``."""
    env = os.environ.get("EAC_CACHE_DIR")
    path = Path(env) if env else Path.home() / ".cache" / "eac_lightning"
    path.mkdir(parents=True, exist_ok=True)
    return path


def resolve_data_path(path: str | os.PathLike) -> Path:
    """Resolve a data path; a relative path that does not exist is tried under the shared data folder.

    Configs name ``../shared/data/counterfact``; that works from the repo root and, through this fallback,
    ``counterfact`` alone works from anywhere.
    """
    p = Path(path).expanduser()
    if p.exists() or p.is_absolute():
        return p
    alt = shared_data_dir() / p
    return alt if alt.exists() else p
