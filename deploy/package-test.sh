#!/usr/bin/env bash
# package-test.sh: install the tidemesh-hub and tidemesh-spoke .deb packages, start each
# unit's ExecStart= the way systemd would (as the unit's User=, with its Environment=,
# EnvironmentFile= and STATE_DIRECTORY), without systemctl, enroll the spoke with the
# hub, check both answer, then purge both packages.
#
# Usage: deploy/package-test.sh DIR     (DIR holds tidemesh-hub_*.deb and tidemesh-spoke_*.deb
#                                        of this machine's architecture, from deploy/package.sh)
# Needs root and apt-get. Without them, or without the packages, it prints SKIP and exits 0,
# unless TIDEMESH_REQUIRE_PKG=1 (CI), which makes that a failure.
# It really installs the packages (and creates the system users tidemesh-hub and
# tidemesh-spoke, which purge leaves, as Debian does): run it on a CI or throwaway box.
set -euo pipefail

DIR=${1:?usage: deploy/package-test.sh DIR}
PASSED=0
FAILED=0
log() { echo "package-test: $*"; }
skip() {
    if [[ ${TIDEMESH_REQUIRE_PKG:-0} == 1 ]]; then
        echo "package-test: FAIL: $* (TIDEMESH_REQUIRE_PKG=1)" >&2
        exit 1
    fi
    log "SKIP: $*"
    exit 0
}
ok() { PASSED=$((PASSED + 1)); log "ok: $*"; }
bad() { FAILED=$((FAILED + 1)); echo "package-test: FAILED: $*" >&2; }
check() { # check DESCRIPTION COMMAND...
    local what=$1
    shift
    if "$@"; then ok "$what"; else bad "$what"; fi
}

