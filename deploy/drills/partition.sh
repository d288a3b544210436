#!/usr/bin/env bash
# partition.sh: network fault drills for tidemesh on one Linux host.
#
# It builds three network namespaces joined by veth pairs,
#
#     <prefix>-spoke  ──veth──  <prefix>-router  ──veth──  <prefix>-hub
#      10.203.1.2           10.203.1.1 | 10.203.2.1          10.203.2.2
#
# and applies faults in the ROUTER namespace only. The spoke and the hub therefore see
# silence: sends succeed and nothing comes back, which is what a real WAN outage looks like.
# Faults applied in the sender's own namespace (link down, blackhole route) return
# ENETUNREACH or EINVAL on send instead, and that exercises a different code path.
#
# Run `partition.sh --help` for usage. See README.md next to this file for drills
# against the real tidemesh-hub and tidemesh-spoke binaries.
set -euo pipefail

readonly PROG=${0##*/}

PREFIX=${TIDEMESH_DRILL_PREFIX:-tmd}
STATE_ROOT=${TIDEMESH_DRILL_STATE_DIR:-/run/tidemesh-drill}
BACKEND_OVERRIDE=${TIDEMESH_DRILL_BACKEND:-auto}
TBF_LATENCY=${TIDEMESH_DRILL_TBF_LATENCY:-200ms}

usage() {
    cat <<EOF
Usage: $PROG COMMAND [ARGS] [--direction both|to-hub|to-spoke]

Builds a three-namespace topology (spoke - router - hub) and injects faults in the router,
so that a partition is silent for both ends: senders get no errors and receivers get nothing.

Topology:
  setup                    create namespaces, veth pairs, addresses, routes and forwarding
                           (idempotent); detects whether this kernel has tc netem
  teardown                 stop a running flap and any process left in the namespaces, then
                           delete the namespaces and everything in them (idempotent)
  status                   print the topology, the fault backend and the active faults
  addr spoke|hub           print the namespace's IPv4 address
  addr router-spoke|router-hub
                           print the router's address on the spoke or hub side
  exec spoke|hub|router CMD [ARGS...]
                           run CMD inside that namespace (for example tidemesh-hub serve)

Faults (all applied in the router namespace):
  partition [--direction D]   drop every forwarded packet in direction D (nftables, one
                              table); replaces a previous partition; default both
  heal                        remove all faults (partition, loss, delay, rate) and stop a flap
  loss PCT [--direction D]    drop PCT percent (0-100, one decimal) of packets; 0 clears it
  delay MS [JITTER_MS] [--direction D]
                              add one-way delay per direction (needs tc netem); 0 clears it
  rate RATE [--direction D]   cap bandwidth with tc tbf; RATE like 256kbit, 1mbit, 10mbit;
                              "off" clears it
  flap UP_S DOWN_S COUNT [--direction D]
                              COUNT times: partition for DOWN_S seconds, then heal the
                              partition and wait UP_S seconds (no wait after the last heal);
                              runs in the foreground and heals the partition on Ctrl-C

  D is one of: both (default), to-hub (spoke->hub packets are dropped), to-spoke
  (hub->spoke packets are dropped). loss, delay and rate set the given direction(s) and leave
  the other direction as it is; faults of different kinds stack.

Environment:
  TIDEMESH_DRILL_PREFIX      name prefix for namespaces, links and nft tables (default tmd;
                             lowercase letters and digits, at most 10, starting with a letter).
                             Use a distinct prefix per parallel CI job.
  TIDEMESH_DRILL_BACKEND     auto (default), netem or nft: force the fault backend
  TIDEMESH_DRILL_STATE_DIR   where fault state is kept (default /run/tidemesh-drill)
  TIDEMESH_DRILL_TBF_LATENCY queue limit of the tbf rate cap (default 200ms)

Backends: "netem" uses tc netem for loss and delay; "nft" (kernels without sch_netem) uses
nftables "numgen random" for loss and cannot add delay: use the tidemesh-relay (simulations/)
for delay and jitter. Rate caps always use tc tbf, partitions always use nftables.

Examples:
  sudo $PROG setup
  sudo $PROG exec hub tidemesh-hub serve --data-dir /tmp/hub --listen "\$($PROG addr hub):7443" &
  sudo $PROG partition --direction to-hub
  sudo $PROG status
  sudo $PROG heal
  sudo $PROG teardown
EOF
}

die() {
    echo "$PROG: error: $*" >&2
    exit 1
}

log() {
    echo "[$PREFIX] $*" >&2
}

# ---------------------------------------------------------------------------------------
# Names and addresses. Everything this script creates carries the prefix.

[[ $PREFIX =~ ^[a-z][a-z0-9]{0,9}$ ]] ||
    die "invalid TIDEMESH_DRILL_PREFIX '$PREFIX': use 1-10 lowercase letters or digits, starting with a letter (interface names are limited to 15 characters)"

readonly NS_SPOKE=$PREFIX-spoke NS_ROUTER=$PREFIX-router NS_HUB=$PREFIX-hub
readonly IF_SPOKE=$PREFIX-sp   # in the spoke namespace
readonly IF_R_SPOKE=$PREFIX-rs # in the router namespace, facing the spoke
readonly IF_R_HUB=$PREFIX-rh   # in the router namespace, facing the hub
readonly IF_HUB=$PREFIX-hb     # in the hub namespace
readonly IF_PROBE_A=$PREFIX-pa IF_PROBE_B=$PREFIX-pb # temporary, for netem detection
readonly ALL_IFS=("$IF_SPOKE" "$IF_R_SPOKE" "$IF_R_HUB" "$IF_HUB" "$IF_PROBE_A" "$IF_PROBE_B")

# The namespaces are isolated, so parallel runs with different prefixes can reuse these.
readonly ADDR_SPOKE=10.203.1.2 ADDR_R_SPOKE=10.203.1.1
readonly ADDR_HUB=10.203.2.2 ADDR_R_HUB=10.203.2.1
readonly NET_SPOKE=10.203.1.0/24 NET_HUB=10.203.2.0/24

readonly TABLE_PART=${PREFIX}_partition TABLE_LOSS=${PREFIX}_loss
readonly STATE_DIR=$STATE_ROOT/$PREFIX
readonly FLAP_PIDFILE=$STATE_DIR/flap.pid

# ---------------------------------------------------------------------------------------
# Helpers

need_root() {
    [[ $EUID -eq 0 ]] || die "must run as root (creating namespaces and qdiscs needs CAP_NET_ADMIN); try: sudo $PROG $*"
}

need_cmd() {
    local c
    for c in "$@"; do
        command -v "$c" >/dev/null 2>&1 || case $c in
            nft) die "nft not found: install nftables (apt-get install -y nftables)" ;;
            ip | tc) die "$c not found: install iproute2 (apt-get install -y iproute2)" ;;
            *) die "$c not found" ;;
        esac
    done
}

