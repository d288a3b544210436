//! TLS origination: the hub gateway's TLS leg to a cloud endpoint.
//!
//! What it is: turns a `DestinationRule`'s `trafficPolicy.tls` (or the
//! `portLevelSettings` entry for the service entry's port) into a rustls
//! client config, reading the PEM files it names on the hub; checks every
//! such file of a config before it is applied ([`check_config`]); opens the
//! TLS connection to one endpoint and says what was negotiated
//! ([`LegFacts`]) or, in words an operator can act on, why not.
//!
//! Who drives it: the apply and rollback paths (`crate::sync`) call
//! [`check_config`]; the gateway (`crate::gateway`) builds an
//! [`Origination`] per config version and host and calls [`connect`].
//!
//! Without `caCertificates` the server is verified against the system
//! roots ([`system_roots`]): the platform's trust store as
//! `rustls-native-certs` finds it (`SSL_CERT_FILE` / `SSL_CERT_DIR` when
//! set), read once per hub process.
//!
//! What it must not do: skip server verification (there is no
//! `insecureSkipVerify`), fall back to plaintext when TLS is configured, or
//! read unbounded files.

use std::{
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use rustls::{
    client::{
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        WebPkiServerVerifier,
    },
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tidemesh_policy::{
    model::{ClientTls, DestinationPolicy, TlsMode},
    MeshConfig,
};
use tokio::net::TcpStream;
use tokio_rustls::{client::TlsStream, TlsConnector};

/// Largest PEM file read (a CA bundle of a few hundred certificates fits).
const MAX_PEM_BYTES: u64 = 1024 * 1024;

/// Largest `SSL_CERT_FILE` accepted as the system roots (a distribution's
/// bundle is a few hundred KiB).
const MAX_SYSTEM_BUNDLE_BYTES: u64 = 16 * 1024 * 1024;

/// Most system roots kept (a distribution ships about 150).
const MAX_SYSTEM_ROOTS: usize = 4096;

/// Most loader errors quoted in the "no system roots" error.
const MAX_QUOTED_ERRORS: usize = 3;

/// Why a TLS setting could not be loaded. Every variant names the field and
/// the file, so the apply error points at the line to fix.
#[derive(Debug, thiserror::Error)]
pub enum OriginationError {
    /// The file could not be read.
    #[error("{field}: cannot read {path}: {source}")]
    Read {
        /// The YAML field naming the file.
        field: &'static str,
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is larger than [`MAX_PEM_BYTES`].
    #[error("{field}: {path} is larger than {MAX_PEM_BYTES} bytes")]
    TooLarge {
        /// The YAML field naming the file.
        field: &'static str,
        /// The file.
        path: String,
    },
    /// The file holds no usable PEM object of the kind the field needs.
    #[error("{field}: {path}: {reason}")]
    Content {
        /// The YAML field naming the file.
        field: &'static str,
        /// The file.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// rustls refused the combination (e.g. a key that does not match the
    /// client certificate).
    #[error("{field}: {reason}")]
    Config {
        /// The YAML field the problem is about.
        field: &'static str,
        /// What rustls said.
        reason: String,
    },
}

/// A loaded TLS setting: the rustls configs (HTTP/1.1 and HTTP/2 ALPN) and
/// what to say about it.
#[derive(Debug)]
pub struct Origination {
    /// `SIMPLE` or `MUTUAL`.
    pub mode: TlsMode,
    /// The server name sent (SNI) and checked unless `subjectAltNames` is set.
    pub server_name: ServerName<'static>,
    /// ALPN `http/1.1`.
    h1: Arc<rustls::ClientConfig>,
    /// ALPN `h2`.
    h2: Arc<rustls::ClientConfig>,
    /// What the server's chain must end in, for error messages:
    /// `caCertificates (<file>)` or `the system roots (<source>; ...)`.
    trust: String,
}

/// What the TLS leg negotiated, measured from the session.
#[derive(Debug, Clone)]
pub struct LegFacts {
    /// `1.3` or `1.2`.
    pub version: &'static str,
    /// The IANA name of the cipher suite.
    pub cipher: String,
}

impl LegFacts {
    /// The `x-tidemesh-upstream-tls` value: `1.3 TLS13_AES_256_GCM_SHA384 SIMPLE sni=api.example`.
    pub fn header(&self, o: &Origination) -> String {
        format!(
            "{} {} {} sni={}",
            self.version,
            self.cipher,
            o.mode.as_str(),
            o.server_name.to_str()
        )
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_pem(field: &'static str, path: &str) -> Result<Vec<u8>, OriginationError> {
    use std::io::Read;
    let read = |source| OriginationError::Read {
        field,
        path: path.to_owned(),
        source,
    };
    let f = std::fs::File::open(Path::new(path)).map_err(read)?;
    let mut buf = Vec::new();
    f.take(MAX_PEM_BYTES + 1)
        .read_to_end(&mut buf)
        .map_err(read)?;
    if buf.len() as u64 > MAX_PEM_BYTES {
        return Err(OriginationError::TooLarge {
            field,
            path: path.to_owned(),
        });
    }
    Ok(buf)
}

fn certificates(
    field: &'static str,
    path: &str,
) -> Result<Vec<CertificateDer<'static>>, OriginationError> {
    let pem = read_pem(field, path)?;
    let content = |reason: String| OriginationError::Content {
        field,
        path: path.to_owned(),
        reason,
    };
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| content(format!("not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(content("holds no CERTIFICATE block".into()));
    }
    Ok(certs)
}

impl Origination {
    /// Loads `tls` for `host` (the default server name). `None` for
    /// `DISABLE`.
    pub fn load(host: &str, tls: &ClientTls) -> Result<Option<Origination>, OriginationError> {
        if tls.mode == TlsMode::Disable {
            return Ok(None);
        }
        let ca_field = "caCertificates";
        let (roots, trust) = match &tls.ca_certificates {
            Some(ca_file) => {
                let mut roots = RootCertStore::empty();
                for (i, c) in certificates(ca_field, ca_file)?.into_iter().enumerate() {
                    roots.add(c).map_err(|e| OriginationError::Content {
                        field: ca_field,
                        path: ca_file.clone(),
                        reason: format!("certificate {} is not a usable CA: {e}", i + 1),
                    })?;
                }
                (Arc::new(roots), format!("caCertificates ({ca_file})"))
            }
            None => {
                let system = system_roots()?;
                let trust = format!(
                    "the system roots ({}; caCertificates is not set)",
                    system.source
                );
                (system.roots, trust)
            }
        };
        let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider())
            .build()
            .map_err(|e| OriginationError::Config {
                field: ca_field,
                reason: e.to_string(),
            })?;
        let sni = tls.sni.clone().unwrap_or_else(|| host.to_owned());
        let server_name =
            ServerName::try_from(sni.clone()).map_err(|_| OriginationError::Config {
                field: "sni",
                reason: format!("{sni:?} is not a valid server name"),
            })?;
        let mut names = Vec::new();
        for n in &tls.subject_alt_names {
            names.push(
                ServerName::try_from(n.clone()).map_err(|_| OriginationError::Config {
                    field: "subjectAltNames",
                    reason: format!("{n:?} is not a DNS name or IP address"),
                })?,
            );
        }
        let verifier: Arc<dyn ServerCertVerifier> = if names.is_empty() {
            webpki
        } else {
            Arc::new(SanVerifier {
                inner: webpki,
                names,
            })
        };
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| OriginationError::Config {
                field: "mode",
                reason: e.to_string(),
            })?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let config = match tls.mode {
            TlsMode::Mutual => {
                let cert_file = tls.client_certificate.as_deref().unwrap_or_default();
                let key_file = tls.private_key.as_deref().unwrap_or_default();
                let chain = certificates("clientCertificate", cert_file)?;
                let pem = read_pem("privateKey", key_file)?;
                let key =
                    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| OriginationError::Content {
                        field: "privateKey",
                        path: key_file.to_owned(),
                        reason: format!("no usable private key: {e}"),
                    })?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| OriginationError::Config {
                        field: "privateKey",
                        reason: format!("{key_file} does not go with {cert_file}: {e}"),
                    })?
            }
            _ => builder.with_no_client_auth(),
        };
        let mut h1 = config.clone();
        h1.alpn_protocols = vec![b"http/1.1".to_vec()];
        let mut h2 = config;
        h2.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Some(Origination {
            mode: tls.mode,
            server_name,
            h1: Arc::new(h1),
            h2: Arc::new(h2),
            trust,
        }))
    }

    /// Why a handshake failed, in the operator's terms.
    fn explain(&self, e: &std::io::Error) -> String {
        match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
            Some(t) => self.explain_tls(t),
            None => format!("TLS handshake failed: {e}"),
        }
    }

    /// A TLS failure in words an operator can act on.
    fn explain_tls(&self, e: &rustls::Error) -> String {
        match e {
            rustls::Error::InvalidCertificate(c) => match c {
                CertificateError::UnknownIssuer | CertificateError::BadSignature => format!(
                    "the server's certificate does not chain to a CA in {}: {c:?}",
                    self.trust
                ),
                CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. } => format!(
                    "the server's certificate is not valid for the expected name (sni or subjectAltNames): {c:?}"
                ),
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    format!("the server's certificate has expired: {c:?}")
                }
                other => format!("the server's certificate was refused: {other:?}"),
            },
            rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired) => format!(
                "the server refused the handshake (CertificateRequired): it requires a client certificate{}",
                if self.mode == TlsMode::Simple { "; use mode MUTUAL" } else { "" }
            ),
            rustls::Error::AlertReceived(a) => format!("the server refused the handshake ({a:?})"),
            other => format!("TLS handshake failed: {other}"),
        }
    }

    /// The TLS failure behind a request error on the leg (in TLS 1.3 the
    /// server judges the client's certificate after the client's side of
    /// the handshake is done, so its refusal arrives with the response).
    pub fn tls_failure(&self, e: &(dyn std::error::Error + 'static)) -> Option<String> {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(err) = cur {
            if let Some(t) = err.downcast_ref::<rustls::Error>() {
                return Some(self.explain_tls(t));
            }
            if let Some(io) = err.downcast_ref::<std::io::Error>() {
                if let Some(t) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                    return Some(self.explain_tls(t));
                }
            }
            cur = err.source();
        }
        None
    }
}

