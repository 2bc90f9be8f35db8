"""Each fact the package depends on is written once: the request size, the channels, the
verdict names, the loopback rule. A second copy is how two parts of the code come to
disagree (a batch of 100 cut here, of 50 there) without any test noticing.

The checks read the package's source, as a reviewer would: they fail on a literal copy of a
fact outside the module that defines it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from blockfilter.config import CHANNELS, is_loopback
from blockfilter.model import MAX_NUMBERS_PER_REQUEST, Verdict, channel_named

PACKAGE = Path(__file__).resolve().parents[1] / "blockfilter"


def sources() -> dict[str, ast.Module]:
    return {
        str(path.relative_to(PACKAGE)): ast.parse(path.read_text(encoding="utf-8"))
        for path in PACKAGE.rglob("*.py")
    }


def constants(tree: ast.Module) -> list[ast.Constant]:
    return [node for node in ast.walk(tree) if isinstance(node, ast.Constant)]


def test_verdict_names_are_written_only_where_they_are_defined() -> None:
    names = set(Verdict.ALL)
    # Words that are verdict names but mean something else where they stand.
    other_meanings = {
        ("cli.py", "deferred"),  # the `blockfilter deferred` command
        ("cli.py", "blocked"),  # the key of `blockfilter check --json`'s answer
        ("ledger/cli.py", "invalid"),  # how many lines of an import were not numbers
        ("ledger/api.py", "invalid"),
        ("ledger/tasks.py", "invalid"),
    }
    found = sorted(
        (module, node.value, node.lineno)
        for module, tree in sources().items()
        if module != "model.py" and not module.startswith("testing/")
        for node in constants(tree)
        if node.value in names and (module, node.value) not in other_meanings
    )
    assert found == []


def test_the_request_size_is_written_once() -> None:
    # MAX_NUMBERS_PER_REQUEST and MAX_PAGE_SIZE (the API's limit on a page), both in model.py
    copies = sorted(
        module
        for module, tree in sources().items()
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign | ast.AnnAssign)
        and isinstance(node.value, ast.Constant)
        and node.value.value == MAX_NUMBERS_PER_REQUEST
        and any(
            word in ast.unparse(target).upper()
            for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
            for word in ("REQUEST", "BATCH", "PAGE_SIZE")
        )
    )
    assert copies == ["model.py", "model.py"]


def test_the_channels_are_listed_once() -> None:
    listed = sorted(
        (module, node.lineno)
        for module, tree in sources().items()
        for node in ast.walk(tree)
        if isinstance(node, ast.Tuple | ast.List | ast.Set)
        and {c.value for c in node.elts if isinstance(c, ast.Constant)} >= set(CHANNELS)
    )
    assert [module for module, _ in listed] == ["config.py"]


def test_one_loopback_rule() -> None:
    defined = sorted(
        module
        for module, tree in sources().items()
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef) and "loopback" in node.name
    )
    assert defined == ["config.py"]
    assert is_loopback("localhost") and is_loopback("127.3.0.1") and is_loopback("::1")
    assert is_loopback("::ffff:127.0.0.1")  # an IPv4-mapped address is its IPv4 address
    assert not is_loopback("10.0.0.1") and not is_loopback("kaleyra.io")


@pytest.mark.parametrize("given", ["sms", " SMS ", "WhatsApp", "voice"])
def test_a_channel_name_is_read_the_same_everywhere(given: str) -> None:
    assert channel_named(given) == given.strip().lower()


@pytest.mark.parametrize("given", ["", "email", None, 3, "sms,voice"])
def test_an_unknown_channel_is_refused_with_the_known_ones_named(given: object) -> None:
    with pytest.raises(ValueError, match="expected one of sms, whatsapp, voice"):
        channel_named(given)


def test_the_exceptions_a_caller_may_catch_are_defined_in_errors() -> None:
    # Private signals (a leading underscore) stay where they are raised and caught.
    stays = {
        # A stand-in for an exception whose text had to be cleaned before it is stored: made
        # by the redaction itself, never raised by the library's own code.
        ("redact.py", "MaskedError"),
        ("atomicfile.py", "Terminated"),  # a BaseException for SIGTERM, as KeyboardInterrupt
    }
    defined = sorted(
        (module, node.name)
        for module, tree in sources().items()
        if module != "errors.py"
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef)
        and not node.name.startswith("_")
        and any(
            ast.unparse(base).endswith(("Error", "Exception", "Unavailable", "Refused"))
            or ast.unparse(base) in ("BaseException", "TransportError")
            for base in node.bases
        )
        and (module, node.name) not in stays
    )
    assert defined == []


def test_a_number_given_as_the_channel_is_masked_in_the_error() -> None:
    with pytest.raises(ValueError) as refused:
        channel_named("+919812345678")
    assert "9812345678" not in str(refused.value)
