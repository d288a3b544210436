#!/usr/bin/env bash
# selftest.sh: checks partition.sh end to end on this host with a python3 UDP echo
# (udp_probe.py) running inside the drill namespaces. Needs root, nftables and python3.
# Uses its own prefix (default tmdst) so it does not disturb a drill running with tmd.
# Prints "N passed, N failed" as its last line; exits non-zero if anything failed.

# The checks below pass arguments to small `bash -c '...' _ ARGS` snippets on purpose.
# shellcheck disable=SC2016
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DRILL=$HERE/partition.sh
PROBE=$HERE/udp_probe.py
export TIDEMESH_DRILL_PREFIX=${TIDEMESH_DRILL_PREFIX:-tmdst}
P=$TIDEMESH_DRILL_PREFIX
STATE_DIR=${TIDEMESH_DRILL_STATE_DIR:-/run/tidemesh-drill}/$P
PORT=9999
START=$SECONDS

PASSED=0
FAILED=0
TMP=$(mktemp -d "/tmp/tidemesh-selftest.XXXXXX")
SERVER_PIDS=()

pass() {
    PASSED=$((PASSED + 1))
    echo "ok   $*"
}
fail() {
    FAILED=$((FAILED + 1))
    echo "FAIL $*"
}
# check DESCRIPTION COMMAND...: pass if the command succeeds
check() {
    local desc=$1
    shift
    if "$@"; then pass "$desc"; else fail "$desc"; fi
}

DONE=0
cleanup() {
    local rc=$? pid
    for pid in "${SERVER_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    "$DRILL" teardown >/dev/null 2>&1 || true
    rm -rf "$TMP"
    if [[ $DONE -eq 0 ]]; then
        echo "FAIL self-test aborted (exit status $rc, line ${ERR_LINE:-?})"
        echo "$PASSED passed, $((FAILED + 1)) failed"
        exit 1
    fi
}
trap cleanup EXIT
trap 'ERR_LINE=$LINENO' ERR

if [[ $EUID -ne 0 ]]; then
    echo "selftest needs root (network namespaces)" >&2
    echo "0 passed, 1 failed"
    exit 1
fi
for c in python3 nft ip tc; do
    if ! command -v "$c" >/dev/null; then
        echo "selftest needs $c (apt-get install -y nftables iproute2 python3)" >&2
        echo "0 passed, 1 failed"
        exit 1
    fi
done

drill() { "$DRILL" "$@" 2>>"$TMP/drill.log"; }

json_field() { # JSON FIELD: a number or string field of the probe's flat JSON line
    local re_num="\"$2\": (-?[0-9.]+)" re_str="\"$2\": \"([^\"]*)\""
    if [[ $1 =~ $re_num ]]; then
        echo "${BASH_REMATCH[1]}"
    elif [[ $1 =~ $re_str ]]; then
        echo "${BASH_REMATCH[1]}"
    fi
}

# probe FROM_ROLE TO_ADDR COUNT [probe options...] -> JSON line
probe() {
    local from=$1 to=$2 count=$3
    shift 3
    "$DRILL" exec "$from" python3 "$PROBE" probe "$to" "$PORT" "$count" "$@" ||
        echo '{"tag": "none", "sent": 0, "send_errors": 1, "received": 0, "recv_errors": 0, "first_error": "probe failed to run", "rtt_ms_median": null}'
}

# server_count LOG TAG: how many datagrams of this probe reached the server
server_count() {
    sleep 0.1
    grep -c "^$2 " "$1" || true
}

start_server() { # ROLE ADDR LOG
    "$DRILL" exec "$1" python3 "$PROBE" serve "$2" "$PORT" "$3" &
    SERVER_PIDS+=($!)
}

wait_ready() { # LOG
    local i
    for ((i = 0; i < 50; i++)); do
        grep -q READY "$1" 2>/dev/null && return 0
        sleep 0.1
    done
    return 1
}

in_range() { # VALUE LOW HIGH (floats)
    awk -v v="$1" -v l="$2" -v h="$3" 'BEGIN { exit !(v != "" && v + 0 >= l + 0 && v + 0 <= h + 0) }'
}

# silent_probe DESC FROM TO SERVER_LOG EXPECT_SERVER(=0|all|some): a probe whose echoes
# must all be lost, with no error at the sender.
silent_probe() {
    local desc=$1 from=$2 to=$3 log=$4 expect=$5 out tag recv errs got
    out=$(probe "$from" "$to" 5 --timeout 0.6)
    tag=$(json_field "$out" tag)
    recv=$(json_field "$out" received)
    errs=$(($(json_field "$out" send_errors) + $(json_field "$out" recv_errors)))
    got=$(server_count "$log" "$tag")
    check "$desc: $from gets no echo (received $recv of 5)" test "$recv" -eq 0
    check "$desc: $from sees no send/recv error (silent; errors=$errs $(json_field "$out" first_error))" test "$errs" -eq 0
    case $expect in
        0) check "$desc: nothing reaches the other end (server saw $got)" test "$got" -eq 0 ;;
        all) check "$desc: the other end still receives everything (server saw $got of 5)" test "$got" -eq 5 ;;
    esac
}