/// The system roots, loaded once per process.
#[derive(Debug, Clone)]
pub struct SystemRoots {
    /// The trust anchors.
    roots: Arc<RootCertStore>,
    /// Where they came from: `SSL_CERT_FILE=<file>`, `SSL_CERT_DIR=<dirs>`
    /// or `the platform trust store`, with the count.
    pub source: String,
}

impl SystemRoots {
    /// The trust anchors.
    pub fn roots(&self) -> Arc<RootCertStore> {
        self.roots.clone()
    }
}

/// The loaded system roots; only a success is kept, so a hub whose trust
/// store was missing tries again at the next apply or config version.
static SYSTEM_ROOTS: Mutex<Option<SystemRoots>> = Mutex::new(None);

/// Where `rustls-native-certs` looks, in words.
fn system_source() -> String {
    let file = std::env::var_os("SSL_CERT_FILE");
    let dir = std::env::var_os("SSL_CERT_DIR");
    let mut parts = Vec::new();
    if let Some(f) = &file {
        parts.push(format!("SSL_CERT_FILE={}", f.to_string_lossy()));
    }
    if let Some(d) = &dir {
        parts.push(format!("SSL_CERT_DIR={}", d.to_string_lossy()));
    }
    if parts.is_empty() {
        "the platform trust store".into()
    } else {
        parts.join(", ")
    }
}

