"""The first pass read on the second core: a forked process decodes the lines, this one asks.

Decoding, validating and coding the lines is most of the CPU of a first pass over a campaign,
and it holds the interpreter's lock that the request threads need each time an answer comes
in: on a 2-core machine one core did all the work while the other idled, and the requests
waited for the reader. Here, once the filter has read the first lines itself, it forks (Linux
only): the child goes on with the same reader, at the same place of the same open file, and
codes its lines into its copy of the plan; this process takes, as they come, the valid
messages the resolver must see (new routes, compact lines), and, at the end, the plan's codes.
Requests leave as before, from this process.

Fail closed: the run goes on only with the child's whole plan, ended by its end-of-plan frame.
A child that ends before it (killed, out of memory) or reports an error makes the first pass
raise (:class:`~blockfilter.errors.ReaderFailed`, or the child's own
:class:`~blockfilter.errors.InputChanged`): no line gets a verdict from a plan read in part.
The child is killed and reaped however the pass ends, and never runs this process's exit
handlers or flushes its buffers (``os._exit``). Where no process can be forked (a limit on
processes), this one reads on, as with the reader off.

Only the filter's own readers are handed over (``blockfilter filter``'s files): a line source
that leans on a thread or on state shared with this process would stall or diverge in a
forked copy. Routes must share verdicts (a message-independent fallback policy): the
resolver is then shown the parse alone, and the lines are not decoded again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import sys
import warnings
from collections.abc import Iterable, Iterator
from itertools import chain, islice
from typing import IO, Any, Final

from ..errors import BlockfilterError, InputChanged, ReaderFailed
from ..model import Invalid, Parsed
from .lines import NO_MESSAGE, STILL_READING, LinePlan

log = logging.getLogger("blockfilter.engine")

#: Lines this process reads itself before it forks, when the choice is ``auto``: a campaign
#: shorter than this (some 40 ms of reading) costs less to read than to fork for.
AUTO_AFTER_LINES: Final = 4096

# The valid messages sent in one frame: a few milliseconds of the child's reading.
_BATCH: Final = 256
_HEADER: Final = 9  # a frame: its kind (1 byte), its length (8 bytes), a pickle
_ITEMS, _PLAN, _ERROR = b"i", b"p", b"e"  # pickled
_CODES, _KEYS = b"c", b"k"  # raw: a chunk of the plan's codes, of its compact keys
_CHUNKS: Final = (_CODES, _KEYS)


def forking_supported() -> bool:
    """Whether this platform forks safely for the reader: Linux. (macOS's system libraries
    are not fork-safe, and Windows has no fork.)"""
    return sys.platform.startswith("linux") and hasattr(os, "fork")


def first_pass_in_child(
    plan: LinePlan, lines: Iterable[bytes], *, after_lines: int
) -> Iterator[tuple[Any, Parsed | Invalid] | tuple[None, None]]:
    """The first pass of ``plan`` over ``lines``, as :meth:`LinePlan.read_lines` gives it and
    with the plan finished: the first ``after_lines`` lines read here, the rest in a forked
    process (none if there is no rest)."""
    if not plan.share_verdicts or after_lines < 1:
        raise ValueError("the child reads routes that share verdicts, after a first line")
    lines = iter(lines)
    # This process reads the first lines: a reader that opens its file on its first line
    # (and remembers what it opened, to compare later passes with) does it here.
    yield from plan.read_lines(islice(lines, after_lines))
    following = next(lines, None)
    if following is None:
        plan.finish_first_pass()
        return
    plan.before_fork()  # a spool already on disk is shared with the child: see LinePlan
    try:
        read_end, write_end, pid = _fork()
    except OSError as exc:
        # No second process to be had (a limit on processes, memory that cannot be
        # committed twice): this one reads on, as with the reader off.
        log.info("no reader process (%s): the first pass is read in this one", exc.strerror)
        yield from plan.read_lines(chain((following,), lines), after_lines + 1)
        plan.finish_first_pass()
        return
    if pid == 0:  # pragma: no cover (the child: its coverage is never written)
        os.close(read_end)
        _child(plan, chain((following,), lines), after_lines + 1, write_end)
    os.close(write_end)
    plan.start_adopting()  # the child sends every line's code, the first ones' too
    child = _Child(pid)
    try:
        with os.fdopen(read_end, "rb", buffering=1 << 16) as frames:
            yield from _received(plan, frames)
        child.reap()
    finally:
        child.stop()


def _fork() -> tuple[int, int, int]:
    """A pipe and a forked process: ``(read end, write end, pid)``, the pid 0 in the child."""
    read_end, write_end = os.pipe()
    try:
        with warnings.catch_warnings():
            # Python 3.12 warns of fork() in a process with threads (request threads may
            # have started): the child touches none of their locks, only the reader and
            # the plan.
            warnings.simplefilter("ignore", DeprecationWarning)
            return read_end, write_end, os.fork()
    except OSError:
        os.close(read_end)
        os.close(write_end)
        raise


class _Child:
    def __init__(self, pid: int) -> None:
        self.pid: int | None = pid

    def reap(self) -> None:
        """Wait for the child, which sent its plan and is ending."""
        if self.pid is not None:
            os.waitpid(self.pid, 0)
            self.pid = None

    def stop(self) -> None:
        """Kill and reap a child still running: the pass ended without its plan."""
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):  # ended already: reaped below
                os.kill(self.pid, signal.SIGKILL)
            self.reap()


def _received(
    plan: LinePlan, frames: IO[bytes]
) -> Iterator[tuple[Any, Parsed | Invalid] | tuple[None, None]]:
    routes = plan.routes
    # One string of each channel and one tuple of each fallback list, as a plan read in one
    # process holds (unpickled, each batch would bring copies of its own).
    channels: dict[str, str] = {}
    fallbacks: dict[tuple[str, ...], tuple[str, ...]] = {}
    while True:
        kind, body = _read_frame(frames)
        if kind == _ITEMS:
            for item in body:
                if item is None:
                    yield STILL_READING
                    continue
                message_id, channel, fallback, key, is_route = item
                parsed = Parsed(
                    message_id,
                    channels.setdefault(channel, channel),
                    f"+{key}",
                    fallbacks.setdefault(fallback, fallback),
                    key,
                )
                if is_route:
                    routes.append(parsed)
                yield NO_MESSAGE, parsed
        elif kind in _CHUNKS:
            plan.adopt_chunk(kind == _CODES, body)
        elif kind == _PLAN:
            route_count, state = body
            if route_count != len(routes):
                raise ReaderFailed(
                    f"the reader process numbered {route_count} routes, {len(routes)} came"
                )
            plan.adopt_first_pass(state)
            return
        else:  # _ERROR
            name, message = body
            if name == "InputChanged":
                raise InputChanged(message)
            raise ReaderFailed(f"the reader process failed: {message}")


def _read_frame(frames: IO[bytes]) -> tuple[bytes, Any]:
    header = frames.read(_HEADER)
    if len(header) == _HEADER:
        size = int.from_bytes(header[1:], "little")
        payload = frames.read(size)
        if len(payload) == size:
            kind = header[:1]
            if kind in _CHUNKS:
                return kind, payload
            try:
                return kind, pickle.loads(payload)  # noqa: S301 (our own child's frames)
            except Exception as exc:  # a frame cut short by a failing child, then another
                raise ReaderFailed("the reader process sent a frame that cannot be read") from exc
    raise ReaderFailed("the reader process ended before it had sent all it read")


def _child(  # pragma: no cover (runs in the forked process)
    plan: LinePlan, lines: Iterable[bytes], first_line_number: int, write_end: int
) -> None:
    """Read the rest of the first pass into ``plan`` and send it; never returns."""
    status = 1
    try:
        with os.fdopen(write_end, "wb", buffering=1 << 16) as out:
            try:
                _read_and_send(plan, lines, first_line_number, out)
                status = 0
            except BrokenPipeError:
                pass  # the parent stopped listening: it is ending the run
            except BaseException as exc:  # noqa: BLE001 (all goes back to the parent)
                _send(out, _ERROR, _described(exc))
    except BaseException:  # noqa: BLE001, S110 (nothing to tell: the parent sees no plan)
        pass
    os._exit(status)


def _read_and_send(  # pragma: no cover (runs in the forked process)
    plan: LinePlan, lines: Iterable[bytes], first_line_number: int, out: IO[bytes]
) -> None:
    plan.own_spools()
    routes = plan.routes
    known = len(routes)
    batch: list[tuple[str, str, tuple[str, ...], int, bool] | None] = []
    for _, parsed in plan.read_lines(lines, first_line_number):
        if parsed is None:  # STILL_READING: the parent hands over what it holds
            batch.append(None)
        elif type(parsed) is Parsed:
            is_route = len(routes) > known
            if is_route:
                # The parent keeps the route; here only its place is read again (the plan
                # counts its routes), not the route: some 130 bytes each, freed.
                routes[known] = _SENT
                known += 1
            batch.append((parsed.id, parsed.channel, parsed.fallback, parsed.key, is_route))
            if len(batch) < _BATCH:
                continue
        else:
            continue  # invalid: the verdict pass decodes its line again
        _send(out, _ITEMS, batch)
        batch = []
    if batch:
        _send(out, _ITEMS, batch)
    plan.finish_first_pass()
    for is_code, chunk in plan.spooled_chunks():
        _send(out, _CODES if is_code else _KEYS, chunk)
    _send(out, _PLAN, (len(routes), plan.first_pass_state()))


_SENT: Final = Parsed("", "", "", (), 0)  # in the child's plan, a route sent to the parent


def _send(out: IO[bytes], kind: bytes, body: Any) -> None:  # pragma: no cover (child)
    payload = body if kind in _CHUNKS else pickle.dumps(body, protocol=pickle.HIGHEST_PROTOCOL)
    out.write(kind + len(payload).to_bytes(8, "little"))
    out.write(payload)
    out.flush()  # the parent takes each batch as it comes: its numbers are requests to make


def _described(exc: BaseException) -> tuple[str, str]:  # pragma: no cover (child)
    """What the parent is told of an error: blockfilter's own messages (which never hold a
    number), and of any other only its type (its text might quote a line)."""
    name = type(exc).__name__
    if isinstance(exc, BlockfilterError):
        return name, str(exc)
    return name, name
