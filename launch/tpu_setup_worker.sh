#!/usr/bin/env bash
# Prepares one Cloud TPU VM worker for jclip. `launch/tpu.py setup` unpacks the source tarball into
# ~/jclip-src/HASH on every worker and runs this script from there. It points ~/jclip at that folder, builds
# ~/jclip-venv once, installs the pinned jax[tpu] unless that version is already there, installs jclip
# (editable), and prints one `jclip-versions:` line, so that workers which disagree show.
#
#   tpu_setup_worker.sh --source DIR --jax-version VERSION [--python PYTHON]
#
# Environment (defaults): JCLIP_SRC (~/jclip), JCLIP_VENV (~/jclip-venv).
set -euo pipefail

SOURCE="" JAX="" PYTHON=python3
while [ $# -gt 0 ]; do
  case $1 in
    --source) SOURCE=${2?"$1 needs a value"}; shift 2 ;;
    --jax-version) JAX=${2?"$1 needs a value"}; shift 2 ;;
    --python) PYTHON=${2?"$1 needs a value"}; shift 2 ;;
    *) echo "tpu_setup_worker.sh: unknown argument: $1" >&2; exit 2 ;;
  esac
done
if [ ! -d "$SOURCE" ] || [ -z "$JAX" ]; then
  sed -n '2,8p' "$0" >&2
  exit 2
fi
LINK=${JCLIP_SRC:-$HOME/jclip}
VENV=${JCLIP_VENV:-$HOME/jclip-venv}

fail() {
  echo "jclip-setup: error on $(hostname): $*" >&2
  exit 1
}

vpip() {
  "$VENV/bin/python" -m pip "$@"
}

point_link() {
  # An older launcher cloned the repository into ~/jclip: keep that folder, out of the way.
  if [ -d "$LINK" ] && [ ! -L "$LINK" ]; then
    mv "$LINK" "$LINK.old-$(date +%s)"
  fi
  ln -sfn "$SOURCE" "$LINK.new"
  mv -Tf "$LINK.new" "$LINK"
}

install_packages() {
  if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV" || fail "could not create $VENV with $PYTHON (Ubuntu: sudo apt-get install python3-venv)"
  fi
  local installed
  installed=$(vpip show jax 2>/dev/null | sed -n 's/^Version: //p') || installed=""
  if [ "$installed" = "$JAX" ]; then
    echo "jclip-setup: jax $JAX is already in $VENV"
  else
    vpip install -q "jax[tpu]==$JAX" || fail "pip could not install jax[tpu]==$JAX with $("$VENV/bin/python" -V 2>&1)" \
      "(recent jax, 0.10 included, needs Python 3.11+: see --python)"
  fi
  vpip install -q -e "$SOURCE"
}

report() {
  local versions line package version
  versions=$(vpip show jax jaxlib libtpu 2>/dev/null | awk '/^Name: /{name=$2} /^Version: /{print name "=" $2}') || true
  line="jclip-versions: host=$(hostname) worker=$(bash "$SOURCE/launch/tpu_worker.sh" id)"
  version=$("$VENV/bin/python" -V 2>&1)
  line+=" python=${version#Python }"
  for package in jax jaxlib libtpu; do
    version=$(awk -F= -v p="$package" '$1 == p {print $2; exit}' <<<"$versions")
    line+=" $package=${version:-absent}"
  done
  echo "$line source=$(basename "$SOURCE")"
}

point_link
install_packages
report
