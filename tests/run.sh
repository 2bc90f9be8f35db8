#!/usr/bin/env bash
# The whole test suite: lint, format, types, then every test (brokers included).
# Makes its own virtualenv in .venv on first use; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

# BLOCKFILTER_VENV, BLOCKFILTER_EXTRAS and BLOCKFILTER_CELERY (a pip requirement such as
# "celery==5.7.*") make another environment: CI's Celery 5.7 run (see .ci/run).
VENV="${BLOCKFILTER_VENV:-.venv}"
EXTRAS="${BLOCKFILTER_EXTRAS:-test,collector,metrics}"

if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[$EXTRAS]" \
    ${BLOCKFILTER_CELERY:+"$BLOCKFILTER_CELERY"}

echo "== ruff"
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
echo "== mypy"
"$VENV/bin/mypy"
echo "== pytest ($("$VENV/bin/python" -c 'import celery; print("celery", celery.__version__)'))"
"$VENV/bin/python" -m pytest -p no:cacheprovider "$@"