/// The system roots (the platform's trust store, or `SSL_CERT_FILE` /
/// `SSL_CERT_DIR` when set), read on first use and kept for the life of
/// the process. An error, naming where it looked, when no usable root
/// could be loaded, when `SSL_CERT_FILE` is larger than 16 MiB, or when
/// there are more than 4096 roots.
pub fn system_roots() -> Result<SystemRoots, OriginationError> {
    load_system_roots().map_err(|reason| OriginationError::Config {
        field: "caCertificates",
        reason: format!("not set, and {reason}"),
    })
}

/// [`system_roots`] for other TLS clients of the hub (the OTLP exporter):
/// the error is `no system roots could be loaded from <where>: <why>`.
pub fn load_system_roots() -> Result<SystemRoots, String> {
    let mut slot = SYSTEM_ROOTS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(s) = slot.as_ref() {
        return Ok(s.clone());
    }
    let source = system_source();
    let fail = |reason: String| format!("no system roots could be loaded from {source}: {reason}");
    if let Some(f) = std::env::var_os("SSL_CERT_FILE") {
        if let Ok(m) = std::fs::metadata(&f) {
            if m.len() > MAX_SYSTEM_BUNDLE_BYTES {
                return Err(fail(format!(
                    "the file is larger than {MAX_SYSTEM_BUNDLE_BYTES} bytes"
                )));
            }
        }
    }
    let found = rustls_native_certs::load_native_certs();
    if found.certs.len() > MAX_SYSTEM_ROOTS {
        return Err(fail(format!(
            "{} certificates, more than {MAX_SYSTEM_ROOTS}",
            found.certs.len()
        )));
    }
    let mut roots = RootCertStore::empty();
    let (added, ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let mut why: Vec<String> = found
            .errors
            .iter()
            .take(MAX_QUOTED_ERRORS)
            .map(ToString::to_string)
            .collect();
        if found.errors.len() > MAX_QUOTED_ERRORS {
            why.push(format!(
                "and {} more errors",
                found.errors.len() - MAX_QUOTED_ERRORS
            ));
        }
        if ignored > 0 {
            why.push(format!("{ignored} certificates are not usable CAs"));
        }
        if why.is_empty() {
            why.push("no CERTIFICATE found".into());
        }
        return Err(fail(why.join("; ")));
    }
    let loaded = SystemRoots {
        roots: Arc::new(roots),
        source: format!(
            "{source}, {added} root{}",
            if added == 1 { "" } else { "s" }
        ),
    };
    tracing::info!(
        roots = added,
        ignored,
        errors = found.errors.len(),
        "system roots loaded from {source}"
    );
    *slot = Some(loaded.clone());
    Ok(loaded)
}

