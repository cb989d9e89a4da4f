#!/bin/sh
# nvmprov built-in image: apply the guest's seed at boot, in place of cloud-init.
#
# The seed ISO (label cidata) carries, besides cloud-init's user-data, the same seed in final form:
# nvmprov/ holds one plain file per value, made and checked on the host by nvmprov.image_seed. This
# program only puts them in place, with a few shell commands and no Python (a Python start cost
# 10-25 s of the one emulated CPU under TCG, on sshd's path): hostname and /etc/hosts, the NIC
# named by MAC with QEMU user networking's fixed address (no DHCP client), and, once per instance,
# the pinned host key, the login user with sudo and its key; it asks nvmprov-grow-root.service,
# which runs after sshd, to grow the root filesystem to the disk.
#
# A file in nvmprov/ it does not know, or a format other than its own, stops it before it changes
# anything, with the file named on the console: a seed asking for more never boots half-applied.
#
# It runs while udev, journald, dbus and logind start on the same emulated CPU, where each program
# started costs ~0.3-1 s: it does with shell built-ins what they can do (reading and writing files,
# /etc/hosts, /etc/passwd), and starts 5 programs on a first boot (mount, ip, useradd, chown,
# umount), 3 on a power-cycle boot. Files are written in place, not via a rename: nothing reads
# them before this unit has finished (sshd, sudo and every login come after it), and the instance
# is recorded last, so a run cut short is redone whole on the next boot.
#
#   apply_seed.sh                    apply (root, from nvmprov-seed.service, every boot)
#   apply_seed.sh --check DIR        only check the final-form directory DIR (host unit tests)
#   apply_seed.sh --hosts HOST FILE  print FILE (an /etc/hosts) naming HOST (host unit tests)
set -eu

LABEL=cidata
FORMAT=1
# Every file of the final form (nvmprov.image_seed.FILES).
KNOWN="format instance-id hostname user shell groups sudo authorized_keys ssh_host_ed25519_key ssh_host_ed25519_key.pub nic resize_rootfs packages"
DEVICE_WAIT_TENTHS=1800  # the seed's SATA CD: ahci/sr_mod/isofs are in the initrd, so it is there at once
NIC_WAIT_TENTHS=600      # virtio_net is in the initrd too
MOUNT_DIR=/run/nvmprov-seed  # made by the unit (RuntimeDirectory)
TAB="$(printf '\t')"
INSTANCE_RECORD=/var/lib/nvmprov/seed-instance-id
HOST_KEY=/etc/ssh/ssh_host_ed25519_key

# The serial console, written directly by main: nvmprov waits for the "applied" line there before
# its first SSH attempt, and journald, through which StandardOutput=journal+console would pass it,
# starts seconds later under TCG (4-9 s after the seed had finished, measured).
CONSOLE=
say() {
    echo "nvmprov-seed: $*"
    [ -z "$CONSOLE" ] || echo "nvmprov-seed: $*" > "$CONSOLE" 2> /dev/null || true
}
fail() { say "error: $*" >&2; exit 1; }
centis() { echo $(( ${1%.*} * 100 + 1${1#*.} - 100 )); }  # "12.34" (/proc/uptime) -> 1234

first_line() {  # FILE: its first line, without the newline
    line=
    IFS= read -r line < "$1" || true
    printf '%s' "$line"
}

value() { first_line "$seed/$1"; }

copy() {  # SRC DEST: a text file, with shell built-ins only
    while IFS= read -r line || [ -n "$line" ]; do
        printf '%s\n' "$line"
    done < "$1" > "$2"
}

check() {  # DIR: the final-form directory; refuses what this program does not implement
    [ -d "$1" ] || fail "the seed has no $1 (made by an nvmprov that does not know the built-in image?)"
    for path in "$1"/* "$1"/.[!.]* "$1"/..?*; do
        [ -e "$path" ] || continue
        name="${path##*/}"
        case " $KNOWN " in
            *" $name "*) ;;
            *) fail "seed file nvmprov/$name not implemented by the built-in image" ;;
        esac
    done
    for name in $KNOWN; do
        [ -f "$1/$name" ] || fail "seed file nvmprov/$name missing"
    done
    got="$(first_line "$1/format")"
    [ "$got" = "$FORMAT" ] || fail "seed format '$got' not implemented by the built-in image (it has $FORMAT)"
    got="$(first_line "$1/user")"
    case "$got" in
        "" | *[!a-z0-9_-]*) fail "seed user '$got' is not a login name" ;;
    esac
    got="$(first_line "$1/hostname")"
    case "$got" in
        "" | *[!A-Za-z0-9-]*) fail "seed hostname '$got' is not a host name" ;;
    esac
}

