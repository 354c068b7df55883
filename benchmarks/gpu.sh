#!/usr/bin/env bash
# Everything only a GPU can show, in one run (see benchmarks/gpu.py for the parts and targets):
#   bash benchmarks/gpu.sh OUT             # a GPU machine with torch, triton, transformers, ...
#   bash benchmarks/gpu.sh --dry-run OUT   # a CPU: tiny shapes, Triton's interpreter (CI)
# Writes OUT/gpu.json and OUT/gpu.md. Nothing is installed and nothing is fetched: odeify is
# imported from this checkout through a temporary package folder in which adapters/ sits at
# odeify/adapters, as pyproject's package-dir installs it. PYTHON picks the interpreter.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
mkdir "$site/odeify"
for f in "$repo"/odeify/*; do
    [ "$(basename "$f")" = __pycache__ ] || ln -s "$f" "$site/odeify/"
done
ln -s "$repo/adapters" "$site/odeify/adapters"
# PYTHONSAFEPATH: `python -m pytest` must not put the checkout's own odeify/ (without adapters)
# ahead of the folder above.
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONSAFEPATH=1
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
cd "$repo"
"${PYTHON:-python3}" benchmarks/gpu.py "$@"
