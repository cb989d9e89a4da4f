#!/bin/sh
# mmdebstrap customize hook of the built-in guest image.
# Usage: customize.sh ROOTFS_DIR RECIPE_DIR   (run on the host, as root, after all packages are in)
set -eu
root="$1"
recipe="$2"

# Static files of the recipe (the seed applier and its unit, sshd and initramfs settings),
# copied over the root filesystem.
cp -R "$recipe/files/." "$root/"
chmod 0755 "$root/usr/local/lib/nvmprov/apply_seed.sh" "$root/usr/local/lib/nvmprov/initrd-init" \
    "$root/etc/initramfs-tools/hooks/nvmprov-init"
mkdir -p "$root/etc/systemd/system/multi-user.target.wants"
for unit in nvmprov-seed.service nvmprov-grow-root.service; do
    ln -sf "/etc/systemd/system/$unit" "$root/etc/systemd/system/multi-user.target.wants/$unit"
done

# Root on the whole virtio disk: the image is a bare ext4 filesystem, no partition table.
# No fsck (pass 0): every guest's root is a fresh overlay of this image, and systemd-fsck-root sat
# on sshd's path (~2 s under TCG); the initrd then carries no fsck either.
printf '%s\n' '/dev/vda / ext4 defaults,errors=remount-ro 0 0' > "$root/etc/fstab"

# No ifupdown, no DHCP client: nvmprov-seed gives eth0 QEMU user networking's fixed address itself
# (ifupdown-pre's udev settle and DHCP held sshd back by ~20 s under TCG).

# Kernel NIC names: the guest's one NIC stays eth0 (the name nvmprov-seed configures), with no
# udev rename racing it.
mkdir -p "$root/etc/systemd/network"
ln -sf /dev/null "$root/etc/systemd/network/99-default.link"

# The login user's ~/.ssh comes from the skeleton, owned and 0700 (nvmprov-seed adds the key).
install -d -m 0700 "$root/etc/skel/.ssh"
mkdir -p "$root/var/lib/nvmprov"

# Every guest gets its own host key from its seed (ssh_keys, applied by nvmprov-seed); none baked in.
rm -f "$root"/etc/ssh/ssh_host_*

# Each guest makes its own machine-id on first boot.
: > "$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id"

# nvmprov-seed sets the hostname and writes resolv.conf (mmdebstrap left the build host's).
printf '%s\n' localhost > "$root/etc/hostname"
: > "$root/etc/resolv.conf"
chmod 0644 "$root/etc/hostname" "$root/etc/resolv.conf"

# Nothing periodic or unneeded in a short-lived test guest (each costs seconds under TCG).
# Nor utmp records (nobody runs `who` here), sysusers (dpkg made the image's system users at build
# time), hugepages, POSIX message queues, configfs, the static nodes of modules not loaded, or a
# login prompt on the serial console (no password works: keys only).
# Nor the early-boot units for things the guest has not got (EFI, graphics, device mapper, loop,
# FUSE, binfmt, debugfs/tracefs): under TCG each costs seconds of the one CPU before sshd starts.
for unit in apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service fstrim.timer \
        dpkg-db-backup.timer ndctl-monitor.service getty@tty1.service \
        modprobe@drm.service modprobe@dm_mod.service modprobe@efi_pstore.service modprobe@loop.service \
        modprobe@fuse.service systemd-binfmt.service proc-sys-fs-binfmt_misc.automount \
        proc-sys-fs-binfmt_misc.mount sys-kernel-debug.mount sys-kernel-tracing.mount \
        sys-fs-fuse-connections.mount systemd-update-utmp.service systemd-update-utmp-runlevel.service \
        systemd-sysusers.service dev-hugepages.mount dev-mqueue.mount sys-kernel-config.mount \
        modprobe@configfs.service kmod-static-nodes.service serial-getty@ttyS0.service; do
    ln -sf /dev/null "$root/etc/systemd/system/$unit"
done

# systemd's generators, each a program started before any unit (2.3 s of systemd's start-up under
# TCG went to them and to loading units): only the fstab one is needed (the agent mounts regions
# through /etc/fstab). No encrypted, verity or integrity volumes, no GPT (root is a bare ext4), no
# hibernation, no SysV scripts without a unit, no rc.local, no serial getty (masked above), no
# systemd.run=/debug options on the kernel command line (nvmprov writes it).
mkdir -p "$root/etc/systemd/system-generators"
for gen in systemd-cryptsetup-generator systemd-debug-generator systemd-getty-generator \
        systemd-gpt-auto-generator systemd-hibernate-resume-generator systemd-integritysetup-generator \
        systemd-rc-local-generator systemd-run-generator systemd-system-update-generator \
        systemd-sysv-generator systemd-veritysetup-generator; do
    ln -sf /dev/null "$root/etc/systemd/system-generators/$gen"
done

# sshd starts before systemd-user-sessions (ssh.service.d/10-nvmprov.conf): no /run/nologin
# "System is booting up" that would refuse the first logins. With no /run/nologin ever made,
# systemd-user-sessions (which only removes it) has nothing to do: masked (~1 s under TCG).
mkdir -p "$root/etc/tmpfiles.d"
ln -sf /dev/null "$root/etc/tmpfiles.d/systemd-nologin.conf"
ln -sf /dev/null "$root/etc/systemd/system/systemd-user-sessions.service"

# No message of the day at login: pam_motd ran run-parts and uname (three programs) in every SSH
# session, 2.6 s of the first one while the boot goes on under TCG; nobody reads it here. Nor the
# mail check.
sed -i -e '/^session[[:space:]].*pam_motd\.so/d' -e '/^session[[:space:]].*pam_mail\.so/d' "$root/etc/pam.d/sshd"
if grep -q '^session.*\(pam_motd\|pam_mail\)' "$root/etc/pam.d/sshd"; then
    echo "customize.sh: pam_motd/pam_mail still in /etc/pam.d/sshd" >&2
    exit 1
fi

# Rebuild the initrd with the recipe's initramfs settings (files/etc/initramfs-tools).
chroot "$root" update-initramfs -u -k all