install_file() {  # SRC DEST UMASK: a new file with the mode UMASK leaves
    [ ! -e "$2" ] || rm -f "$2"  # left by a run cut short: its mode may differ
    (umask "$3" && copy "$1" "$2")
}

hosts_file() {  # HOST FILE: FILE with one 127.0.1.1 line naming HOST (sudo resolves the hostname)
    has_local=
    while IFS= read -r line || [ -n "$line" ]; do
        case "$line" in "127.0.0.1 "* | "127.0.0.1$TAB"*) has_local=1 ;; esac
    done < "$2"
    n=0
    if [ -z "$has_local" ]; then
        printf '127.0.0.1\tlocalhost\n127.0.1.1\t%s\n' "$1"
        n=2
    fi
    while IFS= read -r line || [ -n "$line" ]; do
        case "$line" in 127.0.1.1*) continue ;; esac
        printf '%s\n' "$line"
        n=$((n + 1))
        [ "$n" -ne 1 ] || printf '127.0.1.1\t%s\n' "$1"
    done < "$2"
}

mount_seed() {  # the CD holding the NoCloud seed (label cidata, with meta-data), at MOUNT_DIR
    [ -d "$MOUNT_DIR" ] || mkdir -m 0700 "$MOUNT_DIR"
    i=0
    while [ "$i" -lt "$DEVICE_WAIT_TENTHS" ]; do
        for dev in /dev/sr*; do
            [ -b "$dev" ] || continue
            if mount -t iso9660 -o ro "$dev" "$MOUNT_DIR" 2> /dev/null; then
                [ ! -f "$MOUNT_DIR/meta-data" ] || return 0
                umount "$MOUNT_DIR"
            fi
        done
        sleep 0.1
        i=$((i + 1))
    done
    fail "no $LABEL CD with a seed after $((DEVICE_WAIT_TENTHS / 10)) s: is the seed ISO attached?"
}

set_hostname() {
    host="$(value hostname)"
    printf '%s\n' "$host" > /etc/hostname
    hosts="$(hosts_file "$host" /etc/hosts)"
    printf '%s\n' "$hosts" > /etc/hosts
    printf '%s' "$host" > /proc/sys/kernel/hostname
}

