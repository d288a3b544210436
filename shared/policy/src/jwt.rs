//! A small, strict JWS (compact JWT) verifier for request authentication.
//!
//! What it is: [`Jwks::parse`] reads a JSON Web Key Set; [`verify`] checks
//! a compact token against it, an issuer, audiences and a time passed in,
//! and returns [`VerifiedClaims`], a type no other crate can build. Only
//! asymmetric algorithms are accepted, each bound to its key type: `ES256`
//! (P-256 keys), `EdDSA` (Ed25519 keys). `none`, every `HS*` algorithm (the
//! classic key-confusion attack uses an RSA public key as an HMAC secret)
//! and a token whose `crit` header asks for extensions are refused; a key is
//! only tried for the algorithm of its type (and its `alg`, when the JWK
//! names one). Signatures are verified by ring, the crypto provider of the
//! rest of tidemesh. Base64url is decoded strictly (no padding, no other
//! alphabet, canonical trailing bits).
//!
//! JSON objects in a token (header and payload, at any depth) must not
//! repeat a key: parsers that keep the first and parsers that keep the last
//! copy would read different claims from the same signed bytes.
//!
//! Who drives it: [`crate::reqauthn`] (Istio `RequestAuthentication` on
//! the spoke's inbound path). What it must not do: I/O or clock reads (time is an argument),
//! panic or allocate without bound on hostile input (tokens are at most
//! [`MAX_TOKEN_BYTES`], key sets at most [`MAX_JWKS_BYTES`] and
//! [`MAX_KEYS`] keys).

use ring::signature::{self, UnparsedPublicKey};
use serde_json::{Map, Value};

/// Longest token accepted.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// Largest key set accepted.
pub const MAX_JWKS_BYTES: usize = 64 * 1024;
/// Most keys in a key set.
pub const MAX_KEYS: usize = 64;

/// Why a token or key set was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    /// Not three base64url parts, or larger than [`MAX_TOKEN_BYTES`].
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    /// `alg: none`: unsigned tokens are never accepted.
    #[error("unsigned token (alg none) refused")]
    AlgNone,
    /// An algorithm tidemesh does not accept (all `HS*`, `RS*`, `PS*`, ...).
    #[error("algorithm {0:?} is not accepted (ES256 and EdDSA are)")]
    UnsupportedAlg(String),
    /// The header names critical extensions.
    #[error("critical header extensions are not supported")]
    Critical,
    /// No key of the set fits the token's algorithm (and `kid`).
    #[error("no key of the key set fits this token (alg {alg}, kid {kid:?})")]
    NoKey {
        /// The token's algorithm.
        alg: &'static str,
        /// The token's key id.
        kid: Option<String>,
    },
    /// The signature does not verify with any fitting key.
    #[error("the signature does not verify")]
    BadSignature,
    /// `iss` is not the configured issuer.
    #[error("issuer {got:?} is not {want:?}")]
    Issuer {
        /// The token's `iss`.
        got: Option<String>,
        /// The configured issuer.
        want: String,
    },
    /// None of the token's audiences is configured.
    #[error("no audience of the token is accepted")]
    Audience,
    /// The token has no numeric `exp`.
    #[error("the token has no expiry (exp)")]
    NoExpiry,
    /// `exp` is past.
    #[error("the token expired at {exp} (now {now})")]
    Expired {
        /// `exp`, seconds since the epoch.
        exp: u64,
        /// The time of the check.
        now: u64,
    },
    /// `nbf` is in the future.
    #[error("the token is not valid before {nbf} (now {now})")]
    NotYetValid {
        /// `nbf`, seconds since the epoch.
        nbf: u64,
        /// The time of the check.
        now: u64,
    },
    /// The key set is not usable.
    #[error("key set: {0}")]
    Jwks(String),
}

