"""Testing helpers for fpsolve and its plugins: hypothesis strategies (:mod:`.strategies`)."""

from __future__ import annotations

__all__ = ["strategies"]
