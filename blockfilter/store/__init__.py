"""Shared stores: the status cache (memory, or Redis in :mod:`.redis`) and its circuit
breaker (:mod:`.guard`), the fleet-wide rate limit and the request budget (:mod:`.ratelimit`)."""
