#!/bin/bash
# Stop the daemons that start.sh started, by their pid files (munged is left running: it is shared).
D=${SLURM_LOCAL_DIR:-/tmp/slurm-local}
for f in "$D"/run/slurmd-*.pid "$D"/run/slurmctld.pid; do
  [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null; rm -f "$f"
done
sleep 1
