"""The simulator without its sockets: ``SimulatedKaleyra.transport`` answers the Kaleyra
client in-process, and the client must not be able to tell it from the HTTP server.

Each case runs the same client call twice, once over HTTP to a :class:`Simulator` and once
through the transport of a :class:`SimulatedKaleyra` with the same blocklist and faults, and
compares what the caller sees (the answer, or the error's class and code) and what the
simulator counted.
"""

from __future__ import annotations

from typing import Any

import pytest

from blockfilter.config import load_settings
from blockfilter.errors import BlockfilterError
from blockfilter.kaleyra.client import KaleyraClient
from blockfilter.testing.kaleyra_api import SimulatedKaleyra
from blockfilter.testing.simulator import FAULT_KINDS, FaultRule, Simulator

SID = "DIFFSID"
KEY = "diff-key-7c1e0b"
BLOCKED = {"sms": ["+918020000061", "+918020000062"], "whatsapp": ["+918020000063"]}
ASKED = ["+918020000061", "+918020000064", "+918020000063"]


def client_settings(**overrides: Any) -> Any:
    values: dict[str, Any] = {
        "sid": SID,
        "api_key": KEY,
        "retry_attempts": 1,  # one attempt: the fault itself is what the caller sees
        "request_timeout": 0.5,
        "connect_timeout": 0.5,
    }
    values.update(overrides)
    return load_settings(environ={}, **values)


def outcome(call: Any) -> tuple[str, Any]:
    try:
        return "answer", call()
    except BlockfilterError as exc:
        return type(exc).__name__, getattr(exc, "code", None)


def both(faults: list[FaultRule], call: Any, **settings: Any) -> list[tuple[Any, Any]]:
    """(what the caller saw, what the simulator counted), over HTTP then in-process."""
    seen = []
    with Simulator(BLOCKED, sid=SID, api_key=KEY, faults=faults) as server:
        client = KaleyraClient(client_settings(base_url=server.base_url, **settings))
        try:
            seen.append((outcome(lambda: call(client)), _counted(server)))
        finally:
            client.close()
    api = SimulatedKaleyra(BLOCKED, sid=SID, api_key=KEY, faults=faults)
    client = KaleyraClient(
        client_settings(base_url="https://kaleyra.invalid", **settings), transport=api.transport
    )
    seen.append((outcome(lambda: call(client)), _counted(api)))
    return seen


def _counted(api: SimulatedKaleyra) -> tuple[int, dict[str, int], dict[int, int], int]:
    stats = api.snapshot(records=False)
    return stats.requests, stats.by_outcome, stats.by_status, stats.numbers_asked


def lookup(client: KaleyraClient) -> list[str]:
    return sorted(client.blocked("sms", ASKED))


@pytest.mark.parametrize("kind", sorted(set(FAULT_KINDS) - {"timeout", "trickle"}))
def test_every_fault_looks_the_same_without_a_socket(kind: str) -> None:
    http, in_process = both([FaultRule(kind)], lookup)
    assert http == in_process
    assert http[1][1] == {f"fault:{kind}": 1}


def test_a_genuine_answer_looks_the_same_without_a_socket() -> None:
    http, in_process = both([], lookup)
    assert http == in_process
    assert http[0] == ("answer", ["+918020000061"])


def test_a_silence_longer_than_the_timeout_is_a_timeout_both_ways() -> None:
    http, in_process = both([FaultRule("timeout", seconds=5)], lookup)
    # the caller's view and the request count; the server counts the silence as answered
    # only when it ends (after the client gave up), the transport when the client gives up
    assert http[0] == in_process[0]
    assert http[0][0] == "RetryBudgetExhausted"
    assert http[1][0] == in_process[1][0] == 1
    assert in_process[1][1] == {"fault:timeout": 1}


def test_a_trickle_within_the_timeout_is_the_answer_both_ways() -> None:
    http, in_process = both([FaultRule("trickle", seconds=0.2)], lookup, request_timeout=5.0)
    assert http == in_process
    assert http[0] == ("answer", ["+918020000061"])


def test_wrong_credentials_are_refused_both_ways() -> None:
    def wrong_key(client: KaleyraClient) -> Any:
        return client.blocked("sms", ASKED)

    with Simulator(BLOCKED, sid=SID, api_key="another-key") as server:
        client = KaleyraClient(client_settings(base_url=server.base_url))
        over_http = outcome(lambda: wrong_key(client))
        client.close()
    api = SimulatedKaleyra(BLOCKED, sid=SID, api_key="another-key")
    client = KaleyraClient(
        client_settings(base_url="https://kaleyra.invalid"), transport=api.transport
    )
    assert outcome(lambda: wrong_key(client)) == over_http
    assert over_http[0] == "CredentialsRefused"


def test_a_change_of_status_through_the_transport_is_seen_by_the_next_lookup() -> None:
    api = SimulatedKaleyra(BLOCKED, sid=SID, api_key=KEY)
    client = KaleyraClient(
        client_settings(base_url="https://kaleyra.invalid"), transport=api.transport
    )
    client.change_blocklist("sms", add=["+918020000064"])
    assert lookup(client) == ["+918020000061", "+918020000064"]
    assert api.changes == [("sms", 1)]


def test_a_reset_simulator_answers_and_counts_as_a_new_one() -> None:
    api = SimulatedKaleyra(BLOCKED, sid=SID, api_key=KEY, latency=0.01)
    api.set_faults([FaultRule("wa500", every=2)])
    client = KaleyraClient(
        client_settings(base_url="https://kaleyra.invalid", retry_attempts=3),
        transport=api.transport,
        sleep=lambda seconds: None,
    )
    client.change_blocklist("sms", add=["+918020000064"])
    api.reset()
    assert (api.faults, api.latency, api.changes) == ([], 0.0, [])
    assert _counted(api) == (0, {}, {}, 0)
    assert lookup(client) == []
    assert _counted(api) == (1, {"ok": 1}, {200: 1}, 3)
