"""Names that are used but never defined or imported, in the code a user runs.

The benchmarks in bench/ are not imported by any other test, so a missing import there only
shows when someone runs the benchmark; pyflakes finds it without running it. The tests
themselves are left out: pytest fixtures imported from another test module look unused to
pyflakes but are how those tests share fixtures.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHECKED = ["mycelium", "tasks", "flows", "bench"]


def test_no_undefined_or_unused_names_in_the_shipped_code():
    result = subprocess.run([sys.executable, "-m", "pyflakes", *CHECKED], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
