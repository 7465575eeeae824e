"""Give the memory a step freed back to the operating system, so that a long stream's resident memory stays flat.

An edit step and, more so, an evaluation of every edit so far allocate and free hundreds of megabytes of tensors of
varying sizes. glibc's allocator keeps freed blocks for reuse rather than returning them, so the process's resident
memory ratchets up with each evaluation without being in use: on a 10,000-edit AlphaEdit stream on ``testbed:small``,
``malloc_trim(0)`` called into the running process after its evaluation at 5,000 edits took its resident memory from
1,547 to 1,309 MB (docs/long_streams.md, "Memory"). Calling it after every step and every evaluation keeps what the
run holds visible as what it uses. A no-op where the C library has no ``malloc_trim`` (macOS, musl, Windows).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _trim():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        trim = getattr(libc, "malloc_trim", None) if libc is not None else None
    except OSError:
        return None
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_freed_memory() -> bool:
    """Return the allocator's freed memory to the operating system (glibc ``malloc_trim(0)``). True if it could be
    asked (whether or not anything was freed), False where the C library has no such call."""
    trim = _trim()
    if trim is None:
        return False
    trim(0)
    return True
