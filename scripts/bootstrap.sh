#!/usr/bin/env bash
# Make .venv/ with scaling-search and its dev tools installed. Safe to repeat: it installs only
# what is missing.
#
# torch comes first and pinned: `pip install torch==2.13.0` takes the CPU wheel where one is kept
# locally, and an unpinned torch with none installed would pull several GB of CUDA packages.
# A GPU user installs the CUDA build of torch into .venv first (see README); this script keeps any
# torch that is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${SCALING_SEARCH_TORCH:-torch==2.13.0}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
py=.venv/bin/python
$py -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
if ! $py -c "import torch" >/dev/null 2>&1; then
  echo "bootstrap: installing $TORCH_SPEC" >&2
  $py -m pip install --quiet "$TORCH_SPEC"
fi
stamp=.venv/.scaling-search-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "bootstrap: installing scaling-search and its dependencies into .venv" >&2
  $py -m pip install --quiet -e '.[dev]'
  touch "$stamp"
fi
