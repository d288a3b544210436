#!/usr/bin/env bash
# package.sh: build the Debian packages of tidemesh-hub and tidemesh-spoke with cargo-deb.
#
# Usage: deploy/package.sh [--profile release|dev] [--target TRIPLE] [--no-build] [--out DIR] [hub] [spoke]
#   --profile P   cargo profile of the packaged binaries (default release; CI packages the
#                 dev build its tests already made)
#   --target T    cross target, e.g. aarch64-unknown-linux-gnu (build it first with
#                 deploy/cross-check.sh, or drop --no-build with the cross linker set up)
#   --no-build    package binaries already built for that profile and target
#   --out DIR     where the .deb files go (default: TARGET_DIR/debian)
#   --fast        faster, weaker compression (cargo deb --fast)
#   hub, spoke    which packages (default both)
#
# Needs cargo-deb (`cargo install cargo-deb --locked`). Shell completions (bash, zsh,
# fish) and man pages are generated from the binaries' clap definitions by a binary of
# the build machine (`tidemesh-hub completions bash`, `tidemesh-hub man --out-dir`), so
# a cross build also needs the host build of the same profile (built here if missing).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly ROOT
PROFILE=release
TARGET=
BUILD=1
OUT=
FAST=()
WHICH=()
while [[ $# -gt 0 ]]; do
    case $1 in
        --profile) PROFILE=${2:?--profile needs a value}; shift 2 ;;
        --target) TARGET=${2:?--target needs a value}; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        --out) OUT=${2:?--out needs a value}; shift 2 ;;
        --fast) FAST=(--fast); shift ;;
        hub | spoke) WHICH+=("$1"); shift ;;
        -h | --help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "package: unknown argument '$1' (see --help)" >&2; exit 1 ;;
    esac
done
[[ ${#WHICH[@]} -gt 0 ]] || WHICH=(hub spoke)

log() { echo "package: $*"; }
fail() { echo "package: FAIL: $*" >&2; exit 1; }

cd "$ROOT"
cargo deb --version >/dev/null 2>&1 || fail "cargo-deb is missing: cargo install cargo-deb --locked"
target_dir=${CARGO_TARGET_DIR:-$ROOT/target}
case $PROFILE in
    dev | debug) profile_dir=debug; PROFILE=dev ;;
    *) profile_dir=$PROFILE ;;
esac
[[ -n $OUT ]] || OUT=$target_dir/debian
mkdir -p "$OUT"

pkgs=()
for w in "${WHICH[@]}"; do pkgs+=(-p "tidemesh-$w"); done
target_flag=()
[[ -n $TARGET ]] && target_flag=(--target "$TARGET")
if [[ $BUILD -eq 1 ]]; then
    log "building ${WHICH[*]} ($PROFILE${TARGET:+, $TARGET})"
    start=$SECONDS
    cargo build --profile "$PROFILE" "${target_flag[@]}" "${pkgs[@]}"
    log "build took $((SECONDS - start)) s"
fi

case ${TARGET:-} in
    "") deb_arch=$(dpkg --print-architecture 2>/dev/null || echo amd64) ;;
    aarch64-*) deb_arch=arm64 ;;
    x86_64-*) deb_arch=amd64 ;;
    *) deb_arch=${TARGET%%-*} ;;
esac
for w in "${WHICH[@]}"; do
    name=tidemesh-$w
    host_bin=$target_dir/$profile_dir/$name
    if [[ ! -x $host_bin ]]; then
        log "building the host $name ($PROFILE) to generate completions and man pages"
        cargo build --profile "$PROFILE" -p "$name"
    fi
    gen=$ROOT/deploy/debian/generated/$w
    rm -rf "$gen"
    mkdir -p "$gen/man"
    "$host_bin" completions bash >"$gen/$name.bash"
    "$host_bin" completions zsh >"$gen/_$name"
    "$host_bin" completions fish >"$gen/$name.fish"
    "$host_bin" man --out-dir "$gen/man"
    log "$name: $(find "$gen/man" -name '*.1' | wc -l) man pages, bash/zsh/fish completions"

    bin=$target_dir/${TARGET:+$TARGET/}$profile_dir/$name
    [[ -x $bin ]] || fail "no binary at $bin (build it, or drop --no-build)"
    log "packaging $bin"
    # an older version's package of this architecture would make two
    rm -f "$OUT/${name}_"*"_$deb_arch.deb"
    start=$SECONDS
    cargo deb -p "$name" --no-build --profile "$PROFILE" "${target_flag[@]}" "${FAST[@]}" --output "$OUT"
    log "cargo deb took $((SECONDS - start)) s"
done
log "packages in $OUT:"
ls -l "$OUT"/*.deb
