#!/usr/bin/env bash
# Build the release artefacts into OUTDIR (default dist/):
#
#   kmuxd-VERSION.tar.gz, kmuxd-VERSION-*.whl   python -m build (a cp311 wheel
#                  with the data path compiled by mypyc, or py3-none-any
#                  when it cannot be compiled: setup.py)
#   wheelhouse/    the kmuxd wheel and a wheel of every dependency, for an
#                  offline `pip install --no-index --find-links wheelhouse kmuxd`
#   kmuxd_VERSION-1_ARCH.deb   dpkg-buildpackage on the unpacked sdist plus
#                  packaging/debian (a venv-in-a-package from the wheelhouse)
#
#   packaging/build.sh [OUTDIR]      (./dev.sh deb [OUTDIR] sets up, then runs this)
#
# PYTHON (default .venv/bin/python) must have `build` and pip >= 22.3. A
# wheelhouse already in OUTDIR is reused when it has what the new wheel
# needs (no network then); otherwise pip fetches what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
# Absolute, and not through its symlink (that would leave the venv).
case $PYTHON in */*) PYTHON=$(realpath -s "$PYTHON") ;; *) PYTHON=$(command -v "$PYTHON") ;; esac
OUT=$(realpath -m "${1:-dist}")
WHEELHOUSE="$OUT/wheelhouse"
# pip's output is kept for a failure; quiet otherwise.
LOG="$OUT/build.log"
mkdir -p "$WHEELHOUSE"
: >"$LOG"

step() { printf '%s: [%3ds] %s\n' "${0##*/}" "$SECONDS" "$*" >&2; }
fail() { step "failed; the last lines of $LOG:"; tail -n 30 "$LOG" >&2; exit 1; }

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml)
[ -n "$version" ] || { step "no version in pyproject.toml"; exit 1; }

step "sdist and wheel of kmuxd $version"
rm -f "$OUT/kmuxd-$version.tar.gz" "$OUT"/kmuxd-"$version"-*.whl "$WHEELHOUSE"/kmuxd-"$version"-*.whl
"$PYTHON" -m build --outdir "$OUT" . >>"$LOG" 2>&1 || fail
wheel=$(ls "$OUT"/kmuxd-"$version"-*.whl | head -n 1)

step "wheelhouse $WHEELHOUSE"
cp "$wheel" "$WHEELHOUSE/"
pipwheel() { "$PYTHON" -m pip wheel --wheel-dir "$WHEELHOUSE" --find-links "$WHEELHOUSE" "$@" "$wheel" >>"$LOG" 2>&1; }
pipwheel --no-index || pipwheel || fail

step "Debian package"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tar -xzf "$OUT/kmuxd-$version.tar.gz" -C "$work"
src="$work/kmuxd-$version"
cp -r packaging/debian "$src/debian"
cat >"$src/debian/changelog" <<EOF
kmuxd ($version-1) unstable; urgency=medium

  * kmuxd $version, built by packaging/build.sh from the sdist.

 -- kmuxd maintainers <root@localhost>  $(date -R)
EOF
(cd "$src" && KMUXD_WHEELHOUSE="$WHEELHOUSE" KMUXD_PIP="$PYTHON -m pip" dpkg-buildpackage -b -us -uc) >>"$LOG" 2>&1 || fail
deb=$(cd "$work" && ls kmuxd_"$version"-1_*.deb)
mv "$work/$deb" "$OUT/"
rm -f "$work"/*.buildinfo "$work"/*.changes

step "done"
printf '%s\n' "$OUT/kmuxd-$version.tar.gz" "$wheel" "$WHEELHOUSE" "$OUT/$deb"