set_network() {  # the NIC with the seed's MAC gets the seed's name and QEMU user networking's address
    read -r mac name address gateway dns < "$seed/nic"
    i=0
    current=
    while [ -z "$current" ]; do
        for path in /sys/class/net/*/address; do
            [ -f "$path" ] || continue
            if [ "$(first_line "$path")" = "$mac" ]; then
                current="${path#/sys/class/net/}"
                current="${current%/address}"
            fi
        done
        if [ -z "$current" ]; then
            [ "$i" -lt "$NIC_WAIT_TENTHS" ] || fail "no NIC with MAC $mac after $((NIC_WAIT_TENTHS / 10)) s"
            sleep 0.1
            i=$((i + 1))
        fi
    done
    rename=
    [ "$current" = "$name" ] || rename="link set dev $current down
link set dev $current name $name"
    if [ "$address" = dhcp ]; then  # a libvirt network: systemd-networkd asks, off sshd's path (no DNS: nvmprov needs none)
        [ -z "$rename" ] || printf '%s\n' "$rename" | ip -batch -
        mkdir -p /run/systemd/network
        printf '[Match]\nName=%s\n\n[Network]\nDHCP=ipv4\n' "$name" > /run/systemd/network/50-nvmprov.network
        systemctl start --no-block systemd-networkd.service
        return 0
    fi
    # one `ip` for all of it
    printf '%s\naddress replace %s dev %s\nlink set dev %s up\nroute replace default via %s dev %s\n' \
        "$rename" "$address" "$name" "$name" "$gateway" "$name" | ip -batch -
    printf '# written by nvmprov-seed: QEMU user networking'"'"'s DNS\nnameserver %s\n' "$dns" > /etc/resolv.conf
}

add_user() {
    user="$(value user)"
    home="/home/$user"
    existing=
    while IFS=: read -r name _ _ _ _ dir _; do
        [ "$name" != "$user" ] || existing="$dir"
    done < /etc/passwd
    if [ -n "$existing" ]; then  # only if the image had it: then lock it and add the groups
        home="$existing"
        usermod --lock ${groups:+--append --groups "$groups"} "$user"
    else  # -p '!': locked, keys only; the image's /etc/skel has .ssh (0700)
        useradd --create-home --home-dir "$home" --shell "$(value shell)" --user-group --password '!' \
            ${groups:+--groups "$groups"} "$user"
    fi
    rule="$(value sudo)"
    if [ -n "$rule" ]; then  # one rule, of the form nvmprov.image_seed checked on the host
        sudoers="/etc/sudoers.d/90-nvmprov-$user"
        [ ! -e "$sudoers" ] || rm -f "$sudoers"
        (umask 0337 && printf '%s %s\n' "$user" "$rule" > "$sudoers")
    fi
    [ -d "$home/.ssh" ] || mkdir -m 0700 "$home/.ssh"
    install_file "$seed/authorized_keys" "$home/.ssh/authorized_keys" 077
    chown "$user:" "$home/.ssh" "$home/.ssh/authorized_keys"
}

check_packages() {  # outbound guests ask for packages: the built-in image has them baked in
    missing=
    for p in $(value packages); do
        [ "$(dpkg-query -W -f '${db:Status-Status}' "$p" 2> /dev/null || true)" = installed ] || missing="$missing $p"
    done
    [ -z "$missing" ] || fail "packages not in the built-in image:$missing"
}

main() {
    read -r started _ < /proc/uptime
    CONSOLE=/dev/console
    mount_seed
    trap 'umount "$MOUNT_DIR"' EXIT
    seed="$MOUNT_DIR/nvmprov"
    [ -d "$seed" ] || fail "the seed has no nvmprov/ (made by an nvmprov older than this image: upgrade nvmprov)"
    check "$seed"

    set_hostname
    set_network
    instance="$(value instance-id)"
    done_id=
    [ ! -f "$INSTANCE_RECORD" ] || done_id="$(first_line "$INSTANCE_RECORD")"
    if [ "$done_id" != "$instance" ]; then
        [ -z "$(value packages)" ] || check_packages
        install_file "$seed/ssh_host_ed25519_key" "$HOST_KEY" 077
        install_file "$seed/ssh_host_ed25519_key.pub" "$HOST_KEY.pub" 022
        groups="$(value groups)"
        add_user
        # nvmprov-grow-root.service does it after sshd has started
        [ "$(value resize_rootfs)" != yes ] || : > /run/nvmprov-grow-root
        [ -d "${INSTANCE_RECORD%/*}" ] || mkdir -p "${INSTANCE_RECORD%/*}"  # made in the image
        printf '%s\n' "$instance" > "$INSTANCE_RECORD"  # last: a run cut short is redone whole
    fi
    read -r now _ < /proc/uptime
    took=$(($(centis "$now") - $(centis "$started")))
    say "applied (host $(value hostname), user $(value user), instance $instance) in" \
        "$((took / 100)).$((took % 100 / 10)) s"
}

case "${1:-}" in
    --check)
        [ $# -eq 2 ] || fail "usage: apply_seed.sh --check DIR"
        check "$2"
        ;;
    --hosts)
        [ $# -eq 3 ] || fail "usage: apply_seed.sh --hosts HOST FILE"
        hosts_file "$2" "$3"
        ;;
    "") main ;;
    *) fail "usage: apply_seed.sh [--check DIR | --hosts HOST FILE]" ;;
esac
