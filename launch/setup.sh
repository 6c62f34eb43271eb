#!/usr/bin/env bash
# Creates .venv (if missing) and installs kvp_jax with its test extras into it. Safe to rerun: the install is
# skipped while setup.cfg / setup.py are unchanged since the last successful one.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
stamp=.venv/.kvp_jax_installed
want=$(cat setup.cfg setup.py | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && .venv/bin/python -c "import kvp_jax, jax, torch" 2>/dev/null; then
  echo "setup: .venv is up to date"
  exit 0
fi
# torch is pinned in setup.cfg to the CPU build (test reference only); pip prints only warnings and errors.
.venv/bin/python -m pip install -q -e '.[test]'
echo "$want" > "$stamp"
echo "setup: installed kvp_jax[test] into .venv"
