#!/bin/sh
# install.sh: install upmt_tun from this checkout on Debian/Ubuntu (or any Linux with a
# Python >= 3.11), as root or through sudo, without touching the system's Python.
#
#   sh install.sh            install into a venv (/opt/upmt) and link upmt-agent,
#                            upmt-anchor and upmt-demo into /usr/local/bin
#   sh install.sh --demo     the same, then run upmt-demo (namespace demo; removes itself)
#   sh install.sh --test     install '.[test]' into a separate test venv (/opt/upmt-test)
#                            and run the test suite from this checkout with it
#   sh install.sh --systemd  install, and the systemd units upmt-agent.service and
#                            upmt-anchor.service into /etc/systemd/system (not enabled)
#
# Why a venv: Debian 12+ and Ubuntu 23.04+ mark their Python "externally managed"
# (PEP 668), so `pip install` into it is refused; a venv is the supported way and
# leaves the distribution's Python alone. The test venv is separate so that running the
# tests of a checkout never replaces the code of an installed (maybe running) daemon
# nor puts pytest into it; the daemons the tests start come from the test venv (lab.py
# uses the console scripts next to the Python that runs pytest).
#
# Options: --prefix DIR (the venv; default /opt/upmt, for --test /opt/upmt-test),
# --bindir DIR (default /usr/local/bin), --no-apt (install no Debian packages), and
# after --test or --demo, `-- ARGS` are passed to pytest or upmt-demo.
# Environment: PYTHON (default python3), UPMT_PREFIX, UPMT_TEST_PREFIX, UPMT_BINDIR,
# UPMT_UNITDIR (default /etc/systemd/system).
set -eu

me=install.sh
die() { echo "$me: $*" >&2; exit 1; }
say() { echo "$me: $*"; }

mode=install
systemd=0
apt=1
prefix=${UPMT_PREFIX-}
bindir=${UPMT_BINDIR:-/usr/local/bin}
py=${PYTHON:-python3}

self=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
src=$(dirname "$self")
[ -f "$src/pyproject.toml" ] || die "run me from a upmt_tun checkout (no pyproject.toml next to $self)"

usage() { sed -n '2,/^set -eu/p' "$self" | sed -e '$d' -e 's/^# \{0,1\}//'; }
for a in "$@"; do      # help needs no root (arguments after -- are pytest's or the demo's)
    case $a in --) break ;; -h|--help) usage; exit 0 ;; esac
done

# --- root first: everything below changes the system ------------------------------------
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 \
        || die "needs root: run it as root (sudo is not installed here)"
    exec sudo -- env "PYTHON=$py" "UPMT_PREFIX=$prefix" "UPMT_BINDIR=$bindir" \
        "UPMT_TEST_PREFIX=${UPMT_TEST_PREFIX-}" "UPMT_UNITDIR=${UPMT_UNITDIR-}" sh "$self" "$@"
fi

while [ $# -gt 0 ]; do
    case $1 in
        --demo) mode=demo ;;
        --test) mode=test ;;
        --systemd) systemd=1 ;;
        --no-apt) apt=0 ;;
        --prefix) [ $# -ge 2 ] || die "--prefix needs a directory"; prefix=$2; shift ;;
        --prefix=*) prefix=${1#--prefix=} ;;
        --bindir) [ $# -ge 2 ] || die "--bindir needs a directory"; bindir=$2; shift ;;
        --bindir=*) bindir=${1#--bindir=} ;;
        --) shift; break ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown option '$1' (try --help)" ;;
    esac
    shift
done
if [ -z "$prefix" ]; then
    if [ "$mode" = test ]; then prefix=${UPMT_TEST_PREFIX:-/opt/upmt-test}; else prefix=/opt/upmt; fi
