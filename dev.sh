#!/usr/bin/env bash
# One entry point for a fresh Debian machine: installs what the system lacks,
# builds .venv, then runs the demo, the tests or the benchmark.
#
#   ./dev.sh demo [ARGS]    start kmuxd + a demo backend + several client apps
#   ./dev.sh test [ARGS]    run the test suite (pytest ARGS)
#   ./dev.sh bench [ARGS]   run the benchmark (python -m kmuxd.tools.bench ARGS)
#   ./dev.sh fuzz [ARGS]    long fuzz run: >= 100,000 examples per decoder target
#                           (pytest tests/fuzz ARGS; docs/fuzzing.md)
#   ./dev.sh setup          only set up
set -euo pipefail
cd "$(dirname "$0")"

VENV=${KMUX_VENV:-.venv}
APT_PACKAGES=(python3 python3-venv python3-dev gcc pkg-config libsystemd-dev)

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        echo "dev.sh: need root (or sudo) to run: $*" >&2; exit 1; fi
}

missing_apt() {
    local p missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
    done
    echo "${missing[@]:-}"
}

python_ok() {
    command -v python3 >/dev/null &&
        python3 -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null
}

setup_system() {
    local want=()
    python_ok || want+=(python3 python3-venv python3-dev)
    # systemd-python (issue: systemd) builds from source against libsystemd.
    want+=(gcc pkg-config libsystemd-dev)
    [ "${1:-}" = test ] && want+=(memcached unbound dnsmasq-base)
    local missing
    missing=$(missing_apt "${want[@]}")
    if [ -n "$missing" ]; then
        if command -v apt-get >/dev/null; then
            echo "dev.sh: installing system packages: $missing" >&2
            as_root apt-get update -qq
            # shellcheck disable=SC2086
            as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
        else
            echo "dev.sh: please install: $missing" >&2
        fi
    fi
}

setup_venv() {
    local stamp="$VENV/.kmux-installed"
    if [ ! -x "$VENV/bin/python" ]; then
        python3 -m venv "$VENV"
    fi
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        "$VENV/bin/python" -m pip install -q --upgrade pip
        "$VENV/bin/python" -m pip install -q -e '.[test]'
        touch "$stamp"
    fi
}

cmd=${1:-demo}; shift || true
case "$cmd" in
    setup) setup_system test; setup_venv ;;
    demo) setup_system; setup_venv; exec "$VENV/bin/python" -m kmuxd.tools.demo "$@" ;;
    test) setup_system test; setup_venv; exec "$VENV/bin/python" -m pytest "$@" ;;
    bench) setup_system; setup_venv; exec "$VENV/bin/python" -m kmuxd.tools.bench "$@" ;;
    fuzz) setup_system; setup_venv
        HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-long} exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/fuzz "$@" ;;
    *) echo "usage: $0 {demo|test|bench|fuzz|setup} [ARGS]" >&2; exit 2 ;;
esac