[[ $EUID -eq 0 ]] || skip "needs root (installs packages)"
command -v apt-get >/dev/null || skip "needs apt-get"
arch=$(dpkg --print-architecture)
shopt -s nullglob
hub_debs=("$DIR"/tidemesh-hub_*_"$arch".deb)
spoke_debs=("$DIR"/tidemesh-spoke_*_"$arch".deb)
shopt -u nullglob
[[ ${#hub_debs[@]} -eq 1 && ${#spoke_debs[@]} -eq 1 ]] ||
    skip "want one tidemesh-hub and one tidemesh-spoke .deb for $arch in $DIR (deploy/package.sh)"
for p in tidemesh-hub tidemesh-spoke; do
    if dpkg -s "$p" >/dev/null 2>&1; then
        skip "$p is installed already; this test installs and purges it"
    fi
done
# Purging the hub keeps /var/lib/tidemesh-hub (its CA key), and this test
# removes what it made: on a box that has or had a hub or spoke, do nothing.
for d in /var/lib/tidemesh-hub /var/lib/tidemesh-spoke /etc/tidemesh/hub.env /etc/tidemesh/spoke.env; do
    if [[ -e $d ]]; then
        skip "$d exists (a real or earlier installation); this test would overwrite or remove it"
    fi
done

work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq tidemesh-hub tidemesh-spoke >/dev/null 2>&1 || true
    rm -f /etc/tidemesh/hub.env /etc/tidemesh/spoke.env
    rmdir /etc/tidemesh 2>/dev/null || true
    rm -rf /var/lib/tidemesh-hub "$work"
}
trap cleanup EXIT

# 1. Install, as an operator would.
log "apt-get install ${hub_debs[0]} ${spoke_debs[0]}"
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$(realpath "${hub_debs[0]}")" "$(realpath "${spoke_debs[0]}")"
ok "apt-get install ./tidemesh-hub_*.deb ./tidemesh-spoke_*.deb"

unit_file() { # the installed unit file of a package
    dpkg -L "$1" | grep -E "/systemd/system/$1\.service$" | head -n1
}
for p in tidemesh-hub tidemesh-spoke; do
    check "$p: system user" getent passwd "$p"
    check "$p: /var/lib/$p owned by $p, mode 700" \
        test "$(stat -c '%U %a' "/var/lib/$p")" = "$p 700"
    check "$p: unit installed" test -n "$(unit_file "$p")"
    check "$p: unit not enabled" test ! -e "/etc/systemd/system/multi-user.target.wants/$p.service"
    check "$p: bash completion" test -s "/usr/share/bash-completion/completions/$p"
    check "$p: zsh completion" test -s "/usr/share/zsh/vendor-completions/_$p"
    check "$p: fish completion" test -s "/usr/share/fish/vendor_completions.d/$p.fish"
    check "$p: man pages" test -s "/usr/share/man/man1/$p.1.gz" -a -s "/usr/share/man/man1/$p-healthcheck.1.gz"
    check "$p: README" test -s "/usr/share/doc/$p/README.md"
    v=$("/usr/bin/$p" --version)
    check "$p --version names a commit ($v)" grep -Eq "^$p [0-9.]+ \(commit [0-9a-zA-Z._+-]+, built for " <<<"$v"
done
check "tidemesh-spoke: /etc/tidemesh/spoke.toml is a conffile" \
    grep -qx /etc/tidemesh/spoke.toml <(dpkg-query -W -f='${Conffiles}\n' tidemesh-spoke | awk '{print $1}')

# 2. Start a unit's ExecStart= as systemd would: User=, Environment=, EnvironmentFile=,
#    STATE_DIRECTORY, %S and ${VAR} expanded. Prints the PID.
start_unit() { # start_unit PACKAGE LOGFILE
    local unit user state envs=() words=() w v k line
    unit=$(unit_file "$1")
    user=$(sed -n 's/^User=//p' "$unit")
    state=$(sed -n 's/^StateDirectory=//p' "$unit")
    while IFS= read -r line; do envs+=("$line"); done < <(sed -n 's/^Environment=//p' "$unit")
    while IFS= read -r f; do
        f=${f#-}
        [[ -r $f ]] || continue
        while IFS= read -r line; do
            [[ -z $line || $line == \#* ]] && continue
            envs+=("$line")
        done <"$f"
    done < <(sed -n 's/^EnvironmentFile=//p' "$unit")
    envs+=("STATE_DIRECTORY=/var/lib/$state")
    read -r -a words <<<"$(sed -n 's/^ExecStart=//p' "$unit")"
    local cmd=()
    for w in "${words[@]}"; do
        w=${w//%S//var/lib}
        if [[ $w =~ ^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$ ]]; then
            k=${BASH_REMATCH[1]}
            v=
            for line in "${envs[@]}"; do [[ $line == "$k="* ]] && v=${line#*=}; done
            w=$v
        fi
        cmd+=("$w")
    done
    log "$1: as $user: ${cmd[*]}" >&2
    # setpriv execs (no PAM session, no extra process): the PID is the service's
    setpriv --reuid="$user" --regid="$user" --init-groups \
        env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin "${envs[@]}" "${cmd[@]}" >"$2" 2>&1 &
    echo $!
}

wait_for() { # wait_for SECONDS COMMAND...: until it exits 0
    local deadline=$((SECONDS + $1))
    shift
    until "$@" >/dev/null 2>&1; do
        [[ $SECONDS -lt $deadline ]] || return 1
        sleep 0.3
    done
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
hub_port=$(free_port)
hub_metrics=$(free_port)
spoke_metrics=$(free_port)
# The units' EnvironmentFile= overrides, as an operator's /etc/tidemesh/*.env would.
install -d -m 0755 /etc/tidemesh
printf 'TIDEMESH_LISTEN=127.0.0.1:%s\nTIDEMESH_METRICS=127.0.0.1:%s\n' "$hub_port" "$hub_metrics" >/etc/tidemesh/hub.env
printf 'TIDEMESH_METRICS=127.0.0.1:%s\n' "$spoke_metrics" >/etc/tidemesh/spoke.env

# 3. The hub: init as its user with the default data directory, then its unit's command.
check "tidemesh-hub init as tidemesh-hub, no --data-dir" \
    runuser -u tidemesh-hub -- tidemesh-hub init --trust-domain pkg.test
check "the CA key is in /var/lib/tidemesh-hub" test -s /var/lib/tidemesh-hub/ca_key.pem
hub_pid=$(start_unit tidemesh-hub "$work/hub.log")
pids+=("$hub_pid")
check "tidemesh-hub unit command ready (healthcheck)" \
    wait_for 30 tidemesh-hub healthcheck --metrics "127.0.0.1:$hub_metrics"
check "the hub runs as tidemesh-hub" \
    test "$(ps -o user= -p "$hub_pid")" = tidemesh-hub

# 4. The spoke's unit command before enrollment: waits, not ready.
spoke_pid=$(start_unit tidemesh-spoke "$work/spoke.log")
pids+=("$spoke_pid")
rc=0
sleep 1
for _ in $(seq 50); do
    rc=0
    out=$(tidemesh-spoke healthcheck --metrics "127.0.0.1:$spoke_metrics" 2>&1) || rc=$?
    [[ $rc -ne 2 ]] && break
    sleep 0.2
done
check "spoke unit command up but not ready before enrollment (exit 1: $out)" test "$rc" -eq 1

# 5. Token from the hub (root, default data dir), enrollment as the spoke's user.
id=spiffe://pkg.test/store/s1/node/n1
token=$(tidemesh-hub token create --spoke "$id")
check "tidemesh-hub token create as root, no --data-dir" test -n "$token"
check "tidemesh-spoke enroll as tidemesh-spoke, no --data-dir" \
    runuser -u tidemesh-spoke -- tidemesh-spoke enroll --hub "127.0.0.1:$hub_port" --token "$token"
# A spoke is ready once it holds a config: apply one (as root, default data dir).
check "tidemesh-hub apply as root, no --data-dir" \
    bash -c 'printf "apiVersion: tidemesh.io/v1alpha1\nkind: Store\nmetadata: {name: s1}\nspec: {region: r1, zone: r1a}\n" |
        tidemesh-hub apply -f -'
check "spoke ready after enrollment and the first config (healthcheck)" \
    wait_for 30 tidemesh-spoke healthcheck --metrics "127.0.0.1:$spoke_metrics"
check "tidemesh-spoke status as root, no --data-dir" \
    bash -c "tidemesh-spoke status --json | grep -q '\"id\": \"$id\"'"
check "tidemesh-hub spokes lists it" bash -c "tidemesh-hub spokes | grep -q '$id'"

# 6. Stop (SIGTERM, as systemctl stop), purge.
for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
pids=()
DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq tidemesh-hub tidemesh-spoke
check "purged: binaries gone" test ! -e /usr/bin/tidemesh-hub -a ! -e /usr/bin/tidemesh-spoke
check "purged: spoke state removed" test ! -e /var/lib/tidemesh-spoke
check "purged: hub state (CA key) kept" test -s /var/lib/tidemesh-hub/ca_key.pem

if [[ $FAILED -gt 0 ]]; then
    log "hub log:"; sed 's/^/  | /' "$work/hub.log" | tail -n 30
    log "spoke log:"; sed 's/^/  | /' "$work/spoke.log" | tail -n 30
fi
echo "package-test: $PASSED passed, $FAILED failed"
[[ $FAILED -eq 0 ]]
