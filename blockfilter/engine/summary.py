"""The counts of a run, as the contract's summary JSON."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from ..model import Verdict


@dataclass
class Summary:
    """Counts of a run, as the contract's summary JSON."""

    # (verdict, final channel, source) -> messages: one increment a message on the hot path;
    # the per-verdict, per-channel and per-source views are derived from it.
    counts: Counter[tuple[str, str, str | None]] = field(default_factory=Counter)
    # (requested channel, final channel) -> rerouted messages: so the summary can say which
    # channel they asked for as well as where they go.
    reroutes: Counter[tuple[str, str]] = field(default_factory=Counter)
    requests: int = 0
    cache_hits: int = 0
    elapsed_s: float = 0.0
    credentials_refused: bool = False

    def count(
        self, verdict: str, channel: str, source: str | None = None, requested: str | None = None
    ) -> None:
        self.counts[verdict, channel, source] += 1
        if requested is not None and requested != channel:
            self.reroutes[requested, channel] += 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def verdicts(self) -> Counter[str]:
        verdicts: Counter[str] = Counter()
        for (verdict, _, _), n in self.counts.items():
            verdicts[verdict] += n
        return verdicts

    @property
    def channels(self) -> dict[str, dict[str, int]]:
        channels: dict[str, dict[str, int]] = defaultdict(dict)
        for (verdict, channel, _), n in self.counts.items():
            channels[channel][verdict] = channels[channel].get(verdict, 0) + n
        return dict(channels)

    @property
    def sources(self) -> dict[str, dict[str, int]]:
        """source (``api``, ``cache``, ``snapshot``, ``ledger``, a plugin) -> verdict -> n."""
        sources: dict[str, dict[str, int]] = defaultdict(dict)
        for (verdict, _, source), n in self.counts.items():
            if source is not None:
                sources[source][verdict] = sources[source].get(verdict, 0) + n
        return dict(sources)

    @property
    def requested_channels(self) -> dict[str, dict[str, int]]:
        """Verdicts by the channel each message asked for (``channels`` is by the channel it
        goes out on: a rerouted message counts under its fallback there, under its own here)."""
        requested: dict[str, Counter[str]] = defaultdict(Counter)
        for (verdict, channel, _), n in self.counts.items():
            requested[channel][verdict] += n
        for (asked, final), n in self.reroutes.items():
            requested[final][Verdict.REROUTED] -= n
            requested[asked][Verdict.REROUTED] += n
        return {
            channel: {verdict: n for verdict, n in counts.items() if n}
            for channel, counts in requested.items()
            if any(counts.values())
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "verdicts": dict(self.verdicts),
            "channels": self.channels,
            "sources": self.sources,
            "requested_channels": self.requested_channels,
            "requests": self.requests,
            "cache_hits": self.cache_hits,
            "elapsed_s": round(self.elapsed_s, 3),
            "credentials_refused": self.credentials_refused,
        }
