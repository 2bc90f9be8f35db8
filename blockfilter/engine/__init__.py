"""The filter: its passes (filter), the status table, the verdicts, the summary, JSON Lines.

The names of :mod:`blockfilter.engine.filter` are importable from here too
(``from blockfilter.engine import ...``, as before the package was split); they are looked
up on first use, so that importing one submodule does not import the others.
"""

from blockfilter._moved import names_from

__getattr__ = names_from("blockfilter.engine.filter", __name__)