reachable() { # DESC FROM TO COUNT
    local out recv errs
    out=$(probe "$2" "$3" "$4" --timeout 1)
    recv=$(json_field "$out" received)
    errs=$(($(json_field "$out" send_errors) + $(json_field "$out" recv_errors)))
    check "$1: $2 -> $3 echoes $recv of $4, errors $errs" test "$recv" -eq "$4" -a "$errs" -eq 0
}

no_sender_errors_at_servers() {
    ! grep -q SENDERR "$TMP/hub.log" "$TMP/spoke.log"
}

echo "# partition.sh self-test, prefix '$P'"

# --- CLI basics --------------------------------------------------------------------------
check "--help prints usage" bash -c '"$1" --help | grep -q "partition \[--direction"' _ "$DRILL"
check "an invalid prefix is rejected" bash -c '! TIDEMESH_DRILL_PREFIX=Bad-Prefix "$1" status 2>/dev/null' _ "$DRILL"
check "an unknown command is rejected" bash -c '! "$1" frobnicate 2>/dev/null' _ "$DRILL"
check "an invalid direction is rejected" bash -c '! "$1" partition --direction sideways 2>/dev/null' _ "$DRILL"

# --- setup -------------------------------------------------------------------------------
"$DRILL" teardown >/dev/null 2>&1 || true
check "setup succeeds" drill setup
check "setup is idempotent (second run succeeds)" drill setup
check "after two setups each interface has exactly one address" \
    test "$(ip -n "$P-router" -4 -o addr show | grep -c 10.203.)" -eq 2 -a \
    "$(ip -n "$P-spoke" -4 -o addr show | grep -c 10.203.)" -eq 1
check "after two setups the spoke has exactly one route to the hub" \
    test "$(ip -n "$P-spoke" route show 10.203.2.0/24 | wc -l)" -eq 1
check "addr spoke prints 10.203.1.2" test "$("$DRILL" addr spoke)" = 10.203.1.2
check "addr hub prints 10.203.2.2" test "$("$DRILL" addr hub)" = 10.203.2.2
check "router forwards IPv4" test "$("$DRILL" exec router sysctl -n net.ipv4.ip_forward)" = 1
BACKEND=$(cat "$STATE_DIR/backend" 2>/dev/null || echo unknown)
check "backend detected and recorded ($BACKEND)" test "$BACKEND" = netem -o "$BACKEND" = nft
check "status names the backend" bash -c '"$1" status 2>/dev/null | grep -q "^backend "' _ "$DRILL"

HUB=$("$DRILL" addr hub)
SPOKE=$("$DRILL" addr spoke)
start_server hub "$HUB" "$TMP/hub.log"
start_server spoke "$SPOKE" "$TMP/spoke.log"
servers_ready() { wait_ready "$TMP/hub.log" && wait_ready "$TMP/spoke.log"; }
check "echo servers started in the hub and spoke namespaces" servers_ready

# --- baseline ----------------------------------------------------------------------------
reachable "baseline" spoke "$HUB" 20
reachable "baseline" hub "$SPOKE" 20

# --- full partition ----------------------------------------------------------------------
check "partition (both) applies" drill partition
check "partition is idempotent (applied twice)" drill partition
check "partition table has exactly one forward rule per direction" \
    test "$("$DRILL" exec router nft list chain inet "${P}_partition" forward | grep -c 'drop comment')" -eq 2
silent_probe "partition both" spoke "$HUB" "$TMP/hub.log" 0
silent_probe "partition both" hub "$SPOKE" "$TMP/spoke.log" 0
check "status lists the partition and its drop counter" \
    bash -c '"$1" status 2>/dev/null | grep -Eq "partition to-hub +dropped [1-9]"' _ "$DRILL"
check "heal succeeds" drill heal
reachable "after heal" spoke "$HUB" 20
check "status shows no faults after heal" bash -c '"$1" status 2>/dev/null | grep -A1 "^active faults" | grep -q none' _ "$DRILL"

