#!/usr/bin/env bash
# Set up (once) and run.   ./dev.sh demo [args]   train → featurize → fit → query on sklearn's digits
#                          ./dev.sh test [args]   the test suite (what CI runs)
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then "${PYTHON:-python3}" -m venv .venv; fi
# shellcheck disable=SC1091
. .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
  # The CPU build first: a bare `torch` requirement with no torch installed pulls a multi-GB CUDA build.
  python -m pip install -q torch==2.13.0
fi
python -m pip install -q -e ".[demo,test]"
case "${1:-}" in
  demo) shift; python examples/digits/run.py "$@" ;;
  # One process per core (pytest-xdist; each runs torch on one thread, tests/conftest.py), a file to a process
  # so that its module fixtures are built once; `-n 0` after `test` runs everything in this process.
  test) shift; python -m pytest -q -n auto --maxprocesses 8 --dist loadfile "$@" ;;
  *) echo "usage: ./dev.sh demo|test [args]" >&2; exit 2 ;;
esac
