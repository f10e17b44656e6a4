#!/usr/bin/env bash
# Build (once) and print the path of the project's Python environment for one engine.
#
#   envs/setup.sh vllm        -> prints e.g. /root/.cache/lcx/envs/vllm-3f2a9c1b7e42
#
# The environment is made from envs/<engine>/requirements.lock with --no-deps, so pip never
# re-resolves it, and it is keyed by the hash of the lock: a changed lock builds a new one,
# an unchanged one is reused across clones. The project itself is (re)installed editable
# from this checkout on every call, which takes a few seconds.
# Progress goes to stderr; stdout carries only the path.
set -euo pipefail

engine=${1:?usage: envs/setup.sh ENGINE (one of: $(ls "$(dirname "$0")" | grep -v '\.' | tr '\n' ' '))}
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
lock="$here/$engine/requirements.lock"
[ -f "$lock" ] || { echo "envs/setup.sh: no lock for engine '$engine' ($lock)" >&2; exit 2; }

python=${LCX_PYTHON:-python3.11}
command -v "$python" >/dev/null || { echo "envs/setup.sh: $python not found (set LCX_PYTHON)" >&2; exit 2; }

# The key covers only the files that define the environment: the ones git tracks there (or, outside a
# git checkout, every file but build leftovers), so building never changes its own key.
env_files() {
  if git -C "$repo" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git -C "$repo" ls-files --cached --others --exclude-standard -- "envs/setup.sh" "envs/$engine" | sed "s|^|$repo/|"
  else
    find "$here/setup.sh" "$here/$engine" -type f ! -name '*.pyc' ! -path '*.egg-info/*' ! -path '*/build/*'
  fi | sort
}
key=$(cat $(env_files) | sha256sum | cut -c1-12)
root=${LCX_ENV_ROOT:-$HOME/.cache/lcx/envs}
venv="$root/$engine-$key"

# pip's notes about this machine's extra local indexes are noise here; real errors still show.
quiet() { "$@" 2> >(grep -v -e "is ignored: it is neither a file nor a directory" >&2); }

if [ ! -f "$venv/.lcx-complete" ]; then
  echo "envs/setup.sh: building $engine environment at $venv (a few minutes, once)" >&2
  rm -rf "$venv"
  mkdir -p "$root"
  "$python" -m venv "$venv"
  quiet "$venv/bin/python" -m pip install -q --upgrade "pip==25.3" >&2
  quiet "$venv/bin/python" -m pip install -q --no-deps -r "$lock" >&2
  if [ -d "$here/$engine/dist-shim" ]; then
    # Built from a copy: setuptools writes egg-info and build/ beside the sources it builds.
    shim=$(mktemp -d)
    cp -r "$here/$engine/dist-shim/." "$shim/"
    quiet "$venv/bin/python" -m pip install -q --no-deps --no-build-isolation "$shim" >&2
    rm -rf "$shim"
  fi
  touch "$venv/.lcx-complete"
fi

quiet "$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$repo" >&2
echo "$venv"
