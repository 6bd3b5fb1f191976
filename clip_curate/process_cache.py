"""Values built once per worker process and shared by every DoFn instance and thread there.

Beam runs many instances of one DoFn in a worker process (threads, bundles); a model, a language detector or
a decode budget built per instance multiplies load time and memory. A :class:`ProcessCache` builds each
key's value on first use and hands the same object to every later caller.

:func:`trim_heap` hands memory freed after a load back to the system.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys
import threading
from typing import Any, Callable, Hashable


class ProcessCache:
    """``get(key, build)``: the value for ``key``, ``build()`` called once per process and key."""

    def __init__(self) -> None:
        self._values: dict[Hashable, Any] = {}
        self._lock = threading.Lock()

    def get(self, key: Hashable, build: Callable[[], Any]) -> Any:
        # held while building: a second caller waits for the first value instead of building its own
        with self._lock:
            if key not in self._values:
                self._values[key] = build()
            return self._values[key]


_LIBC: Any = None


def trim_heap() -> bool:
    """Return freed heap memory to the system (glibc ``malloc_trim``), e.g. after a model load freed its
    transient copies; False where the C library has no ``malloc_trim`` (not glibc)."""
    global _LIBC
    if _LIBC is None:
        try:
            linux = sys.platform.startswith("linux")
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6") if linux else False
        except OSError:
            _LIBC = False
    trim = getattr(_LIBC, "malloc_trim", None) if _LIBC else None
    if trim is None:
        return False
    trim(0)
    return True

