"""pytest fixtures for code that calls Kaleyra through blockfilter (entry point ``blockfilter``).

Installed with blockfilter, so any project's tests can use them without a conftest:

* ``kaleyra_simulator``: a started :class:`blockfilter.testing.simulator.Simulator` with an empty
  blocklist, SID ``TESTSID`` and key ``test-key-0123456789``; stopped after the test.
* ``kaleyra_env``: the same simulator, with ``KALEYRA_SID``, ``KALEYRA_API_KEY`` and
  ``KALEYRA_BASE_URL`` pointing at it for the duration of the test.

pytest loads this module in every project that has blockfilter installed, so it imports
nothing heavy at module level: the simulator is imported inside the fixtures.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from .simulator import Simulator

TEST_SID = "TESTSID"
TEST_API_KEY = "test-key-0123456789"


@pytest.fixture
def kaleyra_simulator() -> Iterator[Simulator]:
    """A running Kaleyra simulator: empty blocklist, no faults, ``TESTSID``/test key.

    Blocklist numbers with ``kaleyra_simulator.block("sms", "+918020000052")``, inject faults
    with ``set_faults``, read ``stats`` to see what your code asked.
    """
    from .simulator import Simulator

    with Simulator(sid=TEST_SID, api_key=TEST_API_KEY) as simulator:
        yield simulator


@pytest.fixture
def kaleyra_env(kaleyra_simulator: Simulator, monkeypatch: pytest.MonkeyPatch) -> Simulator:
    """The ``kaleyra_simulator``, with the ``KALEYRA_*`` variables set to reach it."""
    monkeypatch.setenv("KALEYRA_SID", TEST_SID)
    monkeypatch.setenv("KALEYRA_API_KEY", TEST_API_KEY)
    monkeypatch.setenv("KALEYRA_BASE_URL", kaleyra_simulator.base_url)
    return kaleyra_simulator
