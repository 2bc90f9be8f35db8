"""``blockfilter demo``: the real command, in a clean environment, accounts for every message.

The demo runs the sample campaign through Celery tasks on an in-memory broker with a worker in
its own process. What it reports is checked against verdicts computed here, independently of
the filter: from the sample blocklist, with ``phonenumbers`` deciding which numbers are valid.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import phonenumbers

from blockfilter.testing.demo import distinct_for, sample_blocklist, sample_campaign, sample_numbers

CHANNELS = ("sms", "whatsapp", "voice")


def clean_env(home: Path) -> dict[str, str]:
    """What a fresh shell has: no KALEYRA_*/BLOCKFILTER_* settings, no PYTHONPATH."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "LANG": "C.UTF-8"}


def run_demo_command(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "blockfilter", "demo", *args],
        cwd=tmp_path,  # not the repository: the installed package is what runs
        env=clean_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def e164_of(message: dict[str, Any]) -> str | None:
    try:
        parsed = phonenumbers.parse(message["to"], message.get("region"))
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(parsed):
        return None
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


def expected_verdicts(messages: int) -> Counter[str]:
    """The verdict counts of the demo's campaign, from the sample blocklist alone."""
    numbers = sample_numbers(distinct_for(messages))
    blocked = {channel: set(found) for channel, found in sample_blocklist(numbers).items()}
    counts: Counter[str] = Counter()
    for message in sample_campaign(messages, numbers):
        channel = message["channel"].lower()
        number = e164_of(message)
        if channel not in CHANNELS or number is None:
            counts["invalid"] += 1
        elif number not in blocked[channel]:
            counts["allowed"] += 1
        elif any(number not in blocked[f] for f in message.get("fallback", [])):
            counts["rerouted"] += 1
        else:
            counts["blocked"] += 1
    return counts


def test_demo_json_accounts_for_every_message(tmp_path: Path) -> None:
    done = run_demo_command(tmp_path, "--json", "--messages", "700")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    expected = expected_verdicts(700)

    assert report["messages"] == 700
    counted = {k: report[k] for k in ("dispatched", "rerouted", "blocked", "invalid", "deferred")}
    assert sum(counted.values()) == 700
    assert counted == {
        "dispatched": expected["allowed"],
        "rerouted": expected["rerouted"],
        "blocked": expected["blocked"],
        "invalid": expected["invalid"],
        "deferred": 0,
    }
    # Every message reached the demo's hooks exactly once, through real tasks and API calls.
    assert report["reached_hooks"] == 700 and report["repeats"] == 0
    assert report["summary"]["total"] == 700
    assert report["summary"]["verdicts"].get("allowed", 0) == expected["allowed"]
    assert report["tasks"] >= 2, "the campaign is split over several filter_messages tasks"
    assert report["requests"] >= report["primary_lower_bound"] > 0
    assert {e["verdict"] for e in report["examples"]} == {
        "allowed",
        "rerouted",
        "blocked",
        "invalid",
    }
    # No credentials were given: the demo used its own, and printed no key.
    assert "demo-key" not in done.stdout + done.stderr


def test_demo_text_report(tmp_path: Path) -> None:
    done = run_demo_command(tmp_path)
    assert done.returncode == 0, done.stderr
    expected = expected_verdicts(2000)
    shown = {
        name: int(count)
        for name, count in re.findall(r"^\s+(\w+)\s+(\d+)\s+\(", done.stdout, flags=re.MULTILINE)
    }
    assert shown == {
        "dispatched": expected["allowed"],
        "rerouted": expected["rerouted"],
        "blocked": expected["blocked"],
        "invalid": expected["invalid"],
        "deferred": 0,
    }
    assert re.search(r"^\s+messages\s+2000$", done.stdout, flags=re.MULTILINE)
    assert re.search(r"tasks run\s+\d+", done.stdout)
    elapsed = float(re.search(r"elapsed\s+([\d.]+) s", done.stdout).group(1))  # type: ignore[union-attr]
    assert elapsed < 10, "the demo should take seconds"
    # Nothing alarming on stderr (a warning would mean something went wrong quietly).
    assert done.stderr == ""
