#!/usr/bin/env bash
# Stop the SLURM cluster (one node or --nodes N) that slurm/dev/start-local-cluster.sh started.
#
#   bash slurm/dev/stop-local-cluster.sh [--dir DIR] [--purge]
#
# DIR: as for the start script (UNIEMO_SLURM_DIR, default /run/uniemo-slurm). Cancels the cluster's jobs, then
# stops every slurmd, slurmctld and munged by the pids in DIR/pids (only when the pid still runs that program),
# SIGTERM first and SIGKILL after 10 s. An N-node cluster: then whatever still runs inside its nodes' namespaces,
# and the namespaces and links the start script made (listed in DIR/net/created). Idempotent: a stopped cluster,
# or no DIR at all, is fine; afterwards the cluster can be started again. --purge also deletes DIR.
set -euo pipefail

DIR="${UNIEMO_SLURM_DIR:-/run/uniemo-slurm}"
PURGE=0
while [ $# -gt 0 ]; do
    case "$1" in
        --dir) DIR="$2"; shift 2 ;;
        --purge) PURGE=1; shift ;;
        -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "stop-local-cluster.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

log() { echo "stop-local-cluster.sh: $*" >&2; }
# shellcheck source=slurm/dev/local-nodes.sh
source "$(cd "$(dirname "$0")" && pwd)/local-nodes.sh"

if [ ! -d "$DIR" ]; then
    log "nothing to stop ($DIR does not exist)"
    exit 0
fi
DIR="$(cd "$DIR" && pwd)"
PIDS="$DIR/pids"
export SLURM_CONF="$DIR/slurm.conf"

pid_of() {  # pid_of NAME: the pid in DIR/pids/NAME.pid when that process still runs NAME's program, else nothing
    local pid_file="$PIDS/$1.pid" pid
    [ -s "$pid_file" ] || return 0
    pid="$(cat "$pid_file")"
    [ -r "/proc/$pid/cmdline" ] || return 0
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "${1%%-*}" || return 0  # slurmd-node1: program slurmd
    echo "$pid"
}

stop_pids() {  # stop_pids NAME...: SIGTERM to all, then SIGKILL to those still running after 10 s
    local name pid i alive
    local -a names=() pids=()
    for name in "$@"; do
        pid="$(pid_of "$name")"
        if [ -n "$pid" ]; then
            kill -TERM "$pid" 2>/dev/null || true
            names+=("$name")
            pids+=("$pid")
        fi
        rm -f "$PIDS/$name.pid"
    done
    for ((i = 0; i < 100; i++)); do
        alive=0
        for pid in "${pids[@]}"; do [ -e "/proc/$pid" ] && alive=1; done
        [ "$alive" -eq 0 ] && break
        sleep 0.1
    done
    for i in "${!pids[@]}"; do
        if [ -e "/proc/${pids[$i]}" ]; then
            log "${names[$i]} (pid ${pids[$i]}) ignored SIGTERM for 10 s; sending SIGKILL"
            kill -KILL "${pids[$i]}" 2>/dev/null || true
        fi
        log "stopped ${names[$i]} (pid ${pids[$i]})"
    done
}

# Cancel this cluster's jobs first, so their job steps end under slurmd's control (no orphans).
if [ -n "$(pid_of slurmctld)" ] && command -v squeue >/dev/null; then
    jobs="$(squeue -h -o %A 2>/dev/null || true)"
    if [ -n "$jobs" ]; then
        # shellcheck disable=SC2086
        scancel $jobs 2>/dev/null || true
        for _ in $(seq 200); do
            [ -z "$(squeue -h -o %A 2>/dev/null || true)" ] && break
            sleep 0.1
        done
    fi
fi

slurmds=()
for pid_file in "$PIDS"/slurmd*.pid; do [ -e "$pid_file" ] && slurmds+=("$(basename "$pid_file" .pid)"); done
stop_pids "${slurmds[@]}" slurmctld  # together: each takes ~2 s to shut down
stop_pids munged
if [ -f "$DIR/net/created" ]; then
    net_down "$DIR"
    log "removed the nodes' namespaces and links"
fi
if [ "$PURGE" -eq 1 ]; then
    rm -rf "$DIR"
    log "removed $DIR"
fi
