# Network namespaces as SLURM nodes on one machine: sourced by start-local-cluster.sh and stop-local-cluster.sh.
#
# Layout for subnet A.B.C (C also names everything, so two clusters of different subnets never meet):
#   uniemo-C-sw        a namespace holding the bridge br0 (a switch; no address, no routing)
#   uniemo-C-nodeI     one namespace per node: lo, and eth0 = SUBNET.(I+1)/24 plugged into the bridge;
#                      default route via SUBNET.254, which nobody holds (see start-local-cluster.sh)
#   uniemo-C           on this machine: SUBNET.1/24, plugged into the bridge (slurmctld and the clients)
# What was made is listed in DIR/net/created (one "netns NAME" or "link NAME" a line), so that the stop script
# removes exactly that, also after a half-finished start.

# The third octet of the first 10.213.C.0/24 that no address or route of this machine uses and no namespace of
# ours claims.
net_free_subnet() {
    local c used
    used="$(ip -4 -o addr show 2>/dev/null; ip -4 route show table all 2>/dev/null)"
    for c in $(seq 1 254); do
        grep -q "10\.213\.$c\." <<<"$used" && continue
        [ -e "/run/netns/uniemo-$c-sw" ] && continue
        ip link show "uniemo-$c" >/dev/null 2>&1 && continue
        echo "10.213.$c"
        return 0
    done
    return 1
}

# Whether this machine lets us make namespaces and veth pairs (root, iproute2, a kernel with veth and bridge).
net_check() {
    local probe="uniemo-probe-$$"
    command -v ip >/dev/null || { echo "ip (iproute2) is not installed"; return 1; }
    command -v unshare >/dev/null && command -v nsenter >/dev/null \
        || { echo "unshare and nsenter (util-linux) are not installed"; return 1; }
    if ! ip netns add "$probe" 2>/dev/null; then
        echo "cannot create network namespaces here (needs root with CAP_SYS_ADMIN and CAP_NET_ADMIN)"
        return 1
    fi
    if ! ip -n "$probe" link add br0 type bridge 2>/dev/null \
        || ! ip -n "$probe" link add v0 type veth peer name v1 2>/dev/null; then
        ip netns del "$probe" 2>/dev/null || true
        echo "the kernel has no bridge or veth support"
        return 1
    fi
    ip netns del "$probe"
}

_net_made() { echo "$1 $2" >>"$NET_DIR/created"; }

# net_up DIR SUBNET N: the namespaces, links and per-node hosts files of an N-node cluster.
net_up() {  # every step checked: this runs in an `||` list, where set -e does not act
    local dir="$1" subnet="$2" n="$3" c sw i ns
    c="${subnet##*.}"
    NET_DIR="$dir/net"
    mkdir -p "$NET_DIR"
    : >"$NET_DIR/created"
    sw="uniemo-$c-sw"
    ip netns add "$sw" && _net_made netns "$sw" || return 1
    ip -n "$sw" link set lo up || return 1
    ip -n "$sw" link add br0 type bridge || return 1
    ip -n "$sw" link set br0 up || return 1
    # This machine's end: made in the switch's namespace, then moved here (no name can clash while it is made).
    ip -n "$sw" link add host type veth peer name "uniemo-$c" || return 1
    ip -n "$sw" link set "uniemo-$c" netns "$$" && _net_made link "uniemo-$c" || return 1  # into this shell's
    ip -n "$sw" link set host master br0 up || return 1
    ip addr add "$subnet.1/24" dev "uniemo-$c" || return 1
    ip link set "uniemo-$c" up || return 1
    {
        echo "127.0.0.1 localhost"
        echo "::1 localhost"
        echo "$subnet.1 uniemo-$c-ctl"
        for i in $(seq 1 "$n"); do echo "$subnet.$((i + 1)) node$i"; done
    } >"$NET_DIR/hosts"
    for i in $(seq 1 "$n"); do
        ns="uniemo-$c-node$i"
        ip netns add "$ns" && _net_made netns "$ns" || return 1
        ip -n "$sw" link add "n$i" type veth peer name eth0 netns "$ns" || return 1
        ip -n "$sw" link set "n$i" master br0 up || return 1
        ip -n "$ns" link set lo up || return 1
        ip -n "$ns" addr add "$subnet.$((i + 1))/24" dev eth0 || return 1
        ip -n "$ns" link set eth0 up || return 1
        ip -n "$ns" route add default via "$subnet.254" dev eth0 onlink || return 1
    done
}

# net_exec DIR I CMD...: run CMD as node I: in its network namespace, with its host name (a UTS namespace) and the
# cluster's hosts file over /etc/hosts (a mount namespace: the bind mount is seen by this node's processes only).
net_exec() {
    local dir="$1" i="$2" c
    shift 2
    c="$(net_octet "$dir")"
    # nsenter, not `ip netns exec`: that one mounts a fresh /sys, without the cgroup file system slurmd wants.
    nsenter --net="/run/netns/uniemo-$c-node$i" unshare --uts --mount --propagation slave -- sh -c \
        'mount --bind "$1" /etc/hosts && hostname "$2" && shift 2 && exec "$@"' \
        sh "$dir/net/hosts" "node$i" "$@"
}

net_octet() { sed -n 's/^SUBNET=.*\.\([0-9]*\)$/\1/p' "$1/net/env"; }

# net_down DIR: kill what still runs inside the namespaces (job processes, slurmstepd), then remove what net_up
# made, newest first. Idempotent.
net_down() {
    local dir="$1" kind name pid i
    local -a nss=() pids=()
    [ -f "$dir/net/created" ] || return 0
    while read -r kind name; do
        [ "$kind" = netns ] && [ -e "/run/netns/$name" ] && nss+=("$name")
    done <"$dir/net/created"
    for name in "${nss[@]}"; do
        for pid in $(ip netns pids "$name" 2>/dev/null); do kill -TERM "$pid" 2>/dev/null && pids+=("$pid"); done
    done
    for ((i = 0; i < 50; i++)); do
        local alive=0
        for pid in "${pids[@]}"; do [ -e "/proc/$pid" ] && alive=1; done
        [ "$alive" -eq 0 ] && break
        sleep 0.1
    done
    for name in "${nss[@]}"; do
        for pid in $(ip netns pids "$name" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
    done
    tac "$dir/net/created" | while read -r kind name; do
        case "$kind" in
            link) ip link del "$name" 2>/dev/null || true ;;
            netns) ip netns del "$name" 2>/dev/null || true ;;
        esac
    done
    rm -f "$dir/net/created"
}
