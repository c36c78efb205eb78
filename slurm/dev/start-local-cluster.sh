#!/usr/bin/env bash
# Start a SLURM cluster on this machine, for tests and for trying the launchers: one node on localhost (default),
# or N nodes, each a network namespace of its own with its own host name and address (--nodes N).
#
#   eval "$(bash slurm/dev/start-local-cluster.sh)"              # one node; starts it and exports SLURM_CONF
#   eval "$(bash slurm/dev/start-local-cluster.sh --nodes 2)"    # two nodes, node1 and node2
#   uniemo submit slurm --config configs/demo.yaml training.steps=20
#   bash slurm/dev/stop-local-cluster.sh
#
# Options (each also an environment variable):
#   --nodes N            number of nodes (UNIEMO_SLURM_NODES, default 1). N >= 2: node1..nodeN, each one slurmd in
#                        its own network, UTS and mount namespace (host name nodeI, address SUBNET.(I+1), its own
#                        /etc/hosts naming all nodes, bind-mounted inside the namespace only); the namespaces meet on
#                        a bridge inside a further namespace of ours, and this machine reaches them through one veth
#                        pair with address SUBNET.1, where slurmctld listens. Nothing is routed off the machine
#                        (see "Networking of --nodes N" below). Namespaces, not Slurm's multiple-slurmd mode:
#                        those nodes would share one host name and 127.0.0.1, while Ray and gloo find a node's
#                        address from its host name and routes, as on a real cluster.
#   --subnet A.B.C       the nodes' /24 (UNIEMO_SLURM_SUBNET, default: the first free 10.213.C, C = 1..254)
#   --dir DIR            state folder: slurm.conf, daemon state, spool, logs, pid files, munge's key and socket
#                        (UNIEMO_SLURM_DIR, default /run/uniemo-slurm; keep it short, munge puts a socket in it).
#                        It must be root's alone: made 0700 when new, else checked to be a real folder owned by
#                        root that no one else can write (nor its parent, unless sticky like /tmp); then 0700,
#                        or 0710 with munge's group, so that munged reaches its own sub-folder
#   --auth munge|none    munge (a private munged with a fresh random key each start, its own socket), or auth/none
#                        (UNIEMO_SLURM_AUTH, default munge). auth/none only when asked for: with it any local user
#                        can talk to the daemons as anyone, root included
#   --ctld-port P        slurmctld port (UNIEMO_SLURM_CTLD_PORT, default 6817)
#   --slurmd-port P      slurmd port (UNIEMO_SLURM_SLURMD_PORT, default 6818)
#   --keep-state         keep the jobs of an earlier cluster in DIR (default: start from a clean state, so jobs
#                        of an earlier killed run do not come back)
#
# Idempotent: when the daemons of DIR are already running, it only prints the export line again. No systemd:
# the daemons are started directly and write pid files under DIR/pids; stop-local-cluster.sh stops only those
# pids (and, for N nodes, the processes inside the namespaces it made, then the namespaces and links). Everything
# the daemons write stays in DIR; /etc is not touched. Messages go to stderr; stdout carries only
# `export SLURM_CONF=...` for eval.
# Install the packages first with: bash slurm/dev/install.sh
#
# Networking of --nodes N: interfaces and namespaces are named after the subnet's third octet C: namespaces
# uniemo-C-sw (the bridge) and uniemo-C-node1..N, and on this machine one link uniemo-C (address SUBNET.1/24). A
# node's default route points at SUBNET.254, an address nobody holds: programs that find their own address from
# the route to the internet (Ray does) get the node's address, and a packet meant for elsewhere goes nowhere.
set -euo pipefail

DIR="${UNIEMO_SLURM_DIR:-/run/uniemo-slurm}"
AUTH="${UNIEMO_SLURM_AUTH:-}"
CTLD_PORT="${UNIEMO_SLURM_CTLD_PORT:-6817}"
SLURMD_PORT="${UNIEMO_SLURM_SLURMD_PORT:-6818}"
NODES="${UNIEMO_SLURM_NODES:-1}"
SUBNET="${UNIEMO_SLURM_SUBNET:-}"
KEEP_STATE=0
usage_error() { echo "start-local-cluster.sh: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
    case "$1" in
        --dir|--auth|--ctld-port|--slurmd-port|--nodes|--subnet)
            [ $# -ge 2 ] || usage_error "$1 needs a value (see --help)" ;;&
        --dir) DIR="$2"; shift 2 ;;
        --auth) AUTH="$2"; shift 2 ;;
        --ctld-port) CTLD_PORT="$2"; shift 2 ;;
        --slurmd-port) SLURMD_PORT="$2"; shift 2 ;;
        --nodes) NODES="$2"; shift 2 ;;
        --subnet) SUBNET="$2"; shift 2 ;;
        --keep-state) KEEP_STATE=1; shift ;;
        -h|--help) sed -n '2,43p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) usage_error "unknown option $1 (see --help)" ;;
    esac
