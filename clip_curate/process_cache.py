"""Values built once per worker process and shared by every DoFn instance and thread there.

Beam runs many instances of one DoFn in a worker process (threads, bundles); a model, a language detector or
a decode budget built per instance multiplies load time and memory. A :class:`ProcessCache` builds each
key's value on first use and hands the same object to every later caller.
"""
from __future__ import annotations

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
