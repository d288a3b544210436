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

    /// `tidemesh-hub validate` reads key set files as apply does: a
    /// missing one is the same error, a good one lands in the config.
    #[test]
    fn offline_validate_reads_key_set_files() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("jwks.json");
        std::fs::write(&good, KEY).unwrap();
        let doc = |p: &std::path::Path| {
            format!(
                "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: jwt, namespace: shop}}\nspec:\n  jwtRules: [{{issuer: https://idp.test, jwksUri: 'file://{}'}}]\n",
                p.display()
            )
        };
        let c = crate::sync::validate_offline(None, &doc(&good)).unwrap();
        assert_eq!(c.jwks_files.len(), 1);
        let e =
            crate::sync::validate_offline(None, &doc(&dir.path().join("gone.json"))).unwrap_err();
        assert!(e.contains("jwksUri: cannot read"), "{e}");
    }

    /// Through the hub: a file key set is read at every apply and
    /// rollback (a rollback gets today's keys), travels only in the slices
    /// of stores it concerns, and a file gone by then refuses the rollback.
    #[test]
    fn apply_and_rollback_read_the_file_and_slices_carry_it() {
        use std::sync::Arc;
        use tidemesh_identity::{clock::SystemClock, TrustDomain};
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("hub");
        crate::init(
            &dir,
            &TrustDomain::new("jwks.example").unwrap(),
            &SystemClock,
        )
        .unwrap();
        let hub =
            crate::Hub::open(&dir, crate::HubConfig::default(), Arc::new(SystemClock)).unwrap();
        let file = tmp.path().join("jwks.json");
        std::fs::write(&file, KEY).unwrap();
        let store = |name: &str| {
            format!("apiVersion: tidemesh.io/v1alpha1\nkind: Store\nmetadata: {{name: {name}}}\nspec: {{region: r, zone: z}}\n---\n")
        };
        let yaml = format!(
            "{}{}apiVersion: tidemesh.io/v1alpha1\nkind: Workload\nmetadata: {{name: pos, namespace: shop}}\nspec: {{service: pos, store: sf01, serviceAccount: pos, address: '127.0.0.1:1', labels: {{app: pos}}}}\n---\napiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: jwt, namespace: shop}}\nspec:\n  selector: {{matchLabels: {{app: pos}}}}\n  jwtRules: [{{issuer: https://idp.test, jwksUri: 'file://{}'}}]\n",
            store("sf01"),
            store("ny02"),
            file.display()
        );
        let v1 = hub.apply_yaml(&yaml, None).unwrap();
        assert_eq!(v1.config.jwks_files.len(), 1);
        assert_eq!(v1.config.jwks_files[0].json, KEY);
        // the store with the selected workload gets the key set, the other none
        let sf01 = crate::sync::slice(&v1.config, "sf01");
        assert_eq!((sf01.request_authns.len(), sf01.jwks_files.len()), (1, 1));
        let ny02 = crate::sync::slice(&v1.config, "ny02");
        assert_eq!((ny02.request_authns.len(), ny02.jwks_files.len()), (0, 0));
        // the keys rotate: the next apply (of anything) reads them again
        let rotated = KEY.replace("k1", "k2");
        std::fs::write(&file, &rotated).unwrap();
        let v2 = hub.apply_yaml(&store("la03"), None).unwrap();
        assert_eq!(v2.config.jwks_files[0].json, rotated);
        // a rollback to v1 gets today's keys, not v1's
        let v3 = hub.rollback(v1.meta.version, None).unwrap();
        assert_eq!(v3.config.jwks_files[0].json, rotated);
        // without the file, neither an apply nor a rollback goes through
        std::fs::remove_file(&file).unwrap();
        let e = hub.rollback(v1.meta.version, None).unwrap_err().to_string();
        assert!(e.contains("cannot read"), "{e}");
        assert!(hub.apply_yaml(&store("la04"), None).is_err());
    }
}
