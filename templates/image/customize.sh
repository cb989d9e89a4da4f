#!/bin/sh
# mmdebstrap customize hook of the built-in guest image.
# Usage: customize.sh ROOTFS_DIR RECIPE_DIR   (run on the host, as root, after all packages are in)
set -eu
root="$1"
recipe="$2"

# Static files of the recipe (cloud-init settings, ...), copied over the root filesystem.
cp -R "$recipe/files/." "$root/"

# Root on the whole virtio disk: the image is a bare ext4 filesystem, no partition table.
printf '%s\n' '/dev/vda / ext4 defaults,errors=remount-ro 0 1' > "$root/etc/fstab"

# cloud-init's network config lands in interfaces.d: without this source line it is silently
# ignored and SSH never answers.
cat > "$root/etc/network/interfaces" <<'EOT'
# interfaces(5); cloud-init writes the guest's NIC into /etc/network/interfaces.d/
auto lo
iface lo inet loopback

source /etc/network/interfaces.d/*
EOT

# Every guest gets its own host key from its seed (cloud-init ssh_keys); none baked in.
rm -f "$root"/etc/ssh/ssh_host_*

# Each guest makes its own machine-id on first boot.
: > "$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id"

# cloud-init sets the hostname; DHCP writes resolv.conf (mmdebstrap left the build host's).
printf '%s\n' localhost > "$root/etc/hostname"
: > "$root/etc/resolv.conf"
chmod 0644 "$root/etc/hostname" "$root/etc/resolv.conf"

# Nothing periodic or unneeded in a short-lived test guest (each costs seconds under TCG).
for unit in apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service fstrim.timer \
        dpkg-db-backup.timer ndctl-monitor.service getty@tty1.service; do
    ln -sf /dev/null "$root/etc/systemd/system/$unit"
done

# Rebuild the initrd with the recipe's initramfs settings (files/etc/initramfs-tools).
chroot "$root" update-initramfs -u -k all
