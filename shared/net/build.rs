//! Records the git commit the binaries are built from, for
//! `tidemesh_build_info{commit}` and `--version` (see `src/build_info.rs`).
//!
//! `TIDEMESH_BUILD_COMMIT` wins when set (packagers building from a
//! tarball, or a developer who does not want every commit to rebuild the
//! workspace); otherwise `git rev-parse HEAD`; `unknown` outside a git
//! checkout or without git.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let o = Command::new("git").args(args).output().ok()?;
    if !o.status.success() {
        return None;
    }
    let s = String::from_utf8(o.stdout).ok()?.trim().to_owned();
    (!s.is_empty()).then_some(s)
}

fn main() {
    println!("cargo:rerun-if-env-changed=TIDEMESH_BUILD_COMMIT");
    let commit = match std::env::var("TIDEMESH_BUILD_COMMIT") {
        Ok(c) if !c.trim().is_empty() => c.trim().to_owned(),
        _ => {
            // Rebuild when HEAD moves: HEAD itself (a checkout), the branch
            // it points at (a commit) and packed-refs (a gc); only the files
            // that exist, or cargo would rerun this on every build.
            let mut watch = vec![git(&["rev-parse", "--git-path", "HEAD"])];
            if let Some(r) = git(&["symbolic-ref", "-q", "HEAD"]) {
                watch.push(git(&["rev-parse", "--git-path", &r]));
            }
            watch.push(git(&["rev-parse", "--git-path", "packed-refs"]));
            for p in watch.into_iter().flatten() {
                if std::path::Path::new(&p).exists() {
                    println!("cargo:rerun-if-changed={p}");
                }
            }
            git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into())
        }
    };
    // Only printable ASCII reaches the label.
    let commit: String = commit
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '+'))
        .take(64)
        .collect();
    let commit = if commit.is_empty() {
        "unknown".into()
    } else {
        commit
    };
    println!("cargo:rustc-env=TIDEMESH_BUILD_COMMIT={commit}");
    // For `--version`: the target triple and the profile (`debug` or
    // `release`; profiles that inherit release say `release`), both set by
    // cargo for build scripts.
    for (from, to) in [
        ("TARGET", "TIDEMESH_BUILD_TARGET"),
        ("PROFILE", "TIDEMESH_BUILD_PROFILE"),
    ] {
        let v = std::env::var(from).unwrap_or_else(|_| "unknown".into());
        println!("cargo:rustc-env={to}={v}");
    }
}
