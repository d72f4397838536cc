"""The sections of the benchmark report (bench/run.py), one module each, in the report's order.

Every section module has the same three functions, as bench/storage.py:

    run(args) -> dict                      measure; ``args`` is bench.run's command line (``args.quick``, ...)
    render(res, quick) -> (lines, rows)    its part of REPORT.md, and its rows of the README's Results table
    plot(res, path) -> None                its figure, re-drawn from the results (only sections that have one)

``res`` is what ``run`` returned, as saved in REPORT.json (``--reuse`` renders a section from there).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SKILLS = ROOT / "bench" / "skills"
REPORTS = ROOT / "bench" / "reports"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def suffix(quick: bool) -> str:
    """The file-name suffix of a --quick run's reports and plots."""
    return "_quick" if quick else ""
