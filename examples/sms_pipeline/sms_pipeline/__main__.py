"""``python -m sms_pipeline``: send a campaign, send one message, manage opt-outs, show results.

python -m sms_pipeline opt-out sms +919820000001 +919820000002
python -m sms_pipeline send campaign.jsonl --wait     # a campaign: filter_messages tasks
python -m sms_pipeline send-one '{"id": "o-1", "channel": "sms", "to": "+9198..."}'
python -m sms_pipeline outbox                          # what was sent, as JSON lines
python -m sms_pipeline suppressed                      # what was not, and why
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from . import store


def _read_campaign(path: str) -> list[dict[str, Any]]:
    handle = sys.stdin if path == "-" else open(path, encoding="utf-8")  # noqa: SIM115
    with handle:
        return [json.loads(line) for line in handle if line.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sms_pipeline")
    commands = parser.add_subparsers(dest="command", required=True)
    send = commands.add_parser("send", help="send a campaign (JSON Lines) through blockfilter")
    send.add_argument("campaign", help="a JSON Lines file of messages, - for stdin")
    send.add_argument("--wait", action="store_true", help="wait for the tasks, print a summary")
    send.add_argument("--timeout", type=float, default=120.0)
    one = commands.add_parser("send-one", help="send one message through the collector")
    one.add_argument("message", help="the message, as JSON")
    opt_out = commands.add_parser("opt-out", help="record numbers that opted out of a channel")
    opt_out.add_argument("channel")
    opt_out.add_argument("numbers", nargs="+", help="E.164 numbers")
    commands.add_parser("outbox", help="print the messages sent")
    commands.add_parser("suppressed", help="print the messages not sent")
    args = parser.parse_args(argv)

    if args.command == "opt-out":
        store.create_tables()
        store.opt_out(args.channel, args.numbers)
        return 0
    if args.command in ("outbox", "suppressed"):
        store.create_tables()
        for row in store.rows(args.command):
            print(json.dumps(row, ensure_ascii=False))
        return 0

    from blockfilter.tasks import filter_campaign, merge_summaries

    from .celery_app import app

    if args.command == "send-one":
        app.send_task("blockfilter.collect", args=[json.loads(args.message)])
        return 0
    result = filter_campaign(_read_campaign(args.campaign), chunk_size=500, app=app)
    if args.wait:
        summary = merge_summaries(result.get(timeout=args.timeout))
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
