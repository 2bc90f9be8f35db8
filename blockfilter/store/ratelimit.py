"""The fleet-wide rate limit: ``BLOCKFILTER_RATE_LIMIT`` API requests per second, in all.

Kaleyra limits an *account*, not a process, so the limit is shared: with a ``redis://`` cache
URL every worker of the fleet draws from one window kept in Redis, keyed by the account SID;
with ``memory://`` each process has a window of its own.

The window is the ``limits`` library's *moving window* (``MovingWindowRateLimiter``), not a
hand-written bucket. It was chosen over the sliding-window counter because it is exact: it
keeps the time of each of the last R requests, so no interval of one second ever holds more
than R requests, wherever it starts. The counter is an approximation that lets up to twice the
limit through around a window edge, and a token bucket lets up to 2R through in one second (a
full bucket plus the refill). The price, a list of R timestamps per account in Redis, is small.
Over any interval of T seconds at most ``R*T + R`` requests go out: the rate on average, with
at most one burst of R.

Two refinements keep that true where it counts, at Kaleyra, whose clock sees each request a
few milliseconds after ours: each process spaces its own requests 1/R apart (so the fleet's
first second is not one dense burst that the window then repeats every second, where a few
milliseconds of network jitter would move several requests into the next second), and a slot
counts as taken for :data:`HEADROOM` longer than the window (2% of the rate). A process's
very first requests can still reach Kaleyra much later than they were allowed (a new
connection, a busy interpreter at start-up): the first second after a start may then hold a
request or two more as Kaleyra counts.

A 429 from Kaleyra means the whole account is over its limit, so :meth:`RateLimiter.penalize`
pauses the whole fleet: it sets a "paused until" key in Redis that every ``acquire()`` in
every process honours before it takes a slot.

Waiting never holds a lock that other work needs: threads that want a slot take turns (only
the first of them asks Redis, so a process with 64 threads does not poll 64 times per slot),
and everything else a worker does (reading input, the cache) goes on meanwhile.

Timestamps come from each host's clock, as the ``limits`` library takes them: keep the clocks
of a fleet's hosts in sync (NTP) for the window to hold across hosts.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable
from fractions import Fraction
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ..config import Settings
from ..errors import RequestBudgetExhausted

if TYPE_CHECKING:
    from limits import RateLimitItem
    from limits.strategies import MovingWindowRateLimiter

    from ..kaleyra.client import RequestLimiter

__all__ = ["RateLimiter", "RequestBudget", "build_limiter", "rate_window"]

log = logging.getLogger("blockfilter.ratelimit")

# Short, as the status cache's: a limiter that cannot reach Redis falls back to a per-process
# window rather than stall every request.
REDIS_CONNECT_TIMEOUT = 1.0
REDIS_SOCKET_TIMEOUT = 2.0
# A slot counts as taken for this much longer than the window: the limit is kept on this
# side's clock, and requests reach Kaleyra a few milliseconds later, some later than others.
# Without headroom, a request that left late in one second and one that leaves early a second
# later land less than a second apart, and Kaleyra's second holds R + 1. It costs 2% of the
# rate at 1 s windows.
HEADROOM = 0.02
# How stale this process's view of the fleet-wide pause may be, in seconds.
PAUSE_RECHECK = 0.1
# A thread that found the window full sleeps until the oldest entry leaves it, plus a little
# jitter so the processes of a fleet do not all ask Redis in the same millisecond.
_WAKE_JITTER = 0.003
# Never sleep less than this between two asks (a clock step must not turn into a busy loop).
_MIN_SLEEP = 0.001
# How long a broken Redis is left alone before the limiter tries it again.
_REDIS_RETRY_AFTER = 5.0

# Sets the pause key only when it would end later than the pause already set: a short
# Retry-After must not cut a longer pause short.
_PAUSE_SCRIPT = """
local ttl = redis.call('PTTL', KEYS[1])
if ttl < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
  return 1
