#!/usr/bin/env bash
# One entry point for a fresh Debian machine: installs what the system lacks,
# builds .venv, then runs the demo, the tests or the benchmark.
#
#   ./dev.sh demo [ARGS]    start kmuxd + a demo backend + several client apps
#   ./dev.sh test [ARGS]    run the test suite (pytest ARGS)
#   ./dev.sh bench [ARGS]   run the benchmark (python -m kmuxd.tools.bench ARGS)
#   ./dev.sh soak [ARGS]    run the chaos soak, 120 s by default (python -m kmuxd.tools.soak ARGS)
#   ./dev.sh deb [OUTDIR]   build the sdist, the wheel, a wheelhouse and the .deb into OUTDIR (dist/)
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
    # systemd-python (issue: systemd) builds from source against libsystemd and
    # python3's headers; so does mypyc's compile of the data path.
    want+=(gcc pkg-config libsystemd-dev python3-dev)
    # The tests' real servers; the --quick benchmark test also runs twemproxy (nutcracker).
    # iproute2: the dead-peer tests make a network namespace and drop its packets (ip, tc).
    # rpcbind: the ONC RPC tests run it in a network namespace of their own (tests/realservers/test_oncrpc.py).
    # TLS and SASL (issue 18): openssl makes the tests' certificates; memcached's SASL
    # wants saslpasswd2 (sasl2-bin) for its sasldb and the PLAIN and sasldb plugins.
    # strace: the client's system-call tests count its calls (tests/integration/test_client_fast_lane.py).
    [ "${1:-}" = test ] && want+=(memcached unbound dnsmasq-base nutcracker iproute2 rpcbind
        openssl sasl2-bin libsasl2-modules libsasl2-modules-db strace)
    # The benchmark: memcached behind kmuxd and twemproxy; gcc builds the C load generator and relay;
    # strace counts the Python clients' system calls where perf cannot (perf, when usable, is preferred).
    [ "${1:-}" = bench ] && want+=(memcached nutcracker gcc strace)
    # The .deb (./dev.sh deb, and the systemd tests that build and install
    # it): the distribution's build tools, and the python3 it runs on
    # (packaging/build.sh: DEB_PYTHON); python3-venv for the tests' wheel
    # install into a venv; groff and man for the man pages.
    case "${1:-}" in test | deb) want+=(debhelper dpkg-dev python3 python3-venv groff-base man-db) ;; esac
    local missing
    missing=$(missing_apt "${want[@]}")
    if [ -n "$missing" ]; then
        if command -v apt-get >/dev/null; then
            echo "dev.sh: installing system packages: $missing" >&2
            as_root apt-get update -qq
            # shellcheck disable=SC2086
            as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
            # The package starts a portmapper on every address (0.0.0.0:111); the tests start
            # their own in a namespace, so a machine that had no rpcbind does not get one serving.
            if [[ " $missing " == *" rpcbind "* ]] && [ -d /run/systemd/system ]; then
                echo "dev.sh: stopping and disabling rpcbind.service and rpcbind.socket (installed for the tests only)" >&2
                as_root systemctl disable --now rpcbind.socket rpcbind.service >/dev/null 2>&1 || true
            fi
        else
            echo "dev.sh: please install: $missing" >&2
        fi
    fi
}

fresh() {
    # $1: a stamp; true if it exists and nothing the build depends on is newer:
    # the packaging, or a module mypyc compiles (kmuxd/_compiled.py; an
    # out-of-date build would run from source), or the client's fast lane
    # (client/kmux/_compiled.py).
    [ -f "$1" ] && ! [ pyproject.toml -nt "$1" ] && ! [ setup.py -nt "$1" ] &&
        [ -z "$(find kmuxd/core kmuxd/io kmuxd/_compiled.py client/kmux/_compiled.py client/kmux/_session.py \
            client/kmux/_driver.py client/kmux/_link.py client/kmux/_sync.py -name '*.py' -newer "$1" -print -quit)" ]
}

setup_venv() {
    # $1: pip extras (default "test"); each set of extras has its own stamp.
    # KMUXD_PURE_PYTHON=1 skips mypyc's compile (about 45 s): that build has
    # a stamp of its own, so a later run without it compiles; with it, a
    # compiled build that is current is kept (the variable makes it run from
    # source anyway).
    local extras=${1:-test}
    local stamp="$VENV/.kmux-installed-${extras//,/-}"
    if [ ! -x "$VENV/bin/python" ]; then
        python3 -m venv "$VENV"
    fi
    fresh "$stamp" && return
    if [ -n "${KMUXD_PURE_PYTHON:-}" ]; then
        fresh "$stamp-pure" && return
        stamp="$stamp-pure"
    fi
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -e ".[$extras]"
    touch "$stamp"
}

cmd=${1:-demo}; shift || true
case "$cmd" in
    setup) setup_system test; setup_venv ;;
    demo) setup_system; setup_venv; exec "$VENV/bin/python" -m kmuxd.tools.demo "$@" ;;
    test) setup_system test; setup_venv; exec "$VENV/bin/python" -m pytest "$@" ;;
    bench) setup_system bench; setup_venv test,bench; exec "$VENV/bin/python" -m kmuxd.tools.bench "$@" ;;
    soak) setup_system; setup_venv; exec "$VENV/bin/python" -m kmuxd.tools.soak "$@" ;;
    deb) setup_system deb; setup_venv; PYTHON="$VENV/bin/python" exec packaging/build.sh "$@" ;;
    fuzz) setup_system test; setup_venv
        HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-long} exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/fuzz "$@" ;;
    *) echo "usage: $0 {demo|test|bench|soak|deb|fuzz|setup} [ARGS]" >&2; exit 2 ;;
esac
