#!/usr/bin/env bash
# Build the release artefacts into OUTDIR (default dist/):
#
#   kmuxd-VERSION.tar.gz                 the sdist (python -m build)
#   kmuxd-VERSION-cpXY-cpXY-PLATFORM.whl the data path compiled by mypyc, for
#                  PYTHON's version and machine only (setup.py; py3-none-any
#                  when mypyc or a compiler is missing)
#   kmuxd-VERSION-py3-none-any.whl       pure Python (KMUXD_PURE_PYTHON=1):
#                  any Python >= 3.11 on any machine, the data path slower
#   wheelhouse/    the kmuxd wheels and a wheel of every dependency for
#                  DEB_PYTHON, for an offline `pip install --no-index
#                  --find-links wheelhouse kmuxd` (pip takes the compiled
#                  wheel where it fits, else the pure one)
#   kmuxd_VERSION-1_ARCH.deb   dpkg-buildpackage on the unpacked sdist plus
#                  packaging/debian (a venv-in-a-package from the wheelhouse,
#                  on DEB_PYTHON)
#
#   packaging/build.sh [OUTDIR]      (./dev.sh deb [OUTDIR] sets up, then runs this)
#
# PYTHON (default .venv/bin/python) builds the sdist and the wheels; it must
# have `build` and pip >= 22.3. DEB_PYTHON (default /usr/bin/python3, the
# distribution's own) is the Python the .deb runs on and the wheelhouse is
# for: on a release whose python3 is not PYTHON's version (Debian 13's 3.13,
# Ubuntu 24.04's 3.12), the kmuxd wheel for the .deb is compiled under
# DEB_PYTHON from the sdist. A wheelhouse already in OUTDIR is reused when it
# has what the new wheel needs (no network then); otherwise pip fetches what
# is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
DEB_PYTHON=${DEB_PYTHON:-/usr/bin/python3}
# Absolute, and not through its symlink (that would leave the venv).
case $PYTHON in */*) PYTHON=$(realpath -s "$PYTHON") ;; *) PYTHON=$(command -v "$PYTHON") ;; esac
# The real interpreter (/usr/bin/python3 -> python3.11): the .deb's venv links to it, its Depends names it.
DEB_PYTHON=$(realpath "$(command -v "$DEB_PYTHON")")
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
"$DEB_PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    step "DEB_PYTHON=$DEB_PYTHON is Python $("$DEB_PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])'); kmuxd needs 3.11 or later (docs/systemd.md: supported releases)"
    exit 1
}
# The tag a wheel compiled for DEB_PYTHON carries, e.g. cp311-cp311-linux_x86_64.
deb_tag=$("$DEB_PYTHON" -c 'import sys, sysconfig; v = "cp%d%d" % sys.version_info[:2]; print(f"{v}-{v}-" + sysconfig.get_platform().replace("-", "_").replace(".", "_"))')

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

step "sdist and compiled wheel of kmuxd $version"
rm -f "$OUT/kmuxd-$version.tar.gz" "$OUT"/kmuxd-"$version"-*.whl "$WHEELHOUSE"/kmuxd-"$version"-*.whl
"$PYTHON" -m build --outdir "$OUT" . >>"$LOG" 2>&1 || fail
wheel=$(ls "$OUT"/kmuxd-"$version"-*.whl | grep -v -- '-py3-none-any\.whl$' | head -n 1 || true)
tar -xzf "$OUT/kmuxd-$version.tar.gz" -C "$work"
src="$work/kmuxd-$version"

step "pure-Python wheel"
# From the unpacked sdist, so nothing a compiled build left in the tree can slip in.
KMUXD_PURE_PYTHON=1 "$PYTHON" -m build --wheel --outdir "$OUT" "$src" >>"$LOG" 2>&1 || fail
pure="$OUT/kmuxd-$version-py3-none-any.whl"
[ -f "$pure" ] || { step "no $pure"; exit 1; }
rm -rf "$src/build" "$src"/*.egg-info
[ -n "$wheel" ] || wheel=$pure  # no compiler or mypyc here: the pure wheel is the only one

step "wheelhouse $WHEELHOUSE (for $DEB_PYTHON)"
cp "$pure" "$WHEELHOUSE/"
case $wheel in
    *-"$deb_tag".whl) cp "$wheel" "$WHEELHOUSE/" ;;
    *-py3-none-any.whl) ;;
    *)  # Compiled for PYTHON's version or machine, not DEB_PYTHON's: compile one for it.
        step "compiled wheel for $DEB_PYTHON ($deb_tag)"
        "$PYTHON" -m pip --python "$DEB_PYTHON" wheel --no-deps --wheel-dir "$WHEELHOUSE" \
            "$OUT/kmuxd-$version.tar.gz" >>"$LOG" 2>&1 || fail ;;
esac
deb_wheel=$(ls "$WHEELHOUSE"/kmuxd-"$version"-"$deb_tag".whl 2>/dev/null || echo "$pure")
pipwheel() {
    "$PYTHON" -m pip --python "$DEB_PYTHON" wheel --wheel-dir "$WHEELHOUSE" --find-links "$WHEELHOUSE" "$@" \
        "$deb_wheel" >>"$LOG" 2>&1
}
pipwheel --no-index || pipwheel || fail

step "Debian package (${deb_wheel##*/} on $DEB_PYTHON)"
cp -r packaging/debian "$src/debian"
cat >"$src/debian/changelog" <<EOF
kmuxd ($version-1) unstable; urgency=medium

  * kmuxd $version, built by packaging/build.sh from the sdist.

 -- kmuxd maintainers <root@localhost>  $(date -R)
EOF
(cd "$src" && KMUXD_WHEELHOUSE="$WHEELHOUSE" KMUXD_PIP="$PYTHON -m pip" KMUXD_PYTHON="$DEB_PYTHON" \
    dpkg-buildpackage -b -us -uc) >>"$LOG" 2>&1 || fail
deb=$(cd "$work" && ls kmuxd_"$version"-1_*.deb)
mv "$work/$deb" "$OUT/"
rm -f "$work"/*.buildinfo "$work"/*.changes

step "done"
printf '%s\n' "$OUT/kmuxd-$version.tar.gz" "$wheel" "$pure" "$WHEELHOUSE" "$OUT/$deb"
