"""The opt-out ledger: opt-outs learnt from send results, replies and operators, kept
durably, in force at once in every process that shares the ledger, and written back to
Kaleyra if asked.

The three ways in are plain functions (and Celery tasks, and ``blockfilter optout``):

* :func:`report_send_results` -- what the provider said of sent messages;
* :func:`inbound` -- a reply (STOP, START...);
* :func:`add_optouts` / :func:`remove_optouts` -- an operator's word.

Imported lazily: a filter that never records pays only for :mod:`.source`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = [
    "Change",
    "InboundResult",
    "Ledger",
    "LedgerUnavailable",
    "SendResultsReport",
    "add_optouts",
    "inbound",
    "remove_optouts",
    "report_send_results",
    "shared_ledger",
]

if TYPE_CHECKING:
    from .api import (
        InboundResult,
        SendResultsReport,
        add_optouts,
        inbound,
        remove_optouts,
        report_send_results,
    )
    from .ledger import Change, Ledger, shared_ledger
    from .store import LedgerUnavailable

_LAZY = {
    "Change": "ledger",
    "Ledger": "ledger",
    "shared_ledger": "ledger",
    "LedgerUnavailable": "store",
    "InboundResult": "api",
    "SendResultsReport": "api",
    "add_optouts": "api",
    "inbound": "api",
    "remove_optouts": "api",
    "report_send_results": "api",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'blockfilter.ledger' has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f".{module}", __name__), name)
