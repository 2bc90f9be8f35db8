"""Moved to :mod:`blockfilter.testing.demo`.

The old name works, with a DeprecationWarning, until 0.3.
"""

from blockfilter._moved import moved

moved(__name__, "blockfilter.testing.demo")
