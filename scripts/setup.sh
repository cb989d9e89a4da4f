#!/bin/bash
# Set up everything nvmprov needs on a Debian 12 host, as root. Idempotent and quick when done:
#   - Debian packages (only the missing ones),
#   - the virtualenv <checkout>/.venv with nvmprov installed (only when pyproject.toml changed)
#     and its bytecode compiled,
#   - the libvirt daemons (systemd units when systemd runs, else virtlogd -d / libvirtd -d).
# It never starts libvirt's `default` NAT network: guests use QEMU user networking.
set -euo pipefail

checkout="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$checkout/.venv"
stamp="$venv/.nvmprov-installed"
libvirt_uri="qemu:///system"
libvirt_wait_s=30

packages=(
    qemu-system-x86 qemu-utils ovmf
    libvirt-daemon-system libvirt-clients libvirt-dev pkg-config gcc python3-dev python3-venv
    mmdebstrap e2fsprogs xfsprogs openssh-client make
    libxml2-utils   # xmllint, which virt-xml-validate runs (the golden XML tests)
    openssh-server  # sshd for the SSH session tests (a throwaway one on loopback) and qemu+ssh tests
    python3-setuptools python3-wheel  # the host tier builds nvmprov's wheel offline (tests/unit/test_wheel.py)
)

step() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (it installs Debian packages and starts libvirtd)"
command -v dpkg-query >/dev/null || die "this script supports Debian (dpkg/apt) only"

install_packages() {
    local missing=() p
    for p in "${packages[@]}"; do
        installed "$p" || missing+=("$p")
    done
    if [ "${#missing[@]}" -eq 0 ]; then
        step "packages: all ${#packages[@]} present"
        return
    fi
    step "packages: installing ${missing[*]}"
    local had_network_config=yes
    installed libvirt-daemon-config-network || had_network_config=no
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq </dev/null
    apt-get install -y -qq --no-install-recommends "${missing[@]}" </dev/null
    if [ "$had_network_config" = no ]; then
        quiet_default_network
    fi
}

installed() {
    # "install ok installed" only when the package is fully installed
    [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]
}

quiet_default_network() {
    # libvirt-daemon-system pulls in libvirt-daemon-config-network, which defines libvirt's NAT
    # network `default` with autostart. nvmprov never uses it and must never start it; we only
    # touch it when it was installed just now (it is ours then, nothing else relies on it).
    local link=/etc/libvirt/qemu/networks/autostart/default.xml
    if [ -e "$link" ] || [ -L "$link" ]; then
        rm -f "$link"
        step "network: autostart of libvirt's 'default' NAT network turned off (nvmprov uses QEMU user networking)"
    fi
    if virsh -c "$libvirt_uri" net-info default 2>/dev/null | grep -qE '^Active:[[:space:]]+yes'; then
        virsh -c "$libvirt_uri" net-destroy default >/dev/null
        step "network: stopped libvirt's 'default' NAT network that the package install started"
    fi
}

setup_venv() {
    local want have=""
    want="$(sha256sum "$checkout/pyproject.toml" | cut -d' ' -f1)"
    [ -f "$stamp" ] && have="$(cat "$stamp")"
    if [ -x "$venv/bin/python" ] && [ "$want" = "$have" ]; then
        step "virtualenv: $venv up to date"
        return
    fi
    if [ ! -x "$venv/bin/python" ]; then
        step "virtualenv: creating $venv"
        /usr/bin/python3 -m venv "$venv"
    fi
    step "virtualenv: installing nvmprov with test and lint extras"
    local log="$venv/pip-install.log"
    if ! "$venv/bin/python" -m pip install --disable-pip-version-check -e "$checkout[test,lint]" \
            </dev/null >"$log" 2>&1; then
        tail -n 20 "$log" >&2
        die "pip install failed; full log in $log"
    fi
    printf '%s\n' "$want" > "$stamp"
}

compile_bytecode() {
    # An editable install leaves nvmprov's bytecode to be written on first import, which
    # PYTHONDONTWRITEBYTECODE (set in some CI images) prevents: every command would then recompile
    # its modules, ~60 ms of `nvmprov render`. Only changed files are recompiled.
    "$venv/bin/python" -m compileall -q "$checkout/nvmprov" >/dev/null
    step "virtualenv: nvmprov's bytecode up to date"
}

daemon_running() {
    # pidfile first (what the daemon itself writes), pgrep as a fallback
    local name="$1" pidfile="/run/$1.pid"
    if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        return 0
    fi
    pgrep -x "$name" >/dev/null
}

start_daemons() {
    if [ -d /run/systemd/system ]; then
        step "daemons: systemctl start virtlogd libvirtd"
        systemctl start virtlogd libvirtd
    else
        local d
        for d in virtlogd libvirtd; do
            if daemon_running "$d"; then
                step "daemons: $d running"
            else
                step "daemons: starting $d -d"
                "$d" -d
            fi
        done
    fi
    local deadline=$((SECONDS + libvirt_wait_s))
    # `virsh list` needs the QEMU driver but not QEMU's capabilities: a cheap probe
    until virsh -c "$libvirt_uri" list --name >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$deadline" ] || die "libvirtd did not answer on $libvirt_uri within ${libvirt_wait_s}s; try 'virsh -c $libvirt_uri list' and libvirtd's log"
        sleep 0.5
    done
    step "daemons: libvirt answers on $libvirt_uri"
}

kvm_device() {
    # Without udev (as here) /dev/kvm stays root-only 0600. libvirt then sees KVM when it probes
    # QEMU but "not available now" for the QEMU user, calls its capability cache outdated and
    # re-probes QEMU on every call (4-8 s per define/start). Set what Debian's udev rule sets.
    [ -c /dev/kvm ] || { step "kvm: no /dev/kvm (guests run under TCG)"; return; }
    getent group kvm >/dev/null || { step "kvm: no kvm group; leaving /dev/kvm as it is"; return; }
    if [ "$(stat -c '%G %a' /dev/kvm)" = "kvm 660" ]; then
        step "kvm: /dev/kvm root:kvm 0660"
        return
    fi
    chgrp kvm /dev/kvm && chmod 0660 /dev/kvm
    step "kvm: /dev/kvm set to root:kvm 0660 (as udev would)"
}

install_packages
setup_venv
compile_bytecode
kvm_device
start_daemons
step "done"
