#!/usr/bin/env bash
# Developer helper: rebuild the extension and swap it in atomically, so
# processes that have the old one loaded keep working.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
$PY setup.py -q build_ext --build-lib build/inplace >/tmp/kvmsys-build.log 2>&1 || { grep -A8 -E "Error|error:" /tmp/kvmsys-build.log | head -60; exit 1; }
so=$(ls build/inplace/kvmsys/_core*.so)
cp "$so" "kvmsys/$(basename "$so").new"
mv -f "kvmsys/$(basename "$so").new" "kvmsys/$(basename "$so")"
echo "built $(basename "$so")"
