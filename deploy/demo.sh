#!/usr/bin/env bash
# tidemesh demo: the product's story in about two minutes, on loopback.
#
# A hub and two spokes of store sf01, both reaching the hub through
# tidemesh-relay (the project's userspace UDP relay); store apps where pos
# (spoke A) calls inventory (spoke B, same site) and payments.cloud (through
# the hub gateway) in a steady loop. The relay then blacks the hub out for
# longer than the workload SVID lifetime, and heals. One console line per
# second (mode, calls per path, evidence backlog, survival horizon), then a
# summary and a self-contained HTML report with an SVG timeline.
#
# Usage: deploy/demo.sh [--debug] [--short] [--keep]
#   --debug  use debug binaries (or TIDEMESH_DEMO_PROFILE=debug); default release
#   --short  CI mode: a 14 s outage with 8 s SVIDs (about 25 s of timeline)
#   --keep   leave everything running, /metrics on, until Ctrl-C
# The report goes to $TIDEMESH_DEMO_REPORT, default TARGET/demo/report.html
# (TARGET: $CARGO_TARGET_DIR or ./target); its data next to it as .json.
set -euo pipefail

profile="${TIDEMESH_DEMO_PROFILE:-release}"
args=()
for a in "$@"; do
  case "$a" in
    --debug) profile=debug ;;
    --release) profile=release ;;
    --short | --keep) args+=("$a") ;;
    -h | --help)
      sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
      exit 0
      ;;
    *)
      echo "demo.sh: unknown option $a (try --help)" >&2
      exit 2
      ;;
  esac
done
case "$profile" in
  release | debug) ;;
  *)
    echo "demo.sh: TIDEMESH_DEMO_PROFILE must be release or debug, not $profile" >&2
    exit 2
    ;;
esac

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
target="${CARGO_TARGET_DIR:-$root/target}"
case "$target" in
  /*) ;;
  *) target="$root/$target" ;;
esac
build=(cargo build --bin tidemesh-hub --bin tidemesh-spoke --bin tidemesh-relay --bin tidemesh-demo)
[ "$profile" = release ] && build+=(--release)
echo "== building the $profile binaries: ${build[*]}"
if [ "$profile" = release ]; then
  echo "   (the first release build takes several minutes; --debug is quicker to build)"
fi
"${build[@]}"
bin="$target/$profile"
report="${TIDEMESH_DEMO_REPORT:-$target/demo/report.html}"
echo "== running $bin/tidemesh-demo run ${args[*]:-}"
exec "$bin/tidemesh-demo" run --bin-dir "$bin" --report "$report" "${args[@]}"
