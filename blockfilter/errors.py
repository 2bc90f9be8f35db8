"""The exceptions blockfilter raises.

Upstream failures are split by what a caller should do about them:

* :class:`FinalUpstreamError` and its subclasses will not get better by retrying
  (credentials refused, account not allowed, low balance, a request we built wrong).
* :class:`TransientUpstreamError` and its subclasses may succeed on a later attempt
  (5xx, 429, 202 "accepted, no answer yet", timeouts, resets, garbled bodies).

No message of any of these ever contains the API key: the client builds them from the
response code and the request *shape*, never from the headers.

Every exception a caller of the package may catch is defined here, whichever part raises it
(the modules that raise them import them from here, and their names stay importable from
there too): the transport's, the plugins', the files', the deferred queue's and the numbers'.
"""

from __future__ import annotations

from typing import Final


class BlockfilterError(Exception):
    """Base class of every error blockfilter raises on purpose."""


class ConfigError(BlockfilterError):
    """A setting is missing or wrong. The message names the variable and says what to do."""


class InputChanged(BlockfilterError):
    """The input read on a later pass of a run is not the one read on the first.

    The filter reads its input more than once and trusts what the first pass learnt of each
    line; a file edited during a run would get verdicts meant for other lines.
    """


class ReaderFailed(BlockfilterError):
    """The process that read the input's first pass ended without handing over all it read
    (killed, out of memory): the run stops, and no message gets a verdict from it."""


class UpstreamError(BlockfilterError):
    """The blocklist API could not answer a request.

    :ivar status: HTTP status, or ``None`` when no response arrived.
    :ivar code: Kaleyra's code (``RBC001``, ``WA500``...), or a short code of ours
        (``timeout``, ``connection``, ``bad_body``) when there was none.
    """

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code


class FinalUpstreamError(UpstreamError):
    """Retrying will not help."""


class CredentialsRefused(FinalUpstreamError):
    """``RBC001`` (wrong SID or key), ``WA401``/``WA-401`` (account or number not allowed),
    ``E110`` (balance too low): the account cannot check anything until a human acts."""


class BadRequest(FinalUpstreamError):
    """``WA400``: the API rejected the payload. This is a bug of blockfilter's; the message
    carries the request shape (channel, count of numbers) to report it."""


class TransientUpstreamError(UpstreamError):
    """Retrying later may succeed.

    :ivar retry_after: seconds the server asked us to wait (``Retry-After``), if any.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ):
        super().__init__(message, status=status, code=code)
        self.retry_after = retry_after


class RetryBudgetExhausted(TransientUpstreamError):
    """Every attempt allowed by the retry budget failed with a transient error.

    :ivar last_error: the last transient error seen.
    :ivar attempts: how many attempts were made.
    """

    def __init__(self, message: str, *, last_error: TransientUpstreamError, attempts: int):
        super().__init__(
            message,
            status=last_error.status,
            code=last_error.code,
            retry_after=last_error.retry_after,
        )
        self.last_error = last_error
        self.attempts = attempts


class RequestBudgetExhausted(BlockfilterError):
    """``--max-requests`` was reached: the remaining numbers are left unchecked on purpose."""


class SyncAborted(FinalUpstreamError):
    """A full-list sync stopped before the list ended: the upstream repeated a page, or paged
    past every bound (pages, time). Nothing it read is put in place; lookups answer instead."""


class CheckFailed(BlockfilterError):
    """Some of the numbers asked about could not be checked, so no answer is given: a list of
    the blocklisted ones that left them out would pass them off as not blocklisted."""


# -- numbers -------------------------------------------------------------------------------


class InvalidNumber(ValueError):
    """The input is not a valid phone number (or names an unknown region).

    ``reason`` is always ``"invalid_number"``, the verdict's stable code; ``detail`` says why in
    words and never contains the full number (at most its masked form).
    """

    reason: Final = "invalid_number"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


# -- plugins -------------------------------------------------------------------------------


class PluginError(ConfigError):
    """A plugin cannot be used: it failed to load (strict mode), implements an unknown hook,
    refused to start, or returned something unusable. The message names the plugin.

    :ivar plugin_name: the plugin's name (its entry-point name), when one is to blame.
    """

    def __init__(self, message: str, *, plugin_name: str | None = None) -> None:
        super().__init__(message)
        self.plugin_name = plugin_name


# -- files the command line writes ---------------------------------------------------------


class OutputError(BlockfilterError):
    """A file could not be written; the old one, if any, is left as it was."""


# -- the deferred queue --------------------------------------------------------------------


class DeferredNotParked(BlockfilterError):
    """Deferred messages could not be parked on the deferred queue (the broker is away): they
    were handed to ``blockfilter_suppressed`` as ``deferred``, and the task fails so that
    someone looks. Nothing replays them: the pipeline's suppressed hook has the record."""

    @classmethod
    def of(cls, count: int, error: Exception, *, quote_error: bool) -> DeferredNotParked:
        """The error for ``count`` messages the broker would not take.

        :param quote_error: also quote ``error``'s text (a task masks its exceptions before
            they are stored; the collector's go to the worker log as they are).
        """
        cause = f"{type(error).__name__}: {error}" if quote_error else type(error).__name__
        tail = " as deferred" if quote_error else ""
        return cls(
            f"{count} deferred message(s) could not be parked on the deferred queue "
            f"({cause}); they were handed to blockfilter_suppressed{tail}"
        )


# -- the transport under the Kaleyra client -------------------------------------------------


class TransportError(Exception):
    """The exchange ended without a whole answer. The text says what went wrong (an
    exception's class name, at most), never the URL: it holds the numbers asked."""


class TransportTimeout(TransportError):
    """No whole answer within the request's ``timeout`` (or no connection within its
    ``connect_timeout``)."""


class TransportFailed(TransportError):
    """The connection could not be made, or broke before the answer was whole."""


class BodyTooLarge(TransportError):
    """The body is longer than the request's ``max_body_bytes``."""


# -- the opt-out ledger --------------------------------------------------------------------


class LedgerUnavailable(BlockfilterError):
    """The ledger could not be read or written (a lock, a lost connection, a bad file).

    Reading fails closed: the numbers it would have answered are left unchecked (deferred).
    """


# -- the collector's celery-batches ---------------------------------------------------------


class UnsupportedBatches(RuntimeError):
    """The installed celery-batches lacks a part the collector relies on."""


# -- the status cache ----------------------------------------------------------------------


class CacheUnavailable(BlockfilterError):
    """The cache could not be reached or did not answer. The message names the server (without
    credentials) and the operation, never a secret or a phone number. The caller may go on
    without the cache."""