/// Checks names against `subjectAltNames` (any one of them) instead of the
/// SNI name; the chain is verified by webpki exactly as without it.
#[derive(Debug)]
struct SanVerifier {
    inner: Arc<WebPkiServerVerifier>,
    names: Vec<ServerName<'static>>,
}

impl ServerCertVerifier for SanVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut last = rustls::Error::InvalidCertificate(CertificateError::NotValidForName);
        for n in &self.names {
            match self
                .inner
                .verify_server_cert(end_entity, intermediates, n, ocsp_response, now)
            {
                Ok(v) => return Ok(v),
                Err(
                    e @ rustls::Error::InvalidCertificate(
                        CertificateError::NotValidForName
                        | CertificateError::NotValidForNameContext { .. },
                    ),
                ) => last = e,
                // A chain problem is the same for every name.
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Why the TLS leg could not be opened.
#[derive(Debug)]
pub enum LegError {
    /// TCP connect failed or timed out: nothing was sent, another endpoint
    /// may be tried.
    Connect(String),
    /// The handshake failed (verification, alert, timeout): the reason.
    Handshake(String),
}

/// Opens the TLS leg to `addr` within `limit` (TCP connect and handshake
/// together), with ALPN `h2` when `h2`.
pub async fn connect(
    o: &Origination,
    addr: std::net::SocketAddr,
    h2: bool,
    limit: Duration,
) -> Result<(TlsStream<TcpStream>, LegFacts), LegError> {
    let deadline = tokio::time::Instant::now() + limit;
    let tcp = match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(LegError::Connect(format!("{addr}: {e}"))),
        Err(_) => {
            return Err(LegError::Connect(format!(
                "{addr}: no TCP connection within {limit:?}"
            )))
        }
    };
    let _ = tcp.set_nodelay(true);
    let config = if h2 { o.h2.clone() } else { o.h1.clone() };
    let tls = match tokio::time::timeout_at(
        deadline,
        TlsConnector::from(config).connect(o.server_name.clone(), tcp),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(LegError::Handshake(o.explain(&e))),
        Err(_) => {
            return Err(LegError::Handshake(format!(
                "no TLS handshake within {limit:?}"
            )))
        }
    };
    let (_, session) = tls.get_ref();
    let version = match session.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "1.3",
        Some(rustls::ProtocolVersion::TLSv1_2) => "1.2",
        _ => "unknown",
    };
    let cipher = session
        .negotiated_cipher_suite()
        .map(|s| format!("{:?}", s.suite()))
        .unwrap_or_else(|| "unknown".into());
    Ok((tls, LegFacts { version, cipher }))
}

/// The TLS setting for `host` in `config` (the host's destination policy,
/// for the entry's first port, which the gateway forwards to).
pub fn setting_for<'c>(
    config: &'c MeshConfig,
    host: &str,
) -> Option<(&'c DestinationPolicy, &'c ClientTls)> {
    let entry = config
        .service_entries
        .iter()
        .find(|e| e.hosts.iter().any(|h| h == host))?;
    let port = entry.ports.first()?.number;
    let p = config
        .destination_policies
        .iter()
        .find(|p| p.host == host)?;
    p.traffic.tls_for_port(port).map(|t| (p, t))
}

