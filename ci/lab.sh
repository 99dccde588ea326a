#!/usr/bin/env bash
# A two-"host" network lab for Godwit: two network namespaces joined by a veth pair.
#
#   ci/lab.sh up NAME            create NAME-a and NAME-b (tears down a stale lab of that name first)
#   ci/lab.sh down NAME          remove both namespaces (missing ones are fine)
#   ci/lab.sh exec NAME a|b CMD  run CMD inside host A or B
#   ci/lab.sh addr NAME a|b      print that host's address
#
# Host A is NAME-a with NAME-va = 10.77.X.1/24, host B is NAME-b with NAME-vb = 10.77.X.2/24,
# MTU 9000, lo up in both. X is derived from NAME (1..250), or taken from $LAB_SUBNET (0..255).
# Labs with different names coexist (each pair of namespaces is its own network anyway).
# NAME: 1-12 characters of [A-Za-z0-9_-], starting with a letter or digit (the interface
# names NAME-va / NAME-vb must fit in 15 characters).
#
# `up` prints the addresses on stdout as `A=<ip>` and `B=<ip>`; messages go to stderr.
# Needs root.
set -euo pipefail
shopt -s inherit_errexit

LOCK=/run/lock/godwit-lab.lock

usage() {
    sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit "${1:-2}"
}

die() {
    echo "lab.sh: $*" >&2
    exit 1
}

check_name() {
    local name=$1
    [[ $name =~ ^[A-Za-z0-9][A-Za-z0-9_-]{0,11}$ ]] ||
        die "bad lab name '$name': 1-12 characters of [A-Za-z0-9_-], starting with a letter or digit"
}

need_root() {
    [[ $EUID -eq 0 ]] || die "needs root (network namespaces): run it with sudo"
}

# The third octet of the lab's subnet.
subnet() {
    local name=$1 x
    if [[ -n ${LAB_SUBNET:-} ]]; then
        if ! [[ $LAB_SUBNET =~ ^[0-9]{1,3}$ ]] || ((10#$LAB_SUBNET > 255)); then
            die "LAB_SUBNET must be a number 0..255, got '$LAB_SUBNET'"
        fi
        echo "$((10#$LAB_SUBNET))"
        return
    fi
    x=$(printf '%s' "$name" | cksum | cut -d' ' -f1)
    echo $((x % 250 + 1))
}

addr() {
    local name=$1 side=$2 x
    x=$(subnet "$name")
    case $side in
    a) echo "10.77.$x.1" ;;
    b) echo "10.77.$x.2" ;;
    *) die "host must be a or b, got '$side'" ;;
    esac
}

ns_exists() {
    [[ -e /run/netns/$1 ]]
}

# Serialise lab changes: parallel tests may bring labs up and down at the same time, and
# `ip netns add` races with itself when it first sets up /run/netns.
take_lock() {
    mkdir -p "$(dirname "$LOCK")"
    exec 9>"$LOCK"
    flock -w 30 9 || die "could not take $LOCK within 30 s"
}

do_down() {
    local name=$1 ns
    for ns in "$name-a" "$name-b"; do
        if ns_exists "$ns"; then
            ip netns delete "$ns" 2>/dev/null || ip netns delete "$ns" ||
                die "could not delete namespace $ns"
        fi
    done
    # A half-built lab may have left an end of the pair in the root namespace.
    local link
    for link in "$name-va" "$name-vb"; do
        if ip link show "$link" >/dev/null 2>&1; then
            ip link delete "$link" 2>/dev/null || true
        fi
    done
}

do_up() {
    local name=$1 a b i ok=0
    a=$(addr "$name" a)
    b=$(addr "$name" b)
    do_down "$name"
    ip netns add "$name-a"
    ip netns add "$name-b"
    ip link add "$name-va" mtu 9000 netns "$name-a" type veth \
        peer name "$name-vb" mtu 9000 netns "$name-b"
    ip -n "$name-a" link set lo up
    ip -n "$name-b" link set lo up
    ip -n "$name-a" addr add "$a/24" dev "$name-va"
    ip -n "$name-b" addr add "$b/24" dev "$name-vb"
    ip -n "$name-a" link set "$name-va" up
    ip -n "$name-b" link set "$name-vb" up

    if command -v ping >/dev/null 2>&1; then
        # Bounded: at most 10 tries of at most 1 s each.
        for ((i = 0; i < 10; i++)); do
            if ip netns exec "$name-a" ping -c 1 -W 1 -q "$b" >/dev/null 2>&1 &&
                ip netns exec "$name-b" ping -c 1 -W 1 -q "$a" >/dev/null 2>&1; then
                ok=1
                break
            fi
            sleep 0.2
        done
        if ((!ok)); then
            do_down "$name"
            die "lab $name: $a and $b cannot ping each other"
        fi
    else
        echo "lab.sh: ping not installed (ci/setup.sh installs it), skipping the ping check" >&2
    fi
    echo "lab $name up: $name-a $a ($name-va) <-> $name-b $b ($name-vb), mtu 9000" >&2
    echo "A=$a"
    echo "B=$b"
}

main() {
    (($# >= 1)) || usage
    local cmd=$1
    shift
    case $cmd in
    up | down)
        (($# == 1)) || usage
        check_name "$1"
        need_root
        take_lock
        if [[ $cmd == up ]]; then
            do_up "$1"
        else
            do_down "$1"
            echo "lab $1 down" >&2
        fi
        ;;
    exec)
        (($# >= 3)) || usage
        check_name "$1"
        [[ $2 == a || $2 == b ]] || die "host must be a or b, got '$2'"
        need_root
        ns_exists "$1-$2" || die "lab $1 is not up (no namespace $1-$2): run ci/lab.sh up $1"
        local ns=$1-$2
        shift 2
        exec ip netns exec "$ns" "$@"
        ;;
    addr)
        (($# == 2)) || usage
        check_name "$1"
        addr "$1" "$2"
        ;;
    -h | --help | help) usage 0 ;;
    *) usage ;;
    esac
}

main "$@"
