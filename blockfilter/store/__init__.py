"""Shared stores: the status cache (memory or Redis) and the fleet-wide rate limit."""
