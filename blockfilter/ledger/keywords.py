"""Opt-out and opt-in keywords in replies: STOP, START and their kin.

A reply is a keyword when, once upper-cased and stripped of whitespace and of punctuation
around it, it *is* one: ``" Stop. "``, ``"opt out"`` and ``"OPT-OUT"`` are; ``"don't stop"``
is not (that is free text, for the ``blockfilter_inbound_intent`` hook). The lists are
per locale; English always applies, as carriers honour STOP whatever the language.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

OPT_OUT: Final = "opt_out"
OPT_IN: Final = "opt_in"

#: Keywords that revoke consent on every channel, not only the one the reply came on.
ALL_CHANNEL_KEYWORDS: Final = frozenset({"STOPALL"})

DEFAULT_OPT_OUT: Final[Mapping[str, tuple[str, ...]]] = {
    "en": (
        "STOP",
        "STOPALL",
        "UNSUBSCRIBE",
        "CANCEL",
        "END",
        "QUIT",
        "REVOKE",
        "OPTOUT",
        "OPT OUT",
    ),
}
DEFAULT_OPT_IN: Final[Mapping[str, tuple[str, ...]]] = {
    "en": ("START", "UNSTOP", "YES"),
}
DEFAULT_LOCALE: Final = "en"

_SPACE_AND_DASHES = re.compile(r"[\s\-_]+")
_EDGE_PUNCTUATION = re.compile(r"^[^\w]+|[^\w]+$")


def normalise(text: str) -> str:
    """Upper case, NFKC, no spaces or dashes, no punctuation at either end."""
    folded = unicodedata.normalize("NFKC", text).upper()
    return _SPACE_AND_DASHES.sub("", _EDGE_PUNCTUATION.sub("", folded.strip()))


def parse_keyword_setting(raw: str | None, setting: str) -> dict[str, tuple[str, ...]]:
    """``'es:ALTO,PARAR;fr:ARRET'`` -> ``{"es": ("ALTO", "PARAR"), "fr": ("ARRET",)}``.

    :raises ValueError: an entry without ``locale:``, or a locale with no keyword.
    """
    lists: dict[str, tuple[str, ...]] = {}
    if not raw:
        return lists
    for entry in raw.split(";"):
        if not entry.strip():
            continue
        locale, sep, words = entry.partition(":")
        locale = locale.strip().lower()
        keywords = tuple(w.strip() for w in words.split(",") if w.strip())
        if not sep or not locale or not keywords:
            raise ValueError(f"{setting}: expected 'locale:WORD,WORD;locale:WORD', got {entry!r}")
        lists[locale] = keywords
    return lists


@dataclass(frozen=True)
class Keywords:
    """The keyword lists in force, per locale."""

    opt_out: Mapping[str, tuple[str, ...]]
    opt_in: Mapping[str, tuple[str, ...]]

    @classmethod
    def from_settings(cls, opt_out: str | None, opt_in: str | None) -> Keywords:
        return cls(
            {**DEFAULT_OPT_OUT, **parse_keyword_setting(opt_out, "BLOCKFILTER_OPTOUT_KEYWORDS")},
            {**DEFAULT_OPT_IN, **parse_keyword_setting(opt_in, "BLOCKFILTER_OPTIN_KEYWORDS")},
        )

    def match(self, text: str, locale: str | None = None) -> tuple[str, str] | None:
        """``(OPT_OUT or OPT_IN, the keyword)`` when ``text`` is a keyword, else ``None``.

        Opt-out wins if a word is on both lists (a misconfiguration must err on not sending).
        """
        word = normalise(text)
        if not word:
            return None
        locales = [DEFAULT_LOCALE]
        if locale and locale.lower() != DEFAULT_LOCALE:
            locales.insert(0, locale.lower())
        for action, lists in ((OPT_OUT, self.opt_out), (OPT_IN, self.opt_in)):
            for name in locales:
                for keyword in lists.get(name, ()):
                    if normalise(keyword) == word:
                        return action, normalise(keyword)
        return None
