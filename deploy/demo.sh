#!/usr/bin/env bash
# tidemesh demo: a local hub and one spoke on loopback.
#
# Builds the binaries, creates a hub (CA + database), issues a join token,
# enrolls a spoke (with one workload), runs it, shows both sides' view,
# then cuts the hub off to show the spoke serving from its cache and
# reconnecting when the hub returns. Everything lives in a temporary
# directory that is removed at the end (pass --keep to keep it running
# until Ctrl-C).
set -euo pipefail

keep=0
[ "${1:-}" = "--keep" ] && keep=1

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
echo "== building (cargo build --bins)"
cargo build --quiet --bins
bin="$root/target/debug"
hub="$bin/tidemesh-hub"
spoke="$bin/tidemesh-spoke"

work="$(mktemp -d /tmp/tidemesh-demo.XXXXXX)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

listen="127.0.0.1:${TIDEMESH_DEMO_PORT:-0}"
td="demo.tidemesh.example"
id="spiffe://$td/store/sf01/node/pi1"

start_hub() {
  "$hub" serve --data-dir "$work/hub" --listen "$listen" >"$work/hub.out" 2>>"$work/hub.log" &
  pids+=("$!")
  hub_pid=$!
  for _ in $(seq 1 100); do
    if [ -S "$work/hub/admin.sock" ] && grep -q '^listening=' "$work/hub.out"; then
      # restarts reuse the address the first start got
      listen="$(sed -n 's/^listening=//p' "$work/hub.out")"
      return 0
    fi
    sleep 0.1
  done
  echo "hub did not start; log:" >&2; cat "$work/hub.log" >&2; exit 1
}

wait_state() {
  local want="$1"
  for _ in $(seq 1 150); do
    if "$spoke" status --data-dir "$work/spoke" --json 2>/dev/null | grep -q "\"state\": \"$want\""; then
      return 0
    fi
    sleep 0.1
  done
  echo "spoke did not reach state $want" >&2
  exit 1
}

echo "== tidemesh-hub init"
"$hub" init --data-dir "$work/hub" --trust-domain "$td"
start_hub
echo "== tidemesh-hub serve: listening on $listen"
echo "== tidemesh-hub token create --spoke $id"
token="$("$hub" token create --data-dir "$work/hub" --spoke "$id" --ttl 10m)"
echo "$token"
echo "== tidemesh-spoke enroll"
"$spoke" enroll --data-dir "$work/spoke" --hub "$listen" --token "$token"
cat >"$work/spoke.toml" <<TOML
[[workload]]
service_account = "pos"
service = "pos"
namespace = "store"
labels = { app = "pos", version = "v1" }
TOML
echo "== tidemesh-spoke run"
"$spoke" run --data-dir "$work/spoke" --config "$work/spoke.toml" 2>>"$work/spoke.log" &
pids+=("$!")
wait_state connected
"$spoke" status --data-dir "$work/spoke"
echo
echo "== tidemesh-hub spokes"
"$hub" spokes --data-dir "$work/hub"
echo
echo "== tidemesh-hub apply -f (the seed's Istio AuthorizationPolicy, VirtualService, DestinationRule, ServiceEntry)"
for f in authorization_policy canary_virtualservice_destinationrule serviceentry_multicluster; do
  cat "$root/shared/policy/testdata/seed/$f.yaml"
  echo "---"
done >"$work/mesh.yaml"
"$hub" apply --data-dir "$work/hub" -f "$work/mesh.yaml"
for _ in $(seq 1 100); do
  "$spoke" status --data-dir "$work/spoke" --json | grep -q '"config_version": 1' && break
  sleep 0.1
done
"$hub" config history --data-dir "$work/hub"
echo "spoke: $("$spoke" status --data-dir "$work/spoke" --json | grep '"config_version"')"
echo
echo "== the hub goes away (SIGKILL): the spoke keeps its identity, certificates and config"
kill -9 "$hub_pid"
wait "$hub_pid" 2>/dev/null || true
wait_state disconnected
"$spoke" status --data-dir "$work/spoke"
echo
echo "== evidence keeps accumulating on the spoke meanwhile (drill load: 500 records/s for 2 s)"
"$spoke" drill load --data-dir "$work/spoke" --rate 500 --duration 2s
"$spoke" evidence stats --data-dir "$work/spoke" | grep -E "last_committed_seq|last_acked_seq|pending_records"
echo
echo "== the hub comes back: the spoke reconnects by itself and syncs its evidence exactly once"
start_hub
wait_state connected
"$spoke" status --data-dir "$work/spoke"
for _ in $(seq 1 300); do
  "$spoke" evidence stats --data-dir "$work/spoke" --json | grep -q '"pending_records": 0' && break
  sleep 0.1
done
"$spoke" evidence stats --data-dir "$work/spoke" | grep -E "last_committed_seq|last_acked_seq|pending_records"
"$hub" evidence stats --data-dir "$work/hub" --spoke "$id" | grep -E "records|high_water_mark|gaps|chain_ok"
"$hub" evidence verify --data-dir "$work/hub" --spoke "$id"
echo
echo "== audit log"
"$hub" audit --data-dir "$work/hub"
if [ "$keep" = 1 ]; then
  echo
  echo "running in $work; Ctrl-C to stop"
  wait
fi
echo
echo "demo OK"
