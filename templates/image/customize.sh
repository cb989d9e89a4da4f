#!/bin/sh
# mmdebstrap customize hook of the built-in guest image.
# Usage: customize.sh ROOTFS_DIR RECIPE_DIR   (run on the host, as root, after all packages are in)
set -eu
root="$1"
recipe="$2"

# Static files of the recipe (the seed applier and its unit, sshd and initramfs settings),
# copied over the root filesystem.
cp -R "$recipe/files/." "$root/"
chmod 0755 "$root/usr/local/lib/nvmprov/apply_seed.py"
mkdir -p "$root/etc/systemd/system/multi-user.target.wants"
ln -sf /etc/systemd/system/nvmprov-seed.service "$root/etc/systemd/system/multi-user.target.wants/nvmprov-seed.service"

# Root on the whole virtio disk: the image is a bare ext4 filesystem, no partition table.
printf '%s\n' '/dev/vda / ext4 defaults,errors=remount-ro 0 1' > "$root/etc/fstab"

# nvmprov-seed writes the NIC's config into interfaces.d: without this source line it is
# silently ignored and SSH never answers.
cat > "$root/etc/network/interfaces" <<'EOT'
# interfaces(5); nvmprov-seed writes the guest's NIC into /etc/network/interfaces.d/
auto lo
iface lo inet loopback

source /etc/network/interfaces.d/*
EOT

# Kernel NIC names: the guest's one NIC stays eth0 (the name nvmprov-seed configures), with no
# udev rename racing it.
mkdir -p "$root/etc/systemd/network"
ln -sf /dev/null "$root/etc/systemd/network/99-default.link"

# Every guest gets its own host key from its seed (ssh_keys, applied by nvmprov-seed); none baked in.
rm -f "$root"/etc/ssh/ssh_host_*

# Each guest makes its own machine-id on first boot.
: > "$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id"

# nvmprov-seed sets the hostname; DHCP writes resolv.conf (mmdebstrap left the build host's).
printf '%s\n' localhost > "$root/etc/hostname"
: > "$root/etc/resolv.conf"
chmod 0644 "$root/etc/hostname" "$root/etc/resolv.conf"

# Nothing periodic or unneeded in a short-lived test guest (each costs seconds under TCG).
# Nor the early-boot units for things the guest has not got (EFI, graphics, device mapper, loop,
# FUSE, binfmt, debugfs/tracefs): under TCG each costs seconds of the one CPU before sshd starts.
for unit in apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service fstrim.timer \
        dpkg-db-backup.timer ndctl-monitor.service getty@tty1.service \
        modprobe@drm.service modprobe@dm_mod.service modprobe@efi_pstore.service modprobe@loop.service \
        modprobe@fuse.service systemd-binfmt.service proc-sys-fs-binfmt_misc.automount \
        proc-sys-fs-binfmt_misc.mount sys-kernel-debug.mount sys-kernel-tracing.mount \
        sys-fs-fuse-connections.mount; do
    ln -sf /dev/null "$root/etc/systemd/system/$unit"
done

# Rebuild the initrd with the recipe's initramfs settings (files/etc/initramfs-tools).
chroot "$root" update-initramfs -u -k all
