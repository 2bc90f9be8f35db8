"""Masking phone numbers in every format, in a record's message, arguments and structured
fields, and in the exceptions Celery stores."""

from __future__ import annotations

import logging
import pickle
import traceback

import pytest

from blockfilter.redact import (
    HIDDEN_ARGUMENTS,
    SECRET_FILTER,
    MaskedError,
    guard_library_logs,
    mask_numbers_in,
    masked_exception,
    redact,
)

E164 = "+919812345678"
SPELLINGS = ["+919812345678", "919812345678", "09812345678", "098123 45678", "98123-45678"]


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("to +918020000052", "to +91802XXXXX52"),  # the contract's form
        ("mobile=%2B918020000052%2C%2B918020000053", "mobile=%2B91802XXXXX52%2C%2B91802XXXXX53"),
        ("to 919812345678", "to 919XXXXXXX78"),
        ('"to": "098123 45678"', '"to": "098XXX XXX78"'),
        ("to 09812345678.", "to 098XXXXXX78."),
        ("ref-98123-45678", "ref-981XX-XXX78"),
        ("+91 98123 45678", "+91 981XX XXX78"),
        ("(0981) 234 5678", "(098X) XXX XX78"),
        ("x+919812345678_y", "x+91981XXXXX78_y"),
    ],
)
def test_numbers_are_masked_in_every_format(text: str, masked: str) -> None:
    assert mask_numbers_in(text) == masked
    assert mask_numbers_in(masked) == masked, "masking twice changes nothing"


@pytest.mark.parametrize(
    "text",
    [
        "task 7c1a2b3c-1234-5678-9abc-def012345678 retried",
        "task 12345678-1234-5678-9abc-def012345678 retried",
        "parked at 2026-12-02T06:31:00.123Z and 2026-12-02 06:31:00,123",
        "batch of 100 message(s) in 0.123456789 s, pid 12345, port 45678",
        "at 0x7f3a12345678",
    ],
)
def test_what_an_operator_needs_is_left_alone(text: str) -> None:
    assert mask_numbers_in(text) == text


def _record(logger: str, msg: object, args: object = None, **extra: object) -> logging.LogRecord:
    guard_library_logs()
    return logging.getLogger(logger).makeRecord(
        logger, logging.INFO, __file__, 1, msg, args, None, extra=extra or None
    )


def test_arguments_and_structured_fields_are_cleaned_not_only_the_message() -> None:
    # Celery's "Task ... received" line: a mapping whose argsrepr the format does not show.
    context = {"id": "abc", "name": "blockfilter.collect", "args": f"[{{'to': '{E164}'}}]"}
    record = _record("celery.worker.strategy", "Task %(name)s[%(id)s] received", context)
    record2 = _record("blockfilter.x", "shown %s", ("fine",), data=context, to="098123 45678")
    for rec in (record, record2):
        shown = logging.Formatter("%(message)s").format(rec)  # what every handler does first
        everything = shown + repr(vars(rec))
        for spelling in SPELLINGS:
            assert spelling not in everything, (spelling, everything)
    assert record.getMessage() == "Task blockfilter.collect[abc] received"
    assert record2.data["args"] == "[{'to': '+91981XXXXX78'}]"
    assert record2.to == "098XXX XXX78"


def test_a_blockfilter_tasks_arguments_leave_the_pool_debug_line() -> None:
    body = f'[[{{"id": "1", "to": "{E164}", "text": "hello Ravi"}}], {{}}, {{}}]'
    args = (
        "<function fast_trace_task>",
        f"('blockfilter.filter_messages', 'id', {{}}, {body!r})",
        "{}",
    )
    record = _record("celery.pool", "TaskPool: Apply %s (args:%s kwargs:%s)", args)
    assert HIDDEN_ARGUMENTS in record.getMessage() and "Ravi" not in record.getMessage()
    other = ("<function f>", "('pipeline.send', 'hello Ravi')", "{}")
    record = _record("celery.pool", "TaskPool: Apply %s (args:%s kwargs:%s)", other)
    assert "hello Ravi" in record.getMessage(), "a user's own task keeps its DEBUG line"


def test_stored_exceptions_are_masked_and_keep_their_type_and_traceback() -> None:
    SECRET_FILTER.add_secret("sekrit-key-123")
    national, key = SPELLINGS[3], "sekrit-key-123"
    try:
        raise RuntimeError(f"hook failed for {national} with key {key}")
    except RuntimeError as exc:
        masked = masked_exception(exc)
    assert type(masked) is RuntimeError
    assert str(masked) == "hook failed for 098XXX XXX78 with key [REDACTED]"
    formatted = "".join(traceback.format_exception(masked))
    assert "test_stored_exceptions_are_masked" in formatted, "the traceback is kept"
    assert "45678" not in formatted and "sekrit" not in formatted

    class Picky(Exception):
        def __init__(self, number: str, count: int) -> None:
            super().__init__(number, count)

        def __str__(self) -> str:
            return f"{self.args[0]} x{self.args[1]}"

    assert str(masked_exception(Picky(E164, 3))) == "+91981XXXXX78 x3"

    class Weird(Exception):
        def __init__(self, payload: dict[str, str]) -> None:
            super().__init__(payload)

    weird = masked_exception(Weird({"to": E164}))
    assert isinstance(weird, MaskedError) and E164 not in str(weird)
    assert str(weird).startswith("Weird: ")
    pickle.loads(pickle.dumps(weird))  # Celery's pickle serializer can carry it
    clean = ValueError("nothing to hide")
    assert masked_exception(clean) is clean


def test_a_secret_inside_a_longer_one_leaves_nothing_of_it() -> None:
    long = "sekrit-key-9d41e07bb2"
    for order in ((long, "k"), ("k", long)):
        cleaned = redact(f"bad number for key {long}", *order)
        assert "9d41e07bb2" not in cleaned and "sekrit" not in cleaned
