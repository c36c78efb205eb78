#!/usr/bin/env bash
# Start a one-node SLURM cluster on this machine (localhost), for tests and for trying the launchers.
#
#   eval "$(bash slurm/dev/start-local-cluster.sh)"      # starts it and exports SLURM_CONF
#   uniemo submit slurm --config configs/demo.yaml training.steps=20
#   bash slurm/dev/stop-local-cluster.sh
#
# Options (each also an environment variable):
#   --dir DIR            state folder: slurm.conf, daemon state, spool, logs, pid files
#                        (UNIEMO_SLURM_DIR, default /tmp/uniemo-slurm; keep it short, munge puts a socket in it)
#   --auth munge|none    munge (a private munged with its own key and socket) or auth/none
#                        (UNIEMO_SLURM_AUTH, default: munge when munged is installed, else none)
#   --ctld-port P        slurmctld port (UNIEMO_SLURM_CTLD_PORT, default 6817)
#   --slurmd-port P      slurmd port (UNIEMO_SLURM_SLURMD_PORT, default 6818)
#   --keep-state         keep the jobs of an earlier cluster in DIR (default: start from a clean state, so jobs
#                        of an earlier killed run do not come back)
#
# Idempotent: when the daemons of DIR are already running, it only prints the export line again. No systemd:
# the daemons are started directly and write pid files under DIR/pids; stop-local-cluster.sh stops only those
# pids. Everything the daemons write stays in DIR; /etc is not touched. Messages go to stderr; stdout carries
# only `export SLURM_CONF=...` for eval.
# Install the packages first with: bash slurm/dev/install.sh
set -euo pipefail

DIR="${UNIEMO_SLURM_DIR:-/tmp/uniemo-slurm}"
AUTH="${UNIEMO_SLURM_AUTH:-}"
CTLD_PORT="${UNIEMO_SLURM_CTLD_PORT:-6817}"
SLURMD_PORT="${UNIEMO_SLURM_SLURMD_PORT:-6818}"
KEEP_STATE=0
while [ $# -gt 0 ]; do
    case "$1" in
        --dir) DIR="$2"; shift 2 ;;
        --auth) AUTH="$2"; shift 2 ;;
        --ctld-port) CTLD_PORT="$2"; shift 2 ;;
        --slurmd-port) SLURMD_PORT="$2"; shift 2 ;;
        --keep-state) KEEP_STATE=1; shift ;;
        -h|--help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "start-local-cluster.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

log() { echo "start-local-cluster.sh: $*" >&2; }
die() { log "$*"; exit 1; }

for tool in slurmctld slurmd scontrol sinfo; do
    command -v "$tool" >/dev/null || die "$tool is not installed; run: bash slurm/dev/install.sh"
done
if [ -z "$AUTH" ]; then
    if command -v munged >/dev/null; then AUTH=munge; else AUTH=none; fi
fi
case "$AUTH" in
    munge) command -v munged >/dev/null || die "munged is not installed; run slurm/dev/install.sh or pass --auth none" ;;
    none) ;;
    *) die "--auth must be munge or none, got $AUTH" ;;
esac
[ "$(id -u)" -eq 0 ] || die "run as root: slurmd starts job processes as their submitting user"

mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"
CONF="$DIR/slurm.conf"
PIDS="$DIR/pids"
export SLURM_CONF="$CONF"

# A pid file names a live process of the expected program (not a recycled pid).
alive() {  # alive NAME
    local pid_file="$PIDS/$1.pid" pid
    [ -s "$pid_file" ] || return 1
    pid="$(cat "$pid_file")"
    [ -r "/proc/$pid/cmdline" ] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "$1" || return 1
}

wanted=(slurmctld slurmd)
[ "$AUTH" = munge ] && wanted=(munged "${wanted[@]}")
running=0
for name in "${wanted[@]}"; do alive "$name" && running=$((running + 1)); done
if [ "$running" -eq "${#wanted[@]}" ] && scontrol ping >/dev/null 2>&1; then
    log "already running in $DIR"
    echo "export SLURM_CONF=$CONF"
    exit 0
fi
if [ -f "$PIDS/slurmctld.pid" ] || [ -f "$PIDS/slurmd.pid" ] || [ -f "$PIDS/munged.pid" ]; then
    log "found a partly running cluster in $DIR; stopping it first"
    bash "$(dirname "$0")/stop-local-cluster.sh" --dir "$DIR" >&2
fi

if [ "$KEEP_STATE" -eq 0 ]; then
    rm -rf "$DIR/state" "$DIR/spool" "$DIR/log" "$PIDS"
fi
mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log" "$PIDS"

