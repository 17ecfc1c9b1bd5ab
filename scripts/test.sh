#!/usr/bin/env bash
# The test suite, in its own virtual environment.
source "$(dirname "$0")/env.sh"
python -m pytest "$@"
