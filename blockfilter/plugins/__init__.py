"""The hook system: hook specs, the plugin manager, the built-in plugins.

The names of :mod:`blockfilter.plugins.manager` are importable from here too
(``from blockfilter.plugins import ...``, as before the package was split); they are looked
up on first use, so that importing one submodule does not import the others.
"""

from blockfilter._moved import names_from

__getattr__ = names_from("blockfilter.plugins.manager", __name__)
