#!/usr/bin/env bash
# cross-check.sh: cross-build tidemesh-spoke for aarch64 (Raspberry Pi class store boxes)
# and run the ARM binary under qemu-user, to prove the cross toolchain works.
#
# Usage: deploy/cross-check.sh [--release] [--test]
#   --release   build the release profile instead of debug
#   --test      also run the spoke's unit tests under qemu (slower)
#
# Installs what is missing: the rust-std for aarch64-unknown-linux-gnu with rustup, and
# Debian's gcc-aarch64-linux-gnu, libc6-dev-arm64-cross and qemu-user-static with apt-get
# (as root). If that fails, for example without network, it prints SKIP and exits 0, so
# CI can run it unconditionally.
# A failing build or a binary that does not run is a real failure (exit 1).
# See deploy/CROSS.md for the background and for static musl builds.
set -euo pipefail

readonly TARGET=aarch64-unknown-linux-gnu
readonly SYSROOT=/usr/aarch64-linux-gnu
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly ROOT

PROFILE=debug
RUN_TESTS=0
for arg in "$@"; do
    case $arg in
        --release) PROFILE=release ;;
        --test) RUN_TESTS=1 ;;
        -h | --help)
            sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "cross-check: unknown argument '$arg' (see --help)" >&2
            exit 1
            ;;
    esac
done

log() { echo "cross-check: $*"; }
skip() {
    log "SKIP: $*"
    exit 0
}
fail() {
    log "FAIL: $*" >&2
    exit 1
}

cd "$ROOT"
command -v cargo >/dev/null || skip "cargo not found"
command -v rustup >/dev/null || skip "rustup not found: cannot add the $TARGET standard library"

# 1. The Rust standard library for the target, on the toolchain this workspace uses.
toolchain=$(rustup show active-toolchain | awk '{print $1}')
if rustup target list --installed --toolchain "$toolchain" | grep -qx "$TARGET"; then
    log "rust target $TARGET already installed ($toolchain)"
else
    log "installing rust target $TARGET for $toolchain"
    rustup target add "$TARGET" --toolchain "$toolchain" ||
        skip "could not install the rust-std for $TARGET (offline?): rustup target add $TARGET"
fi

# 2. The C cross toolchain (linker; C code in dependencies such as ring) and qemu-user.
missing=()
command -v aarch64-linux-gnu-gcc >/dev/null || missing+=(gcc-aarch64-linux-gnu)
# The target's libc headers and crt files: only "recommended" by gcc-aarch64-linux-gnu, and
# needed by every crate with C code (ring: "bits/libc-header-start.h: No such file").
[[ -e $SYSROOT/include/stdio.h ]] || missing+=(libc6-dev-arm64-cross)
command -v qemu-aarch64-static >/dev/null || missing+=(qemu-user-static)
if [[ ${#missing[@]} -gt 0 ]]; then
    [[ $EUID -eq 0 ]] || skip "missing ${missing[*]}; install as root: apt-get install -y ${missing[*]}"
    command -v apt-get >/dev/null || skip "missing ${missing[*]} and no apt-get to install them"
    log "installing ${missing[*]}"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"; then
        log "apt-get install failed; refreshing the package lists once"
        { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"; } ||
            skip "could not install ${missing[*]} (offline?)"
    fi
fi

# 3. Tell cargo and the cc crate how to build, link and run for aarch64.
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64-static -L $SYSROOT"

# 4. Build.
profile_flag=()
[[ $PROFILE == release ]] && profile_flag=(--release)
log "building tidemesh-spoke ($PROFILE) for $TARGET"
start=$SECONDS
cargo build "${profile_flag[@]}" -p tidemesh-spoke --target "$TARGET" ||
    fail "cargo build -p tidemesh-spoke --target $TARGET failed"
log "build took $((SECONDS - start)) s"

target_dir=${CARGO_TARGET_DIR:-$ROOT/target}
bin=$target_dir/$TARGET/$PROFILE/tidemesh-spoke
[[ -x $bin ]] || fail "no binary at $bin"

# 5. It is an aarch64 ELF: e_machine (2 bytes at offset 18) is 0xb7 = EM_AARCH64.
machine=$(od -An -tx1 -j18 -N2 "$bin" | tr -d ' \n')
[[ $machine == b700 ]] || fail "$bin is not an aarch64 ELF (e_machine bytes: $machine)"
log "$bin: aarch64 ELF, $(du -h "$bin" | cut -f1)"

# 6. It runs under qemu-user (binfmt_misc is not relied on).
if ! out=$(qemu-aarch64-static -L "$SYSROOT" "$bin" --help 2>&1); then
    printf '%s\n' "$out" >&2
    fail "the aarch64 binary did not run under qemu: qemu-aarch64-static -L $SYSROOT $bin --help"
fi
printf '%s\n' "$out" | sed 's/^/  | /'
log "ran under qemu-aarch64-static: tidemesh-spoke --help exited 0"

# 7. Optionally the unit tests, through the RUNNER set above.
if [[ $RUN_TESTS -eq 1 ]]; then
    log "running tidemesh-spoke unit tests under qemu"
    cargo test "${profile_flag[@]}" -p tidemesh-spoke --target "$TARGET" ||
        fail "tests failed under qemu"
fi
log "OK"