ns_exists() {
    local names
    names=$(ip netns list 2>/dev/null | awk '{print $1}')
    [[ $'\n'$names$'\n' == *$'\n'"$1"$'\n'* ]]
}

link_exists() { # NS IFNAME (NS "" = root namespace)
    if [[ -z $1 ]]; then
        ip link show dev "$2" >/dev/null 2>&1
    else
        ip -n "$1" link show dev "$2" >/dev/null 2>&1
    fi
}

rns() { ip netns exec "$NS_ROUTER" "$@"; }

require_topology() {
    local ns
    for ns in "$NS_SPOKE" "$NS_ROUTER" "$NS_HUB"; do
        ns_exists "$ns" || die "namespace $ns does not exist: run '$PROG setup' first (prefix '$PREFIX')"
    done
}

ns_for_role() {
    case ${1:-} in
        spoke) echo "$NS_SPOKE" ;;
        hub) echo "$NS_HUB" ;;
        router) echo "$NS_ROUTER" ;;
        *) die "unknown role '${1:-}': expected spoke, hub or router" ;;
    esac
}

# DIRECTION -> the directions it covers
expand_direction() {
    case $1 in
        both) echo "to-hub to-spoke" ;;
        to-hub | to-spoke) echo "$1" ;;
        *) die "invalid direction '$1': expected both, to-hub or to-spoke" ;;
    esac
}

# Interfaces a packet travelling in DIRECTION enters and leaves the router by.
dir_in() { [[ $1 == to-hub ]] && echo "$IF_R_SPOKE" || echo "$IF_R_HUB"; }
dir_out() { [[ $1 == to-hub ]] && echo "$IF_R_HUB" || echo "$IF_R_SPOKE"; }

state_get() { # DIRECTION KEY DEFAULT
    local f=$STATE_DIR/$1.$2
    if [[ -s $f ]]; then cat "$f"; else echo "$3"; fi
}

