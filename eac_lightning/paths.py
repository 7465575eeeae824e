"""Where the project finds its offline data and keeps its caches.

The offline data the defaults read (CounterFact and ZsRE samples, the four downstream tasks, WikiText-2) ships inside
the package, in ``eac_lightning/assets/data`` (``PROVENANCE.md`` there names each file's source and licence);
``EAC_DATA_DIR`` points elsewhere. Rebuilt testbeds and covariance statistics go to ``EAC_CACHE_DIR`` (default
``~/.cache/eac_lightning``).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
#: Run configs and method presets, shipped as package data (``configs/`` in a clone links here).
CONFIGS_DIR = Path(__file__).resolve().parent / "configs"


def data_dir() -> Path:
    """The offline data folder: ``$EAC_DATA_DIR`` or the package's own ``assets/data``."""
    env = os.environ.get("EAC_DATA_DIR")
    return Path(env) if env else ASSETS_DIR / "data"


def cache_dir() -> Path:
    """The cache folder for testbeds and statistics: ``$EAC_CACHE_DIR`` or ``~/.cache/eac_lightning``, created if
    missing. A folder that cannot be created or written raises ``OSError`` naming it and ``EAC_CACHE_DIR``."""
    env = os.environ.get("EAC_CACHE_DIR")
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "eac_lightning"
    return writable_cache_folder(path)


def writable_cache_folder(path: Path) -> Path:
    """``path`` created if missing; ``OSError`` naming it and ``EAC_CACHE_DIR`` when it cannot be created or
    written (a read-only or missing home directory, a file in the way, a full disk)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(err.errno, _cache_advice(path, f"cannot be created ({err.strerror or err})")) from err
    if not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, _cache_advice(path, "is not writable"))
    return path


def _cache_advice(path: Path, problem: str) -> str:
    given = os.environ.get("EAC_CACHE_DIR")
    where = f"EAC_CACHE_DIR={given}" if given else "the default under your home directory"
    return (f"the cache folder {path} ({where}) {problem}; set EAC_CACHE_DIR to a writable folder, e.g. "
            "EAC_CACHE_DIR=/tmp/eac_cache (it keeps covariance statistics and rebuilt testbeds)")


def resolve_data_path(path: str | os.PathLike) -> Path:
    """Resolve a data path: an existing path as it is, else a relative name under the data folder
    (``counterfact``, ``zsre/zsre_mend_train-800.json``), else unchanged (a hub dataset name)."""
    p = Path(path).expanduser()
    if p.exists() or p.is_absolute():
        return p
    alt = data_dir() / p
    return alt if alt.exists() else p


def data_source_name(file: str | os.PathLike) -> str:
    """How a data file is named in ledgers and testbed records: relative to the data folder when it lies there
    (the same on every machine), else as given."""
    p = Path(file)
    try:
        return p.resolve().relative_to(data_dir().resolve()).as_posix()
    except ValueError:
        return str(file)
