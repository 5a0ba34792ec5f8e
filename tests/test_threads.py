"""OS-level thread names."""

from __future__ import annotations

import sys
import threading

import pytest

from moderation.threads import name_current_thread, native_name

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread names via /proc")


@linux_only
def test_a_thread_named_shows_its_name_to_the_operating_system() -> None:
    seen: list[str | None] = []

    def run() -> None:
        assert name_current_thread("a-rather-long-thread-name")
        seen.append(native_name(threading.get_native_id()))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert seen == ["a-rather-long-t"]  # Linux keeps 15 bytes
    assert thread.name == "a-rather-long-thread-name"


def test_an_unknown_thread_has_no_name() -> None:
    assert native_name(-1) is None
