#!/usr/bin/env bash
# Developer helper: rebuild the extensions and swap them in atomically, so
# processes that have the old ones loaded keep working.
#   kvmsys._core              -> kvmsys/
#   kvmsys_bench._reference   -> benchmarks/ (the folder kvmsys_bench installs from)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
# The build requirements pinned in pyproject.toml (setuptools >= 77 reads its SPDX licence),
# installed into this venv where it has others.
reqs=$($PY -c 'import tomllib; print(" ".join(tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]))' 2>/dev/null) || reqs=""   # Python 3.10 has no tomllib: no check
$PY - $reqs <<'EOF2' || $PY -m pip install -q $reqs
import sys
from importlib.metadata import version
sys.exit(any(version(r.split("==")[0]) != r.split("==")[1] for r in sys.argv[1:]))
EOF2
$PY setup.py -q build_ext --build-lib build/inplace >/tmp/kvmsys-build.$$.log 2>&1 || { grep -A8 -E "Error|error:" /tmp/kvmsys-build.$$.log | head -60; exit 1; }
rm -f /tmp/kvmsys-build.$$.log
swap() {  # built .so, destination folder
    cp "$1" "$2/$(basename "$1").new"
    mv -f "$2/$(basename "$1").new" "$2/$(basename "$1")"
    echo "built $(basename "$1") -> $2/"
}
swap "$(ls build/inplace/kvmsys/_core*.so)" kvmsys
swap "$(ls build/inplace/kvmsys_bench/_reference*.so)" benchmarks
