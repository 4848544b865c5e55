#!/bin/bash
# Start a throw-away Slurm cluster on this host (Debian: slurmctld slurmd slurm-client munge; run as root).
# Usage: SLURM_LOCAL_DIR=/tmp/slurm-local SLURM_LOCAL_PORT=6817 start.sh [slurm.conf|slurm-2node.conf]
# SLURM_LOCAL_PORT and the next 3 ports are used (controller, slurmd, and per-node slurmd ports), so two
# clusters (e.g. two test runs) can live on one host. Prints the SLURM_CONF to export.
# Adapted from the verified single-host setup (Slurm 22.05.8, Debian 12, no systemd).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
D=${SLURM_LOCAL_DIR:-/tmp/slurm-local}
P=${SLURM_LOCAL_PORT:-6817}
conf_src=${1:-$here/slurm.conf}
[ -f "$conf_src" ] || conf_src=$here/$conf_src
mkdir -p "$D"/state "$D"/spool "$D"/run "$D"/log
sed -e "s#/tmp/slurm-local#$D#g" -e "s#@PORT0@#$P#" -e "s#@PORT1@#$((P + 1))#" \
    -e "s#@PORT2@#$((P + 2))#" -e "s#@PORT3@#$((P + 3))#" "$conf_src" > "$D/slurm.conf"
export SLURM_CONF=$D/slurm.conf
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
chmod 0755 /run/munge
[ -s /etc/munge/munge.key ] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=128 status=none
chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
if ! [ -S /run/munge/munge.socket.2 ] || ! munge -n >/dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged --force
fi
munge -n | unmunge >/dev/null
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
alive "$D/run/slurmctld.pid" || slurmctld -f "$SLURM_CONF" -c
for n in $(scontrol show hostnames "$(sed -n 's/^NodeName=\([^ ]*\).*/\1/p' "$SLURM_CONF" | paste -sd,)"); do
  mkdir -p "$D/spool/$n"
  alive "$D/run/slurmd-$n.pid" || slurmd -f "$SLURM_CONF" -N "$n"
done
nodes=$(scontrol show hostnames "$(sed -n 's/^NodeName=\([^ ]*\).*/\1/p' "$SLURM_CONF" | paste -sd,)" | wc -l)
for _ in $(seq 60); do
  [ "$(sinfo -h -N -o '%T' 2>/dev/null | grep -c '^idle')" -ge "$nodes" ] && break
  sleep 1
done
sinfo -N >&2
echo "export SLURM_CONF=$SLURM_CONF"