fi
case $prefix in /*) ;; *) die "--prefix must be an absolute path, not '$prefix'" ;; esac
case $bindir in /*) ;; *) die "--bindir must be an absolute path, not '$bindir'" ;; esac
if [ $# -gt 0 ] && [ "$mode" = install ]; then die "extra arguments need --test or --demo"; fi
if [ "$systemd" = 1 ] && [ "$mode" = test ]; then die "--systemd installs; it does not go with --test"; fi

export DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore

# --- Debian packages -----------------------------------------------------------------------
have_apt() { [ "$apt" = 1 ] && command -v apt-get >/dev/null 2>&1 && command -v dpkg-query >/dev/null 2>&1; }
apt_updated=0
# apt_install PKG...: install those not installed yet (nothing to do: no network needed)
apt_install() {
    missing=
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q ' installed$' || missing="$missing $p"
    done
    [ -n "$missing" ] || return 0
    say "installing Debian packages:$missing"
    if [ "$apt_updated" = 0 ]; then apt-get update -qq </dev/null; apt_updated=1; fi
    # shellcheck disable=SC2086  # one word per package
    apt-get install -y -qq --no-install-recommends $missing </dev/null >/dev/null
}

# what the daemons run (nft, ip), what the demo and the tests drive
tools="nftables iproute2 curl iperf3 iputils-ping tcpdump conntrack"
if have_apt; then
    # shellcheck disable=SC2086
    apt_install $tools
else
    for t in nft ip curl; do
        command -v "$t" >/dev/null 2>&1 || say "warning: '$t' not found: install it (nftables, iproute2, curl)"
    done
fi

# --- Python ---------------------------------------------------------------------------------
command -v "$py" >/dev/null 2>&1 || die "$py not found: install Python 3.11 or newer (Debian: apt-get install python3)"
ver=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])') || die "$py does not run"
"$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "$py is Python $ver; upmt_tun needs 3.11 or newer"

# the C fast path needs Python's headers and the compiler Python was built with
if ! "$py" -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; then
    if have_apt; then apt_install "python$ver-dev"; else say "warning: no Python.h for $py: the C fast path will not be built (slower)"; fi
fi
cc=$("$py" -c 'import sysconfig; print((sysconfig.get_config_var("CC") or "cc").split()[0])')
if ! command -v "$cc" >/dev/null 2>&1; then
    if have_apt; then apt_install gcc libc6-dev; else say "warning: no C compiler ($cc): the C fast path will not be built (slower)"; fi
fi

# make_venv DIR: a working venv at DIR (Debian's python3 needs python3.X-venv for it)
make_venv() {
    if [ -x "$1/bin/python" ] && "$1/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        return 0
    fi
    if [ -e "$1" ] && [ ! -f "$1/pyvenv.cfg" ] && [ -n "$(ls -A "$1" 2>/dev/null)" ]; then
        die "$1 exists and is not a venv; not touching it (choose another --prefix)"
    fi
    say "creating a venv in $1 with $py (Python $ver)"
    if ! out=$("$py" -m venv --clear "$1" 2>&1); then
        if have_apt; then
            apt_install "python$ver-venv"
            out=$("$py" -m venv --clear "$1" 2>&1) || die "cannot create a venv in $1: $(echo "$out" | tail -n 1)"
        else
            die "cannot create a venv in $1 (install your distribution's python venv package): $(echo "$out" | tail -n 1)"
        fi
    fi
}

make_venv "$prefix"
vpy=$prefix/bin/python
cd "$src"

if [ "$mode" = test ]; then
    say "installing '.[test]' into $prefix (builds the C fast path: about a minute)"
    "$vpy" -m pip install -q '.[test]'
    [ -d tests ] || die "no tests/ directory in $src"
    say "running the tests from $src with $vpy"
    rc=0
    # the venv's commands first on PATH, as an activated venv has them: some tests start
    # `upmt-agent` by name, and it must be this checkout's, not another install's
    PATH="$prefix/bin:$PATH" "$vpy" -m pytest -q -ra --durations=25 "$@" || rc=$?
    # 5 = pytest collected no test: never report that as a pass (nor hide it as one)
    if [ "$rc" -eq 5 ]; then die "pytest collected no tests (exit 5): nothing was tested"; fi
    [ "$rc" -eq 0 ] || die "tests failed (pytest exit $rc)"
    exit 0
fi

say "installing upmt_tun into $prefix (builds the C fast path: about a minute)"
"$vpy" -m pip install -q .
mkdir -p "$bindir"
for c in upmt-agent upmt-anchor upmt-demo; do
    [ -x "$prefix/bin/$c" ] || die "$prefix/bin/$c missing after the install"
    ln -sfn "$prefix/bin/$c" "$bindir/$c"
done
say "installed: $("$prefix/bin/upmt-agent" --version 2>/dev/null || echo upmt_tun); commands linked into $bindir"

if [ "$systemd" = 1 ]; then
    unitdir=${UPMT_UNITDIR:-/etc/systemd/system}
    "$vpy" -m upmt_tun.units install "$unitdir" "$bindir" >/dev/null
    mkdir -p /etc/upmt
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
        systemctl daemon-reload
        say "units upmt-agent.service and upmt-anchor.service installed in $unitdir; with" \
            "/etc/upmt/agent.toml (or anchor.toml) in place: systemctl enable --now upmt-agent"
    else
        say "units written to $unitdir; systemd is not running here, so nothing was reloaded"
    fi
fi

if [ "$mode" = demo ]; then
    exec "$prefix/bin/upmt-demo" "$@"
fi