# --- one-way partitions ------------------------------------------------------------------
check "partition --direction to-hub applies" drill partition --direction to-hub
silent_probe "to-hub cut" spoke "$HUB" "$TMP/hub.log" 0
silent_probe "to-hub cut" hub "$SPOKE" "$TMP/spoke.log" all
check "partition --direction to-spoke replaces it" drill partition --direction to-spoke
silent_probe "to-spoke cut" spoke "$HUB" "$TMP/hub.log" all
silent_probe "to-spoke cut" hub "$SPOKE" "$TMP/spoke.log" 0
check "heal after one-way partitions" drill heal
reachable "after heal" hub "$SPOKE" 20

# --- faults also hit traffic through a relay in the router (as tidemesh-relay would run) -
"$DRILL" exec router python3 "$PROBE" forward "$("$DRILL" addr router-spoke)" "$PORT" "$HUB" "$PORT" >"$TMP/fwd.log" 2>&1 &
SERVER_PIDS+=($!)
wait_ready "$TMP/fwd.log" || true
RELAY=$("$DRILL" addr router-spoke)
reachable "via a relay in the router" spoke "$RELAY" 20
check "partition --direction to-hub (relay in router)" drill partition --direction to-hub
silent_probe "to-hub cut, via relay" spoke "$RELAY" "$TMP/hub.log" 0
check "partition --direction to-spoke (relay in router)" drill partition --direction to-spoke
silent_probe "to-spoke cut, via relay" spoke "$RELAY" "$TMP/hub.log" all
check "heal (relay in router)" drill heal
reachable "via the relay after heal" spoke "$RELAY" 20

# --- control: a fault in the sender's own namespace is NOT silent ------------------------
# This shows the probe's silence check has teeth: link down on the spoke's own veth makes
# its sends fail (ENETUNREACH), unlike the router-side faults above.
ip -n "$P-spoke" link set "$P-sp" down
out=$(probe spoke "$HUB" 5 --timeout 0.3)
check "control: link down in the spoke's own namespace gives the sender errors ($(json_field "$out" first_error))" \
    test "$(json_field "$out" send_errors)" -gt 0
ip -n "$P-spoke" link set "$P-sp" up
check "setup repairs the topology (link down dropped the spoke's route)" drill setup
reachable "after repair" spoke "$HUB" 20

# --- loss --------------------------------------------------------------------------------
check "loss 30 --direction to-hub applies" drill loss 30 --direction to-hub
out=$(probe spoke "$HUB" 400 --interval 0.0005 --timeout 0.5)
got=$(server_count "$TMP/hub.log" "$(json_field "$out" tag)")
check "loss 30% to-hub: hub received $got of 400 (expect ~280, 240-320)" in_range "$got" 240 320
check "loss 30% to-hub: echoes match what arrived ($(json_field "$out" received) vs $got)" \
    in_range "$(json_field "$out" received)" "$((got - 2))" "$got"
check "loss is silent: no sender errors" test "$(json_field "$out" send_errors)" -eq 0 -a "$(json_field "$out" recv_errors)" -eq 0
check "loss 30 (both) applies" drill loss 30
out=$(probe spoke "$HUB" 400 --interval 0.0005 --timeout 0.5)
recv=$(json_field "$out" received)
check "loss 30% both ways: $recv of 400 round trips (expect ~196, 150-240)" in_range "$recv" 150 240
check "loss 0 clears it" drill loss 0
reachable "after loss 0" spoke "$HUB" 50

# --- rate --------------------------------------------------------------------------------
check "rate 1mbit --direction to-hub applies (tbf)" drill rate 1mbit --direction to-hub
check "tbf qdisc is on the router's hub-facing veth" \
    bash -c '"$1" exec router tc qdisc show dev "$2-rh" | grep -q "tbf .*rate 1Mbit"' _ "$DRILL" "$P"
out=$(probe spoke "$HUB" 250 --size 1000 --interval 0.002 --timeout 0.6)
capped=$(server_count "$TMP/hub.log" "$(json_field "$out" tag)")
check "rate 1mbit: a ~4 Mbit/s stream is cut down (hub received $capped of 250, expect < 175)" test "$capped" -lt 175
check "heal removes the rate cap" drill heal
check "no qdisc left on the router's veths" \
    bash -c '! "$1" exec router tc qdisc show | grep -Eq "tbf|netem"' _ "$DRILL"
out=$(probe spoke "$HUB" 250 --size 1000 --interval 0.002 --timeout 0.6)
full=$(server_count "$TMP/hub.log" "$(json_field "$out" tag)")
check "uncapped: the same stream arrives (hub received $full of 250, expect >= 240)" test "$full" -ge 240

# --- delay -------------------------------------------------------------------------------
if [[ $BACKEND == nft ]]; then
    rc=0
    "$DRILL" delay 50 10 >"$TMP/delay.out" 2>&1 || rc=$?
    check "delay without netem exits 2 (got $rc)" test "$rc" -eq 2
    check "delay without netem explains how to use tidemesh-relay in the router" \
        grep -q "exec router .*tidemesh-relay" "$TMP/delay.out"
