"""``blockfilter optout``, run as an operator runs it (a subprocess), on both stores."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

from tests.ledger_support import KEY_A, KEY_B, LedgerPlace
from tests.support.env import subprocess_env

ROOT = Path(__file__).resolve().parents[1]
N1, N2, N3 = "+919812300001", "+919812300002", "+919812300003"


def optout(
    place: LedgerPlace, *args: str, key: str = KEY_A, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    env = subprocess_env(
        BLOCKFILTER_OPTOUT_URL=place.url, BLOCKFILTER_OPTOUT_KEY=key, BLOCKFILTER_LOAD_PLUGINS=""
    )
    return subprocess.run(
        [sys.executable, "-m", "blockfilter", "optout", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )


def test_add_show_remove_import_export(place: LedgerPlace, tmp_path: Path) -> None:
    added = optout(place, "add", "--channel", "sms", "--by", "alice", "--reason", "complaint", N1)
    assert added.returncode == 0, added.stderr
    assert "1 recorded (1 changed)" in added.stderr
    shown = optout(place, "show", "--json", N1)
    state = json.loads(shown.stdout)["opted_out"]
    assert state["whatsapp"] is None
    assert (state["sms"]["by"], state["sms"]["code"], state["sms"]["source"]) == (
        "alice", "complaint", "operator",
    )  # fmt: skip
    human = optout(place, "show", N1)
    assert "sms       opted out since" in human.stdout and N1 not in human.stdout  # masked

    listing = tmp_path / "list.txt"
    listing.write_text(f"# from the old system\n{N2}\n098123 00003\nnot-a-number\n")
    imported = optout(place, "import", "--channel", "all", "--region", "IN", str(listing))
    assert imported.returncode == 2 and "entry 3: invalid_number" in imported.stderr
    assert "2 recorded" in imported.stderr

    refused = optout(place, "export")
    assert refused.returncode == 2 and "--plaintext" in refused.stderr and N1 not in refused.stdout
    exported = optout(place, "export", "--plaintext")
    rows = list(csv.DictReader(io.StringIO(exported.stdout)))
    assert {(r["number"], r["channel"]) for r in rows} == {
        (N1, "sms"), *((n, c) for n in (N2, N3) for c in ("sms", "whatsapp", "voice")),
    }  # fmt: skip
    assert {r["source"] for r in rows if r["number"] == N2} == {"import"}

    removed = optout(place, "remove", "--channel", "sms", N1)
    assert removed.returncode == 0
    assert json.loads(optout(place, "show", "--json", N1).stdout)["opted_out"]["sms"] is None


def test_keygen_and_rotate(place: LedgerPlace) -> None:
    key = optout(place, "keygen").stdout.strip()
    assert len(key) >= 32 and key != optout(place, "keygen").stdout.strip()
    optout(place, "add", "--channel", "sms", N1, N2)
    rotated = optout(place, "rotate", key=f"{KEY_B},{KEY_A}")
    assert rotated.returncode == 0 and "2 events re-sealed" in rotated.stderr
    shown = optout(place, "show", "--json", N1, key=KEY_B)
    assert json.loads(shown.stdout)["opted_out"]["sms"] is not None
    stale = optout(place, "show", "--json", N1, key=KEY_A)
    assert stale.returncode == 1 and "not in BLOCKFILTER_OPTOUT_KEY" in stale.stderr


def test_a_missing_key_is_a_usage_error(place: LedgerPlace) -> None:
    done = optout(place, "add", "--channel", "sms", N1, key="")
    assert done.returncode == 2 and "BLOCKFILTER_OPTOUT_KEY is not set" in done.stderr


def test_config_shows_the_ledger_settings_without_secrets(place: LedgerPlace) -> None:
    env = subprocess_env(
        BLOCKFILTER_OPTOUT_URL="postgresql://bf:s3cret-pw@db.internal:5432/ledger",
        BLOCKFILTER_OPTOUT_KEY=KEY_A,
        BLOCKFILTER_OPTOUT_SCOPE="all",
    )
    done = subprocess.run(
        [sys.executable, "-m", "blockfilter", "config"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "BLOCKFILTER_OPTOUT_SCOPE" in done.stdout and "all" in done.stdout
    assert "bf:[REDACTED]@db.internal:5432/ledger" in done.stdout
    assert "s3cret-pw" not in done.stdout and KEY_A not in done.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "blockfilter", "config"],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
        env=subprocess_env(BLOCKFILTER_OPTOUT_SCOPE="galaxy"),
    )  # fmt: skip
    assert bad.returncode == 2 and "BLOCKFILTER_OPTOUT_SCOPE" in bad.stderr


def test_send_results_and_replies_from_files(place: LedgerPlace) -> None:
    results = "\n".join(
        [
            json.dumps({"to": N1, "channel": "sms", "provider": "kaleyra", "code": "OPT-OUT",
                        "id": "m-1"}),
            json.dumps({"to": N2, "channel": "sms", "provider": "kaleyra", "status": "DELIVRD"}),
            "not json",
            "",
        ]
    )  # fmt: skip
    reported = optout(place, "results", "-", stdin=results)
    assert reported.returncode == 2, reported.stderr  # a line could not be read
    report = json.loads(reported.stdout)
    assert (report["opted_out"], report["ignored"], report["invalid"]) == (1, 1, 1)
    assert report["errors"] == [{"index": 2, "reason": "a send result is a JSON object"}]
    again = optout(place, "results", "-", stdin=results.splitlines()[0])
    assert (again.returncode, json.loads(again.stdout)["duplicates"]) == (0, 1)

    replies = "\n".join(
        json.dumps({"from": n, "channel": "whatsapp", "text": text, "id": i})
        for i, (n, text) in enumerate([(N2, "Stop"), (N2, "STOP"), (N3, "hello")])
    )
    answered = optout(place, "replies", "-", stdin=replies)
    assert answered.returncode == 0, answered.stderr
    answers = [json.loads(line) for line in answered.stdout.splitlines()]
    assert [(a["action"], a["confirm"]) for a in answers] == [
        ("opt_out", True),  # one confirmation...
        ("opt_out", False),  # ...never two
        (None, False),
    ]
    bad = optout(place, "replies", "-", stdin=json.dumps({"from": N3, "channel": "sms"}))
    assert bad.returncode == 2 and "text" in json.loads(bad.stdout)["error"]
    for output in (reported, answered, bad):
        assert not any(f in output.stdout + output.stderr for n in (N1, N2, N3)
                       for f in (n, n[1:], n[-8:]))  # fmt: skip
    state = {
        n: json.loads(optout(place, "show", "--json", n).stdout)["opted_out"] for n in (N1, N2)
    }
    assert state[N1]["sms"]["source"] == "send_result" and state[N1]["whatsapp"] is None
    assert state[N2]["whatsapp"]["source"] == "inbound" and state[N2]["sms"] is None
