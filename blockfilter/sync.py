"""Moved to :mod:`blockfilter.kaleyra.sync`.

The old name works, with a DeprecationWarning, until 0.3.
"""

from blockfilter._moved import moved

moved(__name__, "blockfilter.kaleyra.sync")
