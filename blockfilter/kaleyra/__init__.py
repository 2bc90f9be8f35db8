"""Kaleyra, the built-in blocklist source: its HTTP client, its whole-list sync, and the source
that checks numbers through the status cache (the cost model, coalescing and the stream each
in a module of their own).

The names of :mod:`blockfilter.kaleyra.source` are importable from here too
(``from blockfilter.kaleyra import ...``, as before the package was split); they are looked
up on first use, so that importing one submodule does not import the others.
"""

from blockfilter._moved import names_from

__getattr__ = names_from("blockfilter.kaleyra.source", __name__)