state_set() { # DIRECTION KEY VALUE ("" or 0 removes)
    mkdir -p "$STATE_DIR"
    local f=$STATE_DIR/$1.$2
    if [[ -z $3 || $3 == 0 ]]; then rm -f "$f"; else echo "$3" >"$f"; fi
}

# ---------------------------------------------------------------------------------------
# Backend detection: try a netem qdisc on a throwaway veth pair in the router namespace.

detect_netem() {
    local err rc=0
    ip -n "$NS_ROUTER" link del "$IF_PROBE_A" >/dev/null 2>&1 || true
    ip -n "$NS_ROUTER" link add "$IF_PROBE_A" type veth peer name "$IF_PROBE_B" ||
        die "could not create the probe veth pair in $NS_ROUTER"
    err=$(rns tc qdisc add dev "$IF_PROBE_A" root netem delay 1ms 2>&1) || rc=$?
    rns tc qdisc del dev "$IF_PROBE_A" root >/dev/null 2>&1 || true
    ip -n "$NS_ROUTER" link del "$IF_PROBE_A" >/dev/null 2>&1 || true
    if [[ $rc -eq 0 ]]; then
        echo "available"
    else
        echo "unavailable (${err//$'\n'/ })"
    fi
}

# Prints netem or nft. Detects once per topology and remembers it in the state directory.
backend() {
    case $BACKEND_OVERRIDE in
        netem | nft)
            echo "$BACKEND_OVERRIDE"
            return
            ;;
        auto) ;;
        *) die "invalid TIDEMESH_DRILL_BACKEND '$BACKEND_OVERRIDE': expected auto, netem or nft" ;;
    esac
    if [[ ! -s $STATE_DIR/backend ]]; then
        local netem
        netem=$(detect_netem)
        mkdir -p "$STATE_DIR"
        echo "$netem" >"$STATE_DIR/netem"
        if [[ $netem == available ]]; then echo netem >"$STATE_DIR/backend"; else echo nft >"$STATE_DIR/backend"; fi
    fi
    cat "$STATE_DIR/backend"
}

describe_backend() {
    local b netem
    b=$(backend)
    netem=$(cat "$STATE_DIR/netem" 2>/dev/null || echo "not probed")
    if [[ $b == netem ]]; then
        echo "backend netem: loss and delay via tc netem, rate via tc tbf, partition via nftables (netem: $netem)"
    else
        echo "backend nft: loss via nftables numgen, rate via tc tbf, partition via nftables; delay needs tidemesh-relay (netem: $netem)"
    fi
    [[ $BACKEND_OVERRIDE == auto ]] || echo "  (forced by TIDEMESH_DRILL_BACKEND=$BACKEND_OVERRIDE)"
}

# ---------------------------------------------------------------------------------------
# setup / teardown

ensure_veth() { # NS_A IF_A NS_B IF_B
    local a_ok=0 b_ok=0
    link_exists "$1" "$2" && a_ok=1
    link_exists "$3" "$4" && b_ok=1
    if [[ $a_ok -eq 1 && $b_ok -eq 1 ]]; then return 0; fi
    # A half-built pair (one end elsewhere): remove whatever exists and start again.
    [[ $a_ok -eq 1 ]] && ip -n "$1" link del "$2"
    [[ $b_ok -eq 1 ]] && ip -n "$3" link del "$4"
    if link_exists "" "$2"; then ip link del "$2"; fi
    if link_exists "" "$4"; then ip link del "$4"; fi
    ip link add "$2" netns "$1" type veth peer name "$4" netns "$3" ||
        die "could not create veth pair $2/$4"
}

