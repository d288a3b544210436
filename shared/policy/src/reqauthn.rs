//! Request authentication: Istio's `RequestAuthentication` (JWT) as model
//! types, and its compiled form that authenticates one request.
//!
//! What it is: [`RequestAuthn`] (what the config holds: selector and JWT
//! rules), [`JwksFile`] (a key set the hub read from a file at apply, so it
//! travels in the config snapshot), and [`CompiledAuthn`], built once per
//! config version, whose [`CompiledAuthn::authenticate`] finds the token of
//! a request, picks the rule of its issuer and verifies it with
//! [`crate::jwt::verify`].
//!
//! Semantics (Istio's): the `RequestAuthentication`s that select a workload
//! (its namespace's and the root namespace's, by `selector.matchLabels`)
//! are merged. A request **without** a token passes authentication with no
//! request principal (authorization decides; `requestPrincipals: ["*"]`
//! then does not match). A request **with** a token (in `Authorization:
//! Bearer ...`, or the rules' `fromHeaders`) must verify against the rule
//! of its issuer: a token of an issuer no rule names, or one that fails
//! ([`crate::jwt::JwtError`]: signature, expiry, `nbf`, audience, `alg:
//! none`, unknown `kid`, malformed, a repeated JSON key) is refused (the
//! spoke answers 401). A verified token gives the request principal
//! `iss/sub`, the claims `when` conditions read, and the claim headers.
//!
//! Who drives it: the spoke's inbound path (per request) and the spoke's
//! status and vector (key set ages). What it must not do: I/O or clock
//! reads (time is passed in), or panic on hostile headers.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::jwt::{self, Jwks, JwtError, VerifiedClaims};
use crate::model::{labels_match, Labels, ObjectName};
use crate::request::HeaderLookup;
use crate::MeshConfig;

/// Most JWT rules in one `RequestAuthentication`.
pub const MAX_JWT_RULES: usize = 32;
/// Most claim headers (or token headers) of one rule.
pub const MAX_RULE_HEADERS: usize = 16;
/// Longest claim header value set on the upstream request; a longer claim
/// is not forwarded.
pub const MAX_CLAIM_HEADER_BYTES: usize = 4096;

/// A `RequestAuthentication`: which workloads, and the JWT issuers they accept.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestAuthn {
    /// Namespace and name.
    pub id: ObjectName,
    /// `selector.matchLabels`; `None` selects every workload of the namespace
    /// (of every namespace, in the root namespace).
    pub selector: Option<Labels>,
    /// The accepted issuers.
    pub jwt_rules: Vec<JwtRule>,
}

/// One accepted issuer (Istio `JWTRule`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JwtRule {
    /// `iss` the token must carry.
    pub issuer: String,
    /// Accepted `aud` values (one must be in the token); empty: any.
    pub audiences: Vec<String>,
    /// Where the public keys are.
    pub jwks: JwksSource,
    /// Pass the token on to the workload (default: removed).
    pub forward_original_token: bool,
    /// Claims copied to request headers for the workload.
    pub output_claim_to_headers: Vec<ClaimToHeader>,
    /// Where the token is; empty: `Authorization: Bearer <token>`.
    pub from_headers: Vec<TokenHeader>,
}

/// The key set of a rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum JwksSource {
    /// `jwks`: the key set's JSON, inline.
    Inline(String),
    /// `jwksUri: file:///PATH`: an absolute path on the hub, read at apply
    /// into [`MeshConfig::jwks_files`].
    File(String),
}

/// `outputClaimToHeaders[]`: a claim copied to a request header.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimToHeader {
    /// Header name (lowercase).
    pub header: String,
    /// Top-level claim name.
    pub claim: String,
}

/// `fromHeaders[]`: a header carrying the token, after an optional prefix.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenHeader {
    /// Header name (lowercase).
    pub name: String,
    /// Prefix before the token (e.g. `Bearer `), if any.
    pub prefix: Option<String>,
}

