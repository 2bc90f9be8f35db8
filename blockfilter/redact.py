"""Keeping secrets and phone numbers out of logs, errors and reprs."""

from __future__ import annotations

import logging
import re

# A number in a log line: "+" then 8 to 15 digits (E.164 is at most 15).
_E164_IN_TEXT = re.compile(r"\+[0-9]{8,15}")


def mask_number(number: str) -> str:
    """Mask a phone number for logs: ``+918020000052`` -> ``+91802XXXXX52``.

    The ``+``, the first five and the last two digits are kept and the length is kept, so an
    operator can still tell numbers apart without the log giving them away. Anything too short
    to mask that way is masked whole.
    """
    if len(number) < 9:
        return "X" * len(number)
    return number[:6] + "X" * (len(number) - 8) + number[-2:]


def mask_numbers_in(text: str) -> str:
    """Mask every E.164-looking number inside free text."""
    return _E164_IN_TEXT.sub(lambda m: mask_number(m.group(0)), text)


def redact(text: str, *secrets: str | None) -> str:
    """Replace every occurrence of each non-empty secret in ``text`` with ``[REDACTED]``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[REDACTED]")
    return text


class SecretFilter(logging.Filter):
    """A logging filter that removes registered secrets and masks numbers in every record.

    The library never logs the key on purpose; this is the belt to that pair of braces, so a
    third-party library (urllib3 debug logs, say) cannot leak it either.
    """

    def __init__(self) -> None:
        super().__init__()
        self._secrets: set[str] = set()

    def add_secret(self, secret: str | None) -> None:
        if secret:
            self._secrets.add(secret)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = mask_numbers_in(redact(message, *self._secrets))
        if cleaned != message:
            record.msg = cleaned
            record.args = None
        return True


SECRET_FILTER = SecretFilter()


def install_secret_filter(*secrets: str | None) -> None:
    """Register secrets and make sure every handler of the root logger filters them."""
    for secret in secrets:
        SECRET_FILTER.add_secret(secret)
    root = logging.getLogger()
    for handler in root.handlers:
        if SECRET_FILTER not in handler.filters:
            handler.addFilter(SECRET_FILTER)