cmd_setup() {
    need_root setup
    need_cmd ip tc nft
    local ns
    for ns in "$NS_SPOKE" "$NS_ROUTER" "$NS_HUB"; do
        ns_exists "$ns" || ip netns add "$ns" || die "could not create namespace $ns"
        ip -n "$ns" link set lo up
        # IPv6 is not used by the drill; keep neighbour discovery chatter out of the counters.
        ip netns exec "$ns" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 >/dev/null 2>&1 || true
    done
    ensure_veth "$NS_SPOKE" "$IF_SPOKE" "$NS_ROUTER" "$IF_R_SPOKE"
    ensure_veth "$NS_HUB" "$IF_HUB" "$NS_ROUTER" "$IF_R_HUB"

    ip -n "$NS_SPOKE" addr replace "$ADDR_SPOKE/24" dev "$IF_SPOKE"
    ip -n "$NS_ROUTER" addr replace "$ADDR_R_SPOKE/24" dev "$IF_R_SPOKE"
    ip -n "$NS_ROUTER" addr replace "$ADDR_R_HUB/24" dev "$IF_R_HUB"
    ip -n "$NS_HUB" addr replace "$ADDR_HUB/24" dev "$IF_HUB"
    ip -n "$NS_SPOKE" link set "$IF_SPOKE" up
    ip -n "$NS_ROUTER" link set "$IF_R_SPOKE" up
    ip -n "$NS_ROUTER" link set "$IF_R_HUB" up
    ip -n "$NS_HUB" link set "$IF_HUB" up

    # Only the two drill subnets are routed: nothing can leave the namespaces.
    ip -n "$NS_SPOKE" route replace "$NET_HUB" via "$ADDR_R_SPOKE" dev "$IF_SPOKE"
    ip -n "$NS_HUB" route replace "$NET_SPOKE" via "$ADDR_R_HUB" dev "$IF_HUB"
    rns sysctl -qw net.ipv4.ip_forward=1

    log "topology ready: spoke $ADDR_SPOKE ($NS_SPOKE) <-> router $ADDR_R_SPOKE|$ADDR_R_HUB ($NS_ROUTER) <-> hub $ADDR_HUB ($NS_HUB)"
    log "$(describe_backend)"
}

flap_pid() { # prints the pid of a running flap for this prefix, if any
    local pid
    [[ -s $FLAP_PIDFILE ]] || return 1
    pid=$(cat "$FLAP_PIDFILE")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q 'flap' || return 1
    echo "$pid"
}

stop_flap() {
    local pid i
    pid=$(flap_pid) || {
        rm -f "$FLAP_PIDFILE"
        return 0
    }
    log "stopping flap (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 30; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    rm -f "$FLAP_PIDFILE"
}

stop_ns_processes() { # NS
    local pids pid i comm
    pids=$(ip netns pids "$1" 2>/dev/null || true)
    [[ -n $pids ]] || return 0
    for pid in $pids; do
        comm=$(cat "/proc/$pid/comm" 2>/dev/null || echo '?')
        log "stopping pid $pid ($comm) still running in $1"
        kill -TERM "$pid" 2>/dev/null || true
    done
    for ((i = 0; i < 30; i++)); do
        pids=$(ip netns pids "$1" 2>/dev/null || true)
        [[ -n $pids ]] || return 0
        sleep 0.1
    done
    for pid in $pids; do
        log "pid $pid did not exit after SIGTERM, sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    done
    sleep 0.2
}

cmd_teardown() {
    need_root teardown
    need_cmd ip
    local ns ifname
    stop_flap
    for ns in "$NS_SPOKE" "$NS_HUB" "$NS_ROUTER"; do
        if ns_exists "$ns"; then
            stop_ns_processes "$ns"
            # Deleting the namespace removes its veth ends, nft tables and qdiscs with it.
            ip netns del "$ns" || die "could not delete namespace $ns"
        fi
    done
    # Leftovers of an interrupted setup in the root namespace (only our exact names).
    for ifname in "${ALL_IFS[@]}"; do
        if link_exists "" "$ifname"; then ip link del "$ifname" || true; fi
    done
    rm -rf "$STATE_DIR"
    rmdir "$STATE_ROOT" 2>/dev/null || true
    log "teardown done: no namespaces, links, nft tables or state left for prefix '$PREFIX'"
}

# ---------------------------------------------------------------------------------------
# nftables faults. Each kind of fault lives in its own table in the router namespace, so it
# is replaced or removed in one atomic transaction ("add table; delete table" is a no-op
# safe delete, followed by the new table in the same nft -f run).

