"""Keeping secrets and phone numbers out of logs, errors and reprs."""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from typing import Any

# Numbers in free text, in every spelling a log line, an error or a stored result could use:
#
# * "+" (or "%2B", percent-encoded as in a query string) then digits, with single spaces,
#   dashes or parentheses between them: E.164 and international formats, anywhere in the text;
# * 8 or more digits not glued to a word, written the same way: E.164 without its "+"
#   ("919812345678"), national formats with or without spaces ("098123 45678").
#
# UUIDs (Celery's task ids) and ISO dates and times are matched first and left as they are, so
# an operator can still follow a task; other long digit runs (an epoch time) are masked too:
# masking one too many is a nuisance, missing one is a leak.
_DIGITS = r"\(?\d(?:(?:[ -]|\)[ -]?|[ -]?\()?\d)*"
_KEEP = (
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}(?![\w-])"
    r"|\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?)?(?!\d)"
)
_NUMBER_IN_TEXT = re.compile(
    rf"(?P<keep>(?<![\w-])(?:{_KEEP}))"
    rf"|(?P<plus>(?:\+|%2[Bb]){_DIGITS})"
    rf"|(?P<bare>(?<![\w.%+]){_DIGITS})(?!\w)"
)
# Records of these loggers (and their children) are cleaned when they are made, whichever
# handler gets them later: the library's own, and the HTTP and task stacks it hands numbers
# and the key to (celery_batches logs a failed batch's exception, amqp and billiard carry
# Celery's messages). A host application's own loggers are left alone.
LIBRARY_LOGGERS = (
    "blockfilter",
    "urllib3",
    "requests",
    "celery",
    "celery_batches",
    "kombu",
    "amqp",
    "billiard",
)

# The attributes every LogRecord has; any other attribute is a structured field a handler
# may print (``extra={"data": ...}``, as Celery's own "Task received" line passes).
_RECORD_ATTRIBUTES = frozenset(
    {
        *vars(logging.LogRecord("", 0, "", 0, "", None, None)),
        "message",
        "asctime",
        "_blockfilter_fields_clean",
    }
)
# How deep a structured field is cleaned (a dict of lists of strings, say).
_MAX_DEPTH = 6

# Fewer digits than this is a count, a port, a pid: not a phone number.
_MIN_DIGITS = 8
# Digits kept at the front: after a "+" the country code and a little more (the contract's
# +91802XXXXX52); a bare number may start with a trunk "0", so fewer.
_KEPT_AFTER_PLUS = 5
_KEPT_BARE = 3
_KEPT_AT_END = 2


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
    if match.group("keep") is not None:
        return match.group("keep")
    plus = match.group("plus")
    text = plus if plus is not None else match.group("bare")
    prefix = ""
    if plus is not None:
        # "+" or "%2B": the "2" of the encoding is not one of the number's digits.
        prefix, text = ("+", text[1:]) if text.startswith("+") else (text[:3], text[3:])
    digits = sum(c.isdigit() for c in text)
    if digits < _MIN_DIGITS:
        return prefix + text
    head = _KEPT_AFTER_PLUS if plus is not None else _KEPT_BARE
    out = []
    seen = 0
    for char in text:
        if char.isdigit():
            seen += 1
            if head < seen <= digits - _KEPT_AT_END:
                char = "X"
        out.append(char)
    return prefix + "".join(out)


def mask_numbers_in(text: str) -> str:
    """Mask every phone number inside free text, in every format (see ``_NUMBER_IN_TEXT``):
    ``+91...``, ``%2B91...``, ``91...`` without the ``+``, national ``098123 45678``."""
    return _NUMBER_IN_TEXT.sub(_mask_match, text)


