//! What binary this is: the workspace version and the git commit it was
//! built from (recorded by `build.rs`; `unknown` outside a git checkout),
//! exposed as `tidemesh_build_info{version, commit} 1` on both `/metrics`
//! pages and printed by `--version` with the target and profile.

use crate::metrics::{Exposition, Kind};

/// The workspace version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The git commit (12 hex digits), or `unknown`.
pub const COMMIT: &str = env!("TIDEMESH_BUILD_COMMIT");
/// What `tidemesh-hub --version` and `tidemesh-spoke --version` print after
/// the name: `0.1.0 (commit 3dc7891a2b4c, built for x86_64-unknown-linux-gnu, release)`.
pub const VERSION_LINE: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("TIDEMESH_BUILD_COMMIT"),
    ", built for ",
    env!("TIDEMESH_BUILD_TARGET"),
    ", ",
    env!("TIDEMESH_BUILD_PROFILE"),
    ")"
);

/// Writes the `tidemesh_build_info` family.
pub fn write(e: &mut Exposition) {
    e.family(
        "tidemesh_build_info",
        Kind::Gauge,
        "Always 1; the labels name the version and the git commit of this binary.",
    )
    .sample(&[("version", VERSION), ("commit", COMMIT)], 1.0);
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_a_version_and_a_commit() {
        let mut e = crate::metrics::Exposition::new();
        super::write(&mut e);
        let page = e.finish();
        assert!(
            page.contains(&format!(
                "tidemesh_build_info{{version=\"{}\",commit=\"{}\"}} 1\n",
                super::VERSION,
                super::COMMIT
            )),
            "{page}"
        );
        assert!(!super::COMMIT.is_empty());
        assert!(super::COMMIT
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.+".contains(c)));
    }
}
