"""Run one ``eac-lightning`` command in this process and fail on the warnings a user must not have to read.

    python scripts/audit_warnings.py fit --config configs/quickstart.yaml --model.model testbed:tiny ...

The command runs as ``eac-lightning`` would run it, with every FutureWarning and DeprecationWarning recorded
(each time it is raised; a third-party DeprecationWarning, which Python hides from users, stays unprinted) and the
transformers log watched. Exit status: the command's own when it failed; else 1 when it raised

* a FutureWarning (Python shows those to users), except the third-party ones in :data:`KNOWN_THIRD_PARTY`;
* a DeprecationWarning from the project's own code, or one that names a KV-cache argument;
* a transformers log line about a deprecation or a sequence that "will result in indexing errors";

and 0 otherwise. Used by ``scripts/check_deps.sh`` at both ends of the dependency ranges and by
``tests/test_deps.py``.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import sys
import warnings
from pathlib import Path

#: The folder of the eac_lightning package that runs (found without importing it, so no warning escapes the audit).
PACKAGE = str(Path(importlib.util.find_spec("eac_lightning").origin).resolve().parent)

#: (file suffix, message start): FutureWarnings raised inside a dependency by the dependency's own code, that no call
#: of the project can avoid. Each is printed as such, never silently passed.
KNOWN_THIRD_PARTY = [
    # Lightning's CombinedLoader builds torch's deprecated LeafSpec on every fit (torch 2.13 warns; seen with
    # lightning 2.4.0 and 2.6.6, the ends of its range here; Lightning-AI/pytorch-lightning#21326).
    ("lightning/pytorch/utilities/_pytree.py", "`isinstance(treespec, LeafSpec)` is deprecated"),
]

LOG_PATTERNS = re.compile(r"deprecat|indexing errors", re.IGNORECASE)
CACHE_NAMES = re.compile(r"past_key_values|cache_params")


class _Log(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if LOG_PATTERNS.search(message):
            self.lines.append(f"{record.name}: {message}")


def classify(category: type[Warning], filename: str, message: str) -> str:
    """``"fail"``, ``"third-party"`` (known, allowed) or ``"ignore"`` for one recorded warning."""
    ours = str(Path(filename).resolve()).startswith(PACKAGE + "/")
    if issubclass(category, FutureWarning):
        if not ours and any(filename.replace("\\", "/").endswith(f) and message.startswith(m)
                            for f, m in KNOWN_THIRD_PARTY):
            return "third-party"
        return "fail"
    if issubclass(category, DeprecationWarning):
        return "fail" if ours or CACHE_NAMES.search(message) else "ignore"
    return "ignore"


def main(argv: list[str]) -> int:
    recorded: list[tuple[str, str]] = []
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        verdict = classify(category, str(filename), str(message))
        if verdict != "ignore":
            recorded.append((verdict, f"{category.__name__} at {filename}:{lineno}: {message}"))
        elif issubclass(category, DeprecationWarning):
            return  # hidden by Python's default filters: not part of what a user sees
        shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    warnings.simplefilter("always", FutureWarning)
    warnings.simplefilter("always", DeprecationWarning)
    log = _Log()
    logging.getLogger("transformers").addHandler(log)

    from eac_lightning.lightning.cli import main as cli

    status = 0
    sys.argv = ["eac-lightning", *argv]  # as the console script sees its command line
    try:
        cli()
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 1
    failures = [text for verdict, text in recorded if verdict == "fail"] + [f"log {line}" for line in log.lines]
    allowed = sorted({text for verdict, text in recorded if verdict == "third-party"})
    sys.stdout.flush()
    for text in allowed:
        print(f"audit: known third-party warning: {text}", file=sys.stderr)
    for text in failures:
        print(f"audit: FORBIDDEN {text}", file=sys.stderr)
    if status:
        print(f"audit: the command failed (exit {status})", file=sys.stderr)
        return status
    print(f"audit: {len(failures)} forbidden warning(s)", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
