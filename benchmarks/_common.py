"""What the benchmark scripts share: where ../shared and the benchmark cache are."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def shared_dir(given: str | None, needs: str) -> Path:
    """``--shared``, ``$TTA_SHARED`` or ``../shared``; exits with a message if ``needs`` is missing."""
    path = Path(given or os.environ.get("TTA_SHARED") or REPO.parent / "shared")
    if not (path / needs).is_file():
        sys.exit(f"no {needs} under {path}: pass --shared or set TTA_SHARED")
    return path


def cache_dir(given: str | None) -> Path:
    """``--cache``, ``$TTA_BENCH_CACHE`` or ``~/.cache/tta-cli/bench``."""
    return Path(given or os.environ.get("TTA_BENCH_CACHE") or Path.home() / ".cache" / "tta-cli" / "bench")
