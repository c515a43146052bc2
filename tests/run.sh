#!/usr/bin/env bash
# The project's test command (README quickstart; .ci/run calls it): installs what
# the tests need into .venv, checks formatting and lint, then runs the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh cpu --test
venv="${PRMIM_VENV:-.venv}"
"$venv/bin/ruff" format --check .
"$venv/bin/ruff" check .
exec "$venv/bin/python" -m pytest -n "${PRMIM_TEST_WORKERS:-2}" "$@"