else
    check "delay 50 (netem) applies" drill delay 50
    out=$(probe spoke "$HUB" 10 --interval 0.01 --timeout 1)
    rtt=$(json_field "$out" rtt_ms_median)
    check "delay 50 both ways: median RTT ${rtt} ms (expect >= 95)" in_range "${rtt:-0}" 95 1000
    check "heal removes the delay" drill heal
fi

# --- flap --------------------------------------------------------------------------------
"$DRILL" exec spoke python3 "$PROBE" sample "$HUB" "$PORT" --duration 3.2 --interval 0.05 >"$TMP/sample.out" &
sampler=$!
sleep 0.3
check "flap 0.6 0.6 2 runs to completion" drill flap 0.6 0.6 2
wait "$sampler" || true
pattern=$(cut -d' ' -f1 "$TMP/sample.out")
runs_down=$(grep -o '0\+' <<<"$pattern" | wc -l)
check "flap: the link went down twice and came back (samples $pattern)" \
    bash -c '[[ $1 -eq 2 && $2 == *1 && $3 == *errors=0 ]]' _ "$runs_down" "$pattern" "$(cat "$TMP/sample.out")"
check "flap leaves no partition behind" \
    bash -c '! "$1" exec router nft list table inet "$2_partition" >/dev/null 2>&1' _ "$DRILL" "$P"

"$DRILL" flap 0.4 0.4 100 2>>"$TMP/drill.log" &
flapper=$!
sleep 1
check "heal stops a running flap" drill heal
rc=0
wait "$flapper" || rc=$?
check "the flap process exited (status $rc) and left no pid file" test ! -e "$STATE_DIR/flap.pid"
reachable "after a stopped flap" spoke "$HUB" 20

# --- netem command construction (tc shimmed: this checks the commands, not the kernel) ----
mkdir -p "$TMP/shim"
cat >"$TMP/shim/tc" <<EOF
#!/bin/sh
echo "\$*" >>"$TMP/tc.log"
case "\$*" in *netem*|*"parent 1:1"*) exit 0 ;; esac
exec $(command -v tc) "\$@"
EOF
chmod +x "$TMP/shim/tc"
netem_drill() { PATH="$TMP/shim:$PATH" TIDEMESH_DRILL_BACKEND=netem "$DRILL" "$@" 2>>"$TMP/drill.log"; }
check "netem backend: delay 100 20 --direction to-hub" netem_drill delay 100 20 --direction to-hub
check "netem backend: loss 5 --direction to-hub" netem_drill loss 5 --direction to-hub
check "netem backend: rate 2mbit --direction to-hub" netem_drill rate 2mbit --direction to-hub
check "netem backend: delay and loss share one netem qdisc with a tbf child" bash -c '
    grep -qx "qdisc add dev $2-rh root handle 1: netem limit 100000 delay 100ms 20ms" "$1" &&
    grep -qx "qdisc add dev $2-rh root handle 1: netem limit 100000 delay 100ms 20ms loss 5%" "$1" &&
    grep -qx "qdisc add dev $2-rh parent 1:1 handle 10: tbf rate 2mbit burst 5000 latency 200ms" "$1" &&
    ! grep -q "dev $2-rs" "$1"' _ "$TMP/tc.log" "$P"
check "netem backend: no nft loss table is used" \
    bash -c '! "$1" exec router nft list table inet "$2_loss" >/dev/null 2>&1' _ "$DRILL" "$P"
check "heal after the netem commands" netem_drill heal

check "no echo server ever got a send error" no_sender_errors_at_servers

# --- teardown ----------------------------------------------------------------------------
for pid in "${SERVER_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
wait 2>/dev/null || true
SERVER_PIDS=()
check "teardown succeeds" drill teardown
check "teardown is idempotent (second run succeeds)" drill teardown
check "no namespace with prefix '$P-' left" bash -c '! ip netns list | grep -q "^$1-"' _ "$P"
check "no link with prefix '$P-' left in the root namespace" bash -c '! ip -o link show | grep -q ": $1-"' _ "$P"
check "no nft table with prefix '${P}_' left in the root namespace" bash -c '! nft list tables | grep -q " $1_"' _ "$P"
check "no state directory left" test ! -e "$STATE_DIR"
check "finished within 60 s ($((SECONDS - START)) s)" test $((SECONDS - START)) -lt 60

if [[ $FAILED -gt 0 ]]; then
    echo "# drill log:"
    sed 's/^/#   /' "$TMP/drill.log"
fi
DONE=1
echo "$PASSED passed, $FAILED failed"
[[ $FAILED -eq 0 ]]
