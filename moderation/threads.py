"""Names for this process's own threads as the operating system shows them (``top -H``, ``ps -L``, py-spy)."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import threading

_PR_SET_NAME = 15
_MAX_NAME_BYTES = 15  # Linux keeps 16 bytes, the last one a NUL


def name_current_thread(name: str) -> bool:
    """Give the calling thread ``name`` at the OS level (Linux only; silently skipped elsewhere)."""
    threading.current_thread().name = name
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        encoded = name.encode("utf-8", "replace")[:_MAX_NAME_BYTES]
        return bool(libc.prctl(_PR_SET_NAME, ctypes.c_char_p(encoded), 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def native_name(native_id: int) -> str | None:
    """The OS-level name of one of this process's threads (Linux), or None."""
    try:
        with open(f"/proc/self/task/{native_id}/comm", encoding="utf-8") as handle:
            return handle.read().strip()
    except OSError:
        return None
