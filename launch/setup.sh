#!/usr/bin/env bash
# Create .venv (if missing) and install dist_llama with its test dependencies.
# torch is pinned to 2.13.0 here (a CPU wheel on these machines); the package itself accepts newer
# builds, so GPU users can install a CUDA torch first and then `pip install -e .`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
# The Slurm tests start a real two-node cluster on this host (slurm/local/): install it where we can.
if ! command -v sbatch >/dev/null 2>&1 || ! [ -x /usr/sbin/slurmctld ] || ! [ -x /usr/sbin/slurmd ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing Slurm (slurmctld slurmd slurm-client munge) for the Slurm tests" >&2
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
  else
    echo "setup: Slurm is not installed and this is not a root Debian/Ubuntu shell; tests/test_slurm.py" \
         "will fail until slurmctld, slurmd, slurm-client and munge are installed" >&2
  fi
fi
