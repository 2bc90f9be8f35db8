#!/usr/bin/env bash
# The whole test suite: lint, format, types, then every test (brokers included).
# Makes its own virtualenv in .venv on first use; extra arguments go to pytest (both tiers).
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
# The fast tier in parallel (pytest-xdist: it mostly waits on subprocesses and sockets), then
# the slow one (brokers, worker processes, private servers) in one process, as it always ran.
# Extra arguments go to both; a tier they leave empty (exit 5: no test selected) is fine.
tier() {
    local status=0
    "$VENV/bin/python" -m pytest -p no:cacheprovider "$@" || status=$?
    if [ "$status" -ne 0 ] && [ "$status" -ne 5 ]; then
        exit "$status"
    fi
}
CELERY_VERSION="$("$VENV/bin/python" -c 'import celery; print(celery.__version__)')"
echo "== pytest, fast tier (celery $CELERY_VERSION)"
tier -m "not slow" -n 4 "$@"
echo "== pytest, slow tier (celery $CELERY_VERSION)"
tier -m slow "$@"
