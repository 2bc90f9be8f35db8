"""The repository's root, put first on ``sys.path`` once for every benchmark.

The benchmarks run as scripts (``python benchmarks/soak.py``), which puts only this folder on
the path: importing this module first makes them measure this checkout's ``blockfilter`` and
share the tests' support (``tests.support``: the worker launcher, campaigns, plugins).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
