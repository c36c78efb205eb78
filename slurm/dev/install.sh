#!/usr/bin/env bash
# Install the SLURM packages the local clusters need (Debian/Ubuntu, as root or with sudo): slurmctld, slurmd, the
# clients and munge, and iproute2 for the namespaces of a several-node cluster (start-local-cluster.sh --nodes N).
#
#   bash slurm/dev/install.sh
#
# Debian 12 gives Slurm 22.05 and munge. The packages' own service scripts need systemd; they are not used:
# slurm/dev/start-local-cluster.sh starts the daemons directly.
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client munge iproute2)

if command -v sbatch >/dev/null && command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
    && command -v munged >/dev/null && command -v ip >/dev/null; then
    echo "slurm/dev/install.sh: SLURM already installed ($(slurmd -V))"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null; then
        SUDO="sudo"
    else
        echo "slurm/dev/install.sh: needs root (or sudo) to apt-get install ${PACKAGES[*]}" >&2
        exit 1
    fi
fi
if ! command -v apt-get >/dev/null; then
    echo "slurm/dev/install.sh: no apt-get here; install ${PACKAGES[*]} with your package manager" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
# policy-rc.d exit 101: package scripts must not try to start the daemons (no systemd; we start them ourselves).
POLICY=/usr/sbin/policy-rc.d
ADDED_POLICY=0
if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null
    $SUDO chmod +x "$POLICY"
    ADDED_POLICY=1
fi
trap '[ "$ADDED_POLICY" = 1 ] && $SUDO rm -f "$POLICY"' EXIT
$SUDO apt-get install -y -q --no-install-recommends "${PACKAGES[@]}"
echo "slurm/dev/install.sh: installed $(slurmd -V), munge and iproute2; start a cluster with slurm/dev/start-local-cluster.sh"
