#!/usr/bin/env bash
# Runs the test suite (sets up .venv on first use). Extra arguments go to pytest,
# e.g. ./run_tests.sh -m "not slow and not real_weights" for the default suite (no weight package needed).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
"$root/scripts/ensure_venv.sh"
cd "$root"
exec "$root/.venv/bin/python" -m pytest "$@"