/// Decodes base64url without padding, strictly: any other byte, a length
/// of 1 mod 4 or non-zero unused trailing bits is an error.
pub fn b64url(s: &str) -> Result<Vec<u8>, JwtError> {
    fn val(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return None,
        } as u32)
    }
    let b = s.as_bytes();
    if b.len() % 4 == 1 {
        return Err(JwtError::Malformed("base64url length"));
    }
    let mut out = Vec::with_capacity(b.len() / 4 * 3 + 2);
    for chunk in b.chunks(4) {
        let mut acc = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            let v = val(*c).ok_or(JwtError::Malformed("base64url alphabet"))?;
            acc |= v << (18 - 6 * i);
        }
        let bytes = [(acc >> 16) as u8, (acc >> 8) as u8, acc as u8];
        let n = chunk.len() - 1;
        // Unused low bits must be zero (one encoding per byte string).
        let unused = match chunk.len() {
            2 => acc & 0xFFFF,
            3 => acc & 0xFF,
            _ => 0,
        };
        if unused != 0 {
            return Err(JwtError::Malformed("base64url trailing bits"));
        }
        out.extend_from_slice(&bytes[..n]);
    }
    Ok(out)
}

/// An accepted algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alg {
    /// ECDSA P-256 with SHA-256, `r || s` signatures.
    Es256,
    /// Ed25519.
    EdDsa,
}

impl Alg {
    /// The JOSE name.
    pub fn as_str(self) -> &'static str {
        match self {
            Alg::Es256 => "ES256",
            Alg::EdDsa => "EdDSA",
        }
    }
}

/// One public key of a set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jwk {
    /// `kid`.
    pub kid: Option<String>,
    /// The algorithm the key is for (from its type).
    pub alg: Alg,
    /// The public key as ring takes it (uncompressed P-256 point, or the
    /// 32-byte Ed25519 key).
    public: Vec<u8>,
}

/// A JSON Web Key Set.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Jwks {
    /// The usable keys.
    pub keys: Vec<Jwk>,
}

fn str_field<'a>(o: &'a Map<String, Value>, k: &str) -> Result<Option<&'a str>, String> {
    match o.get(k) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(format!("{k} must be a string")),
    }
}

impl Jwks {
    /// Parses a key set. A key of a type tidemesh does not verify with (RSA,
    /// symmetric `oct`, other curves) or one marked for encryption is an
    /// error, not skipped: the operator should know the set does not do
    /// what they think.
    pub fn parse(json: &str) -> Result<Jwks, JwtError> {
        let err = JwtError::Jwks;
        if json.len() > MAX_JWKS_BYTES {
            return Err(err(format!("larger than {MAX_JWKS_BYTES} bytes")));
        }
        let v: Value = serde_json::from_str(json).map_err(|e| err(format!("not JSON: {e}")))?;
        let keys = v
            .get("keys")
            .and_then(Value::as_array)
            .ok_or_else(|| err("needs a keys array".into()))?;
        if keys.is_empty() || keys.len() > MAX_KEYS {
            return Err(err(format!("needs 1 to {MAX_KEYS} keys")));
        }
        let mut out = Vec::new();
        for (i, k) in keys.iter().enumerate() {
            let at = |m: String| err(format!("keys[{i}]: {m}"));
            let o = k.as_object().ok_or_else(|| at("not an object".into()))?;
            let kty = str_field(o, "kty").map_err(at)?;
            let crv = str_field(o, "crv").map_err(at)?;
            if let Some(u) = str_field(o, "use").map_err(at)? {
                if u != "sig" {
                    return Err(at(format!("use {u:?}: only sig keys verify tokens")));
                }
            }
            let kid = str_field(o, "kid").map_err(at)?.map(str::to_owned);
            let coord = |name: &str| -> Result<Vec<u8>, JwtError> {
                let s = str_field(o, name)
                    .map_err(at)?
                    .ok_or_else(|| at(format!("{name} is required")))?;
                b64url(s).map_err(|e| at(format!("{name}: {e}")))
            };
            let (alg, public) = match (kty, crv) {
                (Some("EC"), Some("P-256")) => {
                    let (x, y) = (coord("x")?, coord("y")?);
                    if x.len() != 32 || y.len() != 32 {
                        return Err(at("P-256 x and y must be 32 bytes".into()));
                    }
                    let mut p = vec![4u8];
                    p.extend_from_slice(&x);
                    p.extend_from_slice(&y);
                    (Alg::Es256, p)
                }
                (Some("OKP"), Some("Ed25519")) => {
                    let x = coord("x")?;
                    if x.len() != 32 {
                        return Err(at("Ed25519 x must be 32 bytes".into()));
                    }
                    (Alg::EdDsa, x)
                }
                (kty, crv) => {
                    return Err(at(format!(
                        "key type {kty:?} curve {crv:?} is not supported (EC P-256 and OKP Ed25519 are)"
                    )))
                }
            };
            if let Some(a) = str_field(o, "alg").map_err(at)? {
                if a != alg.as_str() {
                    return Err(at(format!("alg {a:?} does not fit a {} key", alg.as_str())));
                }
            }
            out.push(Jwk { kid, alg, public });
        }
        Ok(Jwks { keys: out })
    }
}

