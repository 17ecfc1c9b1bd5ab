# Sourced by the other scripts: creates .venv on first use and activates it.
# A Python that already has torch keeps it (the venv sees its site-packages);
# otherwise torch==2.13.0 is installed (a CPU build where the machine provides one).
# Override the interpreter with AUTOTUNE_PYTHON, the torch requirement with AUTOTUNE_TORCH.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
py="${AUTOTUNE_PYTHON:-python3}"
stamp="$venv/.autotune-installed"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
  if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "autotune needs Python >= 3.11; $py is $("$py" -V 2>&1). Set AUTOTUNE_PYTHON=python3.12 (or another)" >&2
    exit 1
  fi
  if [ ! -x "$venv/bin/python" ]; then
    if "$py" -c 'import torch' >/dev/null 2>&1; then
      echo "autotune: using the torch that $py already has" >&2
      "$py" -m venv --system-site-packages "$venv"
    else
      "$py" -m venv "$venv"
    fi
  fi
  if ! "$venv/bin/python" -c 'import torch' >/dev/null 2>&1; then
    "$venv/bin/python" -m pip install --quiet "${AUTOTUNE_TORCH:-torch==2.13.0}"
  fi
  "$venv/bin/python" -m pip install --quiet -e "$root[test]"
  touch "$stamp"
fi
# shellcheck disable=SC1091
source "$venv/bin/activate"
cd "$root"
