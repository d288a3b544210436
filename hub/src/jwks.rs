//! Key sets of `RequestAuthentication` rules that name a file
//! (`jwksUri: file:///PATH`): read on the hub when a config version is
//! made, so that they travel in the config snapshot to every spoke.
//!
//! What it is: [`load_config`] reads every such file (at most
//! [`tidemesh_policy::jwt::MAX_JWKS_BYTES`]), checks it with
//! [`tidemesh_policy::jwt::Jwks::parse`] and puts it, with the time it was
//! read, in [`MeshConfig::jwks_files`]. Who drives it: the apply and
//! rollback paths (`crate::sync`), after the config's own checks; a file
//! that cannot be read or is not a usable key set refuses the whole apply.
//! What it must not do: fetch anything over the network, or read unbounded
//! files.

use std::io::Read;

use tidemesh_policy::{
    jwt::{Jwks, MAX_JWKS_BYTES},
    reqauthn::{JwksFile, JwksSource},
    MeshConfig,
};

/// Reads every file key set `config` names (each path once) into
/// `config.jwks_files`, stamped `now_ms`; replaces what was there. The
/// error names every object, rule and file that failed.
pub fn load_config(config: &mut MeshConfig, now_ms: u64) -> Result<(), String> {
    let mut files: Vec<JwksFile> = Vec::new();
    let mut errors = Vec::new();
    for ra in &config.request_authns {
        for (i, r) in ra.jwt_rules.iter().enumerate() {
            let JwksSource::File(path) = &r.jwks else {
                continue;
            };
            if files.iter().any(|f| &f.path == path) {
                continue;
            }
            match read(path) {
                Ok(json) => files.push(JwksFile {
                    path: path.clone(),
                    json,
                    read_at_ms: now_ms,
                }),
                Err(e) => errors.push(format!(
                    "RequestAuthentication {}: spec.jwtRules[{i}].jwksUri: {e}",
                    ra.id
                )),
            }
        }
    }
    if !errors.is_empty() {
        return Err(errors.join("\n"));
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    config.jwks_files = files;
    Ok(())
}

fn read(path: &str) -> Result<String, String> {
    let f = std::fs::File::open(path).map_err(|e| format!("cannot read {path}: {e}"))?;
    let mut buf = Vec::new();
    f.take(MAX_JWKS_BYTES as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(|e| format!("cannot read {path}: {e}"))?;
    if buf.len() > MAX_JWKS_BYTES {
        return Err(format!("{path} is larger than {MAX_JWKS_BYTES} bytes"));
    }
    let json = String::from_utf8(buf).map_err(|_| format!("{path} is not UTF-8 text"))?;
    Jwks::parse(&json).map_err(|e| format!("{path}: {e}"))?;
    Ok(json)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]
mod tests {
    use super::*;

    const KEY: &str = r#"{"keys":[{"kty":"OKP","crv":"Ed25519","kid":"k1","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]}"#;

    fn config(path: &str) -> MeshConfig {
        MeshConfig::from_yaml(&format!(
            "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: jwt, namespace: shop}}\nspec:\n  jwtRules:\n  - {{issuer: https://idp.test, jwksUri: 'file://{path}'}}\n  - {{issuer: https://idp2.test, jwksUri: 'file://{path}'}}\n"
        ))
        .unwrap()
    }

    #[test]
    fn files_are_read_checked_and_stamped() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("jwks.json");
        std::fs::write(&good, KEY).unwrap();
        let mut c = config(good.to_str().unwrap());
        load_config(&mut c, 42).unwrap();
        assert_eq!(c.jwks_files.len(), 1, "one read per path");
        assert_eq!(c.jwks_files[0].json, KEY);
        assert_eq!(c.jwks_files[0].read_at_ms, 42);
        tidemesh_policy::reqauthn::CompiledAuthn::from_config(&c).unwrap();

        let missing = dir.path().join("nope.json");
        let e = load_config(&mut config(missing.to_str().unwrap()), 1).unwrap_err();
        assert!(
            e.contains("RequestAuthentication shop/jwt: spec.jwtRules[0].jwksUri: cannot read"),
            "{e}"
        );
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, r#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#).unwrap();
        let e = load_config(&mut config(bad.to_str().unwrap()), 1).unwrap_err();
        assert!(e.contains("not supported"), "{e}");
        let big = dir.path().join("big.json");
        std::fs::write(&big, " ".repeat(MAX_JWKS_BYTES + 1)).unwrap();
        let e = load_config(&mut config(big.to_str().unwrap()), 1).unwrap_err();
        assert!(e.contains("larger than"), "{e}");
    }
}
