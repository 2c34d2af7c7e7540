#!/usr/bin/env bash
# Developer helper: rebuild the extensions and swap them in atomically, so
# processes that have the old ones loaded keep working.
#   kvmsys._core              -> kvmsys/
#   kvmsys_bench._reference   -> benchmarks/ (the folder kvmsys_bench installs from)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
$PY setup.py -q build_ext --build-lib build/inplace >/tmp/kvmsys-build.$$.log 2>&1 || { grep -A8 -E "Error|error:" /tmp/kvmsys-build.$$.log | head -60; exit 1; }
rm -f /tmp/kvmsys-build.$$.log
swap() {  # built .so, destination folder
    cp "$1" "$2/$(basename "$1").new"
    mv -f "$2/$(basename "$1").new" "$2/$(basename "$1")"
    echo "built $(basename "$1") -> $2/"
}
swap "$(ls build/inplace/kvmsys/_core*.so)" kvmsys
swap "$(ls build/inplace/kvmsys_bench/_reference*.so)" benchmarks