/// Loads every TLS setting of `config` that the gateway would use, so that
/// an apply or rollback naming a missing or bad file is refused before it
/// is stored. The error names the destination rule, the field and the file.
pub fn check_config(config: &MeshConfig) -> Result<(), String> {
    let mut errors = Vec::new();
    for p in &config.destination_policies {
        let t = &p.traffic;
        let settings = t
            .tls
            .iter()
            .map(|tls| ("spec.trafficPolicy.tls".to_string(), tls))
            .chain(t.port_tls.iter().map(|pt| {
                (
                    format!("spec.trafficPolicy.portLevelSettings[port {}].tls", pt.port),
                    &pt.tls,
                )
            }));
        for (path, tls) in settings {
            if let Err(e) = Origination::load(&p.host, tls) {
                errors.push(format!("DestinationRule {}: {path}.{e}", p.id));
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("\n"))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

    fn pki(dir: &Path) -> (String, String, String, String) {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap();
        let key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["client.test".into()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        let other = KeyPair::generate().unwrap();
        let w = |n: &str, s: String| {
            let f = dir.join(n);
            std::fs::write(&f, s).unwrap();
            f.to_str().unwrap().to_owned()
        };
        (
            w("ca.pem", ca.pem()),
            w("c.pem", leaf.pem()),
            w("k.pem", key.serialize_pem()),
            w("other-k.pem", other.serialize_pem()),
        )
    }

    fn tls(mode: TlsMode, ca: &str, cert: Option<&str>, key: Option<&str>) -> ClientTls {
        ClientTls {
            mode,
            ca_certificates: Some(ca.into()),
            client_certificate: cert.map(Into::into),
            private_key: key.map(Into::into),
            sni: Some("api.pay.test".into()),
            subject_alt_names: vec![],
        }
    }

    #[test]
    fn files_load_and_every_bad_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, cert, key, other_key) = pki(dir.path());
        let o = Origination::load("pay.cloud", &tls(TlsMode::Simple, &ca, None, None))
            .unwrap()
            .unwrap();
        assert_eq!(o.server_name.to_str(), "api.pay.test");
        let m = tls(TlsMode::Mutual, &ca, Some(&cert), Some(&key));
        assert!(Origination::load("pay.cloud", &m).unwrap().is_some());
        let d = ClientTls {
            mode: TlsMode::Disable,
            ca_certificates: None,
            ..m.clone()
        };
        assert!(Origination::load("pay.cloud", &d).unwrap().is_none());

        let missing = dir.path().join("nope.pem");
        let missing = missing.to_str().unwrap();
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not pem at all").unwrap();
        let garbage = garbage.to_str().unwrap();
        let big = dir.path().join("big.pem");
        std::fs::write(&big, vec![b'a'; (MAX_PEM_BYTES + 1) as usize]).unwrap();
        let big = big.to_str().unwrap();
        let cases = [
            (
                tls(TlsMode::Simple, missing, None, None),
                "caCertificates: cannot read",
            ),
            (tls(TlsMode::Simple, garbage, None, None), "caCertificates"),
            (tls(TlsMode::Simple, big, None, None), "is larger than"),
            (
                tls(TlsMode::Simple, &key, None, None),
                "holds no CERTIFICATE block",
            ),
            (
                tls(TlsMode::Mutual, &ca, Some(missing), Some(&key)),
                "clientCertificate: cannot read",
            ),
            (
                tls(TlsMode::Mutual, &ca, Some(&cert), Some(&ca)),
                "privateKey",
            ),
            (
                tls(TlsMode::Mutual, &ca, Some(&cert), Some(&other_key)),
                "does not go with",
            ),
        ];
        for (t, want) in cases {
            let e = Origination::load("pay.cloud", &t).unwrap_err().to_string();
            assert!(e.contains(want), "{e} / want {want}");
        }
    }

    #[test]
    fn check_config_names_rule_field_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, ..) = pki(dir.path());
        let yaml = |ca: &str| {
            format!(
                r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: pay, namespace: cloud}}
spec:
  hosts: [pay.cloud]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: [{{number: 443, name: https, protocol: HTTP}}]
  endpoints: [{{address: 127.0.0.1}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: pay, namespace: cloud}}
spec:
  host: pay.cloud
  trafficPolicy:
    portLevelSettings:
    - port: {{number: 443}}
      tls: {{mode: SIMPLE, caCertificates: {ca}}}
"#
            )
        };
        let good = MeshConfig::from_yaml(&yaml(&ca)).unwrap();
        check_config(&good).unwrap();
        assert!(setting_for(&good, "pay.cloud").is_some());
        let bad = MeshConfig::from_yaml(&yaml("/nonexistent/ca.pem")).unwrap();
        let e = check_config(&bad).unwrap_err();
        assert!(
            e.starts_with("DestinationRule cloud/pay: spec.trafficPolicy.portLevelSettings[port 443].tls.caCertificates: cannot read /nonexistent/ca.pem"),
            "{e}"
        );
    }
}
