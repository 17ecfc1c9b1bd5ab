#!/usr/bin/env bash
# The main job: probe this machine, recommend settings for an example dataset, build the loader, run one epoch.
source "$(dirname "$0")/env.sh"
python examples/quickstart.py "$@"
