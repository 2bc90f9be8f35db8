"""The ``blockfilter`` command line.

Exit codes (the contract's): 0 done, every message checked or invalid; 4 done, but some
messages deferred; 2 usage or configuration error; 3 upstream refused the credentials or the
account; 1 anything else. Ctrl-C and a closed pipe end quietly; so do SIGTERM and SIGHUP
(exit 128 + the signal), which leave no temporary file behind and the old output in place.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import IO, TYPE_CHECKING, Any

from . import __version__

# The rest of the package is imported where a command needs it: `blockfilter --version`
# (what packagers and health checks run) then costs the interpreter's start and little more.
if TYPE_CHECKING:
    from .atomicfile import AtomicFile
    from .config import Settings

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_REFUSED, EXIT_DEFERRED = 0, 1, 2, 3, 4
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse's own exits with 2, as the contract wants
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"blockfilter: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from .config import CHANNELS

    parser = _Parser(
        prog="blockfilter",
        description="Check message recipients against Kaleyra's blocklist before sending.",
    )
    parser.add_argument("--version", action="version", version=f"blockfilter {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="log more (-v info, -vv debug)"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    check = commands.add_parser("check", help="which of these numbers are blocklisted on C")
    check.add_argument(
        "--channel", required=True, type=str.lower, choices=CHANNELS, help="the channel to check"
    )
    check.add_argument("--region", help="ISO 3166 alpha-2 region for national numbers")
    check.add_argument("--json", action="store_true", help="print a JSON object")
    check.add_argument(
        "numbers", nargs="+", metavar="NUMBER", help="E.164 (or national, with --region)"
    )

    filt = commands.add_parser("filter", help="scrub a JSON Lines campaign file")
    filt.add_argument("input", metavar="INPUT", help="JSON Lines file of messages, - for stdin")
    filt.add_argument("--out", metavar="OUTPUT", help="output file (default: stdout)")
    filt.add_argument("--summary-json", metavar="FILE", help="write the summary as JSON")
    filt.add_argument("--quiet", action="store_true", help="no human summary on stderr")
    filt.add_argument(
        "--estimate", action="store_true", help="print the API requests it would make, and stop"
    )
    filt.add_argument(
        "--max-requests", type=int, metavar="N", help="make at most N API requests; defer the rest"
    )
    filt.add_argument(
        "--on-error",
        choices=("defer", "allow", "drop"),
        help="override BLOCKFILTER_ON_ERROR for this run",
    )
    filt.add_argument(
        "--metrics-file",
        metavar="FILE",
        help="write the run's Prometheus metrics to FILE (needs blockfilter[metrics])",
    )

    sync = commands.add_parser(
        "sync", help="page whole blocklists into the cache (cheaper than lookups for big campaigns)"
    )
    sync.add_argument(
        "--channel",
        action="append",
        type=str.lower,
        choices=CHANNELS,
        help="a channel to sync; repeat for several (default: all)",
    )
    sync.add_argument("--json", action="store_true", help="print the results as JSON")
    sync.add_argument("--quiet", action="store_true", help="no progress bar")

    sim = commands.add_parser("simulator", help="run the Kaleyra-compatible simulator")
    sim.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    sim.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    sim.add_argument("--blocked", metavar="FILE", help="lines of channel,+E164")
    sim.add_argument("--latency", type=float, default=0.0, help="seconds added to each answer")
    sim.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="SPEC",
        help="inject a failure, e.g. wa500:every=3 or rate_limit:first=2,seconds=1",
    )

    demo = commands.add_parser("demo", help="the whole job on embedded defaults")
    demo.add_argument("--messages", type=int, default=2000, help="size of the sample campaign")
    demo.add_argument("--json", action="store_true", help="print the report as JSON")

    replay = commands.add_parser(
        "replay", help="feed the deferred messages of a Celery pipeline back through the filter"
    )
    replay.add_argument("--app", metavar="MODULE:APP", help="your Celery app (as celery -A)")
    replay.add_argument("--broker", metavar="URL", help="or just the broker URL")
    replay.add_argument("--limit", type=int, help="replay at most this many messages")
    replay.add_argument(
        "--queue",
        metavar="QUEUE",
        help="send the tasks to this queue (default: where the app routes filter_messages)",
    )

    deferred = commands.add_parser(
        "deferred", help="how many messages are parked, by reason and age (no number shown)"
    )
    deferred.add_argument("--app", metavar="MODULE:APP", help="your Celery app (as celery -A)")
    deferred.add_argument("--broker", metavar="URL", help="or just the broker URL")
    deferred.add_argument("--json", action="store_true", help="print the report as JSON")

    from .ledger.cli import add_parser as add_optout_parser

    add_optout_parser(commands)

    config = commands.add_parser("config", help="print the effective settings and their sources")
    config.add_argument(
        "--app",
        metavar="MODULE:APP",
        help="as a worker of this Celery app sees them (its conf wins), collector's included",
    )
    commands.add_parser("plugins", help="list the loaded plugins, their versions and hooks")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else list(argv)
    if arguments == ["--version"]:
        # Answered as argparse would, before the parser is built: its subcommands import the
        # settings and the ledger.
        print(f"blockfilter {__version__}")
        return EXIT_OK
    from .atomicfile import Terminated
    from .errors import BlockfilterError, ConfigError, CredentialsRefused

    parser = build_parser()
    args, extra = parser.parse_known_args(arguments)
    if extra:
        # Said by the subcommand's parser, so its usage is the one printed.
        _subparser(parser, args.command).error(f"unrecognized arguments: {' '.join(extra)}")
    _setup_logging(args.verbose)
    handler: Callable[[argparse.Namespace], int] = _COMMANDS[args.command]
    try:
        return handler(args)
    except ConfigError as exc:
        print(f"blockfilter: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CredentialsRefused as exc:
        print(f"blockfilter: upstream refused the credentials: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Terminated as stop:  # SIGTERM, SIGHUP: quietly, as the shell reports a signal
        return 128 + stop.signum
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_ERROR
    except (BlockfilterError, OSError) as exc:
        print(f"blockfilter: {_clean(str(exc))}", file=sys.stderr)
        return EXIT_ERROR


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found: argparse.ArgumentParser | None = action.choices.get(command)
            if found is not None:
                return found
    return parser


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


def _setup_logging(verbosity: int) -> None:
    import logging

    from .redact import install_secret_filter

    level = logging.WARNING - 10 * min(verbosity, 2)
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    install_secret_filter(os.environ.get("KALEYRA_API_KEY"))


def _clean(text: str) -> str:
    from .redact import mask_numbers_in, redact

    return mask_numbers_in(redact(text, os.environ.get("KALEYRA_API_KEY")))


def _silence_stdout() -> None:
    # After a closed pipe, Python would complain again while flushing stdout at exit.
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


# -- check ---------------------------------------------------------------------------------


def cmd_check(args: argparse.Namespace) -> int:
    from .config import load_settings
    from .engine.filter import Filter
    from .errors import CheckFailed
    from .numbers import InvalidNumber, normalize

    numbers = []
    for raw in args.numbers:
        try:
            numbers.append(normalize(raw, args.region))
        except InvalidNumber as exc:
            print(f"blockfilter: {exc}", file=sys.stderr)
            return EXIT_USAGE
    # The filter's own sources (the installed plugins' with Kaleyra's), so that check says
    # what `blockfilter filter` and the Celery tasks do.
    with Filter(load_settings()) as engine:
        try:
            blocked = engine.blocklisted(args.channel, numbers)
        except CheckFailed as exc:  # refused credentials go on up: exit 3
            print(f"blockfilter: the check failed: {_clean(str(exc))}", file=sys.stderr)
            return EXIT_ERROR
    if args.json:
        print(json.dumps({"channel": args.channel, "blocked": blocked}))
    else:
        for number in blocked:
            print(number)
    return EXIT_OK


# -- filter --------------------------------------------------------------------------------


def _line_opener(
    path: str, open_file: Callable[[], IO[bytes]] | None = None
) -> Callable[[], Iterator[bytes]]:
    """Opens ``path`` anew for each pass of the filter (through ``open_file`` when given), and
    makes sure each pass reads the file the first one read: same file, size and modification
    time, before and after."""
    from .engine.lines import line_blocks, lines_of
    from .errors import InputChanged

    first_seen: tuple[int, ...] | None = None

    def identity(handle: IO[bytes]) -> tuple[int, ...]:
        stat = os.fstat(handle.fileno())
        return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns

    def check(handle: IO[bytes]) -> None:
        if identity(handle) != first_seen:
            raise InputChanged(f"INPUT {path!r} changed while it was being filtered")

    def checked_blocks() -> Iterator[bytes]:
        nonlocal first_seen
        with open_file() if open_file is not None else open(path, "rb") as handle:
            if first_seen is None:
                first_seen = identity(handle)
            check(handle)
            yield from line_blocks(handle)
            check(handle)

    def open_lines() -> Iterator[bytes]:
        # Checked a block at a time: a generator's step a line was a tenth of what the
        # verdict pass spends on a line.
        return lines_of(checked_blocks())

    return open_lines


@contextlib.contextmanager
def _replayable_input(path: str) -> Iterator[Callable[[], Iterator[bytes]]]:
    """The input as something that can be read several times: stdin is spooled to a file."""
    import shutil
    import tempfile

    from .errors import ConfigError

    if path != "-":
        if not os.path.isfile(path):
            raise ConfigError(f"INPUT {path!r} is not a readable file")
        yield _line_opener(path)
        return
    # A file without a name (O_TMPFILE on Linux, unlinked at once elsewhere): nothing is left
    # behind however the run ends. Each pass reads it through a file descriptor of its own,
    # from the start (the passes come one after the other).
    with tempfile.TemporaryFile(prefix="blockfilter-stdin-") as spool:
        shutil.copyfileobj(sys.stdin.buffer, spool, 1 << 20)
        spool.flush()

        def reopen() -> IO[bytes]:
            handle = os.fdopen(os.dup(spool.fileno()), "rb")
            handle.seek(0)
            return handle

        yield _line_opener("-", reopen)


@contextlib.contextmanager
def _output_files(
    out: str | None, summary: str | None
) -> Iterator[tuple[IO[bytes] | AtomicFile, AtomicFile | None]]:
    """The output (stdout, or a file) and the summary file, if any. Files appear whole or not
    at all, and together: both are on disk before either replaces its old file, so a failure
    (a full disk, a signal) leaves both old files as they were."""
    from .atomicfile import AtomicFile

    with contextlib.ExitStack() as stack:
        files = [
            stack.enter_context(AtomicFile(path, label=label))
            for path, label in ((out, "--out"), (summary, "--summary-json"))
            if path is not None
        ]
        out_file = files[0] if out is not None else None
        summary_file = files[-1] if summary is not None else None
        yield out_file if out_file is not None else sys.stdout.buffer, summary_file
        if out_file is None:
            sys.stdout.buffer.flush()
        for file in files:
            file.flush()
        # Leaving the stack commits each (the summary first): renames, which do not fail
        # for want of room.


class _Progress:
    """A tqdm bar on a terminal, nothing elsewhere."""

    def __init__(self, enabled: bool) -> None:
        self._enabled = enabled
        self._bars: dict[str, Any] = {}

    def __call__(self, phase: str, advance: int, total: int | None) -> None:
        if not self._enabled:
            return
        from tqdm import tqdm

        bar = self._bars.get(phase)
        if bar is None:
            label = {"numbers": "checking numbers", "verdicts": "writing verdicts"}[phase]
            bar = self._bars[phase] = tqdm(
                total=total, desc=label, unit=" " + phase, file=sys.stderr, leave=False
            )
        bar.update(advance)

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()


def cmd_filter(args: argparse.Namespace) -> int:
    from .atomicfile import stop_on_signals
    from .gcpacing import paced_collections, paced_switches

    # Stopped by a signal, the run unwinds: its temporary files go, the old ones stay. The
    # short switch interval lets the request threads take answers in while the main thread
    # reads the input, so the pool does not sit idle waiting for it.
    with stop_on_signals(), paced_collections(), paced_switches():
        return _filter(args)


def _filter(args: argparse.Namespace) -> int:
    from . import metrics
    from .config import load_settings
    from .errors import ConfigError

    settings = load_settings()
    if args.max_requests is not None and args.max_requests < 0:
        raise ConfigError("--max-requests must be >= 0")
    settings.require_credentials()
    if not args.metrics_file:
        with metrics.recording_nothing():
            return _run_filter(args, settings)
    metrics.require()
    return _run_filter(args, settings)


def _run_filter(args: argparse.Namespace, settings: Settings) -> int:
    from . import metrics
    from .engine.filter import Filter

    progress = _Progress(sys.stderr.isatty() and not args.quiet)
    # The filter of the Python API, plugins and all; it shows its results to the observers.
    # Scrubbing a file sends nothing: dispatch and suppressed are never called.
    with (
        _replayable_input(args.input) as open_lines,
        Filter(
            settings, on_error=args.on_error, max_requests=args.max_requests, progress=progress
        ) as engine,
    ):
        for source in engine.sources:
            source.one_shot()  # this process runs one campaign and ends
        if args.estimate:
            low, high = engine.estimate(open_lines)
            shown = str(low) if low == high else f"{low} to {high}"
            print(f"{shown} API requests")
            return EXIT_OK
        # The file's lines: a forked copy of this process may go on reading them.
        lines = engine.run_lines(open_lines, parser_process=settings.parser_process)
        if args.metrics_file:
            from .engine.filter import observed_lines

            lines = observed_lines(lines, metrics.count_verdicts)
        with _output_files(args.out, args.summary_json) as (out, summary_file):
            out.writelines(lines)
            progress.close()
            summary = engine.summary.as_dict()
            if summary_file is not None:
                summary_file.write(json.dumps(summary, indent=2).encode() + b"\n")
        if args.metrics_file:
            metrics.count_run(engine)
            metrics.write_file(args.metrics_file)
    if not args.quiet:
        print(format_summary(summary), file=sys.stderr)
    return exit_code_for(summary)


def exit_code_for(summary: dict[str, Any]) -> int:
    from .model import Verdict

    if summary.get("credentials_refused"):
        return EXIT_REFUSED
    if summary["verdicts"].get(Verdict.DEFERRED):
        return EXIT_DEFERRED
    return EXIT_OK


def format_summary(summary: dict[str, Any]) -> str:
    from .model import Verdict

    verdicts = summary["verdicts"]
    parts = ", ".join(f"{verdicts.get(name, 0)} {name}" for name in Verdict.ALL)
    lines = [
        f"blockfilter: {summary['total']} messages: {parts}",
        f"  {summary['requests']} API requests, {summary['cache_hits']} cache hits, "
        f"{summary['elapsed_s']:.2f} s",
    ]
    sources = summary.get("sources") or {}
    if sources:
        lines.append(
            "  decided by: "
            + ", ".join(
                f"{name} {sum(counts.values())}" for name, counts in sorted(sources.items())
            )
        )
    if summary.get("credentials_refused"):
        lines.append("  upstream refused the credentials or the account: unchecked are deferred")
    return "\n".join(lines)


# -- sync ----------------------------------------------------------------------------------


def cmd_sync(args: argparse.Namespace) -> int:
    from datetime import datetime, timezone

    from .config import CHANNELS, load_settings
    from .kaleyra.source import KaleyraSource

    settings = load_settings()
    settings.require_credentials()
    source = KaleyraSource(settings, strategy="sync")
    if settings.cache_url.startswith("memory:"):
        print(
            "blockfilter: BLOCKFILTER_CACHE_URL is memory://, so the synced lists are forgotten "
            "when this command ends; use a redis:// cache to share them with your workers",
            file=sys.stderr,
        )
    show_progress = sys.stderr.isatty() and not args.quiet
    results: dict[str, dict[str, Any]] = {}
    try:
        for channel in args.channel or CHANNELS:
            bar: Any = None
            if show_progress:
                from tqdm import tqdm

                bar = tqdm(desc=f"syncing {channel}", unit=" pages", file=sys.stderr, leave=False)

            def progress(done: int, expected: int | None, bar: Any = bar) -> None:
                if bar is not None:
                    if expected is not None and bar.total != max(expected, done):
                        bar.total = max(expected, done)
                    bar.update(1)

            try:
                result = source.sync(channel, progress=progress)
            finally:
                if bar is not None:
                    bar.close()
            synced_at = datetime.fromtimestamp(result.synced_at, timezone.utc)
            results[channel] = {
                "size": result.size,
                "pages": result.pages,
                "synced_at": synced_at.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                "marked": result.marked,
                "elapsed_s": round(result.elapsed_s, 3),
            }
            if not args.json:
                note = "" if result.marked else " (not marked: absent numbers are still looked up)"
                print(
                    f"{channel}: {result.size} blocklisted numbers, {result.pages} requests, "
                    f"{result.elapsed_s:.2f} s{note}"
                )
    finally:
        source.close()
    if args.json:
        print(json.dumps({"channels": results}))
    return EXIT_OK


# -- simulator, demo, config, plugins ---------------------------------------------------------


def cmd_simulator(args: argparse.Namespace) -> int:
    import signal

    from .errors import ConfigError
    from .testing.simulator import run_simulator

    def ready(base_url: str) -> None:
        print(base_url, flush=True)

    # SIGTERM ends the simulator as Ctrl-C does: quietly.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        run_simulator(args.host, args.port, args.blocked, args.fault, args.latency, ready)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from .testing.demo import run_demo

    report = run_demo(messages=args.messages)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        from .testing.demo import format_report

        print(format_report(report))
    return EXIT_OK


def cmd_replay(args: argparse.Namespace) -> int:
    from .pipeline.replay import consumers_of, load_app, replay_deferred, target_queue

    app = load_app(args.app, args.broker)
    queue = target_queue(app, args.queue)
    consumers = consumers_of(app, queue)
    if consumers == 0:
        print(
            f"blockfilter: warning: no worker consumes queue {queue!r}: the replayed tasks "
            f"will wait there until one does (celery -A ... worker -Q {queue}), or use --queue",
            file=sys.stderr,
        )
    elif consumers is None:
        print(
            f"blockfilter: note: could not tell whether a worker consumes queue {queue!r} "
            "(this broker does not say, and no worker answered `celery inspect`)",
            file=sys.stderr,
        )
    count = replay_deferred(app, limit=args.limit, queue=args.queue)
    print(f"blockfilter: {count} deferred messages sent to queue {queue!r}", file=sys.stderr)
    return EXIT_OK


def cmd_deferred(args: argparse.Namespace) -> int:
    from .pipeline.replay import deferred_report, load_app

    report = deferred_report(load_app(args.app, args.broker))
    if args.json:
        print(json.dumps(report.as_dict()))
    else:
        print("\n".join(report.lines()))
    return EXIT_OK


def cmd_config(args: argparse.Namespace) -> int:
    import importlib.util

    from .config import load_settings

    conf = None
    if args.app:
        from .pipeline.replay import load_app

        conf = load_app(args.app, None).conf
    settings: Settings = load_settings(celery_conf=conf)
    rows = settings.describe()
    if importlib.util.find_spec("celery_batches") is None:
        # Without the blockfilter[collector] extra there is no collector to configure.
        rows = [row for row in rows if not row[0].startswith("BLOCKFILTER_COLLECT_")]
    width = max(len(name) for name, _, _ in rows)
    value_width = max(len(value) for _, value, _ in rows)
    for name, value, source in rows:
        print(f"{name:<{width}}  {value:<{value_width}}  ({source})")
    print(f"{'(api root)':<{width}}  {settings.api_root}")
    return EXIT_OK


def cmd_optout(args: argparse.Namespace) -> int:
    from .ledger.cli import run as run_optout

    return run_optout(args)


def cmd_plugins(args: argparse.Namespace) -> int:
    from .plugins.manager import describe_plugins

    for line in describe_plugins():
        print(line)
    return EXIT_OK


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "check": cmd_check,
    "filter": cmd_filter,
    "sync": cmd_sync,
    "simulator": cmd_simulator,
    "demo": cmd_demo,
    "replay": cmd_replay,
    "deferred": cmd_deferred,
    "config": cmd_config,
    "plugins": cmd_plugins,
    "optout": cmd_optout,
}

if __name__ == "__main__":  # pragma: no cover
    run()
