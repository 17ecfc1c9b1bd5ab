#!/usr/bin/env bash
# The test suite, in its own virtual environment. Most tests wait on worker processes,
# torchrun or Lightning, so two test processes (pytest-xdist; each file in one of them, its
# fixtures built once) nearly halve the wall time on 2 CPUs. Tests marked `serial` hold a
# measured time to a bar: they run afterwards, alone. Arguments go to both runs; a `-m EXPR`
# of yours narrows both, `-n N` sets the first run's processes (`-n 0`: one process).
source "$(dirname "$0")/env.sh"
marks="" processes="${AUTOTUNE_TEST_PROCESSES:-2}" args=()
while [ $# -gt 0 ]; do
  case "$1" in
    -m) marks="${2-}"; shift $(( $# > 1 ? 2 : 1 )) ;;
    -m*) marks="${1#-m}"; shift ;;
    -n|--numprocesses) processes="${2-}"; shift $(( $# > 1 ? 2 : 1 )) ;;
    -n*) processes="${1#-n}"; shift ;;
    --numprocesses=*) processes="${1#*=}"; shift ;;
    *) args+=("$1"); shift ;;
  esac
done
select_() { if [ -n "$marks" ]; then echo "($marks) and $1"; else echo "$1"; fi; }
status=0
python -m pytest -n "$processes" --dist loadfile -m "$(select_ "not serial")" \
  ${args[@]+"${args[@]}"} || status=$?
case "$status" in 2|3|4) exit "$status" ;; esac  # interrupted, internal error, bad usage
serial=0
python -m pytest -n 0 -m "$(select_ serial)" ${args[@]+"${args[@]}"} || serial=$?
# 5: the arguments selected no test in that run (e.g. one file without serial tests)
for code in "$status" "$serial"; do
  if [ "$code" -ne 0 ] && [ "$code" -ne 5 ]; then exit "$code"; fi
done
if [ "$status" -eq 5 ] && [ "$serial" -eq 5 ]; then exit 5; fi