done
[[ "$NODES" =~ ^[1-9][0-9]*$ ]] && [ "$NODES" -le 64 ] || usage_error "--nodes must be a whole number 1..64, got '$NODES'"
if [ -n "$SUBNET" ]; then
    [[ "$SUBNET" =~ ^([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})$ ]] && [ "${BASH_REMATCH[3]}" -ge 1 ] \
        && [ "${BASH_REMATCH[3]}" -le 254 ] || usage_error "--subnet must be the first three parts of a /24 such as 10.213.7, got '$SUBNET'"
fi

log() { echo "start-local-cluster.sh: $*" >&2; }
die() { log "$*"; exit 1; }
refuse() { log "$*"; exit 2; }  # a setting the user must change (exit 2, as usage errors)
HERE="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=slurm/dev/local-nodes.sh
source "$HERE/local-nodes.sh"

for tool in slurmctld slurmd scontrol sinfo; do
    command -v "$tool" >/dev/null || die "$tool is not installed; run: bash slurm/dev/install.sh"
done
AUTH="${AUTH:-munge}"
case "$AUTH" in
    munge) command -v munged >/dev/null || refuse "munged is not installed; run slurm/dev/install.sh (or pass --auth none" \
        "to run without authentication: any local user could then act as anyone, root included)" ;;
    none) log "warning: --auth none: the daemons authenticate no one; any local user can submit jobs as any user," \
        "root included. Use it only on a machine of your own" ;;
    *) usage_error "--auth must be munge or none, got $AUTH" ;;
esac
[ "$(id -u)" -eq 0 ] || die "run as root: slurmd starts job processes as their submitting user"