/// A key set file as the hub read it when the config version was made.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JwksFile {
    /// The absolute path on the hub.
    pub path: String,
    /// Its content (a JSON Web Key Set, checked by [`Jwks::parse`]).
    pub json: String,
    /// When the hub read it (ms since the Unix epoch).
    pub read_at_ms: u64,
}

/// What a verified token tells authorization (`requestPrincipals`,
/// `request.auth.*`).
#[derive(Clone, Debug, PartialEq)]
pub struct RequestAuth {
    /// `iss/sub`.
    pub principal: String,
    /// Every claim of the token.
    pub claims: Map<String, Value>,
    /// The token's `aud` values.
    pub audiences: Vec<String>,
    /// The token's `azp`, if any.
    pub presenter: Option<String>,
}

impl RequestAuth {
    /// The string values of claim `path` (nested names): a string, or the
    /// strings of a list; numbers and booleans as written.
    pub fn claim_values(&self, path: &[String]) -> Vec<String> {
        let Some((first, rest)) = path.split_first() else {
            return Vec::new();
        };
        let mut v = self.claims.get(first);
        for p in rest {
            v = v.and_then(|x| x.get(p));
        }
        match v {
            Some(Value::Array(items)) => items.iter().filter_map(scalar).collect(),
            Some(other) => scalar(other).into_iter().collect(),
            None => Vec::new(),
        }
    }
}

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// A request whose token verified.
#[derive(Clone, Debug)]
pub struct Authenticated {
    /// The facts authorization reads.
    pub auth: RequestAuth,
    /// The verified claims.
    pub verified: VerifiedClaims,
    /// The `RequestAuthentication` whose rule verified it (`ns/name`).
    pub policy: String,
    /// The header the token came from (to remove unless forwarded).
    pub token_header: String,
    /// Whether the rule forwards the token.
    pub forward_original_token: bool,
    /// Claim headers to set on the upstream request (name, value).
    pub claim_headers: Vec<(String, String)>,
    /// When the rule's key set was read by the hub (file key sets); `None`
    /// for an inline key set (its age is the config version's).
    pub jwks_read_ms: Option<u64>,
}

/// Why a present token was refused (the spoke answers 401).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthnFailure {
    /// The `RequestAuthentication`s that apply (`ns/name`, comma-separated).
    pub policies: String,
    /// What was wrong, for the caller and the evidence.
    pub reason: String,
}

/// The outcome for one request.
#[derive(Clone, Debug)]
pub enum AuthnOutcome {
    /// No `RequestAuthentication` selects the workload: tokens are not
    /// looked at (and passed on as they are).
    NotApplicable,
    /// One applies and the request carries no token: no request principal.
    NoToken,
    /// The token verified.
    Verified(Box<Authenticated>),
    /// The token is present and was refused.
    Failed(AuthnFailure),
}

#[derive(Debug)]
struct CRule {
    policy: String,
    issuer: String,
    audiences: Vec<String>,
    jwks: Arc<Jwks>,
    jwks_read_ms: Option<u64>,
    forward: bool,
    claim_headers: Vec<ClaimToHeader>,
    from_headers: Vec<TokenHeader>,
}

#[derive(Debug)]
struct CPolicy {
    namespace: String,
    selector: Option<Labels>,
    rules: Vec<CRule>,
}

/// The `RequestAuthentication`s of a config, with their key sets parsed.
#[derive(Debug, Default)]
pub struct CompiledAuthn {
    policies: Vec<CPolicy>,
    root_namespace: String,
}

/// The default token location: `Authorization: Bearer <token>`.
fn default_headers() -> Vec<TokenHeader> {
    vec![TokenHeader {
        name: "authorization".into(),
        prefix: Some("Bearer ".into()),
    }]
}

/// The key set age facts of one rule, for status and vectors.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct JwksFacts {
    /// The `RequestAuthentication` (`ns/name`).
    pub policy: String,
    /// The rule's issuer.
    pub issuer: String,
    /// `inline` or `file:///PATH`.
    pub source: String,
    /// Keys in the set.
    pub keys: usize,
    /// When the hub read the file (ms); `None` for inline key sets.
    pub read_at_ms: Option<u64>,
}

