#!/usr/bin/env bash
# The benchmark (bench/run.py): about 60 minutes on 2 CPUs; writes bench/RESULTS.md.
source "$(dirname "$0")/env.sh"
python -m pip install --quiet -e ".[bench]"
python bench/run.py "$@"
