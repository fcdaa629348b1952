#!/usr/bin/env bash
# Boots this machine's systemd as PID 1 of private mount, PID, UTS, IPC and cgroup namespaces,
# for tests/packaging.rs (`kunpayd_runs_under_a_real_systemd_...`): the units' hardening,
# credentials and notify protocol exercised by a real service manager, on machines whose PID 1
# is not systemd (containers, build VMs). Needs root.
#
#   tests/systemd-boot.sh DIR CGROUP KUNPAYD
#
# DIR/upper holds the files the test adds to the machine's own file system (units, /etc/kunpay,
# /etc/passwd with the kunpay account); the new root is an overlay of / with a copy of them on
# a tmpfs, so nothing the booted system writes reaches the machine. CGROUP is an empty cgroup2
# directory the caller created; it becomes the namespace's cgroup root (the caller removes it).
# KUNPAYD is bind-mounted as /usr/bin/kunpayd. The network is the machine's, so the test
# reaches the ops listener and the daemon reaches the test database on 127.0.0.1.
# Writes the host PID of the booted systemd to DIR/pid; systemd boots into kunpaytest.target.
# Stop it with SIGRTMIN+4 (poweroff) to that PID.
set -euo pipefail

if [ "${1:-}" != --inside ]; then
  dir=$1 cgroup=$2 kunpayd=$3
  echo $$ > "$cgroup/cgroup.procs"
  exec unshare --mount --pid --fork --uts --ipc --cgroup --propagation private -- \
    "$0" --inside "$dir" "$kunpayd"
fi

dir=$2 kunpayd=$3
# /proc is still the machine's here: our parent PID there is this shell's host PID, which the
# exec below hands to systemd.
awk '{ print $4 }' /proc/self/stat > "$dir/pid"

root=$dir/merged
mkdir -p "$dir/tmpfs" "$root"
mount -t tmpfs -o mode=0755 tmpfs "$dir/tmpfs"
mkdir "$dir/tmpfs/upper" "$dir/tmpfs/work"
cp -a "$dir/upper/." "$dir/tmpfs/upper/"
mount -t overlay overlay -o "lowerdir=/,upperdir=$dir/tmpfs/upper,workdir=$dir/tmpfs/work" "$root"
touch "$root/usr/bin/kunpayd"
mount --bind "$kunpayd" "$root/usr/bin/kunpayd"

mount -t proc proc "$root/proc"
mount -t sysfs -o ro sysfs "$root/sys"
mount -t cgroup2 cgroup2 "$root/sys/fs/cgroup"
mount -t tmpfs -o mode=0755 tmpfs "$root/run"
mount -t tmpfs -o mode=1777 tmpfs "$root/tmp"
mount -t tmpfs -o mode=0755 tmpfs "$root/dev"
# The host's own device nodes, bound read-only: the guest's systemd may chown or chmod what it
# finds in /dev (a tty, the console), and through a writable bind that would change the host's
# /dev/null for everything else on the machine. Writing to a device on a read-only mount works.
for node in null zero full random urandom tty; do
  touch "$root/dev/$node"
  mount --bind "/dev/$node" "$root/dev/$node"
  mount -o remount,bind,ro "$root/dev/$node"
done
mkdir "$root/dev/pts" "$root/dev/shm" "$root/dev/mqueue"
mount -t devpts -o newinstance,ptmxmode=0666 devpts "$root/dev/pts"
ln -s pts/ptmx "$root/dev/ptmx"
mount -t tmpfs -o mode=1777 tmpfs "$root/dev/shm"
mount -t mqueue mqueue "$root/dev/mqueue"
touch "$root/dev/console" "$dir/console.log"
mount --bind "$dir/console.log" "$root/dev/console"

hostname kunpay-systemd-test
# pivot_root, not chroot: the kernel refuses user namespaces (PrivateUsers=) to a chrooted
# process. Shared propagation, as systemd sets up when booted by the kernel: it mounts each
# service's credentials in a namespace of its own and relies on them propagating back.
cd "$root"
mkdir -p .oldroot
pivot_root . .oldroot
umount -l /.oldroot
rmdir /.oldroot
mount --make-rshared /
cd /
export container=kunpay-test
exec /lib/systemd/systemd --system --unit=kunpaytest.target --log-target=journal --log-level=info