end
return 0
"""


def rate_window(rate: float) -> tuple[int, int]:
    """``(amount, seconds)``: ``rate`` requests per second as a whole number of requests per
    whole number of seconds, which is what ``limits`` takes. 100 -> (100, 1); 2.5 -> (5, 2);
    0.5 -> (1, 2). Rates that need a window longer than a minute are rounded to one that fits.

    :raises ValueError: a rate that is not a positive number.
    """
    if not (isinstance(rate, (int, float)) and math.isfinite(rate) and rate > 0):
        raise ValueError(f"a rate limit must be a positive number of requests per second: {rate}")
    fraction = Fraction(rate).limit_denominator(60)
    if fraction <= 0:
        fraction = Fraction(1, 60)  # the slowest rate a one-minute window can express
    return fraction.numerator, fraction.denominator


def _limits_redis_uri(cache_url: str) -> str:
    # limits spells a Unix socket redis+unix://; redis:// and rediss:// are the same.
    if cache_url.startswith("unix://"):
        return "redis+unix://" + cache_url[len("unix://") :]
    return cache_url


class RateLimiter:
    """A :class:`~blockfilter.kaleyra.client.RequestLimiter`: at most ``rate`` requests per
    second (``None``: no limit, 429 pauses only), shared through Redis when ``redis_url`` is
    given.

    :param rate: requests per second across everything that shares the window.
    :param account: what the window is keyed by (the Kaleyra SID): one window per account.
    :param redis_url: a ``redis://``, ``rediss://`` or ``unix://`` URL to share the window and
        the pause through; ``None`` for a window of this process alone.
    :param namespace: prefix of the Redis keys (tests use a random one to share a server).
    :param sleep: how to wait (tests inject a fake).
    :param clock: wall-clock time, as ``limits`` uses (tests inject a fake).
    """

    def __init__(
        self,
        rate: float | None,
        *,
        account: str,
        redis_url: str | None = None,
        namespace: str = "",
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.rate = rate
        self.account = account
        self.namespace = namespace
        self._redis_url = redis_url
        self._sleep = sleep
        self._clock = clock
        self._item: RateLimitItem | None = None
        self._spacing = 0.0
        self._next_local = 0.0
        self._monotonic = time.monotonic
        if rate is not None:
            self._spacing = 1.0 / rate
            from limits import RateLimitItemPerSecond

            amount, seconds = rate_window(rate)
            self._item = RateLimitItemPerSecond(amount, seconds, namespace="blockfilter")
        # Made on first use (never at import or construction: Celery forks after both).
        self._shared: MovingWindowRateLimiter | None = None
        self._redis: Any = None
        self._pause_script: Any = None
        self._local: MovingWindowRateLimiter | None = None
        self._local_paused_until = 0.0
        self._shared_paused_until = 0.0
        self._pause_read_at = -math.inf
        self._pause_lock = threading.Lock()
        self._redis_broken_until = 0.0
        self._setup_lock = threading.Lock()
        # Threads wanting a slot take turns; see the module docs.
        self._turn = threading.Lock()
        self._rng = random.Random()

    @property
    def shared(self) -> bool:
        """Whether the window and the pause are shared through Redis."""
        return self._redis_url is not None

    def __repr__(self) -> str:
        where = "redis" if self.shared else "process"
        return f"RateLimiter(rate={self.rate!r}, account={self.account!r}, scope={where!r})"

    # -- the RequestLimiter protocol -----------------------------------------------------

    def acquire(self) -> None:
        """Wait until a request may be sent: the fleet is not paused and the window has room."""
        if self._item is None:
            # No window, only the pause: nothing to take turns for.
            while (paused := self._paused_for()) > 0:
                self._sleep(paused)
            return
        with self._turn:
            while True:
                paused = self._paused_for()
                if paused > 0:
                    self._sleep(paused)
                    continue
                if self._item is None:
                    return
                early = self._next_local - self._monotonic()
                if early > 0:
                    self._sleep(early)
                    continue
                wait = self._try_hit()
                if wait <= 0:
                    self._space_out()
                    return
                self._sleep(wait + self._rng.uniform(0, _WAKE_JITTER))

    def _space_out(self) -> None:
        # This process's next request waits 1/R after this one. The window alone would let R
        # requests out at once and then, a second later, the next R at once, and so on: at
        # the upstream, a few milliseconds of network jitter then decide whether a second
        # holds R requests or R + 5. Spaced out, a jitter that small moves one request at
        # most. A late request does not let the next one go early (no catching up beyond one
        # step), and small sleep overshoots do not add up.
        now = self._monotonic()
        base = self._next_local if now - self._next_local <= self._spacing else now
        self._next_local = base + self._spacing

    def penalize(self, seconds: float) -> None:
        """Pause every request of the fleet (this process included) for ``seconds``."""
        if not seconds > 0:
            return
        until = self._clock() + seconds
        self._local_paused_until = max(self._local_paused_until, until)
        if self._use_redis():
            try:
                self._pause_script(keys=[self._pause_key()], args=[math.ceil(seconds * 1000)])
            except Exception as exc:  # noqa: BLE001 - the local pause above still holds
                self._redis_failed("pause", exc)
        log.warning("Kaleyra asked to slow down: API requests paused for %.2fs", seconds)

    # -- the pause -----------------------------------------------------------------------

    def _pause_key(self) -> str:
        return f"{self.namespace}bf:rl:pause:{self.account}"

    def paused_for(self) -> float:
        """Seconds left of the current pause (0 when requests may go)."""
        return self._paused_for()

    def _paused_for(self) -> float:
        now = self._clock()
        if self._use_redis() and now - self._pause_read_at >= PAUSE_RECHECK:
            # Asked of Redis at most every PAUSE_RECHECK seconds: a round trip per request
            # would cost more than a pause (a Retry-After of a second or more) is noticed late.
            # One thread asks; the others wait for its answer rather than go on without one.
            with self._pause_lock:
                if now - self._pause_read_at >= PAUSE_RECHECK:
                    try:
                        ms = int(self._redis.pttl(self._pause_key()))
                        self._shared_paused_until = now + ms / 1000 if ms > 0 else 0.0
                    except Exception as exc:  # noqa: BLE001
                        self._redis_failed("pause", exc)
                    self._pause_read_at = now
        return max(self._local_paused_until - now, self._shared_paused_until - now, 0.0)

    # -- the window ----------------------------------------------------------------------

    def _try_hit(self) -> float:
        """Take a slot: 0 when taken, else the seconds until one may free up."""
        assert self._item is not None
        if self._use_redis():
            try:
                return self._hit(self._shared, self._item)
            except Exception as exc:  # noqa: BLE001
                self._redis_failed("window", exc)
        return self._hit(self._local_window(), self._item)

    def _hit(self, limiter: Any, item: RateLimitItem) -> float:
        # First a look at a window HEADROOM longer than the limit's: a slot that freed up
        # only a moment ago is left alone a little longer (see HEADROOM). The hit itself
        # then decides, atomically, on the limit's own window.
        span = item.get_expiry() + HEADROOM
        oldest, count = limiter.storage.get_moving_window(
            item.key_for(self.account), item.amount, span
        )
        if count >= item.amount:
            return max(float(oldest) + span - self._clock(), _MIN_SLEEP)
        if limiter.hit(item, self.account):
            return 0.0
        reset, _remaining = limiter.get_window_stats(item, self.account)
        return max(float(reset) + HEADROOM - self._clock(), _MIN_SLEEP)

    def _local_window(self) -> MovingWindowRateLimiter:
        with self._setup_lock:
            if self._local is None:
                from limits.storage import MemoryStorage
                from limits.strategies import MovingWindowRateLimiter

                self._local = MovingWindowRateLimiter(MemoryStorage())
            return self._local

    # -- Redis ---------------------------------------------------------------------------

    def _use_redis(self) -> bool:
        if self._redis_url is None or self._clock() < self._redis_broken_until:
            return False
        if self._shared is None:
            with self._setup_lock:
                if self._shared is None:
                    self._connect()
        return True

    def _connect(self) -> None:
        from limits.storage import RedisStorage
        from limits.strategies import MovingWindowRateLimiter

        assert self._redis_url is not None
        storage = RedisStorage(
            _limits_redis_uri(self._redis_url),
            key_prefix=f"{self.namespace}bf:rl",
            socket_connect_timeout=REDIS_CONNECT_TIMEOUT,
            socket_timeout=REDIS_SOCKET_TIMEOUT,
        )
        self._redis = storage.get_connection()
        self._pause_script = self._redis.register_script(_PAUSE_SCRIPT)
        self._shared = MovingWindowRateLimiter(storage)

    def _redis_failed(self, what: str, exc: BaseException) -> None:
        # Requests are paced per process meanwhile: the fleet may then go over the limit, and
        # the 429s that follow are retried, which is better than no check at all.
        self._redis_broken_until = self._clock() + _REDIS_RETRY_AFTER
        log.warning(
            "rate limit: Redis unavailable (%s: %s); pacing this process alone for %.0fs",
            what,
            type(exc).__name__,
            _REDIS_RETRY_AFTER,
        )


def _is_redis_url(url: str) -> bool:
    return urlsplit(url).scheme.lower() in ("redis", "rediss", "unix")


def build_limiter(settings: Settings, *, namespace: str = "") -> RateLimiter | None:
    """The limiter ``settings`` ask for, or ``None`` when nothing needs pacing.

    * ``BLOCKFILTER_RATE_LIMIT`` set: that many requests per second, fleet-wide with a Redis
      cache URL, per process with ``memory://``.
    * Not set, Redis cache URL: no window, but a 429 still pauses the whole fleet.
    * Not set, ``memory://``: ``None`` (the client handles a 429 on its own).
    """
    redis_url = settings.cache_url if _is_redis_url(settings.cache_url) else None
    if settings.rate_limit is None and redis_url is None:
        return None
    return RateLimiter(
        settings.rate_limit,
        account=settings.sid or "default",
        redis_url=redis_url,
        namespace=namespace,
    )


class RequestBudget:
    """A limiter that lets at most ``limit`` API requests (attempts) through, then refuses.

    Backs ``blockfilter filter --max-requests N``: requests past N are not made, and the
    numbers they would have checked are deferred.
    """

    def __init__(self, limit: int, then: RequestLimiter | None = None) -> None:
        self.limit = limit
        self._then = then
        self._used = 0
        self._lock = threading.Lock()

    def acquire(self) -> None:
        with self._lock:
            if self._used >= self.limit:
                raise RequestBudgetExhausted(f"the request budget of {self.limit} is spent")
            self._used += 1
        if self._then is not None:
            self._then.acquire()

    def penalize(self, seconds: float) -> None:
        if self._then is not None:
            self._then.penalize(seconds)
