"""The Chromium that the browser tests drive: Debian's package (no browser download), installed when missing.

`python -m tsunagu.browser` prints its path (installing it with apt-get as root when needed), for
`make test`; the tests find it the same way, or take `TSUNAGU_CHROMIUM`.
"""

from __future__ import annotations

import os
import shutil
import sys

from tsunagu.stack.apt import apt_install
from tsunagu.stack.settings import StackError

CANDIDATES = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str | None:
    configured = os.environ.get("TSUNAGU_CHROMIUM")
    if configured:
        return configured if os.access(configured, os.X_OK) else None
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def ensure_chromium() -> str:
    found = find_chromium()
    if found:
        return found
    apt_install(["chromium"])
    found = find_chromium()
    if found is None:
        raise StackError("apt-get installed chromium but no chromium binary is on PATH")
    return found


def main() -> int:
    try:
        print(ensure_chromium())
    except StackError as error:
        print(f"tsunagu browser: {error.reason}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