impl CompiledAuthn {
    /// Compiles the config's `RequestAuthentication`s: every key set must
    /// parse, and every file key set must have been read by the hub.
    pub fn from_config(config: &MeshConfig) -> Result<CompiledAuthn, String> {
        let mut policies = Vec::new();
        for ra in &config.request_authns {
            let name = ra.id.to_string();
            let mut rules = Vec::new();
            for (i, r) in ra.jwt_rules.iter().enumerate() {
                let at =
                    |m: String| format!("RequestAuthentication {name}: spec.jwtRules[{i}]: {m}");
                let (json, read) = match &r.jwks {
                    JwksSource::Inline(j) => (j.as_str(), None),
                    JwksSource::File(path) => {
                        let f = config
                            .jwks_files
                            .iter()
                            .find(|f| &f.path == path)
                            .ok_or_else(|| {
                                at(format!("jwksUri file://{path} was not read by the hub"))
                            })?;
                        (f.json.as_str(), Some(f.read_at_ms))
                    }
                };
                let jwks = Jwks::parse(json).map_err(|e| at(e.to_string()))?;
                rules.push(CRule {
                    policy: name.clone(),
                    issuer: r.issuer.clone(),
                    audiences: r.audiences.clone(),
                    jwks: Arc::new(jwks),
                    jwks_read_ms: read,
                    forward: r.forward_original_token,
                    claim_headers: r.output_claim_to_headers.clone(),
                    from_headers: if r.from_headers.is_empty() {
                        default_headers()
                    } else {
                        r.from_headers.clone()
                    },
                });
            }
            policies.push(CPolicy {
                namespace: ra.id.namespace.clone(),
                selector: ra.selector.clone().filter(|s| !s.is_empty()),
                rules,
            });
        }
        Ok(CompiledAuthn {
            policies,
            root_namespace: config.settings.root_namespace.clone(),
        })
    }

