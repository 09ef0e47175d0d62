"""Debian's Chromium driven by Playwright, for the browser tests and the page benchmark.

Playwright's own browser download cannot work here (``playwright install`` is
never called): ``make browser`` installs ``/usr/bin/chromium`` with apt-get,
and ``launch`` starts it headless with a fresh profile and no background
traffic (no sync, component updates, QUIC or first-run pages), so the only
traffic is to the loopback server under test.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from playwright.sync_api import BrowserContext

CHROMIUM = Path(os.environ.get("BRANCHLINE_CHROMIUM", "/usr/bin/chromium"))
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def missing() -> str | None:
    """Why the browser cannot run here (None when it can)."""
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing: run 'make browser' as root (apt-get install -y chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is missing: make venv (the dev extra has it)"
    return None


@contextmanager
def launch(width: int = 1280, height: int = 800) -> Iterator[BrowserContext]:
    """A Chromium context with a fresh user-data dir, closed on exit."""
    from playwright.sync_api import sync_playwright

    with (
        tempfile.TemporaryDirectory(prefix="branchline-chromium-") as profile,
        sync_playwright() as pw,
    ):
        context = pw.chromium.launch_persistent_context(
            profile,
            executable_path=str(CHROMIUM),
            args=ARGS,
            headless=True,
            viewport={"width": width, "height": height},
            locale="en-GB",
        )
        try:
            yield context
        finally:
            context.close()
