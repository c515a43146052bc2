#!/usr/bin/env bash
# Creates (or updates) the project's Python environment on this machine.
#
#   bash launch/setup_env.sh [cpu|cuda|tpu] [--test]
#
# cpu (default) installs requirements.txt as pinned; cuda and tpu install the same
# pins with jax's accelerator build (jax[cuda12] / jax[tpu]) instead. --test adds
# requirements-test.txt (PyTorch CPU reference, pytest, ruff). The environment lives
# in $PRMIM_VENV (default: .venv in the repository root). As root on Debian it also installs
# the default dataset (dataset-fashion-mnist) and, for cpu, tcmalloc (libtcmalloc-minimal4, which
# launch/local.sh preloads in place of glibc's malloc) when missing. Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
prog="setup_env"
usage="usage: bash launch/setup_env.sh [cpu|cuda|tpu] [--test]"
source launch/lib.sh

platform="cpu"
with_tests=0
for arg in "$@"; do
  case "$arg" in
    cpu|cuda|tpu) platform="$arg" ;;
    --test) with_tests=1 ;;
    *) echo "$usage" >&2; exit 2 ;;
  esac
done

# Installs Debian's package $1 as root; as another user, says that $2 is missing and how to install it;
# without apt-get (not Debian), does nothing.
apt_install() {
  command -v apt-get >/dev/null 2>&1 || return 0
  if [ "$(id -u)" = 0 ]; then
    echo "setup_env: installing $1" >&2
    apt-get update -qq >/dev/null && apt-get install -y -qq "$1" >/dev/null
  else
    echo "setup_env: $2 missing; run: sudo apt-get install $1" >&2
  fi
}

# The default dataset, Fashion-MNIST, comes from Debian's dataset-fashion-mnist package.
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || apt_install dataset-fashion-mnist Fashion-MNIST
# tcmalloc, which launch/local.sh preloads on cpu (launch/README.md); training runs without it, only slower.
if [ "$platform" = cpu ] && [ -z "$(find_tcmalloc)" ]; then
  apt_install libtcmalloc-minimal4 tcmalloc || echo "setup_env: could not install libtcmalloc-minimal4; glibc's malloc it is" >&2
fi

venv="${PRMIM_VENV:-.venv}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  if ! "$python" -m venv "$venv" 2>/dev/null; then
    # Debian's python3 ships venv separately.
    echo "setup_env: installing python3-venv" >&2
    apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
    rm -rf "$venv"
    "$python" -m venv "$venv"
  fi
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install --upgrade pip >/dev/null

jax_version=$(sed -n 's/^jax==//p' requirements.txt)
case "$platform" in
  cpu) extra=() ;;
  cuda) extra=("jax[cuda12]==${jax_version}") ;;
  tpu) extra=("jax[tpu]==${jax_version}") ;;
esac
requirements=(-r requirements.txt)
[ "$with_tests" = 1 ] && requirements=(-r requirements-test.txt)
"${pip[@]}" install "${requirements[@]}" "${extra[@]}"
# timm and the mm* packages without two requirements that break the environment (requirements-test-nodeps.txt).
[ "$with_tests" = 1 ] && "${pip[@]}" install --no-deps -r requirements-test-nodeps.txt
"${pip[@]}" install --no-deps -e . >/dev/null
echo "setup_env: $platform environment ready in $venv" >&2
