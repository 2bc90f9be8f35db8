"""``blockfilter demo``: the whole job on embedded defaults.

No credentials and no server to install: a simulator with a sample blocklist runs in this
process, a sample campaign goes through the filter, and a report comes out.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

DEMO_SID = "DEMO"
DEMO_KEY = "demo-key-not-a-secret"


def sample_numbers(count: int, seed: int = 7) -> list[str]:
    """Distinct valid Indian mobile numbers, the same for the same seed."""
    rng = random.Random(seed)
    numbers: dict[str, None] = {}
    while len(numbers) < count:
        numbers[f"+91{rng.choice('6789')}{rng.randrange(10**9):09d}"] = None
    return list(numbers)


def sample_blocklist(numbers: list[str], seed: int = 7) -> dict[str, list[str]]:
    """About 8% of the numbers blocklisted on SMS, some of those on WhatsApp and voice too."""
    rng = random.Random(seed + 1)
    sms = [n for n in numbers if rng.random() < 0.08]
    whatsapp = [n for n in sms if rng.random() < 0.4] + [n for n in numbers if rng.random() < 0.02]
    voice = [n for n in whatsapp if rng.random() < 0.5]
    return {"sms": sms, "whatsapp": whatsapp, "voice": voice}


def sample_campaign(count: int, numbers: list[str], seed: int = 7) -> list[dict[str, Any]]:
    """A campaign like real ones: mostly SMS with a WhatsApp/voice fallback, repeats of
    numbers, a few national-format numbers, and a few broken messages."""
    rng = random.Random(seed + 2)
    messages: list[dict[str, Any]] = []
    for index in range(count):
        number = rng.choice(numbers)
        message: dict[str, Any] = {
            "id": f"m{index:06d}",
            "channel": "sms",
            "to": number,
            "text": "Your order has shipped 📦",
        }
        roll = rng.random()
        if roll < 0.5:
            message["fallback"] = ["whatsapp", "voice"]
        elif roll < 0.6:
            message["channel"] = "whatsapp"
        elif roll < 0.65:
            message["to"] = "0" + number[3:8] + " " + number[8:]
            message["region"] = "IN"
        elif roll < 0.66:
            message["to"] = "+91 12345"  # too short: invalid
        elif roll < 0.665:
            message["channel"] = "pigeon"  # unknown channel: invalid
        messages.append(message)
    return messages


@contextmanager
def demo_simulator(distinct: int, latency: float = 0.02) -> Iterator[Any]:
    from .simulator import Simulator

    numbers = sample_numbers(distinct)
    simulator = Simulator(
        sample_blocklist(numbers), sid=DEMO_SID, api_key=DEMO_KEY, latency=latency
    )
    simulator.start()
    try:
        yield simulator, numbers
    finally:
        simulator.stop()


def run_demo(messages: int = 2000) -> dict[str, Any]:
    """Run the sample campaign through the filter against the embedded simulator."""
    from .config import load_settings
    from .engine import Filter

    distinct = max(10, messages // 4)
    with demo_simulator(distinct) as (simulator, numbers):
        settings = load_settings(
            environ={},
            sid=DEMO_SID,
            api_key=DEMO_KEY,
            base_url=simulator.base_url,
            cache_url="memory://",
        )
        campaign = sample_campaign(messages, numbers)
        started = time.monotonic()
        with Filter(settings) as engine:
            results = list(engine.run(campaign))
        elapsed = time.monotonic() - started
        summary = engine.summary.as_dict()
        stats = simulator.stats
    primary: dict[str, set[Any]] = {}
    for message in campaign:
        channel = str(message.get("channel", "")).lower()
        primary.setdefault(channel, set()).add(message.get("to"))
    return {
        "summary": summary,
        "dispatched": summary["verdicts"].get("allowed", 0),
        "rerouted": summary["verdicts"].get("rerouted", 0),
        "blocked": summary["verdicts"].get("blocked", 0),
        "invalid": summary["verdicts"].get("invalid", 0),
        "deferred": summary["verdicts"].get("deferred", 0),
        "requests": summary["requests"],
        "numbers_asked": stats.numbers_asked,
        "elapsed_s": round(elapsed, 3),
        "examples": _examples(results),
        "primary_lower_bound": sum(math.ceil(len(v) / 100) for v in primary.values() if v),
    }


def _examples(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    chosen: dict[str, dict[str, Any]] = {}
    for result in results:
        chosen.setdefault(result["verdict"], result)
    return list(chosen.values())


def format_report(report: dict[str, Any]) -> str:
    summary = report["summary"]
    lines = [
        "blockfilter demo: a sample campaign against the embedded Kaleyra simulator",
        "",
        f"  messages    {summary['total']:>7}",
        f"  dispatched  {report['dispatched']:>7}   (allowed on their channel)",
        f"  rerouted    {report['rerouted']:>7}   (blocklisted, sent on a fallback channel)",
        f"  blocked     {report['blocked']:>7}   (blocklisted on every channel offered)",
        f"  invalid     {report['invalid']:>7}   (unusable message or number)",
        f"  deferred    {report['deferred']:>7}   (could not be checked)",
        "",
        f"  API requests made  {report['requests']}  (numbers asked: {report['numbers_asked']})",
        f"  elapsed            {report['elapsed_s']:.2f} s",
        "",
        "  one record of each verdict:",
    ]
    for example in report["examples"]:
        shown = {k: v for k, v in example.items() if k != "text"}
        lines.append(f"    {shown}")
    return "\n".join(lines)