nft_replace_table() { # TABLE RULES... (empty RULES: just delete the table)
    local table=$1
    shift
    {
        echo "table inet $table {}"
        echo "delete table inet $table"
        if [[ $# -gt 0 ]]; then
            echo "table inet $table {"
            echo "  chain forward {"
            echo "    type filter hook forward priority -10; policy accept;"
            printf '    %s\n' "$@"
            echo "  }"
            # Input too, so faults also hit traffic for a relay running in the router.
            echo "  chain input {"
            echo "    type filter hook input priority -10; policy accept;"
            printf '    %s\n' "${INPUT_RULES[@]}"
            echo "  }"
            echo "}"
        fi
    } | rns nft -f - || die "nft failed to update table inet $table in $NS_ROUTER"
}

# Builds FORWARD_RULES and INPUT_RULES for one direction and one verdict expression.
FORWARD_RULES=()
INPUT_RULES=()
add_rules() { # DIRECTION MATCH_AND_VERDICT COMMENT
    FORWARD_RULES+=("iifname \"$(dir_in "$1")\" oifname \"$(dir_out "$1")\" $2 comment \"$3\"")
    INPUT_RULES+=("iifname \"$(dir_in "$1")\" $2 comment \"$3 (to router)\"")
}

apply_partition() { # DIRECTION
    local d
    FORWARD_RULES=()
    INPUT_RULES=()
    for d in $(expand_direction "$1"); do
        add_rules "$d" "counter drop" "partition $d"
    done
    nft_replace_table "$TABLE_PART" "${FORWARD_RULES[@]}"
}

remove_partition() { nft_replace_table "$TABLE_PART"; }

# Rebuild the nft loss table from the state (nft backend only).
apply_nft_loss() {
    local d pct tenths
    FORWARD_RULES=()
    INPUT_RULES=()
    for d in to-hub to-spoke; do
        pct=$(state_get "$d" loss 0)
        [[ $pct == 0 ]] && continue
        tenths=$(pct_tenths "$pct")
        add_rules "$d" "numgen random mod 1000 < $tenths counter drop" "loss $pct% $d"
    done
    nft_replace_table "$TABLE_LOSS" "${FORWARD_RULES[@]}"
}

pct_tenths() { # "12.5" -> 125
    local whole=${1%%.*} frac=0
    [[ $1 == *.* ]] && frac=${1#*.}
    echo $((10#$whole * 10 + 10#${frac:-0}))
}

# ---------------------------------------------------------------------------------------
# tc faults: rebuilt from the state for one direction's egress interface.
#   netem backend: root 1: netem (delay, jitter, loss) with an optional tbf child 10:
#   both backends: root 1: tbf when only a rate is set

rate_bits() { # "10mbit" -> bits per second
    local n=${1%%[!0-9]*} unit=${1##*[0-9]}
    case ${unit,,} in
        bit) echo "$n" ;;
        kbit) echo $((n * 1000)) ;;
        mbit) echo $((n * 1000000)) ;;
        gbit) echo $((n * 1000000000)) ;;
        *) return 1 ;;
    esac
}

tbf_args() { # RATE -> "rate R burst B latency L"; burst holds 20 ms of traffic, at least 3000 B
    local bits burst
    bits=$(rate_bits "$1")
    burst=$((bits / 8 / 50))
    ((burst >= 3000)) || burst=3000
    echo "rate $1 burst $burst latency $TBF_LATENCY"
}

apply_tc() { # DIRECTION
    local dev delay jitter loss rate b
    dev=$(dir_out "$1")
    b=$(backend)
    delay=$(state_get "$1" delay 0)
    jitter=$(state_get "$1" jitter 0)
    loss=$(state_get "$1" loss 0)
    rate=$(state_get "$1" rate "")
    rns tc qdisc del dev "$dev" root >/dev/null 2>&1 || true
    local -a args tbf
    if [[ -n $rate ]]; then read -r -a tbf <<<"$(tbf_args "$rate")"; fi
    if [[ $b == netem && ($delay != 0 || $loss != 0) ]]; then
        args=(netem limit 100000)
        if [[ $delay != 0 ]]; then
            args+=(delay "${delay}ms")
            [[ $jitter != 0 ]] && args+=("${jitter}ms")
        fi
        [[ $loss != 0 ]] && args+=(loss "${loss}%")
        rns tc qdisc add dev "$dev" root handle 1: "${args[@]}" ||
            die "tc netem failed on $dev in $NS_ROUTER"
        if [[ -n $rate ]]; then
            rns tc qdisc add dev "$dev" parent 1:1 handle 10: tbf "${tbf[@]}" ||
                die "tc tbf failed on $dev in $NS_ROUTER"
        fi
    elif [[ -n $rate ]]; then
        rns tc qdisc add dev "$dev" root handle 1: tbf "${tbf[@]}" ||
            die "tc tbf failed on $dev in $NS_ROUTER (is sch_tbf available?)"
    fi
}

# ---------------------------------------------------------------------------------------
# Fault commands

DIRECTION=both
POSITIONAL=()
parse_fault_args() {
    DIRECTION=both
    POSITIONAL=()
    while [[ $# -gt 0 ]]; do
        case $1 in
            --direction | -d)
                [[ $# -ge 2 ]] || die "$1 needs a value: both, to-hub or to-spoke"
                DIRECTION=$2
                shift 2
                ;;
            --direction=*)
                DIRECTION=${1#*=}
                shift
                ;;
            -h | --help)
                usage
                exit 0
                ;;
            -*) die "unknown option '$1' (see $PROG --help)" ;;
            *)
                POSITIONAL+=("$1")
                shift
                ;;
        esac
    done
    expand_direction "$DIRECTION" >/dev/null
}

fault_preamble() {
    need_root "$@"
    need_cmd ip tc nft
    require_topology
}

cmd_partition() {
    parse_fault_args "$@"
    [[ ${#POSITIONAL[@]} -eq 0 ]] || die "partition takes no arguments besides --direction (got '${POSITIONAL[*]}')"
    fault_preamble partition
    apply_partition "$DIRECTION"
    log "partition $DIRECTION: router $NS_ROUTER silently drops $(expand_direction "$DIRECTION" | sed 's/ / and /') packets (nft table inet $TABLE_PART)"
}

cmd_heal() {
    [[ $# -eq 0 ]] || die "heal takes no arguments"
    fault_preamble heal
    stop_flap
    remove_partition
    nft_replace_table "$TABLE_LOSS"
    local d
    for d in to-hub to-spoke; do
        rm -f "$STATE_DIR/$d.delay" "$STATE_DIR/$d.jitter" "$STATE_DIR/$d.loss" "$STATE_DIR/$d.rate"
        rns tc qdisc del dev "$(dir_out "$d")" root >/dev/null 2>&1 || true
    done
    log "healed: no partition, loss, delay or rate cap left in $NS_ROUTER"
}

cmd_loss() {
    parse_fault_args "$@"
    [[ ${#POSITIONAL[@]} -eq 1 ]] || die "usage: $PROG loss PCT [--direction both|to-hub|to-spoke]"
    local pct=${POSITIONAL[0]} d b
    if ! [[ $pct =~ ^[0-9]{1,3}(\.[0-9])?$ ]] || (($(pct_tenths "$pct") > 1000)); then
        die "invalid loss '$pct': expected a percentage from 0 to 100 with at most one decimal"
    fi
    fault_preamble loss
    b=$(backend)
    (($(pct_tenths "$pct") > 0)) || pct=0
    for d in $(expand_direction "$DIRECTION"); do state_set "$d" loss "$pct"; done
    if [[ $b == netem ]]; then
        for d in $(expand_direction "$DIRECTION"); do apply_tc "$d"; done
        log "loss $pct% $DIRECTION via tc netem"
    else
        apply_nft_loss
        log "loss $pct% $DIRECTION via nftables numgen (table inet $TABLE_LOSS; no netem on this kernel)"
    fi
}

relay_hint() { # MS JITTER_MS
    local jitter_flag=""
    [[ $2 == 0 ]] || jitter_flag=" --jitter ${2}ms"
    cat >&2 <<EOF
$PROG: delay is not available: this kernel has no tc netem qdisc (backend: nft).
Delay and jitter need the userspace impairment relay tidemesh-relay (simulations/).
Run it in the router namespace between the spoke and the hub, and point the spoke at it:

  # build it (from the workspace root):
  cargo build --release -p tidemesh-sim --bin tidemesh-relay
  # start it in the router ('tidemesh-relay --help' lists loss, rate, blackout, schedules):
  sudo $PROG exec router target/release/tidemesh-relay \\
      --listen $ADDR_R_SPOKE:7443 --upstream $ADDR_HUB:7443 --delay ${1}ms$jitter_flag \\
      --seed 1 --control /run/tidemesh-relay-$PREFIX.sock &
  # then run the spoke with --hub $ADDR_R_SPOKE:7443 instead of $ADDR_HUB:7443
  # (the hub then sees the router's address $ADDR_R_HUB as the spoke's source)

partition, loss and rate from this script keep working with the relay in place (they also
match traffic addressed to the router). On a device or VM with sch_netem, this command uses
tc netem directly.
EOF
}

cmd_delay() {
    parse_fault_args "$@"
    [[ ${#POSITIONAL[@]} -ge 1 && ${#POSITIONAL[@]} -le 2 ]] ||
        die "usage: $PROG delay MS [JITTER_MS] [--direction both|to-hub|to-spoke]"
    local ms=${POSITIONAL[0]} jitter=${POSITIONAL[1]:-0} d
    [[ $ms =~ ^[0-9]+$ ]] || die "invalid delay '$ms': expected whole milliseconds"
    [[ $jitter =~ ^[0-9]+$ ]] || die "invalid jitter '$jitter': expected whole milliseconds"
    fault_preamble delay
    if [[ $(backend) != netem ]]; then
        relay_hint "$ms" "$jitter"
        exit 2
    fi
    for d in $(expand_direction "$DIRECTION"); do
        state_set "$d" delay "$ms"
        state_set "$d" jitter "$([[ $ms == 0 ]] && echo 0 || echo "$jitter")"
        apply_tc "$d"
    done
    log "delay ${ms}ms jitter ${jitter}ms $DIRECTION via tc netem (one way; 'both' adds $((2 * ms))ms to the round trip)"
}

cmd_rate() {
    parse_fault_args "$@"
    [[ ${#POSITIONAL[@]} -eq 1 ]] || die "usage: $PROG rate RATE|off [--direction both|to-hub|to-spoke]"
    local rate=${POSITIONAL[0]} d
    if [[ $rate == off || $rate == 0 ]]; then
        rate=""
    else
        [[ $rate =~ ^[1-9][0-9]*([kKmMgG]?bit)$ ]] ||
            die "invalid rate '$rate': expected a number with unit bit, kbit, mbit or gbit (e.g. 256kbit, 1mbit), or off"
        rate=${rate,,}
    fi
    fault_preamble rate
    for d in $(expand_direction "$DIRECTION"); do
        state_set "$d" rate "$rate"
        apply_tc "$d"
    done
    log "rate ${rate:-off} $DIRECTION via tc tbf (queue limit $TBF_LATENCY)"
}

FLAP_SLEEP_PID=""
flap_nap() {
    sleep "$1" &
    FLAP_SLEEP_PID=$!
    wait "$FLAP_SLEEP_PID" || true
    FLAP_SLEEP_PID=""
}

flap_cleanup() {
    if [[ -n $FLAP_SLEEP_PID ]]; then kill "$FLAP_SLEEP_PID" 2>/dev/null || true; fi
    if ns_exists "$NS_ROUTER"; then remove_partition || true; fi
    if [[ $(cat "$FLAP_PIDFILE" 2>/dev/null) == "$$" ]]; then rm -f "$FLAP_PIDFILE"; fi
}

cmd_flap() {
    parse_fault_args "$@"
    [[ ${#POSITIONAL[@]} -eq 3 ]] || die "usage: $PROG flap UP_S DOWN_S COUNT [--direction both|to-hub|to-spoke]"
    local up=${POSITIONAL[0]} down=${POSITIONAL[1]} count=${POSITIONAL[2]} i pid
    [[ $up =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "invalid UP_S '$up': expected seconds (e.g. 5 or 0.5)"
    [[ $down =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "invalid DOWN_S '$down': expected seconds (e.g. 5 or 0.5)"
    [[ $count =~ ^[1-9][0-9]*$ ]] || die "invalid COUNT '$count': expected a positive whole number"
    fault_preamble flap
    if pid=$(flap_pid); then die "a flap is already running for prefix '$PREFIX' (pid $pid); '$PROG heal' stops it"; fi
    mkdir -p "$STATE_DIR"
    echo "$$" >"$FLAP_PIDFILE"
    trap flap_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    for ((i = 1; i <= count; i++)); do
        apply_partition "$DIRECTION"
        log "$(date +%T.%3N) flap $i/$count: partitioned ($DIRECTION) for ${down}s"
        flap_nap "$down"
        remove_partition
        log "$(date +%T.%3N) flap $i/$count: healed$( ((i < count)) && echo " for ${up}s")"
        ((i < count)) && flap_nap "$up"
    done
    log "flap done: $count cycles, link healed"
}

# ---------------------------------------------------------------------------------------
# status / addr / exec

print_ns() { # LABEL NS IFNAME...
    local label=$1 ns=$2 shown=$2 ifname addr state
    shift 2
    if ! ns_exists "$ns"; then
        printf '  %-7s %-14s missing\n' "$label" "$ns"
        return
    fi
    for ifname in "$@"; do
        if link_exists "$ns" "$ifname"; then
            addr=$(ip -n "$ns" -4 -o addr show dev "$ifname" | awk '{print $4}' | paste -sd, -)
            state=$(ip -n "$ns" -o link show dev "$ifname" | sed -n 's/.* state \([A-Z]*\).*/\1/p')
            printf '  %-7s %-14s %-12s %-18s %s\n' "$label" "$shown" "$ifname" "${addr:-no address}" "${state:-?}"
        else
            printf '  %-7s %-14s %-12s missing\n' "$label" "$shown" "$ifname"
        fi
        label=""
        shown=""
    done
}

cmd_status() {
    need_root status
    need_cmd ip tc nft
    echo "tidemesh drill topology, prefix '$PREFIX'"
    print_ns spoke "$NS_SPOKE" "$IF_SPOKE"
    print_ns router "$NS_ROUTER" "$IF_R_SPOKE" "$IF_R_HUB"
    print_ns hub "$NS_HUB" "$IF_HUB"
    if ! ns_exists "$NS_SPOKE" || ! ns_exists "$NS_ROUTER" || ! ns_exists "$NS_HUB"; then
        echo "not set up: run '$PROG setup'"
        return 1
    fi
    echo "routes:"
    echo "  spoke: $(ip -n "$NS_SPOKE" -4 route show "$NET_HUB" | head -n1)"
    echo "  hub:   $(ip -n "$NS_HUB" -4 route show "$NET_SPOKE" | head -n1)"
    echo "  router ip_forward=$(rns sysctl -n net.ipv4.ip_forward)"
    describe_backend

    echo "active faults:"
    local any=0 table line comment pkts d dev q pid
    for table in "$TABLE_PART" "$TABLE_LOSS"; do
        rns nft list table inet "$table" >/dev/null 2>&1 || continue
        while IFS= read -r line; do
            comment=$(sed -n 's/.*comment "\([^"]*\)".*/\1/p' <<<"$line")
            pkts=$(sed -n 's/.*counter packets \([0-9]*\).*/\1/p' <<<"$line")
            [[ -n $comment ]] || continue
            # Traffic addressed to the router itself only matters when a relay runs there.
            [[ $comment == *"(to router)" && ${pkts:-0} == 0 ]] && continue
            printf '  %-36s dropped %s packets (nft table inet %s)\n' "$comment" "${pkts:-?}" "$table"
            any=1
        done < <(rns nft list table inet "$table")
    done
    for d in to-hub to-spoke; do
        dev=$(dir_out "$d")
        while IFS= read -r q; do
            [[ -n $q ]] || continue
            case $q in *noqueue* | *"qdisc noop"*) continue ;; esac
            printf '  %-8s on %-10s %s\n' "$d" "$dev" "$q"
            any=1
        done < <(rns tc qdisc show dev "$dev")
    done
    if pid=$(flap_pid); then
        echo "  flap running (pid $pid)"
        any=1
    fi
    [[ $any -eq 1 ]] || echo "  none"
}

cmd_addr() {
    [[ $# -eq 1 ]] || die "usage: $PROG addr spoke|hub|router-spoke|router-hub"
    case $1 in
        spoke) echo "$ADDR_SPOKE" ;;
        hub) echo "$ADDR_HUB" ;;
        router-spoke) echo "$ADDR_R_SPOKE" ;;
        router-hub) echo "$ADDR_R_HUB" ;;
        *) die "unknown role '$1': expected spoke, hub, router-spoke or router-hub" ;;
    esac
}

cmd_exec() {
    [[ $# -ge 2 ]] || die "usage: $PROG exec spoke|hub|router CMD [ARGS...]"
    local ns
    ns=$(ns_for_role "$1")
    shift
    need_root exec
    ns_exists "$ns" || die "namespace $ns does not exist: run '$PROG setup' first (prefix '$PREFIX')"
    exec ip netns exec "$ns" "$@"
}

# ---------------------------------------------------------------------------------------

main() {
    [[ $# -ge 1 ]] || {
        usage >&2
        exit 1
    }
    local cmd=$1
    shift
    case $cmd in
        -h | --help | help) usage ;;
        setup) cmd_setup "$@" ;;
        teardown) cmd_teardown "$@" ;;
        status) cmd_status "$@" ;;
        addr) cmd_addr "$@" ;;
        exec) cmd_exec "$@" ;;
        partition) cmd_partition "$@" ;;
        heal) cmd_heal "$@" ;;
        loss) cmd_loss "$@" ;;
        delay) cmd_delay "$@" ;;
        rate) cmd_rate "$@" ;;
        flap) cmd_flap "$@" ;;
        *) die "unknown command '$cmd' (see $PROG --help)" ;;
    esac
}

main "$@"