/// Claims of a token that [`verify`] accepted; other crates cannot build
/// one (`non_exhaustive`), so holding one means the token verified.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct VerifiedClaims {
    /// `iss`.
    pub issuer: String,
    /// `sub`, when present.
    pub subject: Option<String>,
    /// `exp`.
    pub expires: u64,
    /// Every claim, for `request.auth.claims[...]` and claim headers.
    pub claims: Map<String, Value>,
    /// The algorithm the signature verified with.
    pub alg: Alg,
    /// The header's `kid`, when it named one.
    pub kid: Option<String>,
}

impl VerifiedClaims {
    /// Istio's request principal: `iss/sub`.
    pub fn request_principal(&self) -> String {
        format!("{}/{}", self.issuer, self.subject.as_deref().unwrap_or(""))
    }
}

/// A JSON value whose objects, at any depth, repeat no key.
struct Strict(Value);

impl<'de> serde::Deserialize<'de> for Strict {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Strict, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Strict;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_bool<E>(self, v: bool) -> Result<Strict, E> {
                Ok(Strict(Value::Bool(v)))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Strict, E> {
                Ok(Strict(Value::from(v)))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Strict, E> {
                Ok(Strict(Value::from(v)))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Strict, E> {
                Ok(Strict(
                    serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number),
                ))
            }
            fn visit_str<E>(self, v: &str) -> Result<Strict, E> {
                Ok(Strict(Value::String(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Strict, E> {
                Ok(Strict(Value::String(v)))
            }
            fn visit_unit<E>(self) -> Result<Strict, E> {
                Ok(Strict(Value::Null))
            }
            fn visit_none<E>(self) -> Result<Strict, E> {
                Ok(Strict(Value::Null))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<Strict, A::Error> {
                let mut v = Vec::new();
                while let Some(Strict(x)) = a.next_element()? {
                    v.push(x);
                }
                Ok(Strict(Value::Array(v)))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> Result<Strict, A::Error> {
                let mut m = Map::new();
                while let Some(k) = a.next_key::<String>()? {
                    let Strict(v) = a.next_value()?;
                    if m.contains_key(&k) {
                        return Err(serde::de::Error::custom("duplicate key"));
                    }
                    m.insert(k, v);
                }
                Ok(Strict(Value::Object(m)))
            }
        }
        d.deserialize_any(V)
    }
}

fn json_object(part: &str, what: &'static str) -> Result<Map<String, Value>, JwtError> {
    let bytes = b64url(part)?;
    match serde_json::from_slice::<Strict>(&bytes) {
        Ok(Strict(Value::Object(m))) => Ok(m),
        Err(e) if e.to_string().starts_with("duplicate key") => {
            Err(JwtError::Malformed("a JSON object repeats a key"))
        }
        _ => Err(JwtError::Malformed(what)),
    }
}

/// The `iss` claim of a token, read *without* verifying anything: only to
/// choose which configured issuer's rule verifies it. A token that is not
/// three base64url parts with a JSON object payload is an error.
pub fn unverified_issuer(token: &str) -> Result<Option<String>, JwtError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(JwtError::Malformed("token too long"));
    }
    let mut parts = token.split('.');
    let (Some(_), Some(p), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed("a token has three parts"));
    };
    let claims = json_object(p, "payload is not a JSON object")?;
    Ok(claims.get("iss").and_then(Value::as_str).map(str::to_owned))
}

fn seconds(v: Option<&Value>) -> Option<u64> {
    let v = v?;
    v.as_u64().or_else(|| {
        v.as_f64()
            .filter(|f| *f >= 0.0 && f.is_finite())
            .map(|f| f as u64)
    })
}

/// Verifies a compact token: structure, algorithm, signature, then issuer,
/// expiry (`exp` required), `nbf`, and audiences (when `audiences` is not
/// empty, one of the token's `aud` must be among them). `now` and `leeway`
/// are seconds.
pub fn verify(
    token: &str,
    jwks: &Jwks,
    issuer: &str,
    audiences: &[String],
    now: u64,
    leeway: u64,
) -> Result<VerifiedClaims, JwtError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(JwtError::Malformed("token too long"));
    }
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed("a token has three parts"));
    };
    let header = json_object(h, "header is not a JSON object")?;
    let alg = match header.get("alg").and_then(Value::as_str) {
        None => return Err(JwtError::Malformed("header has no alg")),
        Some(a) if a.eq_ignore_ascii_case("none") => return Err(JwtError::AlgNone),
        Some("ES256") => Alg::Es256,
        Some("EdDSA") => Alg::EdDsa,
        Some(other) => return Err(JwtError::UnsupportedAlg(other.chars().take(32).collect())),
    };
    if header.contains_key("crit") {
        return Err(JwtError::Critical);
    }
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(k)) => Some(k.clone()),
        Some(_) => return Err(JwtError::Malformed("kid is not a string")),
    };
    let sig = b64url(s)?;
    let keys: Vec<&Jwk> = jwks
        .keys
        .iter()
        .filter(|k| k.alg == alg && (kid.is_none() || k.kid == kid))
        .collect();
    if keys.is_empty() {
        return Err(JwtError::NoKey {
            alg: alg.as_str(),
            kid,
        });
    }
    // The signing input is the token's first two parts as sent.
    let signed = &token[..h.len() + 1 + p.len()];
    let verified = keys.iter().any(|k| {
        let algo: &dyn signature::VerificationAlgorithm = match alg {
            Alg::Es256 => &signature::ECDSA_P256_SHA256_FIXED,
            Alg::EdDsa => &signature::ED25519,
        };
        UnparsedPublicKey::new(algo, &k.public)
            .verify(signed.as_bytes(), &sig)
            .is_ok()
    });
    if !verified {
        return Err(JwtError::BadSignature);
    }
    let claims = json_object(p, "payload is not a JSON object")?;
    let iss = claims.get("iss").and_then(Value::as_str);
    if iss != Some(issuer) {
        return Err(JwtError::Issuer {
            got: iss.map(|s| s.chars().take(256).collect()),
            want: issuer.to_owned(),
        });
    }
    let exp = seconds(claims.get("exp")).ok_or(JwtError::NoExpiry)?;
    if now >= exp.saturating_add(leeway) {
        return Err(JwtError::Expired { exp, now });
    }
    if let Some(nbf) = seconds(claims.get("nbf")) {
        if now.saturating_add(leeway) < nbf {
            return Err(JwtError::NotYetValid { nbf, now });
        }
    }
    if !audiences.is_empty() {
        let ok = match claims.get("aud") {
            Some(Value::String(a)) => audiences.contains(a),
            Some(Value::Array(list)) => list
                .iter()
                .filter_map(Value::as_str)
                .any(|a| audiences.iter().any(|w| w == a)),
            _ => false,
        };
        if !ok {
            return Err(JwtError::Audience);
        }
    }
    let subject = match claims.get("sub") {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(JwtError::Malformed("sub is not a string")),
    };
    Ok(VerifiedClaims {
        issuer: issuer.to_owned(),
        subject,
        expires: exp,
        claims,
        alg,
        kid,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use ring::{
        rand::SystemRandom,
        signature::{EcdsaKeyPair, Ed25519KeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING},
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

    enum Key {
        Ec(EcdsaKeyPair),
        Ed(Ed25519KeyPair),
    }

    impl Key {
        fn ec() -> Key {
            let rng = SystemRandom::new();
            let pk = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
            Key::Ec(
                EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pk.as_ref(), &rng)
                    .unwrap(),
            )
        }
        fn ed() -> Key {
            let pk = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
            Key::Ed(Ed25519KeyPair::from_pkcs8(pk.as_ref()).unwrap())
        }
        fn jwk(&self, kid: &str) -> Value {
            match self {
                Key::Ec(k) => {
                    let p = k.public_key().as_ref();
                    serde_json::json!({"kty": "EC", "crv": "P-256", "kid": kid, "x": enc(&p[1..33]), "y": enc(&p[33..65])})
                }
                Key::Ed(k) => {
                    serde_json::json!({"kty": "OKP", "crv": "Ed25519", "kid": kid, "x": enc(k.public_key().as_ref())})
                }
            }
        }
        fn sign(&self, header: &Value, claims: &Value) -> String {
            let input = format!(
                "{}.{}",
                enc(header.to_string().as_bytes()),
                enc(claims.to_string().as_bytes())
            );
            let sig = match self {
                Key::Ec(k) => k
                    .sign(&SystemRandom::new(), input.as_bytes())
                    .unwrap()
                    .as_ref()
                    .to_vec(),
                Key::Ed(k) => k.sign(input.as_bytes()).as_ref().to_vec(),
            };
            format!("{input}.{}", enc(&sig))
        }
    }

    fn set(keys: &[Value]) -> Jwks {
        Jwks::parse(&serde_json::json!({ "keys": keys }).to_string()).unwrap()
    }

    fn claims() -> Value {
        serde_json::json!({"iss": ISS, "sub": "alice", "aud": ["pos"], "exp": NOW + 60, "nbf": NOW - 60, "role": "cashier"})
    }

    fn check(token: &str, jwks: &Jwks) -> Result<VerifiedClaims, JwtError> {
        verify(token, jwks, ISS, &["pos".into()], NOW, 0)
    }

    #[test]
    fn es256_and_eddsa_tokens_verify_and_give_their_claims() {
        for (key, alg) in [(Key::ec(), "ES256"), (Key::ed(), "EdDSA")] {
            let jwks = set(&[key.jwk("k1")]);
            let t = key.sign(
                &serde_json::json!({"alg": alg, "kid": "k1", "typ": "JWT"}),
                &claims(),
            );
            let v = check(&t, &jwks).unwrap();
            assert_eq!(v.request_principal(), format!("{ISS}/alice"));
            assert_eq!(v.claims["role"], "cashier");
            // without a kid every key of the type is tried
            let t = key.sign(&serde_json::json!({"alg": alg}), &claims());
            assert!(check(&t, &jwks).is_ok());
        }
    }

    #[test]
    fn unsigned_confused_and_tampered_tokens_are_refused() {
        let ec = Key::ec();
        let ed = Key::ed();
        let jwks = set(&[ec.jwk("k1")]);
        let good = ec.sign(&serde_json::json!({"alg": "ES256", "kid": "k1"}), &claims());
        let parts: Vec<&str> = good.split('.').collect();
        // alg none, in any case, with or without a signature
        for alg in ["none", "None", "NONE"] {
            let h = enc(serde_json::json!({"alg": alg}).to_string().as_bytes());
            for t in [
                format!("{h}.{}.", parts[1]),
                format!("{h}.{}.{}", parts[1], parts[2]),
            ] {
                assert_eq!(check(&t, &jwks).unwrap_err(), JwtError::AlgNone);
            }
        }
        // key confusion: HS256 "signed" with the public key as the secret
        for alg in ["HS256", "RS256", "PS256", "ES384"] {
            let h = enc(serde_json::json!({"alg": alg, "kid": "k1"})
                .to_string()
                .as_bytes());
            let t = format!("{h}.{}.{}", parts[1], parts[2]);
            assert_eq!(
                check(&t, &jwks).unwrap_err(),
                JwtError::UnsupportedAlg(alg.into())
            );
        }
        // the classic attack itself: a real HMAC-SHA256 over the token,
        // keyed with the public key's bytes (the point, and the JWK JSON)
        let Key::Ec(k) = &ec else { unreachable!() };
        let point = k.public_key().as_ref().to_vec();
        let jwk_json = ec.jwk("k1").to_string();
        for secret in [point.as_slice(), jwk_json.as_bytes()] {
            let h = enc(br#"{"alg":"HS256","kid":"k1","typ":"JWT"}"#);
            let input = format!("{h}.{}", parts[1]);
            let mac = ring::hmac::sign(
                &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret),
                input.as_bytes(),
            );
            let t = format!("{input}.{}", enc(mac.as_ref()));
            assert_eq!(
                check(&t, &jwks).unwrap_err(),
                JwtError::UnsupportedAlg("HS256".into())
            );
        }
        // an EdDSA token never meets the P-256 key, and vice versa
        let t = ed.sign(&serde_json::json!({"alg": "EdDSA", "kid": "k1"}), &claims());
        assert!(matches!(check(&t, &jwks), Err(JwtError::NoKey { .. })));
        // another key with the same kid
        let other = Key::ec().sign(&serde_json::json!({"alg": "ES256", "kid": "k1"}), &claims());
        assert_eq!(check(&other, &jwks).unwrap_err(), JwtError::BadSignature);
        // a payload changed after signing
        let mut c = claims();
        c["sub"] = "mallory".into();
        let t = format!(
            "{}.{}.{}",
            parts[0],
            enc(c.to_string().as_bytes()),
            parts[2]
        );
        assert_eq!(check(&t, &jwks).unwrap_err(), JwtError::BadSignature);
        // unknown kid, crit
        let t = ec.sign(&serde_json::json!({"alg": "ES256", "kid": "k9"}), &claims());
        assert!(matches!(check(&t, &jwks), Err(JwtError::NoKey { .. })));
        let t = ec.sign(
            &serde_json::json!({"alg": "ES256", "crit": ["exp"]}),
            &claims(),
        );
        assert_eq!(check(&t, &jwks).unwrap_err(), JwtError::Critical);
    }

    #[test]
    fn issuer_audience_and_time_are_checked_after_the_signature() {
        let ec = Key::ec();
        let jwks = set(&[ec.jwk("k1")]);
        let h = serde_json::json!({"alg": "ES256"});
        let with = |f: &dyn Fn(&mut Value)| {
            let mut c = claims();
            f(&mut c);
            check(&ec.sign(&h, &c), &jwks)
        };
        assert!(matches!(
            with(&|c| c["iss"] = "https://evil.test".into()),
            Err(JwtError::Issuer { .. })
        ));
        assert_eq!(
            with(&|c| c["aud"] = "kiosk".into()).unwrap_err(),
            JwtError::Audience
        );
        assert_eq!(
            with(&|c| c["aud"] = Value::Null).unwrap_err(),
            JwtError::Audience
        );
        assert!(with(&|c| c["aud"] = "pos".into()).is_ok());
        assert_eq!(
            with(&|c| c["exp"] = NOW.into()).unwrap_err(),
            JwtError::Expired { exp: NOW, now: NOW }
        );
        assert_eq!(
            with(&|c| {
                c.as_object_mut().unwrap().remove("exp");
            })
            .unwrap_err(),
            JwtError::NoExpiry
        );
        assert!(matches!(
            with(&|c| c["nbf"] = (NOW + 10).into()),
            Err(JwtError::NotYetValid { .. })
        ));
        // leeway
        let t = ec.sign(&h, &{
            let mut c = claims();
            c["exp"] = (NOW - 5).into();
            c
        });
        assert!(verify(&t, &jwks, ISS, &[], NOW, 10).is_ok());
    }

    #[test]
    fn malformed_tokens_and_key_sets_are_errors() {
        let jwks = set(&[Key::ec().jwk("k1")]);
        for t in [
            "",
            ".",
            "..",
            "a.b",
            "a.b.c.d",
            "e30.e30.",
            "!!.e30.AA",
            "e30=.e30.AA",
            "eyJhbGciOiJFUzI1NiJ9.e30.A",
            "W10.e30.AA", // header is an array
        ] {
            assert!(
                matches!(check(t, &jwks), Err(JwtError::Malformed(_))),
                "{t:?}: {:?}",
                check(t, &jwks)
            );
        }
        assert!(check(&"a".repeat(MAX_TOKEN_BYTES + 1), &jwks).is_err());
        // a repeated key, in the payload (top level or nested) or the
        // header, even when correctly signed
        let ec = Key::ec();
        let jwks = set(&[ec.jwk("k1")]);
        let sign_raw = |header: &str, payload: &str| {
            let input = format!("{}.{}", enc(header.as_bytes()), enc(payload.as_bytes()));
            let Key::Ec(k) = &ec else { unreachable!() };
            let sig = k.sign(&SystemRandom::new(), input.as_bytes()).unwrap();
            format!("{input}.{}", enc(sig.as_ref()))
        };
        let body = |extra: &str| {
            format!(
                r#"{{"iss":"{ISS}","aud":"pos","exp":{},"sub":"alice"{extra}}}"#,
                NOW + 60
            )
        };
        let ok = sign_raw(r#"{"alg":"ES256"}"#, &body(""));
        assert!(check(&ok, &jwks).is_ok());
        for (h, p) in [
            (r#"{"alg":"ES256"}"#.to_string(), body(r#","sub":"root""#)),
            (
                r#"{"alg":"ES256"}"#.to_string(),
                body(r#","x":{"r":1,"r":2}"#),
            ),
            (r#"{"alg":"ES256","alg":"none"}"#.to_string(), body("")),
        ] {
            assert_eq!(
                check(&sign_raw(&h, &p), &jwks).unwrap_err(),
                JwtError::Malformed("a JSON object repeats a key"),
                "{h} {p}"
            );
        }
        assert_eq!(unverified_issuer(&ok).unwrap().as_deref(), Some(ISS));
        assert!(unverified_issuer("a.b").is_err());
        // non-canonical base64url: "AB" has non-zero unused bits ("AA" is canonical)
        assert_eq!(
            b64url("AB").unwrap_err(),
            JwtError::Malformed("base64url trailing bits")
        );
        assert_eq!(b64url("AA").unwrap(), vec![0]);
        assert_eq!(b64url("AAA").unwrap(), vec![0, 0]);
        assert_eq!(b64url("AAAA").unwrap(), vec![0, 0, 0]);
        for bad in [
            r#"{"keys": []}"#,
            r#"{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}"#,
            r#"{"keys": [{"kty": "RSA", "n": "AQAB", "e": "AQAB"}]}"#,
            r#"{"keys": [{"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"}]}"#,
            r#"{"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "AA", "use": "enc"}]}"#,
            r#"not json"#,
        ] {
            assert!(Jwks::parse(bad).is_err(), "{bad}");
        }
        let mut k = Key::ec().jwk("k");
        k["alg"] = "HS256".into();
        assert!(Jwks::parse(&serde_json::json!({"keys": [k]}).to_string()).is_err());
    }

    proptest! {
        /// The parser never panics, whatever the bytes, and never accepts a
        /// token that was not signed by a key of the set.
        #[test]
        fn arbitrary_input_is_an_error_never_a_panic(s in ".{0,300}", parts in proptest::collection::vec("[A-Za-z0-9_-]{0,40}", 0..5)) {
            let jwks = set(&[Key::ed().jwk("k1")]);
            prop_assert!(check(&s, &jwks).is_err());
            prop_assert!(check(&parts.join("."), &jwks).is_err());
            let _ = Jwks::parse(&s);
            let _ = b64url(&s);
        }

        /// base64url decoding inverts encoding.
        #[test]
        fn base64url_round_trips(b in proptest::collection::vec(any::<u8>(), 0..100)) {
            prop_assert_eq!(b64url(&enc(&b)).unwrap(), b);
        }
    }
}