def redact(text: str, *secrets: str | None) -> str:
    """Replace every occurrence of each non-empty secret in ``text`` with ``[REDACTED]``."""
    # Longest first: a short secret inside a longer one (one process's key "k", another's
    # "sekrit-key-9d41") replaced first would split it and leave the rest of it in clear.
    for secret in sorted(filter(None, secrets), key=len, reverse=True):
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

    def clean_value(self, value: Any, depth: int = 0) -> Any:
        """``value`` with its text cleaned: strings, and the strings inside dicts, lists and
        tuples; the same object when there was nothing to clean."""
        if isinstance(value, str):
            return self.clean(value)
        if depth >= _MAX_DEPTH:
            return value
        if isinstance(value, dict):
            cleaned = {k: self.clean_value(v, depth + 1) for k, v in value.items()}
            return value if all(cleaned[k] is v for k, v in value.items()) else cleaned
        if isinstance(value, (list, tuple)):
            items = [self.clean_value(v, depth + 1) for v in value]
            if all(new is old for new, old in zip(items, value, strict=True)):
                return value
            return type(value)(items) if isinstance(value, list) else tuple(items)
        return value

    def filter(self, record: logging.LogRecord) -> bool:
        hide_task_arguments(record)
        try:
            message = record.getMessage()
        except Exception:
            # Arguments that do not fit the format: the handler would print them raw in its
            # error report, so they are dropped here (the format itself is kept, cleaned).
            record.msg = self.clean(f"{record.msg} (unformattable logging arguments dropped)")
            record.args = None
        else:
            cleaned = self.clean(message)
            # The arguments are looked at too: a structured handler (JSON logs, Sentry) keeps
            # them, and a mapping may hold more than the format shows.
            if cleaned != message or (record.args and self._leaks(record.args)):
                record.msg = cleaned
                record.args = None
        self.clean_fields(record)
        if record.exc_info and not record.exc_text:
            # Formatters reuse exc_text when set, so the cleaned traceback is what they print.
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.clean(record.exc_text)
        if record.stack_info:
            record.stack_info = self.clean(record.stack_info)
        return True

    def clean_fields(self, record: logging.LogRecord) -> None:
        """Clean the structured fields of a record (``extra=``): every attribute that is not
        one of a LogRecord's own."""
        for name, value in list(vars(record).items()):
            if name not in _RECORD_ATTRIBUTES:
                cleaned_value = self.clean_value(value)
                if cleaned_value is not value:
                    record.__dict__[name] = cleaned_value

    def _leaks(self, args: Any) -> bool:
        try:
            text = repr(args)
        except Exception:  # a repr that raises is no reason to keep what it would show
            return True
        return self.clean(text) != text


SECRET_FILTER = SecretFilter()

#: What the worker's DEBUG line ``TaskPool: Apply`` shows in place of a blockfilter task's
#: arguments (the raw message body: numbers in any format, and the text of the message).
HIDDEN_ARGUMENTS = "(a blockfilter task's arguments, not logged)"


def hide_task_arguments(record: logging.LogRecord) -> None:
    """Drop the arguments of a blockfilter task from Celery's ``TaskPool: Apply`` line.

    Celery's pool logs, at DEBUG, the task's whole request, message body included; masking the
    numbers in it would still leave the messages' text. Other tasks' lines are left alone.
    """
    if (
        record.name == "celery.pool"
        and isinstance(record.msg, str)
        and record.msg.startswith("TaskPool: Apply")
        and isinstance(record.args, tuple)
        and len(record.args) == 3
        and "blockfilter." in str(record.args[1])[:200]
    ):
        record.args = (record.args[0], HIDDEN_ARGUMENTS, "{}")


class MaskedError(Exception):
    """An exception whose text had to be cleaned, when its own type could not carry the
    cleaned text. Its message starts with the original type's name."""


def masked_exception(exc: BaseException) -> BaseException:
    """``exc``, or a copy of it whose text has its numbers masked and its secrets removed.

    For what outlives the process: a Celery result backend stores a failed or retried task's
    exception and traceback. The copy is of the same type when that type can be built from
    the cleaned arguments, a :class:`MaskedError` otherwise; it keeps the traceback.
    """
    text = str(exc)
    cleaned_args = SECRET_FILTER.clean_value(exc.args)
    if SECRET_FILTER.clean(text) == text and cleaned_args is exc.args:
        return exc
    copy: BaseException | None = None
    if all(isinstance(a, (str, int, float, bool, type(None))) for a in cleaned_args):
        try:
            copy = type(exc)(*cleaned_args)
        except Exception:
            copy = None
        if copy is not None:
            copy_text = str(copy)
            if SECRET_FILTER.clean(copy_text) != copy_text:
                copy = None  # its __str__ shows something else than its arguments
    if copy is None:
        copy = MaskedError(f"{type(exc).__name__}: {SECRET_FILTER.clean(text)}")
    return copy.with_traceback(exc.__traceback__)


_factory_lock = threading.Lock()


def _is_library_record(name: str) -> bool:
    return any(name == root or name.startswith(root + ".") for root in LIBRARY_LOGGERS)


class _GuardedRecord(logging.LogRecord):
    """A library record whose structured fields are cleaned when it is first read.

    ``Logger.makeRecord`` sets the ``extra=`` fields after the record factory returned, so the
    factory cannot see them; every handler reads the message (``getMessage()``) before it
    prints or ships a record, and that is where they are cleaned.
    """

    def getMessage(self) -> str:  # noqa: N802 - logging's name
        if not self.__dict__.get("_blockfilter_fields_clean"):
            self.__dict__["_blockfilter_fields_clean"] = True
            SECRET_FILTER.clean_fields(self)
        return super().getMessage()


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
                if type(record) is logging.LogRecord:
                    record.__class__ = _GuardedRecord
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
