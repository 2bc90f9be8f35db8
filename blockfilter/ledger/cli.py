"""``blockfilter optout``: the opt-out ledger on the command line, an operator's way in.

``add`` / ``remove`` record opt-outs and opt-ins on an operator's word; ``show`` answers for
one number (with the event that decided); ``import`` records a file of numbers; ``export``
prints every number opted out, in clear, for a migration, only with ``--plaintext``;
``results`` and ``replies`` read files of send results and of replies (the other two ways
in, on the command line); ``keygen`` makes a key; ``rotate`` re-seals under the newest key;
``writeback`` sends what is queued for Kaleyra now.
"""

from __future__ import annotations

import argparse
import csv
import getpass
import json
import sys
from typing import Any

from ..config import load_settings
from .events import EVENT_CHANNELS

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


def add_parser(commands: Any) -> None:
    """Add ``optout`` and its subcommands to the top-level parser's subcommands."""
    optout = commands.add_parser("optout", help="the opt-out ledger: add, remove, show, import...")
    sub = optout.add_subparsers(dest="optout_command", metavar="ACTION", parser_class=type(optout))
    sub.required = True

    def channel(parser: argparse.ArgumentParser, required: bool = True) -> None:
        parser.add_argument(
            "--channel",
            required=required,
            type=str.lower,
            choices=EVENT_CHANNELS,
            help="the channel (all: every channel)",
        )

    def who(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--by", help="who says so (default: the login name)")
        parser.add_argument("--reason", help="a short reason code, e.g. complaint")
        parser.add_argument("--region", help="ISO 3166 alpha-2 region for national numbers")

    for name, text in (("add", "record opt-outs"), ("remove", "record opt-ins (lift opt-outs)")):
        parser = sub.add_parser(name, help=text)
        channel(parser)
        who(parser)
        parser.add_argument(
            "numbers", nargs="+", metavar="NUMBER", help="E.164, or national with --region"
        )

    show = sub.add_parser("show", help="whether one number is opted out, and why")
    show.add_argument("number", metavar="NUMBER", help="E.164, or national with --region")
    show.add_argument("--region", help="ISO 3166 alpha-2 region for a national number")
    show.add_argument("--json", action="store_true", help="print the answer as JSON")

    imported = sub.add_parser("import", help="record a file of numbers (one a line) as opt-outs")
    channel(imported)
    who(imported)
    imported.add_argument("file", metavar="FILE", help="one number a line (- for stdin)")

    export = sub.add_parser("export", help="print every opted-out number (for a migration)")
    channel(export, required=False)
    export.add_argument(
        "--plaintext",
        action="store_true",
        help="required: the export holds the numbers in clear",
    )

    results = sub.add_parser(
        "results", help="record what the provider said of sent messages (JSON Lines)"
    )
    results.add_argument("file", metavar="FILE", help="one send result a line (- for stdin)")
    replies = sub.add_parser("replies", help="read replies for STOP and START (JSON Lines)")
    replies.add_argument(
        "file", metavar="FILE", help="one reply a line, as inbound takes (- for stdin)"
    )

    sub.add_parser("keygen", help="print a new key for BLOCKFILTER_OPTOUT_KEY")
    sub.add_parser("rotate", help="re-seal every event and queued write-back under the newest key")
    sub.add_parser("writeback", help="write what is queued back to Kaleyra now")


def run(args: argparse.Namespace) -> int:
    command = args.optout_command
    if command == "keygen":
        from .crypto import generate_secret

        print(generate_secret())
        return EXIT_OK
    settings = load_settings()
    from .ledger import shared_ledger

    ledger = shared_ledger(settings)
    if command in ("add", "remove", "import"):
        from .api import add_optouts, remove_optouts

        by = args.by or _login()
        if command == "import":
            numbers = _read_numbers(args.file)
            done = add_optouts(
                numbers, args.channel, by=by, reason=args.reason, region=args.region,
                imported=True, settings=settings, ledger=ledger,
            )  # fmt: skip
        else:
            record = add_optouts if command == "add" else remove_optouts
            done = record(
                args.numbers, args.channel, by=by, reason=args.reason, region=args.region,
                settings=settings, ledger=ledger,
            )  # fmt: skip
        for error in done["errors"]:
            print(f"blockfilter: entry {error['index'] + 1}: {error['reason']}", file=sys.stderr)
        print(
            f"{done['recorded']} recorded ({done['changed']} changed), {done['invalid']} invalid",
            file=sys.stderr,
        )
        return EXIT_OK if not done["invalid"] else EXIT_USAGE
    if command == "results":
        from .api import report_send_results

        report = report_send_results(_read_objects(args.file), settings=settings, ledger=ledger)
        print(json.dumps(report.as_dict()))
        return EXIT_OK if not report.invalid else EXIT_USAGE
    if command == "replies":
        from .api import answer_inbound

        unusable = 0
        for message in _read_objects(args.file):
            answer = answer_inbound(message, settings=settings, ledger=ledger)
            unusable += "error" in answer
            print(json.dumps(answer), flush=True)  # a reply's confirmation may go out now
        return EXIT_OK if not unusable else EXIT_USAGE
    if command == "show":
        return _show(ledger, args)
    if command == "export":
        if not args.plaintext:
            print(
                "blockfilter: the export prints phone numbers in clear; pass --plaintext "
                "to confirm you mean it",
                file=sys.stderr,
            )
            return EXIT_USAGE
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(["number", "channel", "source", "code", "at"])
        for number, channel, event in ledger.export():
            if args.channel in (None, "all") or channel == args.channel:
                described = event.describe()
                writer.writerow([number, channel, event.source, event.code or "", described["at"]])
        return EXIT_OK
    if command == "rotate":
        count = ledger.rotate()
        print(f"{count} events re-sealed under the newest key", file=sys.stderr)
        return EXIT_OK
    if command == "writeback":
        from .writeback import flush_write_back

        sent = flush_write_back(settings, ledger)
        print(json.dumps(sent))
        return EXIT_OK if not sent["failed"] else EXIT_ERROR
    raise AssertionError(command)  # pragma: no cover - argparse allows no other


def _show(ledger: Any, args: argparse.Namespace) -> int:
    from ..numbers import InvalidNumber, normalize
    from ..redact import mask_number

    try:
        number = normalize(args.number, args.region)
    except InvalidNumber as exc:
        print(f"blockfilter: {exc}", file=sys.stderr)
        return EXIT_USAGE
    state = ledger.state(number)
    answer = {
        channel: (event.describe() if event is not None else None)
        for channel, event in state.items()
    }
    if args.json:
        print(json.dumps({"number": number, "opted_out": answer}))
        return EXIT_OK
    print(f"{mask_number(number)}:")
    for channel, event in answer.items():
        if event is None:
            print(f"  {channel:<9} not opted out")
        else:
            print(
                f"  {channel:<9} opted out since {event['at']} ({event['source']}"
                + (f", {event['provider']}" if event["provider"] else "")
                + (f", {event['code']}" if event["code"] else "")
                + (f", by {event['by']}" if event["by"] else "")
                + f"; event {event['event']})"
            )
    return EXIT_OK


def _read_numbers(path: str) -> list[str]:
    handle = sys.stdin if path == "-" else open(path, encoding="utf-8")  # noqa: SIM115
    try:
        return [line.strip() for line in handle if line.strip() and not line.startswith("#")]
    finally:
        if handle is not sys.stdin:
            handle.close()


def _read_objects(path: str) -> list[Any]:
    """The JSON values of a JSON Lines file, blank lines skipped; a line that is not JSON is
    kept as ``None``, so the function it goes to names it by its index as unusable."""
    handle = sys.stdin if path == "-" else open(path, encoding="utf-8")  # noqa: SIM115
    try:
        found = []
        for line in handle:
            if line.strip():
                try:
                    found.append(json.loads(line))
                except ValueError:
                    found.append(None)
        return found
    finally:
        if handle is not sys.stdin:
            handle.close()


def _login() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name in a container: say so rather than fail
        return "operator"
