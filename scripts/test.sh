#!/usr/bin/env bash
# The test suite, in its own virtual environment. Most tests wait on worker processes,
# torchrun or Lightning, so two test processes (pytest-xdist; each file in one of them, its
# fixtures built once) nearly halve the wall time on 2 CPUs. Tests marked `serial` hold a
# measured time to a bar: they run afterwards, alone. Arguments go to both runs.
source "$(dirname "$0")/env.sh"
status=0
python -m pytest -n "${AUTOTUNE_TEST_PROCESSES:-2}" --dist loadfile -m "not serial" "$@" \
  || status=$?
serial=0
python -m pytest -n 0 -m serial "$@" || serial=$?
# 5: the arguments selected no test in that run (e.g. one file without serial tests)
for code in "$status" "$serial"; do
  if [ "$code" -ne 0 ] && [ "$code" -ne 5 ]; then exit "$code"; fi
done
if [ "$status" -eq 5 ] && [ "$serial" -eq 5 ]; then exit 5; fi
