"""matplotlib, set up once for the analysis figures (the Agg backend: files only, no display)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plt"]