# -- the state folder: root's alone (a folder someone else made first would hand them the key or the config) ------
case "$DIR" in /*) ;; *) DIR="$PWD/$DIR" ;; esac
PARENT="$(dirname "$DIR")"
mkdir -p -- "$PARENT"
if [ ! -e "$DIR" ] && [ ! -L "$DIR" ]; then
    mkdir -m 0700 -- "$DIR" || refuse "could not create $DIR"
fi
# mode_of PATH: the octal permission bits (stat -c %a; 4 digits with a sticky or set-id bit)
mode_of() { stat -c %a -- "$1"; }
[ -L "$DIR" ] && refuse "$DIR is a symbolic link; give a real folder (--dir) that only root can write"
[ -d "$DIR" ] || refuse "$DIR is not a folder; give another --dir"
[ "$(stat -c %u -- "$DIR")" = 0 ] || refuse "$DIR is owned by $(stat -c %U -- "$DIR"), not root: someone else made it;" \
    "remove it or give another --dir"
[ $((8#$(mode_of "$DIR") & 8#022)) -eq 0 ] || refuse "$DIR can be written by others (mode $(mode_of "$DIR")); remove it" \
    "or give another --dir"
parent_mode=$((8#$(mode_of "$PARENT")))
if [ $((parent_mode & 8#022)) -ne 0 ] && [ $((parent_mode & 8#1000)) -eq 0 ]; then
    refuse "$PARENT can be written by others and is not sticky: the state folder could be swapped; give another --dir"
fi
chmod 0700 "$DIR"  # root's; munge's group may pass through to its own sub-folder (below)
DIR="$(cd "$DIR" && pwd -P)"
CONF="$DIR/slurm.conf"
PIDS="$DIR/pids"
export SLURM_CONF="$CONF"

if [ "$NODES" -eq 1 ]; then
    NODE_NAMES=(localhost)
else
    NODE_NAMES=()
    for i in $(seq 1 "$NODES"); do NODE_NAMES+=("node$i"); done
fi
# The pid file of each daemon: DIR/pids/NAME.pid, NAME = program[-node].
slurmd_name() { if [ "$NODES" -eq 1 ]; then echo slurmd; else echo "slurmd-$1"; fi; }

# A pid file names a live process of the expected program (not a recycled pid).
alive() {  # alive NAME
    local pid_file="$PIDS/$1.pid" pid
    [ -s "$pid_file" ] || return 1
    pid="$(cat "$pid_file")"
    [ -r "/proc/$pid/cmdline" ] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "${1%%-*}" || return 1
}

wanted=(slurmctld)
for node in "${NODE_NAMES[@]}"; do wanted+=("$(slurmd_name "$node")"); done
[ "$AUTH" = munge ] && wanted=(munged "${wanted[@]}")
running=0
for name in "${wanted[@]}"; do alive "$name" && running=$((running + 1)); done
if [ "$running" -eq "${#wanted[@]}" ] && scontrol ping >/dev/null 2>&1 \
    && [ "$(grep -c '^NodeName=' "$CONF" 2>/dev/null)" = "$NODES" ]; then
    log "already running in $DIR"
    echo "export SLURM_CONF=$CONF"
    exit 0
fi
if compgen -G "$PIDS/*.pid" >/dev/null || [ -f "$DIR/net/created" ]; then
    log "found a partly running (or differently sized) cluster in $DIR; stopping it first"
    bash "$HERE/stop-local-cluster.sh" --dir "$DIR" >&2
fi

if [ "$KEEP_STATE" -eq 0 ]; then
    rm -rf "$DIR/state" "$DIR/spool" "$DIR/log" "$PIDS"
fi
mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log" "$PIDS"

# -- the nodes' network (N >= 2) ----------------------------------------------------------------------------------
CTLD_ADDR=127.0.0.1
if [ "$NODES" -gt 1 ]; then
    problem="$(net_check)" || die "--nodes $NODES: $problem; a one-node cluster (without --nodes) needs none of it"
    if [ -z "$SUBNET" ]; then
        SUBNET="$(net_free_subnet)" || die "no free 10.213.C.0/24 on this machine; pass --subnet A.B.C"
    elif ip -4 -o addr show | grep -q " $SUBNET\." || [ -e "/run/netns/uniemo-${SUBNET##*.}-sw" ]; then
        die "--subnet $SUBNET is in use on this machine; choose another (or leave it out)"
    fi
    mkdir -p "$DIR/net"
    echo "SUBNET=$SUBNET" >"$DIR/net/env"
    net_up "$DIR" "$SUBNET" "$NODES" || { net_down "$DIR"; die "could not create the nodes' namespaces"; }
    CTLD_ADDR="$SUBNET.1"
fi

# -- munge: a private daemon (a fresh key every start, own socket, pid) run as the munge user ---------------------
AUTH_LINES="AuthType=auth/none
CredType=cred/none"
if [ "$AUTH" = munge ]; then
    MDIR="$DIR/munge"
    rm -rf -- "$MDIR"  # a key of an earlier start (or anything else) is never reused
    mkdir -m 0700 -- "$MDIR"
    (umask 077 && head -c 1024 /dev/urandom >"$MDIR/munge.key")
    MUNGE_USER=root
    id munge >/dev/null 2>&1 && MUNGE_USER=munge
    if [ "$MUNGE_USER" != root ]; then
        chgrp "$(id -g munge)" "$DIR" && chmod 0710 "$DIR"  # munged reaches its sub-folder; no one else gets in
    fi
    chown -R "$MUNGE_USER" "$MDIR"
    chmod 0400 "$MDIR/munge.key"
    runuser -u "$MUNGE_USER" -- test -w "$MDIR" \
        || die "the $MUNGE_USER user cannot reach $MDIR (a parent folder is private); use another --dir"
    # munged refuses a socket folder others can write to unless told the sticky bit is fine (--force).
    # One munged serves every node: its socket is a file, which the nodes' namespaces reach like any file.
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
HARDWARE="$(slurmd -C | head -n 1 | sed -e 's/^NodeName=[^ ]* *//')"
NODE_LINES=""
if [ "$NODES" -eq 1 ]; then
    NODE_LINES="NodeName=localhost NodeAddr=127.0.0.1 $HARDWARE State=UNKNOWN"
    PARTITION_NODES=localhost
    SLURMD_FILES="SlurmdSpoolDir=$DIR/spool