# -- munge: a private daemon (own key, socket, pid) run as the munge user --------------------------------------
AUTH_LINES="AuthType=auth/none
CredType=cred/none"
if [ "$AUTH" = munge ]; then
    MDIR="$DIR/munge"
    mkdir -p "$MDIR"
    if [ ! -s "$MDIR/munge.key" ]; then
        head -c 1024 /dev/urandom >"$MDIR/munge.key"
    fi
    MUNGE_USER=root
    id munge >/dev/null 2>&1 && MUNGE_USER=munge
    chown -R "$MUNGE_USER" "$MDIR"
    chmod 0755 "$DIR"  # mktemp makes 0700 folders; the munge user must reach its own sub-folder
    chmod 0700 "$MDIR"
    chmod 0400 "$MDIR/munge.key"
    runuser -u "$MUNGE_USER" -- test -w "$MDIR" \
        || die "the $MUNGE_USER user cannot reach $MDIR (a parent folder is private); use another --dir or --auth none"
    rm -f "$MDIR/munge.socket" "$MDIR/munge.socket.lock"
    # munged refuses a socket folder others can write to unless told the sticky bit is fine (--force).
    runuser -u "$MUNGE_USER" -- munged --force \
        --key-file="$MDIR/munge.key" --socket="$MDIR/munge.socket" --pid-file="$MDIR/munged.pid" \
        --log-file="$MDIR/munged.log" --seed-file="$MDIR/munged.seed" \
        || die "munged did not start; see $MDIR/munged.log"
    for _ in $(seq 50); do [ -S "$MDIR/munge.socket" ] && [ -s "$MDIR/munged.pid" ] && break; sleep 0.1; done
    [ -S "$MDIR/munge.socket" ] || die "munged did not open $MDIR/munge.socket; see $MDIR/munged.log"
    cp "$MDIR/munged.pid" "$PIDS/munged.pid"
    AUTH_LINES="AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MDIR/munge.socket"
fi

# -- slurm.conf: the minimal settings measured to work with Slurm 22.05 without systemd or cgroups -------------
NODE_LINE="$(slurmd -C | head -n 1 | sed -e 's/^NodeName=[^ ]*/NodeName=localhost NodeAddr=127.0.0.1/')"
cat >"$CONF" <<CONF
# Written by slurm/dev/start-local-cluster.sh: a one-node cluster on localhost.
ClusterName=uniemo-local
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
$AUTH_LINES
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$PIDS/slurmctld.pid
SlurmdPidFile=$PIDS/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Without batch_sched_delay=0 each submission waits up to 3 s for the scheduler.
SchedulerParameters=batch_sched_delay=0
DependencyParameters=kill_invalid_depend
# No slurmdbd: job states come from squeue / scontrol show job (sacct is not available).
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
# A finished job stays visible to scontrol this long (s); SIGTERM -> SIGKILL grace on cancel/requeue (s).
MinJobAge=600
KillWait=30
JobRequeue=1
$NODE_LINE State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF

# -- daemons ------------------------------------------------------------------------------------------------------
CTLD_FLAGS=()
[ "$KEEP_STATE" -eq 0 ] && CTLD_FLAGS=(-c)  # cold start: no jobs from an earlier cluster
slurmctld -f "$CONF" "${CTLD_FLAGS[@]}" || die "slurmctld did not start; see $DIR/log/slurmctld.log"
for _ in $(seq 100); do scontrol ping >/dev/null 2>&1 && break; sleep 0.1; done
scontrol ping >/dev/null 2>&1 || die "slurmctld does not answer; see $DIR/log/slurmctld.log"
slurmd -f "$CONF" -N localhost || die "slurmd did not start; see $DIR/log/slurmd.log"

# Ready when the node is idle (up to 30 s; a node left DOWN by an earlier run is resumed).
state=""
for i in $(seq 300); do
    state="$(sinfo -h -n localhost -o %T 2>/dev/null | head -n 1 || true)"
    case "$state" in
        idle|mixed|allocated) break ;;
        down*|drain*) [ $((i % 20)) -eq 0 ] && scontrol update NodeName=localhost State=RESUME >/dev/null 2>&1 || true ;;
    esac
    sleep 0.1
done
case "$state" in
    idle|mixed|allocated) ;;
    *) die "node localhost is '$state', not idle; see $DIR/log/slurmd.log and $DIR/log/slurmctld.log" ;;
esac
for name in "${wanted[@]}"; do alive "$name" || die "$name is not running; see the logs in $DIR"; done
log "one-node cluster up in $DIR (auth: $AUTH, slurmctld port $CTLD_PORT, slurmd port $SLURMD_PORT)"
echo "export SLURM_CONF=$CONF"
