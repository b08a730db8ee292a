"""matplotlib for the reports' PNG plots, when the [eval] extra is installed."""

from __future__ import annotations

import sys
from functools import cache
from types import ModuleType


@cache
def pyplot() -> ModuleType | None:
    """matplotlib.pyplot on the file-only Agg backend; None (said once) without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        print("tqkv: matplotlib is not installed, so the reports have no PNG plots "
              "(pip install 'tqkv[eval]')", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
