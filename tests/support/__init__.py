"""What the tests share: the environment of the processes they start (:mod:`.env`), the one
``celery worker`` launcher (:mod:`.workers`), a Celery test stack (:mod:`.harness`), the test
app worker processes run (:mod:`.app`), test plugins, campaigns and private servers.

Importable as ``tests.support`` from the repository root: pytest puts the root on
``sys.path`` (``pythonpath`` in ``pyproject.toml``), and every child process gets it on
``PYTHONPATH`` from :func:`.env.subprocess_env`.
"""
