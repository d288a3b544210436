//! Join tokens: `TMJ1~<spoke id>~<secret>~<CA fingerprint>`.
//!
//! The secret is 32 random bytes in hex; the hub stores only its SHA-256.
//! The CA fingerprint (SHA-256 of the hub CA certificate, hex) lets the
//! spoke pin the hub on first contact, as kubeadm's discovery hash does. The
//! spoke ID is a convenience for the spoke (so `enroll` needs no `--id`); the
//! hub never trusts it and checks the binding it stored itself.

use tidemesh_identity::SpiffeId;

const PREFIX: &str = "TMJ1";
const SEP: char = '~';

/// A parsed join token.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// The spoke ID the token names.
    pub spoke: SpiffeId,
    /// The secret, 64 lowercase hex digits.
    pub secret: String,
    /// SHA-256 of the hub CA certificate.
    pub ca_fingerprint: [u8; 32],
}

impl std::fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinToken")
            .field("spoke", &self.spoke.to_string())
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// Why a token string was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    /// Wrong number of parts or wrong prefix.
    #[error("not a tidemesh join token (expected TMJ1~<spoke id>~<secret>~<ca fingerprint>)")]
    Format,
    /// The spoke ID part is not a SPIFFE ID.
    #[error("join token names an invalid spoke id: {0}")]
    SpokeId(String),
    /// The secret is not 64 hex digits.
    #[error("join token secret must be 64 hex digits")]
    Secret,
    /// The fingerprint is not 64 hex digits.
    #[error("join token CA fingerprint must be 64 hex digits")]
    Fingerprint,
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl JoinToken {
    /// Builds a token from its parts; `secret` is raw random bytes.
    pub fn new(spoke: SpiffeId, secret: &[u8; 32], ca_fingerprint: [u8; 32]) -> Self {
        JoinToken {
            spoke,
            secret: hex(secret),
            ca_fingerprint,
        }
    }

    /// Parses a token string (surrounding whitespace ignored).
    pub fn parse(s: &str) -> Result<Self, TokenError> {
        let parts: Vec<&str> = s.trim().split(SEP).collect();
        let [prefix, id, secret, fp] = parts.as_slice() else {
            return Err(TokenError::Format);
        };
        if *prefix != PREFIX {
            return Err(TokenError::Format);
        }
        let spoke = SpiffeId::parse(id).map_err(|e| TokenError::SpokeId(e.to_string()))?;
        if !is_hex64(secret) {
            return Err(TokenError::Secret);
        }
        if !is_hex64(fp) {
            return Err(TokenError::Fingerprint);
        }
        let mut ca_fingerprint = [0u8; 32];
        for (i, chunk) in fp.as_bytes().chunks(2).enumerate() {
            let pair = std::str::from_utf8(chunk).map_err(|_| TokenError::Fingerprint)?;
            ca_fingerprint[i] =
                u8::from_str_radix(pair, 16).map_err(|_| TokenError::Fingerprint)?;
        }
        Ok(JoinToken {
            spoke,
            secret: (*secret).to_owned(),
            ca_fingerprint,
        })
    }
}

impl std::fmt::Display for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{PREFIX}{SEP}{}{SEP}{}{SEP}{}",
            self.spoke,
            self.secret,
            hex(&self.ca_fingerprint)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_rejections() {
        let id: SpiffeId = "spiffe://td/store/s1/node/n1".parse().expect("valid");
        let t = JoinToken::new(id.clone(), &[7; 32], [9; 32]);
        let s = t.to_string();
        assert_eq!(JoinToken::parse(&s).expect("parses"), t);
        assert_eq!(JoinToken::parse("garbage"), Err(TokenError::Format));
        assert_eq!(JoinToken::parse(""), Err(TokenError::Format));
        assert_eq!(
            JoinToken::parse(&s.replace("TMJ1", "TMJ2")),
            Err(TokenError::Format)
        );
        let bad_secret = format!("TMJ1~{id}~{}~{}", "zz".repeat(32), "00".repeat(32));
        assert_eq!(JoinToken::parse(&bad_secret), Err(TokenError::Secret));
        let bad_fp = format!("TMJ1~{id}~{}~{}", "00".repeat(32), "0".repeat(3));
        assert_eq!(JoinToken::parse(&bad_fp), Err(TokenError::Fingerprint));
        let bad_id = format!("TMJ1~http://x~{}~{}", "00".repeat(32), "00".repeat(32));
        assert!(matches!(
            JoinToken::parse(&bad_id),
            Err(TokenError::SpokeId(_))
        ));
        assert!(!format!("{t:?}").contains(&t.secret));
    }
}
