"""Which provider codes mean "the recipient opted out or blocked us".

The built-in table holds the codes the contract names; nothing else is recorded (a failed
send for any other reason is not an opt-out, and recording it would only be noise). A plugin
adds codes, or takes a built-in one away, with the ``blockfilter_optout_codes`` hook.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

#: provider -> {code: True}: the built-in mappings.
BUILTIN_CODES: Final[Mapping[str, Mapping[str, bool]]] = {
    # Kaleyra's SMS status trace codes (status NOT-SENT): opted out, blacklisted, a DND
    # registered number, a contact marked DND, not subscribed to / unsubscribed from the
    # opt-in group.
    "kaleyra": {
        "OPT-OUT": True,
        "BLACKLIST": True,
        "DND-NUMB": True,
        "CON-DND": True,
        "NOT-OPTIN": True,
        "OUTPUT-REJ": True,
    },
    # Twilio error 21610: "Attempt to send to unsubscribed recipient" (the person replied STOP).
    "twilio": {"21610": True},
    # Telnyx 40300: "Blocked due to STOP message".
    "telnyx": {"40300": True},
    # Vonage SMS delivery receipt err-code 9: "Illegal Number" (the recipient opted out).
    "vonage": {"9": True},
}


def normalise_code(code: Any) -> str:
    """A provider code as the tables hold it: text, trimmed, upper case; a whole float such as
    ``21610.0`` (from a JSON decoder) reads as its integer."""
    if isinstance(code, bool):
        return str(code).upper()
    if isinstance(code, float) and code.is_integer():
        code = int(code)
    return str(code).strip().upper()


def merge_codes(provider: str, from_plugins: list[Mapping[str, bool] | None]) -> dict[str, bool]:
    """The effective mapping of ``provider``: the built-in one, overridden by the plugins'.

    :param from_plugins: the hook's results in pluggy's call order (the plugin that wins
        first); ``None`` entries are skipped.
    """
    merged = {code: True for code in BUILTIN_CODES.get(provider, {})}
    for mapping in reversed(from_plugins):
        if mapping is None:
            continue
        if not isinstance(mapping, Mapping):
            raise TypeError(
                f"blockfilter_optout_codes returned {type(mapping).__name__}, not a mapping "
                "of code -> bool"
            )
        for code, means_opt_out in mapping.items():
            merged[normalise_code(code)] = bool(means_opt_out)
    return {code: True for code, yes in merged.items() if yes}


def codes_of(result: Mapping[str, Any]) -> list[str]:
    """Every code a send result carries: ``code`` (Kaleyra's ``NOT-SENT/OPT-OUT`` form is
    split), ``error_code`` and ``status``."""
    found: list[str] = []
    for name in ("code", "error_code", "status"):
        value = result.get(name)
        if value is None or value == "":
            continue
        text = normalise_code(value)
        found.append(text)
        if "/" in text:
            found.extend(part.strip() for part in text.split("/") if part.strip())
    return found
