#!/usr/bin/env bash
# Runs the tidemesh-proto and tidemesh-evidence fuzz targets for a bounded
# time each; exits non-zero if any target finds a crash (panic, failed
# assertion, sanitizer report, timeout or out-of-memory).
#
# Needs a nightly toolchain (libFuzzer instrumentation uses -Z flags) and
# cargo-fuzz; installs cargo-fuzz if missing and tries to install nightly,
# and skips (exit 0, with a SKIP line) when no nightly can be had.
#
# Environment:
#   FUZZ_SECONDS    seconds per target (default 20)
#   FUZZ_RSS_MB     libFuzzer -rss_limit_mb (default 2048)
#   FUZZ_SANITIZER  cargo-fuzz --sanitizer: address (default) or none; none
#                   builds about twice as fast, and the crates fuzzed here
#                   forbid unsafe code
#   FUZZ_TARGETS    space-separated targets (default: all in fuzz_targets/)
#
# Builds into shared/proto/fuzz/target (not the workspace's target/), fuzzes
# into the scratch corpus-work/ seeded from corpus/ (which it never writes),
# and leaves crash inputs in artifacts/<target>/, also printed as base64.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
seconds="${FUZZ_SECONDS:-20}"
rss_mb="${FUZZ_RSS_MB:-2048}"
sanitizer="${FUZZ_SANITIZER:-address}"
read -r -a targets <<<"${FUZZ_TARGETS:-control_frame join_token evidence_batch evidence_chain jwt}"

case "$seconds" in
  '' | *[!0-9]*)
    echo "run.sh: FUZZ_SECONDS must be a whole number of seconds, got '$seconds'" >&2
    exit 2
    ;;
esac

if ! command -v rustup >/dev/null; then
  echo "SKIP fuzz: rustup not found; the fuzz targets need a nightly toolchain"
  exit 0
fi
if ! rustup toolchain list | grep -q '^nightly'; then
  echo "== fuzz: installing the nightly toolchain"
  if ! rustup toolchain install nightly --profile minimal; then
    echo "SKIP fuzz: no nightly toolchain and 'rustup toolchain install nightly' failed"
    exit 0
  fi
fi

if ! command -v cargo-fuzz >/dev/null; then
  echo "== fuzz: installing cargo-fuzz"
  start=$SECONDS
  cargo install cargo-fuzz --locked --version 0.13.2
  echo "cargo-fuzz installed in $((SECONDS - start)) s"
fi

# Both paths are absolute, so the invocation works from any directory and
# ignores a CARGO_TARGET_DIR pointing at the workspace's target/.
fuzz_args=(--fuzz-dir "$here" --target-dir "$here/target" --sanitizer "$sanitizer")

echo "== fuzz: building ${targets[*]} (nightly, sanitizer $sanitizer)"
start=$SECONDS
for t in "${targets[@]}"; do
  cargo +nightly fuzz build "${fuzz_args[@]}" "$t"
done
echo "fuzz targets built in $((SECONDS - start)) s"

failed=()
for t in "${targets[@]}"; do
  echo "== fuzz: $t for ${seconds} s"
  work="$here/corpus-work/$t"
  mkdir -p "$work" "$here/corpus/$t" "$here/artifacts/$t"
  touch "$work.started"
  log="$here/corpus-work/$t.log"
  # The first corpus directory receives new inputs; the seeds stay as they are.
  # libFuzzer's progress lines go to the log; CI shows a summary, or the
  # log's end on a crash.
  if cargo +nightly fuzz run "${fuzz_args[@]}" "$t" "$work" "$here/corpus/$t" -- \
    -max_total_time="$seconds" -rss_limit_mb="$rss_mb" -timeout=10 -print_final_stats=1 \
    >"$log" 2>&1; then
    grep -E 'INITED|DONE|^stat::' "$log" || true
    echo "fuzz $t: no crash in ${seconds} s"
  else
    failed+=("$t")
    tail -n 80 "$log"
    echo "fuzz $t: FAILED (full log: $log); inputs saved under $here/artifacts/$t:"
    while IFS= read -r -d '' f; do
      echo "--- $f (base64)"
      base64 -w 76 "$f"
    done < <(find "$here/artifacts/$t" -type f -newer "$work.started" -print0)
    echo "reproduce: cargo +nightly fuzz run --fuzz-dir shared/proto/fuzz $t <artifact file>"
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: crash found in: ${failed[*]}" >&2
  exit 1
fi
echo "fuzz: ${#targets[@]} targets, no crash"