SlurmdPidFile=$PIDS/slurmd.pid
SlurmdLogFile=$DIR/log/slurmd.log"
    DESCRIPTION="a one-node cluster on localhost"
else
    for i in $(seq 1 "$NODES"); do
        NODE_LINES+="NodeName=node$i NodeAddr=$SUBNET.$((i + 1)) $HARDWARE State=UNKNOWN"$'\n'
    done
    PARTITION_NODES="node[1-$NODES]"
    # %n: the node's name (one slurmd per node, all on this machine).
    SLURMD_FILES="SlurmdSpoolDir=$DIR/spool/%n
SlurmdPidFile=$PIDS/slurmd-%n.pid
SlurmdLogFile=$DIR/log/slurmd-%n.log"
    DESCRIPTION="$NODES nodes on this machine, each a network namespace (slurm/dev/local-nodes.sh), every node
# the whole machine's CPUs and memory"
fi
CONF_TMP="$(mktemp "$DIR/.slurm.conf.XXXXXX")"  # a new file, then renamed: never written through a link
cat >"$CONF_TMP" <<CONF
# Written by slurm/dev/start-local-cluster.sh: $DESCRIPTION.
ClusterName=uniemo-local
SlurmctldHost=localhost($CTLD_ADDR)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
$AUTH_LINES
StateSaveLocation=$DIR/state
SlurmctldPidFile=$PIDS/slurmctld.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
$SLURMD_FILES
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
${NODE_LINES%$'\n'}
PartitionName=debug Nodes=$PARTITION_NODES Default=YES MaxTime=INFINITE State=UP
CONF
chmod 0644 "$CONF_TMP"  # clients (sbatch as any user) read it
mv -f -- "$CONF_TMP" "$CONF"

# -- daemons ------------------------------------------------------------------------------------------------------
CTLD_FLAGS=()
[ "$KEEP_STATE" -eq 0 ] && CTLD_FLAGS=(-c)  # cold start: no jobs from an earlier cluster
slurmctld -f "$CONF" "${CTLD_FLAGS[@]}" || die "slurmctld did not start; see $DIR/log/slurmctld.log"
for _ in $(seq 100); do scontrol ping >/dev/null 2>&1 && break; sleep 0.1; done
scontrol ping >/dev/null 2>&1 || die "slurmctld does not answer; see $DIR/log/slurmctld.log"
if [ "$NODES" -eq 1 ]; then
    slurmd -f "$CONF" -N localhost || die "slurmd did not start; see $DIR/log/slurmd.log"
else
    for i in $(seq 1 "$NODES"); do
        mkdir -p "$DIR/spool/node$i"
        net_exec "$DIR" "$i" slurmd -f "$CONF" -N "node$i" || die "slurmd of node$i did not start; see $DIR/log/slurmd-node$i.log"
    done
fi

# Ready when every node is idle (up to 30 s; a node left DOWN by an earlier run is resumed).
ready=0
for i in $(seq 300); do
    states="$(sinfo -h -N -p debug -o '%N %T' 2>/dev/null || true)"
    if [ "$(grep -cE ' (idle|mixed|allocated)$' <<<"$states")" -eq "$NODES" ]; then ready=1; break; fi
    if [ $((i % 20)) -eq 0 ] && grep -qE ' (down|drain)' <<<"$states"; then
        scontrol update NodeName="$PARTITION_NODES" State=RESUME >/dev/null 2>&1 || true
    fi
    sleep 0.1
done
[ "$ready" -eq 1 ] || die "nodes not idle: $(tr '\n' ' ' <<<"$states"); see the logs in $DIR/log"
for name in "${wanted[@]}"; do alive "$name" || die "$name is not running; see the logs in $DIR"; done
if [ "$NODES" -eq 1 ]; then
    log "one-node cluster up in $DIR (auth: $AUTH, slurmctld port $CTLD_PORT, slurmd port $SLURMD_PORT)"
else
    log "$NODES-node cluster up in $DIR (auth: $AUTH; slurmctld at $CTLD_ADDR:$CTLD_PORT; nodes" \
        "node1..node$NODES at $SUBNET.2..$SUBNET.$((NODES + 1)), slurmd port $SLURMD_PORT)"
fi
echo "export SLURM_CONF=$CONF"
