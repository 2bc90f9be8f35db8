"""The simulator's fault kinds, by what a client must make of them: the expectation the fault
matrices (the command line's and the workers') check each kind against."""

from __future__ import annotations

#: A later attempt may get past them: retried within the budget, then deferred.
TRANSIENT = (
    "wa500",
    "cnt195",
    "http500",
    "rate_limit",
    "accepted",
    "non_json",
    "bad_shape",
    "timeout",
    "reset",
    "trickle",
)
#: They refuse the account for good: nothing is retried, everything is deferred.
REFUSED = ("rbc001", "wa401", "wa-401", "e110")
#: A malformed-request answer: final for the client, which does not repeat the request.
FINAL = ("wa400",)
