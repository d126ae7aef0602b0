"""Where splitfed keeps prepared models and data (never fetched at run time)."""

from __future__ import annotations

import os
from pathlib import Path


def splitfed_home() -> Path:
    """``$SPLITFED_HOME``, default ``~/.cache/splitfed``: the prepared model cache and corpora."""
    return Path(os.environ.get("SPLITFED_HOME", Path.home() / ".cache" / "splitfed"))
