"""Support for the Celery tests: a test app module for worker processes and a test plugin.

Importable as ``tests.celery_support`` from the repository root (worker subprocesses run with
the root as their working directory and on ``PYTHONPATH``).
"""
