"""Keeping secrets and phone numbers out of logs, errors and reprs."""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from typing import Any

# A number in a log line: "+" then 8 to 15 digits (E.164 is at most 15), or the same with the
# "+" percent-encoded, as it travels in a query string (urllib3's debug lines print the URL).
_E164_IN_TEXT = re.compile(r"(\+|%2[Bb])([0-9]{8,15})")

# Records of these loggers (and their children) are cleaned when they are made, whichever
# handler gets them later: the library's own, and the HTTP and task stacks it hands numbers
# and the key to. A host application's own loggers are left alone.
LIBRARY_LOGGERS = ("blockfilter", "urllib3", "requests", "celery", "kombu")


def mask_number(number: str) -> str:
    """Mask a phone number for logs: ``+918020000052`` -> ``+91802XXXXX52``.

    The ``+``, the first five and the last two digits are kept and the length is kept, so an
    operator can still tell numbers apart without the log giving them away. Anything too short
    to mask that way is masked whole.
    """
    if len(number) < 9:
        return "X" * len(number)
    return number[:6] + "X" * (len(number) - 8) + number[-2:]


def _mask_match(match: re.Match[str]) -> str:
    prefix, digits = match.group(1), match.group(2)
    return prefix + mask_number("+" + digits)[1:]


def mask_numbers_in(text: str) -> str:
    """Mask every E.164-looking number inside free text (``+91...`` and ``%2B91...``)."""
    return _E164_IN_TEXT.sub(_mask_match, text)


def redact(text: str, *secrets: str | None) -> str:
    """Replace every occurrence of each non-empty secret in ``text`` with ``[REDACTED]``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[REDACTED]")
    return text


class SecretFilter(logging.Filter):
    """A logging filter that removes registered secrets and masks numbers in every record.

    The library never logs the key on purpose; this is the belt to that pair of braces, so a
    third-party library (urllib3 debug logs, say) cannot leak it either. The message, the
    traceback text and the stack text of a record are all cleaned.
    """

    def __init__(self) -> None:
        super().__init__()
        # A tuple replaced whole: records are cleaned on many threads while a new Filter may
        # add its key, and a set would change size under their iteration.
        self._secrets: tuple[str, ...] = ()

    def add_secret(self, secret: str | None) -> None:
        if secret and secret not in self._secrets:
            self._secrets = (*self._secrets, secret)

    def clean(self, text: str) -> str:
        return mask_numbers_in(redact(text, *self._secrets))

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            # Arguments that do not fit the format: the handler would print them raw in its
            # error report, so they are dropped here (the format itself is kept, cleaned).
            record.msg = self.clean(f"{record.msg} (unformattable logging arguments dropped)")
            record.args = None
        else:
            cleaned = self.clean(message)
            if cleaned != message:
                record.msg = cleaned
                record.args = None
        if record.exc_info and not record.exc_text:
            # Formatters reuse exc_text when set, so the cleaned traceback is what they print.
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.clean(record.exc_text)
        if record.stack_info:
            record.stack_info = self.clean(record.stack_info)
        return True


SECRET_FILTER = SecretFilter()

_factory_lock = threading.Lock()


def _is_library_record(name: str) -> bool:
    return any(name == root or name.startswith(root + ".") for root in LIBRARY_LOGGERS)


def guard_library_logs(*secrets: str | None) -> None:
    """Register secrets and clean every record of :data:`LIBRARY_LOGGERS` as it is made.

    Cleaning at creation (a log record factory, installed once and chained to the one in
    place) covers handlers added later too: a pytest ``caplog``, a Celery worker's, a host
    application's. Idempotent; the filter and the Python API call it.
    """
    for secret in secrets:
        SECRET_FILTER.add_secret(secret)
    with _factory_lock:
        previous = logging.getLogRecordFactory()
        if getattr(previous, "_blockfilter_guard", False):
            return

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            if _is_library_record(record.name):
                SECRET_FILTER.filter(record)
            return record

        guarded: Callable[..., logging.LogRecord] = factory
        guarded._blockfilter_guard = True  # type: ignore[attr-defined]
        logging.setLogRecordFactory(guarded)


def install_secret_filter(*secrets: str | None) -> None:
    """Register secrets, guard the library's loggers, and make every handler of the root
    logger filter them too (the command line: it owns the process, so everything it prints
    is cleaned)."""
    guard_library_logs(*secrets)
    root = logging.getLogger()
    for handler in root.handlers:
        if SECRET_FILTER not in handler.filters:
            handler.addFilter(SECRET_FILTER)
