"""The demo closes the loop: a send result reported after the campaign's first wave, and
the next batch suppresses that number (the ledger decided, though Kaleyra says clean)."""

from __future__ import annotations

from blockfilter.testing.demo import run_demo


def test_the_demo_shows_the_loop() -> None:
    report = run_demo(messages=300)
    loop = report["loop"]
    assert loop["recorded"] == 1
    assert loop["next_batch"] == {"dispatched": 1, "blocked": 1}
    assert loop["blocked_by"] == "ledger"
    assert loop["summary"]["sources"]["ledger"] == {"blocked": 1}
    assert "X" in loop["reported"]  # masked
