"""blockfilter: check recipients against Kaleyra's blocklist before a message goes out."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
