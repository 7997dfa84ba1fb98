#!/usr/bin/env bash
# Embeds the bundled sample catalog with Beam's DirectRunner.
#   ./run_local.sh [OUTPUT_DIR] [extra catalog-index run options...]
# Sets up .venv on first use. Output goes to ./out unless OUTPUT_DIR is given.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
"$root/scripts/ensure_venv.sh"
out="./out"
if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then out="$1"; shift; fi
exec "$root/.venv/bin/catalog-index" run \
  --catalog "$root/sample_catalog/catalog.parquet" \
  --output "$out" \
  --preset auto \
  "$@"
