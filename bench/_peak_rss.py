"""Run the splitfed CLI and write this process's peak resident set size (bytes) to a file when it exits.

    python bench/_peak_rss.py OUT_FILE serve|device|edge ...
"""

import atexit
import resource
import sys
from pathlib import Path

out = Path(sys.argv[1])
atexit.register(lambda: out.write_text(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)))  # KiB on Linux
sys.argv = ["splitfed", *sys.argv[2:]]

from splitfed.cli import main  # noqa: E402

main()
