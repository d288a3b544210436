//! Istio `RequestAuthentication` (security.istio.io/v1, v1beta1): its input
//! shape, the checks one document allows, and printing it back; plus the
//! checks of the JWT parts of `AuthorizationPolicy` (`requestPrincipals`,
//! `request.auth.claims[...]`).
//!
//! Accepted: `selector.matchLabels`, `jwtRules[]` with `issuer`,
//! `audiences`, `jwks` (inline JSON) or `jwksUri` (`file:///PATH` on the
//! hub, which reads it at apply: tidemesh fetches nothing over the
//! network), `forwardOriginalToken`, `outputClaimToHeaders[] {header,
//! claim}`, `fromHeaders[] {name, prefix}`. Refused by name: `fromParams`
//! and `fromCookies`, `jwksUri` over http(s), `outputPayloadToHeader`,
//! `targetRef(s)`, a rule without a key set (no OIDC discovery).

use serde::{Deserialize, Serialize};

use super::convert::Cx;
use super::input::Selector;
use crate::jwt::Jwks;
use crate::model::{ConditionKey, ObjectName};
use crate::reqauthn::{
    ClaimToHeader, JwksSource, JwtRule, RequestAuthn, TokenHeader, MAX_JWT_RULES, MAX_RULE_HEADERS,
};

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RequestAuthenticationSpec {
    #[serde(default)]
    pub selector: Option<Selector>,
    #[serde(default)]
    pub jwt_rules: Option<Vec<JwtRuleIn>>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct JwtRuleIn {
    #[serde(default)]
    pub issuer: Option<String>,
    #[serde(default)]
    pub audiences: Option<Vec<String>>,
    #[serde(default)]
    pub jwks: Option<String>,
    #[serde(default)]
    pub jwks_uri: Option<String>,
    #[serde(default)]
    pub forward_original_token: Option<bool>,
    #[serde(default)]
    pub output_claim_to_headers: Option<Vec<ClaimToHeaderIn>>,
    #[serde(default)]
    pub from_headers: Option<Vec<JwtHeaderIn>>,
    /// Read only to be refused with a reason.
    #[serde(default)]
    pub from_params: Option<Vec<String>>,
    /// Read only to be refused with a reason.
    #[serde(default)]
    pub from_cookies: Option<Vec<String>>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ClaimToHeaderIn {
    pub header: String,
    pub claim: String,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct JwtHeaderIn {
    pub name: String,
    #[serde(default)]
    pub prefix: Option<String>,
}

/// Headers a claim must never be written to: the ones the mesh or HTTP
/// itself owns.
const RESERVED_HEADERS: &[&str] = &[
    "authorization",
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "te",
    "upgrade",
    "x-forwarded-client-cert",
    "x-tidemesh-reason",
    "traceparent",
];

fn check_header_name(h: &str) -> Result<String, String> {
    let ok = !h.is_empty()
        && h.len() <= 128
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.!#$%&'*+^`|~".contains(&b));
    if !ok {
        return Err(format!("{h:?} is not an HTTP header name"));
    }
    Ok(h.to_ascii_lowercase())
}

pub(crate) fn request_authentication(
    cx: &mut Cx,
    id: ObjectName,
    spec: RequestAuthenticationSpec,
) -> Option<RequestAuthn> {
    let before = cx.issues.out.count();
    let selector = spec
        .selector
        .map(|s| cx_labels(cx, &s))
        .filter(|l| !l.is_empty());
    let rules_in = spec.jwt_rules.unwrap_or_default();
    if rules_in.is_empty() {
        cx.issues.add(
            "spec.jwtRules",
            "at least one JWT rule is required (a RequestAuthentication without rules would do nothing)",
        );
    }
    if rules_in.len() > MAX_JWT_RULES {
        cx.issues.add(
            "spec.jwtRules",
            format!("at most {MAX_JWT_RULES} rules, got {}", rules_in.len()),
        );
    }
    let mut jwt_rules = Vec::new();
    for (i, r) in rules_in.into_iter().enumerate() {
        let p = format!("spec.jwtRules[{i}]");
        let issuer = r.issuer.unwrap_or_default();
        if issuer.is_empty() || issuer.len() > 256 || issuer.chars().any(char::is_whitespace) {
            cx.issues.add(
                format!("{p}.issuer"),
                "required: 1 to 256 characters without spaces (the token's iss)",
            );
        }
        let audiences = r.audiences.unwrap_or_default();
        for (ai, a) in audiences.iter().enumerate() {
            if a.is_empty() || a.len() > 256 {
                cx.issues
                    .add(format!("{p}.audiences[{ai}]"), "1 to 256 characters");
            }
        }
        let jwks = match (r.jwks, r.jwks_uri) {
            (Some(_), Some(_)) => {
                cx.issues
                    .add(format!("{p}.jwksUri"), "set jwks or jwksUri, not both");
                None
            }
            (Some(inline), None) => match Jwks::parse(&inline) {
                Ok(_) => Some(JwksSource::Inline(inline)),
                Err(e) => {
                    cx.issues.add(format!("{p}.jwks"), e.to_string());
                    None
                }
            },
            (None, Some(uri)) => match uri.strip_prefix("file://") {
                Some(path) if path.starts_with('/') && !path.contains('\0') => {
                    Some(JwksSource::File(path.to_owned()))
                }
                Some(_) => {
                    cx.issues.add(
                        format!("{p}.jwksUri"),
                        format!("{uri:?}: a file URI needs an absolute path (file:///etc/tidemesh/jwks.json)"),
                    );
                    None
                }
                None => {
                    let why = if uri.starts_with("http://") || uri.starts_with("https://") {
                        "tidemesh does not fetch key sets over the network (a spoke must verify tokens with the hub unreachable): save the key set to a file on the hub and write jwksUri: file:///PATH (the hub reads it at apply and sends it to the spokes), or put it inline with jwks"
                    } else {
                        "only file:///PATH key sets are supported (or an inline jwks)"
                    };
                    cx.issues
                        .add(format!("{p}.jwksUri"), format!("{uri:?}: {why}"));
                    None
                }
            },
            (None, None) => {
                cx.issues.add(
                    format!("{p}.jwks"),
                    "a key set is required: jwks (inline) or jwksUri: file:///PATH (tidemesh does no OIDC discovery)",
                );
                None
            }
        };
        if r.from_params.is_some() {
            cx.issues.add(
                format!("{p}.fromParams"),
                "tokens in query parameters are not supported by tidemesh (they would be authorized and logged with the URL); send the token in a header (fromHeaders)",
            );
        }
        if r.from_cookies.is_some() {
            cx.issues.add(
                format!("{p}.fromCookies"),
                "tokens in cookies are not supported by tidemesh; send the token in a header (fromHeaders)",
            );
        }
        let mut output_claim_to_headers = Vec::new();
        let claims_in = r.output_claim_to_headers.unwrap_or_default();
        if claims_in.len() > MAX_RULE_HEADERS {
            cx.issues.add(
                format!("{p}.outputClaimToHeaders"),
                format!("at most {MAX_RULE_HEADERS}"),
            );
        }
        for (ci, c) in claims_in.into_iter().enumerate() {
            let cp = format!("{p}.outputClaimToHeaders[{ci}]");
            match check_header_name(&c.header) {
                Ok(h) if RESERVED_HEADERS.contains(&h.as_str()) => cx.issues.add(
                    format!("{cp}.header"),
                    format!("{h} is owned by HTTP or the mesh; pick another header"),
                ),
                Ok(h)
                    if output_claim_to_headers
                        .iter()
                        .any(|o: &ClaimToHeader| o.header == h) =>
                {
                    cx.issues
                        .add(format!("{cp}.header"), format!("{h} is listed twice"))
                }
                Ok(header) => {
                    if c.claim.is_empty() || c.claim.len() > 256 {
                        cx.issues.add(
                            format!("{cp}.claim"),
                            "a top-level claim name of 1 to 256 characters",
                        );
                    }
                    output_claim_to_headers.push(ClaimToHeader {
                        header,
                        claim: c.claim,
                    });
                }
                Err(e) => cx.issues.add(format!("{cp}.header"), e),
            }
        }
        let mut from_headers = Vec::new();
        let from_in = r.from_headers.unwrap_or_default();
        if from_in.len() > MAX_RULE_HEADERS {
            cx.issues.add(
                format!("{p}.fromHeaders"),
                format!("at most {MAX_RULE_HEADERS}"),
            );
        }
        for (hi, h) in from_in.into_iter().enumerate() {
            let hp = format!("{p}.fromHeaders[{hi}]");
            match check_header_name(&h.name) {
                Ok(name) => {
                    if h.prefix.as_ref().is_some_and(|x| x.len() > 64) {
                        cx.issues
                            .add(format!("{hp}.prefix"), "at most 64 characters");
                    }
                    from_headers.push(TokenHeader {
                        name,
                        prefix: h.prefix.filter(|x| !x.is_empty()),
                    })
                }
                Err(e) => cx.issues.add(format!("{hp}.name"), e),
            }
        }
        for c in &output_claim_to_headers {
            let token_header = if from_headers.is_empty() {
                c.header == "authorization"
            } else {
                from_headers.iter().any(|h| h.name == c.header)
            };
            if token_header {
                cx.issues.add(
                    format!("{p}.outputClaimToHeaders"),
                    format!("{} carries the token; pick another header", c.header),
                );
            }
        }
        if let Some(jwks) = jwks {
            jwt_rules.push(JwtRule {
                issuer,
                audiences,
                jwks,
                forward_original_token: r.forward_original_token.unwrap_or(false),
                output_claim_to_headers,
                from_headers,
            });
        }
    }
    (cx.issues.out.count() == before).then_some(RequestAuthn {
        id,
        selector,
        jwt_rules,
    })
}

fn cx_labels(cx: &mut Cx, s: &Selector) -> crate::model::Labels {
    cx.labels("spec.selector.matchLabels", &s.match_labels)
}

/// Prints a `RequestAuthentication` back as its spec.
pub(crate) fn print(r: &RequestAuthn) -> RequestAuthenticationSpec {
    RequestAuthenticationSpec {
        selector: r.selector.as_ref().map(|s| Selector {
            match_labels: Some(s.clone()),
        }),
        jwt_rules: Some(
            r.jwt_rules
                .iter()
                .map(|j| {
                    let (jwks, jwks_uri) = match &j.jwks {
                        JwksSource::Inline(s) => (Some(s.clone()), None),
                        JwksSource::File(p) => (None, Some(format!("file://{p}"))),
                    };
                    JwtRuleIn {
                        issuer: Some(j.issuer.clone()),
                        audiences: (!j.audiences.is_empty()).then(|| j.audiences.clone()),
                        jwks,
                        jwks_uri,
                        forward_original_token: j.forward_original_token.then_some(true),
                        output_claim_to_headers: (!j.output_claim_to_headers.is_empty()).then(
                            || {
                                j.output_claim_to_headers
                                    .iter()
                                    .map(|c| ClaimToHeaderIn {
                                        header: c.header.clone(),
                                        claim: c.claim.clone(),
                                    })
                                    .collect()
                            },
                        ),
                        from_headers: (!j.from_headers.is_empty()).then(|| {
                            j.from_headers
                                .iter()
                                .map(|h| JwtHeaderIn {
                                    name: h.name.clone(),
                                    prefix: h.prefix.clone(),
                                })
                                .collect()
                        }),
                        from_params: None,
                        from_cookies: None,
                    }
                })
                .collect(),
        ),
    }
}

/// A request principal pattern: `iss/sub`, with Istio's `*`, `prefix*`,
/// `*suffix`.
pub(crate) fn check_request_principal(p: &str) -> Result<(), String> {
    super::convert::check_pattern(p)?;
    if p.len() > 1024 {
        return Err("at most 1024 characters".into());
    }
    if !p.contains('*') && !p.contains('/') {
        return Err(format!(
            "{p:?} is not a request principal: write ISSUER/SUBJECT (e.g. https://idp.example/alice), or a pattern with *"
        ));
    }
    Ok(())
}

/// `[a][b]...` after `request.auth.claims`.
pub(crate) fn claim_key(rest: &str) -> Result<ConditionKey, String> {
    let mut path = Vec::new();
    let mut r = rest;
    while !r.is_empty() {
        let Some(inner) = r.strip_prefix('[') else {
            return Err(format!(
                "request.auth.claims{rest}: write request.auth.claims[NAME] (nested: [A][B])"
            ));
        };
        let Some(end) = inner.find(']') else {
            return Err(format!("request.auth.claims{rest}: unclosed ["));
        };
        let name = &inner[..end];
        if name.is_empty() || name.len() > 256 {
            return Err(format!(
                "request.auth.claims{rest}: claim names are 1 to 256 characters"
            ));
        }
        path.push(name.to_owned());
        r = &inner[end + 1..];
    }
    if path.is_empty() || path.len() > 8 {
        return Err(format!(
            "request.auth.claims{rest}: name 1 to 8 nested claims, as request.auth.claims[NAME]"
        ));
    }
    Ok(ConditionKey::RequestAuthClaim(path))
}
