#!/usr/bin/env bash
# Prepares a fresh Debian/Ubuntu machine for Godwit's demo and tests, idempotently:
# installs the packages below when any is missing, then checks that /dev/kvm is usable and that cargo (with rustfmt and
# clippy, added through rustup when missing) exists.
# Quiet when everything is already there. Runs as root (or installs through sudo).
set -euo pipefail
shopt -s inherit_errexit

die() {
    echo "setup.sh: $*" >&2
    exit 1
}

# What the build and the tests need: gcc and binutils build the test guest; iproute2 and ping
# make the network lab and nftables stalls its link in the fault tests; the verbs and rdma_cm
# headers, libclang (bindgen) and pkg-config build the RDMA transport (rdma-sys); the rxe
# provider lets it find soft-RoCE devices.
PKGS=(gcc binutils iproute2 iputils-ping nftables libibverbs-dev librdmacm-dev libclang-dev pkg-config ibverbs-providers)
missing=()
for pkg in "${PKGS[@]}"; do
    [[ $(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null) == "install ok installed" ]] || missing+=("$pkg")
done

if ((${#missing[@]})); then
    command -v apt-get >/dev/null 2>&1 ||
        die "missing ${missing[*]} and no apt-get here: install them with your package manager"
    sudo=()
    if ((EUID != 0)); then
        command -v sudo >/dev/null 2>&1 || die "missing ${missing[*]}: run this as root to install them"
        sudo=(sudo)
    fi
    echo "setup.sh: installing ${missing[*]}" >&2
    log=$(mktemp)
    export DEBIAN_FRONTEND=noninteractive
    if ! { "${sudo[@]}" apt-get update -q &&
        "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        die "apt-get failed (output above)"
    fi
    rm -f "$log"
fi

if [[ ! -e /dev/kvm ]]; then
    die "/dev/kvm does not exist: enable virtualization (VT-x/AMD-V) in the firmware, load the
  module (modprobe kvm_intel or kvm_amd), or on a cloud VM pick an instance type with nested
  virtualization"
fi
if [[ ! -r /dev/kvm || ! -w /dev/kvm ]]; then
    kvm_group=$(stat -c %G /dev/kvm)
    if [[ $kvm_group != root ]]; then
        die "/dev/kvm is not readable and writable by $(id -un): run as root (sudo), or add
  yourself to its group (sudo usermod -aG $kvm_group $(id -un), then log in again)"
    fi
    die "/dev/kvm is not readable and writable by $(id -un): run as root (sudo)"
fi

if ! command -v cargo >/dev/null 2>&1; then
    if [[ -x ${CARGO_HOME:-$HOME/.cargo}/bin/cargo ]]; then
        die "cargo is installed in ${CARGO_HOME:-$HOME/.cargo}/bin but not on PATH (sudo resets
  PATH): run with  sudo env PATH=\"\$PATH\" $0  or  . \"\$HOME/.cargo/env\""
    fi
    die "cargo not found: install Rust from https://rustup.rs (rustup installs cargo)"
fi

# ci/test.sh runs `cargo fmt` and `cargo clippy`.
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
    command -v rustup >/dev/null 2>&1 ||
        die "cargo fmt / cargo clippy missing and no rustup to add them: install rustfmt and clippy"
    echo "setup.sh: adding the rustfmt and clippy components" >&2
    rustup component add rustfmt clippy >/dev/null 2>&1 ||
        die "rustup component add rustfmt clippy failed"
fi