    /// Whether any `RequestAuthentication` exists.
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    fn rules_for<'a>(
        &'a self,
        namespace: &'a str,
        labels: &'a Labels,
    ) -> impl Iterator<Item = &'a CRule> + 'a {
        self.policies
            .iter()
            .filter(move |p| {
                (p.namespace == namespace || p.namespace == self.root_namespace)
                    && p.selector.as_ref().is_none_or(|s| labels_match(s, labels))
            })
            .flat_map(|p| p.rules.iter())
    }

    /// The key sets of the rules that apply to a workload.
    pub fn jwks_facts(
        &self,
        namespace: &str,
        labels: &Labels,
        config: &MeshConfig,
    ) -> Vec<JwksFacts> {
        config
            .request_authns
            .iter()
            .filter(|ra| {
                (ra.id.namespace == namespace || ra.id.namespace == self.root_namespace)
                    && ra.selector.as_ref().is_none_or(|s| labels_match(s, labels))
            })
            .flat_map(|ra| self.facts_of(ra, config))
            .collect()
    }

    /// The key sets of every rule of the config.
    pub fn all_jwks_facts(&self, config: &MeshConfig) -> Vec<JwksFacts> {
        config
            .request_authns
            .iter()
            .flat_map(|ra| self.facts_of(ra, config))
            .collect()
    }

    fn facts_of(&self, ra: &RequestAuthn, config: &MeshConfig) -> Vec<JwksFacts> {
        let name = ra.id.to_string();
        ra.jwt_rules
            .iter()
            .map(|r| {
                let (source, read_at_ms) = match &r.jwks {
                    JwksSource::Inline(_) => ("inline".to_string(), None),
                    JwksSource::File(p) => (
                        format!("file://{p}"),
                        config
                            .jwks_files
                            .iter()
                            .find(|f| &f.path == p)
                            .map(|f| f.read_at_ms),
                    ),
                };
                let keys = self
                    .policies
                    .iter()
                    .flat_map(|p| p.rules.iter())
                    .find(|c| c.policy == name && c.issuer == r.issuer)
                    .map_or(0, |c| c.jwks.keys.len());
                JwksFacts {
                    policy: name.clone(),
                    issuer: r.issuer.clone(),
                    source,
                    keys,
                    read_at_ms,
                }
            })
            .collect()
    }

    /// The claim header names every applicable rule sets: the caller's own
    /// values of these are removed whatever the outcome, so a caller cannot
    /// inject them.
    pub fn claim_header_names(&self, namespace: &str, labels: &Labels) -> Vec<String> {
        let mut v: Vec<String> = self
            .rules_for(namespace, labels)
            .flat_map(|r| r.claim_headers.iter().map(|c| c.header.clone()))
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// Authenticates a request to a workload (`namespace`, `labels`) from
    /// its headers, at `now` (seconds since the epoch) with `leeway`
    /// seconds of clock skew allowed on `exp` and `nbf`.
    pub fn authenticate(
        &self,
        namespace: &str,
        labels: &Labels,
        headers: &dyn HeaderLookup,
        now: u64,
        leeway: u64,
    ) -> AuthnOutcome {
        let rules: Vec<&CRule> = self.rules_for(namespace, labels).collect();
        if rules.is_empty() {
            return AuthnOutcome::NotApplicable;
        }
        let mut names: Vec<&str> = rules.iter().map(|r| r.policy.as_str()).collect();
        names.dedup();
        let fail = |reason: String| {
            AuthnOutcome::Failed(AuthnFailure {
                policies: names.join(", "),
                reason,
            })
        };
        // The first location (in rule order) that carries a token.
        let mut found: Option<(&str, &str)> = None;
        'outer: for r in &rules {
            for h in &r.from_headers {
                let Some(v) = headers.header(&h.name) else {
                    continue;
                };
                let token = match &h.prefix {
                    None => Some(v),
                    Some(p) => v
                        .get(..p.len())
                        .filter(|head| head.eq_ignore_ascii_case(p))
                        .and_then(|_| v.get(p.len()..)),
                };
                if let Some(t) = token {
                    found = Some((h.name.as_str(), t.trim()));
                    break 'outer;
                }
            }
        }
        let Some((header, token)) = found else {
            return AuthnOutcome::NoToken;
        };
        if token.len() > jwt::MAX_TOKEN_BYTES {
            return fail(format!(
                "the token is {} bytes; at most {} are accepted",
                token.len(),
                jwt::MAX_TOKEN_BYTES
            ));
        }
        let issuer = match jwt::unverified_issuer(token) {
            Ok(Some(i)) => i,
            Ok(None) => return fail("the token has no issuer (iss)".into()),
            Err(e) => return fail(e.to_string()),
        };
        let mut first_err: Option<JwtError> = None;
        for r in rules.iter().filter(|r| r.issuer == issuer) {
            match jwt::verify(token, &r.jwks, &r.issuer, &r.audiences, now, leeway) {
                Ok(verified) => {
                    let auth = RequestAuth {
                        principal: verified.request_principal(),
                        audiences: match verified.claims.get("aud") {
                            Some(Value::String(a)) => vec![a.clone()],
                            Some(Value::Array(l)) => l
                                .iter()
                                .filter_map(Value::as_str)
                                .map(str::to_owned)
                                .collect(),
                            _ => Vec::new(),
                        },
                        presenter: verified
                            .claims
                            .get("azp")
                            .and_then(Value::as_str)
                            .map(str::to_owned),
                        claims: verified.claims.clone(),
                    };
                    let claim_headers = r
                        .claim_headers
                        .iter()
                        .filter_map(|c| {
                            let v = scalar(verified.claims.get(&c.claim)?)?;
                            let ok = v.len() <= MAX_CLAIM_HEADER_BYTES
                                && v.bytes().all(|b| b == b'\t' || (0x20..0x7f).contains(&b));
                            ok.then(|| (c.header.clone(), v))
                        })
                        .collect();
                    return AuthnOutcome::Verified(Box::new(Authenticated {
                        auth,
                        verified,
                        policy: r.policy.clone(),
                        token_header: header.to_owned(),
                        forward_original_token: r.forward,
                        claim_headers,
                        jwks_read_ms: r.jwks_read_ms,
                    }));
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) => fail(e.to_string()),
            None => fail(format!(
                "issuer {:?} is not accepted here",
                issuer.chars().take(256).collect::<String>()
            )),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]
mod tests {
    use super::*;
    use ring::{
        rand::SystemRandom,
        signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING},
    };

    const ISS: &str = "https://idp.store.test";
    const NOW: u64 = 1_800_000_000;

    fn enc(b: &[u8]) -> String {
        const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for c in b.chunks(3) {
            let n = (u32::from(c[0]) << 16)
                | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
                | u32::from(*c.get(2).unwrap_or(&0));
            for i in 0..=c.len() {
                out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out
    }

    struct Key(EcdsaKeyPair);

    impl Key {
        fn new() -> Key {
            let rng = SystemRandom::new();
            let pk = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
            Key(
                EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pk.as_ref(), &rng)
                    .unwrap(),
            )
        }
        fn jwks(&self) -> String {
            let p = self.0.public_key().as_ref();
            serde_json::json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "k1", "x": enc(&p[1..33]), "y": enc(&p[33..65])}]}).to_string()
        }
        fn sign(&self, claims: &Value) -> String {
            let input = format!(
                "{}.{}",
                enc(br#"{"alg":"ES256","kid":"k1"}"#),
                enc(claims.to_string().as_bytes())
            );
            let sig = self.0.sign(&SystemRandom::new(), input.as_bytes()).unwrap();
            format!("{input}.{}", enc(sig.as_ref()))
        }
    }

    fn config(key: &Key, extra: &str) -> MeshConfig {
        let yaml = format!(
            r#"
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: pos}}}}
  jwtRules:
  - issuer: {ISS}
    audiences: [pos]
    jwks: '{}'
    outputClaimToHeaders: [{{header: x-user, claim: sub}}, {{header: x-role, claim: role}}]
{extra}"#,
            key.jwks()
        );
        MeshConfig::from_yaml(&yaml).unwrap()
    }

    fn labels(app: &str) -> Labels {
        [("app".to_string(), app.to_string())].into_iter().collect()
    }

    fn claims() -> Value {
        serde_json::json!({"iss": ISS, "sub": "alice", "aud": "pos", "exp": NOW + 60, "role": "cashier", "groups": ["a", "b"], "azp": "till"})
    }

    struct H<'a>(&'a [(String, String)]);

    impl HeaderLookup for H<'_> {
        fn header(&self, name: &str) -> Option<&str> {
            self.0.header(name)
        }
    }

    fn run(c: &CompiledAuthn, headers: &[(String, String)], app: &str) -> AuthnOutcome {
        c.authenticate("shop", &labels(app), &H(headers), NOW, 0)
    }

    fn bearer(t: &str) -> Vec<(String, String)> {
        vec![("authorization".into(), format!("Bearer {t}"))]
    }

    #[test]
    fn istio_semantics_no_token_valid_invalid_unselected() {
        let key = Key::new();
        let c = CompiledAuthn::from_config(&config(&key, "")).unwrap();
        // not selected: tokens are not looked at
        assert!(matches!(
            run(&c, &bearer("junk"), "other"),
            AuthnOutcome::NotApplicable
        ));
        // selected, no token, or a non-Bearer Authorization
        assert!(matches!(run(&c, &[], "pos"), AuthnOutcome::NoToken));
        let basic = vec![("authorization".to_string(), "Basic YTpi".to_string())];
        assert!(matches!(run(&c, &basic, "pos"), AuthnOutcome::NoToken));
        // valid
        let AuthnOutcome::Verified(a) = run(&c, &bearer(&key.sign(&claims())), "pos") else {
            panic!("valid token refused")
        };
        assert_eq!(a.auth.principal, format!("{ISS}/alice"));
        assert_eq!(a.auth.audiences, vec!["pos".to_string()]);
        assert_eq!(a.auth.presenter.as_deref(), Some("till"));
        assert_eq!(a.auth.claim_values(&["groups".into()]), vec!["a", "b"]);
        assert_eq!(a.policy, "shop/jwt");
        assert_eq!(a.token_header, "authorization");
        assert!(!a.forward_original_token);
        assert_eq!(
            a.claim_headers,
            vec![
                ("x-user".to_string(), "alice".to_string()),
                ("x-role".to_string(), "cashier".to_string())
            ]
        );
        assert_eq!(
            c.claim_header_names("shop", &labels("pos")),
            vec!["x-role", "x-user"]
        );
        // invalid: expired, wrong key, wrong issuer, wrong audience, malformed, too long
        let mut expired = claims();
        expired["exp"] = (NOW - 1).into();
        let mut other_iss = claims();
        other_iss["iss"] = "https://evil.test".into();
        let mut other_aud = claims();
        other_aud["aud"] = "kiosk".into();
        for (token, want) in [
            (key.sign(&expired), "expired"),
            (Key::new().sign(&claims()), "signature"),
            (key.sign(&other_iss), "not accepted"),
            (key.sign(&other_aud), "audience"),
            ("a.b.c".to_string(), "malformed"),
            ("x".repeat(jwt::MAX_TOKEN_BYTES + 1), "at most"),
        ] {
            match run(&c, &bearer(&token), "pos") {
                AuthnOutcome::Failed(f) => {
                    assert!(f.reason.contains(want), "{want}: {}", f.reason);
                    assert_eq!(f.policies, "shop/jwt");
                }
                other => panic!("{want}: {other:?}"),
            }
        }
    }

    #[test]
    fn from_headers_and_file_key_sets() {
        let key = Key::new();
        let extra = "    forwardOriginalToken: true\n    fromHeaders: [{name: x-jwt}]\n";
        let c = CompiledAuthn::from_config(&config(&key, extra)).unwrap();
        let t = key.sign(&claims());
        let h = vec![("x-jwt".to_string(), t.clone())];
        let AuthnOutcome::Verified(a) = run(&c, &h, "pos") else {
            panic!("token in x-jwt refused")
        };
        assert_eq!(a.token_header, "x-jwt");
        assert!(a.forward_original_token);
        // with fromHeaders, Authorization is not a token location
        assert!(matches!(run(&c, &bearer(&t), "pos"), AuthnOutcome::NoToken));

        // a file key set must have been read by the hub
        let yaml = format!(
            "apiVersion: security.istio.io/v1beta1\nkind: RequestAuthentication\nmetadata: {{name: f, namespace: shop}}\nspec:\n  jwtRules: [{{issuer: {ISS}, jwksUri: 'file:///etc/jwks.json'}}]\n"
        );
        let mut cfg = MeshConfig::from_yaml(&yaml).unwrap();
        let e = CompiledAuthn::from_config(&cfg).unwrap_err();
        assert!(e.contains("was not read by the hub"), "{e}");
        cfg.jwks_files.push(JwksFile {
            path: "/etc/jwks.json".into(),
            json: key.jwks(),
            read_at_ms: 5,
        });
        let c = CompiledAuthn::from_config(&cfg).unwrap();
        let AuthnOutcome::Verified(a) = run(&c, &bearer(&t), "any") else {
            panic!("file key set")
        };
        assert_eq!(a.jwks_read_ms, Some(5));
        let facts = c.jwks_facts("shop", &labels("any"), &cfg);
        assert_eq!(facts.len(), 1);
        assert_eq!(facts[0].source, "file:///etc/jwks.json");
        assert_eq!(facts[0].keys, 1);
        assert_eq!(facts[0].read_at_ms, Some(5));
    }
}
