#!/usr/bin/env bash
# Provision one VM of the Vagrant lab, as root: `provision.sh HOST` (HOST: a name in
# lab.json, or "witness").  Vagrant runs it on every `vagrant up --provision` and
# `vagrant provision`; a second run changes nothing that is already right.
#
# 1. tools/setup from the synced checkout (/opt/pairvol): the same script as everywhere,
#    without the Vagrant packages (a VM needs no Vagrant of its own);
# 2. /usr/local/bin/pairvol, the path the units' ExecStart names;
# 3. the systemd units of systemd/;
# 4. witness: etcd on the lab network (a drop-in for Debian's etcd.service);
#    a storage host: its extra disk as the node's directory, the lab config (lab_config.py:
#    /etc/pairvol/cluster.toml, the secrets, the node table, the units' settings), the nbd
#    module, and pairvol-node@HOST and pairvol-agent enabled and started.
set -euo pipefail
host=${1:?usage: provision.sh HOST}
repo=/opt/pairvol
secrets=/var/lib/pairvol-vagrant/secrets
say() { printf 'provision %s: %s\n' "$host" "$*" >&2; }

PAIRVOL_SETUP_NO_VAGRANT=1 "$repo/tools/setup"
python=$repo/.venv/bin/python
ln -sfn "$repo/.venv/bin/pairvol" /usr/local/bin/pairvol
install -m 0644 "$repo"/systemd/*.service /etc/systemd/system/

if [ "$host" = witness ]; then
  changed=$("$python" "$repo/vagrant/lab_config.py" --host witness)
  systemctl daemon-reload
  systemctl enable etcd >/dev/null 2>&1
  # a changed drop-in needs a restart; an unchanged one leaves the running etcd alone
  if [ -n "$changed" ] || ! systemctl -q is-active etcd; then
    systemctl restart etcd
  fi
  say "etcd serving on $("$python" "$repo/vagrant/lab_config.py" --host witness --print-endpoint)"
  exit 0
fi

# etcd-server came with tools/setup; only the witness runs it
systemctl disable --now etcd >/dev/null 2>&1 || true

# The extra raw disk holds the node's volumes: labelled pairvol-data once made, found by its
# serial (libvirt) or as the one blank disk (VirtualBox).
node_dir=/var/lib/pairvol/nodes/$host
mkdir -p "$node_dir"
disk=
if [ -e /dev/disk/by-label/pairvol-data ]; then
  disk=/dev/disk/by-label/pairvol-data
elif [ -e /dev/disk/by-id/virtio-pairvol-data ]; then
  disk=/dev/disk/by-id/virtio-pairvol-data
else
  while read -r dev type; do
    [ "$type" = disk ] || continue
    # blank: no partition, no file system or other signature
    if [ "$(lsblk -nro NAME "$dev" | wc -l)" -eq 1 ] && [ -z "$(blkid -p -o value -s TYPE "$dev" || true)" ]; then
      disk=$dev; break
    fi
  done < <(lsblk -dnpro NAME,TYPE)
fi
if [ -z "$disk" ]; then
  say "no extra disk found (VirtualBox: VAGRANT_EXPERIMENTAL=disks vagrant up); the volumes live on the root file system"
else
  if [ "$(blkid -o value -s LABEL "$disk" || true)" != pairvol-data ]; then
    say "making ext4 on $disk for $node_dir"
    mkfs.ext4 -q -L pairvol-data "$disk"
  fi
  grep -q '^LABEL=pairvol-data ' /etc/fstab \
    || echo "LABEL=pairvol-data $node_dir ext4 defaults,nofail 0 2" >> /etc/fstab
  mountpoint -q "$node_dir" || { systemctl daemon-reload; mount "$node_dir"; }
fi

"$python" "$repo/vagrant/lab_config.py" --host "$host" --secrets "$secrets"

# the VMs have the kernel's NBD driver (this machine's host may not): real /dev/nbdN
echo nbd > /etc/modules-load.d/pairvol-nbd.conf
modprobe nbd

systemctl daemon-reload
# Started if not running, never restarted here: restarting the agent of the active host would
# move its resources.  After `vagrant rsync`: systemctl restart pairvol-node@HOST pairvol-agent.
# The node's start waits for its READY=1; the agent's does not (it retries until the witness's
# etcd answers, which may still be booting).
systemctl enable "pairvol-node@$host.service" pairvol-agent.service >/dev/null 2>&1
systemctl start "pairvol-node@$host.service"
systemctl start --no-block pairvol-agent.service
say "node $host is up, its agent starting: systemctl status pairvol-node@$host pairvol-agent"
