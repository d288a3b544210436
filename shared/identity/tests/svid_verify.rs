//! X.509-SVID verification: the negative matrix (one test per way a chain can
//! be wrong, each asserting the specific `SvidError`) and real rustls
//! handshakes pumped in memory between a client and a server.
//!
//! Bad certificates are crafted here with rcgen directly, bypassing `Ca`,
//! because `Ca` refuses to make them.
#![allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConnection, ConnectionCommon, ServerConnection};

use tidemesh_identity::clock::FixedClock;
use tidemesh_identity::svid::{self, Ca, KeyPair};
use tidemesh_identity::verify::{
    self, anonymous_client_config, client_config, client_config_no_cert, server_config,
    verify_svid, AnyInTrustDomain, Authorizer, ExactId, ServerTrust, SvidError, TrustBundle, Usage,
};
use tidemesh_identity::{naming, SpiffeId, TrustDomain};

// ---------------------------------------------------------------- fixtures

/// Leaf validity starts here; verification happens ten minutes later.
const NB: u64 = 1_800_000_000;
const HOUR: u64 = 3600;
const DAY: u64 = 86_400;

fn t(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}
fn now() -> UnixTime {
    UnixTime::since_unix_epoch(Duration::from_secs(NB + 600))
}
fn td() -> TrustDomain {
    TrustDomain::new("corp.example").unwrap()
}
fn node() -> SpiffeId {
    naming::node_id(&td(), "sf01", "n1").unwrap()
}
fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().unwrap())
}

struct Pki {
    ca: Ca,
}

impl Pki {
    fn new() -> Self {
        Self {
            ca: Ca::generate(&td(), t(NB - DAY), t(NB + 365 * DAY)).unwrap(),
        }
    }
    /// A CA of someone else's trust domain (so also a different name).
    fn rogue() -> Self {
        let td = TrustDomain::new("rogue.example").unwrap();
        Self {
            ca: Ca::generate(&td, t(NB - DAY), t(NB + 365 * DAY)).unwrap(),
        }
    }
    fn bundle(&self) -> TrustBundle {
        TrustBundle::new(td(), vec![self.ca.cert_der()])
    }
    /// An rcgen issuer holding our CA's real name and key.
    fn issuer(&self) -> Issuer<'static, KeyPair> {
        let key = svid::key_from_pem(&self.ca.key_pem()).unwrap();
        Issuer::from_ca_cert_der(&self.ca.cert_der(), key).unwrap()
    }
    /// A proper SVID for `id`, via the public issuance path.
    fn issue(&self, id: &SpiffeId, nb: u64, na: u64) -> (Vec<CertificateDer<'static>>, KeyPair) {
        let key = svid::generate_key().unwrap();
        let csr = svid::make_csr(&key, id).unwrap();
        let leaf = self.ca.sign_csr(&csr, id, t(nb), t(na)).unwrap();
        (vec![leaf], key)
    }
    fn good(&self) -> Vec<CertificateDer<'static>> {
        self.issue(&node(), NB, NB + HOUR).0
    }
}

/// Leaf parameters as `Ca::sign_csr` would set them, for tests to spoil.
fn leaf_params(sans: Vec<SanType>) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.not_before = time::OffsetDateTime::from_unix_timestamp(NB as i64).unwrap();
    p.not_after = time::OffsetDateTime::from_unix_timestamp((NB + HOUR) as i64).unwrap();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "tidemesh");
    p.distinguished_name = dn;
    p.subject_alt_names = sans;
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.use_authority_key_identifier_extension = true;
    p
}

fn sign_leaf(params: &CertificateParams, issuer: &Issuer<'_, KeyPair>) -> CertificateDer<'static> {
    sign_leaf_keyed(params, issuer).0
}

fn sign_leaf_keyed(
    params: &CertificateParams,
    issuer: &Issuer<'_, KeyPair>,
) -> (CertificateDer<'static>, KeyPair) {
    let key = svid::generate_key().unwrap();
    let der = params.signed_by(&key, issuer).unwrap().der().clone();
    (der, key)
}

/// CA parameters like `Ca::generate`'s, for a CA named `cn`.
fn ca_params(cn: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.not_before = time::OffsetDateTime::from_unix_timestamp((NB - DAY) as i64).unwrap();
    p.not_after = time::OffsetDateTime::from_unix_timestamp((NB + 365 * DAY) as i64).unwrap();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "tidemesh");
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.subject_alt_names = vec![uri("spiffe://corp.example")];
    p
}

/// A DER nameConstraints extension permitting one URI subtree (`host`).
fn uri_name_constraints(host: &str) -> CustomExtension {
    fn tlv(tag: u8, body: &[u8]) -> Vec<u8> {
        assert!(body.len() < 128, "short-form lengths only");
        let mut v = vec![tag, body.len() as u8];
        v.extend_from_slice(body);
        v
    }
    let base = tlv(0x86, host.as_bytes()); // [6] IMPLICIT IA5String: URI
    let subtree = tlv(0x30, &base); // GeneralSubtree
    let permitted = tlv(0xa0, &subtree); // [0] permittedSubtrees
    let nc = tlv(0x30, &permitted); // NameConstraints
    let mut ext = CustomExtension::from_oid_content(&[2, 5, 29, 30], nc);
    ext.set_criticality(true);
    ext
}

fn verify(chain: &[CertificateDer<'_>], bundle: &TrustBundle) -> Result<SpiffeId, SvidError> {
    verify_svid(chain, bundle, now(), Usage::Server).map(|v| v.id().clone())
}

/// The error for `chain`, after checking that the same bundle accepts a good chain.
fn rejected(pki: &Pki, chain: &[CertificateDer<'_>]) -> SvidError {
    assert_eq!(
        verify(&pki.good(), &pki.bundle()),
        Ok(node()),
        "good chain must pass"
    );
    verify(chain, &pki.bundle()).unwrap_err()
}

// ------------------------------------------------------- the good chain

#[test]
fn good_chain_passes_for_both_usages() {
    let pki = Pki::new();
    let chain = pki.good();
    for usage in [Usage::Server, Usage::Client] {
        let v = verify_svid(&chain, &pki.bundle(), now(), usage).unwrap();
        assert_eq!(v.id(), &node());
        assert_eq!(v.not_after(), t(NB + HOUR));
        assert_eq!(v.leaf_fingerprint(), svid::sha256(&chain[0]));
    }
}

#[test]
fn a_generic_intermediate_is_not_a_node_ca() {
    // An unconstrained intermediate of our own root: webpki would build the
    // path, but tidemesh only allows node CAs (pathLenConstraint 0).
    let pki = Pki::new();
    let inter_key = svid::generate_key().unwrap();
    let inter_params = ca_params("tidemesh store CA sf01");
    let inter = inter_params.signed_by(&inter_key, &pki.issuer()).unwrap();
    let inter_issuer = Issuer::new(inter_params, inter_key);
    let leaf = sign_leaf(&leaf_params(vec![uri(&node().to_string())]), &inter_issuer);
    assert!(matches!(
        verify(&[leaf.clone(), inter.der().clone()], &pki.bundle()),
        Err(SvidError::NodeCaPathLen(_))
    ));
    // Without the intermediate the path cannot be built.
    assert_eq!(rejected(&pki, &[leaf]), SvidError::UnknownIssuer);
}

// ------------------------------------------------------------ node CAs

fn workload(store: &str, account: &str) -> SpiffeId {
    naming::workload_id(&td(), store, account).unwrap()
}

/// A node CA of `node` issued through the public path, valid NB-DAY..NB+30d.
fn node_ca(pki: &Pki, node: &SpiffeId) -> svid::NodeCa {
    let key = svid::generate_key().unwrap();
    let csr = svid::make_csr(&key, node).unwrap();
    let der = pki
        .ca
        .issue_node_ca(&csr, node, t(NB - DAY), t(NB + 30 * DAY))
        .unwrap();
    svid::NodeCa::new(der, key).unwrap()
}

/// An rcgen issuer holding a node CA's name and key, to craft what
/// `NodeCa::issue_workload` refuses to make.
fn raw_issuer(ca: &svid::NodeCa, key: KeyPair) -> Issuer<'static, KeyPair> {
    Issuer::from_ca_cert_der(ca.cert_der(), key).unwrap()
}

#[test]
fn a_node_ca_issues_workloads_of_its_store() {
    let pki = Pki::new();
    let ca = node_ca(&pki, &node());
    let key = svid::generate_key().unwrap();
    let id = workload("sf01", "pos");
    let chain = ca.issue_workload(&key, &id, t(NB), t(NB + HOUR)).unwrap();
    assert_eq!(chain.len(), 2);
    for usage in [Usage::Server, Usage::Client] {
        let v = verify_svid(&chain, &pki.bundle(), now(), usage).unwrap();
        assert_eq!(v.id(), &id);
        let issuer = v.issuer().expect("issued by the node ca");
        assert_eq!(issuer.node(), &node());
        assert_eq!(issuer.key_fingerprint(), ca.key_fingerprint());
        assert_eq!(v.key_fingerprint(), svid::key_fingerprint(&key));
    }
    // Its own node ID too: the spoke's data-tunnel serving certificate.
    let serving = ca.issue_serving(&key, t(NB), t(NB + HOUR)).unwrap();
    let v = verify_svid(&serving, &pki.bundle(), now(), Usage::Server).unwrap();
    assert_eq!(v.id(), &node());
    assert_eq!(v.issuer().map(|i| i.node()), Some(&node()));
    // The node CA refuses other stores and non-workload IDs itself.
    for other in [workload("sf02", "pos"), node()] {
        assert!(matches!(
            ca.issue_workload(&key, &other, t(NB), t(NB + HOUR)),
            Err(svid::IssueError::OutOfScope { .. })
        ));
    }
    // A leaf asked to outlive the CA is clamped to the CA's expiry.
    let long = ca
        .issue_workload(&key, &id, t(NB), t(NB + 365 * DAY))
        .unwrap();
    assert_eq!(svid::cert_validity(&long[0]).unwrap().1, ca.validity().1);
}

#[test]
fn a_node_ca_of_store_a_signing_a_store_b_id_is_refused() {
    let pki = Pki::new();
    let key = svid::generate_key().unwrap();
    let csr = svid::make_csr(&key, &node()).unwrap();
    let der = pki
        .ca
        .issue_node_ca(&csr, &node(), t(NB - DAY), t(NB + 30 * DAY))
        .unwrap();
    let ca = svid::NodeCa::new(
        der.clone(),
        svid::key_from_pem(&key.serialize_pem()).unwrap(),
    )
    .unwrap();
    let issuer = raw_issuer(&ca, key);
    for stolen in [
        workload("sf02", "payments").to_string(),
        naming::node_id(&td(), "sf01", "n2").unwrap().to_string(),
        naming::hub_id(&td()).to_string(),
    ] {
        let leaf = sign_leaf(&leaf_params(vec![uri(&stolen)]), &issuer);
        let err = verify(&[leaf, der.clone()], &pki.bundle()).unwrap_err();
        assert!(
            matches!(err, SvidError::NodeCaScope { ref ca, .. } if **ca == node()),
            "{stolen}: {err:?}"
        );
    }
}

#[test]
fn a_leaf_outliving_its_node_ca_is_refused() {
    let pki = Pki::new();
    let key = svid::generate_key().unwrap();
    let csr = svid::make_csr(&key, &node()).unwrap();
    let der = pki
        .ca
        .issue_node_ca(&csr, &node(), t(NB - DAY), t(NB + HOUR))
        .unwrap();
    let ca = svid::NodeCa::new(
        der.clone(),
        svid::key_from_pem(&key.serialize_pem()).unwrap(),
    )
    .unwrap();
    let issuer = raw_issuer(&ca, key);
    let mut params = leaf_params(vec![uri(&workload("sf01", "pos").to_string())]);
    params.not_after = time::OffsetDateTime::from_unix_timestamp((NB + 2 * HOUR) as i64).unwrap();
    let leaf = sign_leaf(&params, &issuer);
    assert_eq!(
        verify(&[leaf, der], &pki.bundle()),
        Err(SvidError::OutlivesIssuer {
            id: workload("sf01", "pos")
        })
    );
}

#[test]
fn a_node_ca_without_path_len_zero_is_refused() {
    let pki = Pki::new();
    for constraint in [
        BasicConstraints::Unconstrained,
        BasicConstraints::Constrained(1),
    ] {
        let ca_key = svid::generate_key().unwrap();
        let mut params = ca_params("tidemesh node CA sf01/n1");
        params.is_ca = IsCa::Ca(constraint);
        params.subject_alt_names = vec![uri(&node().to_string())];
        let ca = params.signed_by(&ca_key, &pki.issuer()).unwrap();
        let issuer = Issuer::new(params, ca_key);
        let leaf = sign_leaf(
            &leaf_params(vec![uri(&workload("sf01", "pos").to_string())]),
            &issuer,
        );
        assert_eq!(
            verify(&[leaf, ca.der().clone()], &pki.bundle()),
            Err(SvidError::NodeCaPathLen(node().to_string()))
        );
    }
    // NodeCa::new refuses such a certificate too.
    let ca_key = svid::generate_key().unwrap();
    let mut params = ca_params("x");
    params.subject_alt_names = vec![uri(&node().to_string())];
    let ca = params.signed_by(&ca_key, &pki.issuer()).unwrap();
    assert!(matches!(
        svid::NodeCa::new(ca.der().clone(), ca_key),
        Err(svid::IssueError::NotANodeCa(_))
    ));
}

#[test]
fn a_second_level_intermediate_is_refused() {
    let pki = Pki::new();
    // root -> CA1 (pathLen 1, node-named) -> CA2 (pathLen 0, node-named) -> leaf:
    // webpki builds this path; tidemesh allows one intermediate only.
    let k1 = svid::generate_key().unwrap();
    let mut p1 = ca_params("ca1");
    p1.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    p1.subject_alt_names = vec![uri(&node().to_string())];
    let c1 = p1.signed_by(&k1, &pki.issuer()).unwrap();
    let i1 = Issuer::new(p1, k1);
    let k2 = svid::generate_key().unwrap();
    let mut p2 = ca_params("ca2");
    p2.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p2.subject_alt_names = vec![uri(&node().to_string())];
    let c2 = p2.signed_by(&k2, &i1).unwrap();
    let i2 = Issuer::new(p2, k2);
    let leaf = sign_leaf(
        &leaf_params(vec![uri(&workload("sf01", "pos").to_string())]),
        &i2,
    );
    assert_eq!(
        verify(&[leaf, c2.der().clone(), c1.der().clone()], &pki.bundle()),
        Err(SvidError::IntermediateDepth(2))
    );
    // And a real node CA (pathLen 0) cannot sign a CA at all: webpki
    // refuses the path by its path length constraint.
    let key = svid::generate_key().unwrap();
    let csr = svid::make_csr(&key, &node()).unwrap();
    let der = pki
        .ca
        .issue_node_ca(&csr, &node(), t(NB - DAY), t(NB + 30 * DAY))
        .unwrap();
    let nca = svid::NodeCa::new(
        der.clone(),
        svid::key_from_pem(&key.serialize_pem()).unwrap(),
    )
    .unwrap();
    let ni = raw_issuer(&nca, key);
    let k3 = svid::generate_key().unwrap();
    let mut p3 = ca_params("ca3");
    p3.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p3.subject_alt_names = vec![uri(&node().to_string())];
    let c3 = p3.signed_by(&k3, &ni).unwrap();
    let i3 = Issuer::new(p3, k3);
    let leaf = sign_leaf(
        &leaf_params(vec![uri(&workload("sf01", "pos").to_string())]),
        &i3,
    );
    assert!(verify(&[leaf, c3.der().clone(), der], &pki.bundle()).is_err());
}

#[test]
fn an_intermediate_not_named_by_a_node_id_is_refused() {
    let pki = Pki::new();
    for name in [
        "spiffe://corp.example".to_string(),
        workload("sf01", "pos").to_string(),
        "spiffe://rogue.example/store/sf01/node/n1".to_string(),
    ] {
        let k = svid::generate_key().unwrap();
        let mut p = ca_params("odd");
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.subject_alt_names = vec![uri(&name)];
        let c = p.signed_by(&k, &pki.issuer()).unwrap();
        let i = Issuer::new(p, k);
        let leaf = sign_leaf(
            &leaf_params(vec![uri(&workload("sf01", "pos").to_string())]),
            &i,
        );
        assert!(
            matches!(
                verify(&[leaf, c.der().clone()], &pki.bundle()),
                Err(SvidError::NodeCaIdentity(_))
            ),
            "{name}"
        );
    }
}

#[test]
fn revocation_refuses_the_node_its_keys_and_its_node_ca() {
    use tidemesh_identity::revocation::{RevocationList, Revocations, RevokedKey};
    let pki = Pki::new();
    let ca = node_ca(&pki, &node());
    let wkey = svid::generate_key().unwrap();
    let wchain = ca
        .issue_workload(&wkey, &workload("sf01", "pos"), t(NB), t(NB + HOUR))
        .unwrap();
    let (nchain, nkey) = pki.issue(&node(), NB, NB + HOUR);
    let handle = Revocations::default();
    let bundle = pki.bundle().with_revocations(handle.clone());
    assert!(verify(&wchain, &bundle).is_ok());
    assert!(verify(&nchain, &bundle).is_ok());
    let revoked = |v: u64, nodes: Vec<SpiffeId>, keys: Vec<[u8; 32]>| RevocationList {
        version: v,
        issued_ms: 0,
        nodes: nodes.into_iter().collect(),
        keys: keys
            .into_iter()
            .map(|fingerprint| RevokedKey {
                fingerprint,
                until_ms: u64::MAX,
            })
            .collect(),
    };
    // the node ID: its node SVID and everything its node CA issued
    assert!(handle.install(revoked(1, vec![node()], vec![])));
    assert!(matches!(
        verify(&wchain, &bundle),
        Err(SvidError::Revoked(_))
    ));
    assert!(matches!(
        verify(&nchain, &bundle),
        Err(SvidError::Revoked(_))
    ));
    // only the node CA's key (the node ID enrolled again with a new key)
    assert!(handle.install(revoked(2, vec![], vec![ca.key_fingerprint()])));
    assert!(matches!(
        verify(&wchain, &bundle),
        Err(SvidError::Revoked(_))
    ));
    assert!(verify(&nchain, &bundle).is_ok());
    // only the old node key
    assert!(handle.install(revoked(3, vec![], vec![svid::key_fingerprint(&nkey)])));
    assert!(verify(&wchain, &bundle).is_ok());
    assert!(matches!(
        verify(&nchain, &bundle),
        Err(SvidError::Revoked(_))
    ));
    // a bundle without the handle knows nothing of it
    assert!(verify(&nchain, &pki.bundle()).is_ok());
}

#[test]
fn data_peers_must_be_workloads_issued_by_a_node_ca() {
    use tidemesh_identity::verify::WorkloadsViaNodeCa;
    let pki = Pki::new();
    let ca = node_ca(&pki, &node());
    let key = svid::generate_key().unwrap();
    let via_ca = ca
        .issue_workload(&key, &workload("sf01", "pos"), t(NB), t(NB + HOUR))
        .unwrap();
    let (direct, _) = pki.issue(&workload("sf01", "pos"), NB, NB + HOUR);
    let (node_leaf, _) = pki.issue(&node(), NB, NB + HOUR);
    let check = |chain: &[CertificateDer<'_>]| {
        let v = verify_svid(chain, &pki.bundle(), now(), Usage::Client).unwrap();
        WorkloadsViaNodeCa.authorize(&v)
    };
    assert_eq!(check(&via_ca), Ok(()));
    assert!(check(&direct).unwrap_err().contains("node CA"));
    assert!(check(&node_leaf)
        .unwrap_err()
        .contains("only workload SVIDs"));
}

// --------------------------------------------------- the negative matrix

#[test]
fn empty_chain_is_no_certificate() {
    assert_eq!(
        verify(&[], &Pki::new().bundle()),
        Err(SvidError::NoCertificate)
    );
}

#[test]
fn unknown_ca_is_unknown_issuer() {
    let ours = Pki::new();
    let rogue = Pki::rogue();
    // The rogue CA claims an ID in our trust domain; the chain check comes first.
    let (leaf, _) = sign_leaf_keyed(
        &leaf_params(vec![uri(&node().to_string())]),
        &rogue.issuer(),
    );
    let chain = [leaf];
    assert_eq!(rejected(&ours, &chain), SvidError::UnknownIssuer);
    // An empty bundle trusts nothing.
    let empty = TrustBundle::new(td(), vec![]);
    assert_eq!(verify(&ours.good(), &empty), Err(SvidError::UnknownIssuer));
}

#[test]
fn another_ca_of_our_trust_domain_is_a_bad_signature() {
    // Two CAs of one trust domain share a subject name (O=tidemesh,
    // CN=tidemesh CA <td>), so a leaf of the other one finds our root by name
    // and fails on the signature. This is what a spoke with a stale bundle
    // sees after the hub's CA was regenerated.
    let ours = Pki::new();
    let other = Pki::new();
    assert_eq!(
        verify(&other.good(), &ours.bundle()),
        Err(SvidError::BadSignature)
    );
    // A bundle holding both (CA rotation) accepts either.
    let both = TrustBundle::new(td(), vec![ours.ca.cert_der(), other.ca.cert_der()]);
    assert_eq!(verify(&other.good(), &both), Ok(node()));
    assert_eq!(verify(&ours.good(), &both), Ok(node()));
}

#[test]
fn wrong_trust_domain() {
    let pki = Pki::new();
    let leaf = sign_leaf(
        &leaf_params(vec![uri("spiffe://evil.example/hub")]),
        &pki.issuer(),
    );
    assert_eq!(
        rejected(&pki, &[leaf]),
        SvidError::WrongTrustDomain {
            expected: td(),
            found: TrustDomain::new("evil.example").unwrap(),
        }
    );
}

#[test]
fn zero_uri_sans() {
    let pki = Pki::new();
    let dns = SanType::DnsName("hub.corp.example".try_into().unwrap());
    let leaf = sign_leaf(&leaf_params(vec![dns]), &pki.issuer());
    assert_eq!(rejected(&pki, &[leaf]), SvidError::NoUriSan);
    let bare = sign_leaf(&leaf_params(vec![]), &pki.issuer());
    assert_eq!(rejected(&pki, &[bare]), SvidError::NoUriSan);
}

#[test]
fn two_uri_sans() {
    let pki = Pki::new();
    let sans = vec![
        uri("spiffe://corp.example/store/sf01/node/n1"),
        uri("spiffe://corp.example/hub"),
    ];
    let leaf = sign_leaf(&leaf_params(sans), &pki.issuer());
    assert_eq!(rejected(&pki, &[leaf]), SvidError::MultipleUriSans(2));
}

#[test]
fn non_spiffe_uri() {
    let pki = Pki::new();
    let leaf = sign_leaf(
        &leaf_params(vec![uri("https://corp.example/hub")]),
        &pki.issuer(),
    );
    assert_eq!(
        rejected(&pki, &[leaf]),
        SvidError::NotSpiffeUri("https://corp.example/hub".into())
    );
}

#[test]
fn invalid_spiffe_id() {
    let pki = Pki::new();
    let leaf = sign_leaf(
        &leaf_params(vec![uri("spiffe://Corp.example/x")]),
        &pki.issuer(),
    );
    assert!(matches!(
        rejected(&pki, &[leaf]),
        SvidError::InvalidSpiffeId(_)
    ));
}

#[test]
fn leaf_without_path() {
    let pki = Pki::new();
    let leaf = sign_leaf(
        &leaf_params(vec![uri("spiffe://corp.example")]),
        &pki.issuer(),
    );
    assert_eq!(rejected(&pki, &[leaf]), SvidError::NoPath(td().id()));
}

#[test]
fn leaf_with_ca_true() {
    let pki = Pki::new();
    let mut p = leaf_params(vec![uri(&node().to_string())]);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let leaf = sign_leaf(&p, &pki.issuer());
    assert_eq!(rejected(&pki, &[leaf]), SvidError::CaUsedAsLeaf);
}

#[test]
fn leaf_with_signing_key_usage() {
    let pki = Pki::new();
    let mut p = leaf_params(vec![uri(&node().to_string())]);
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyCertSign,
    ];
    let leaf = sign_leaf(&p, &pki.issuer());
    assert_eq!(rejected(&pki, &[leaf]), SvidError::SigningUsageOnLeaf);
}

#[test]
fn leaf_without_the_needed_eku() {
    let pki = Pki::new();
    let mut p = leaf_params(vec![uri(&node().to_string())]);
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let leaf = sign_leaf(&p, &pki.issuer());
    let chain = [leaf];
    assert!(verify_svid(&chain, &pki.bundle(), now(), Usage::Server).is_ok());
    assert_eq!(
        verify_svid(&chain, &pki.bundle(), now(), Usage::Client),
        Err(SvidError::WrongPurpose(Usage::Client))
    );
}

#[test]
fn expired() {
    let pki = Pki::new();
    let (chain, _) = pki.issue(&node(), NB - 2 * HOUR, NB - HOUR);
    assert_eq!(
        rejected(&pki, &chain),
        SvidError::Expired {
            now: t(NB + 600),
            not_after: t(NB - HOUR),
        }
    );
}

#[test]
fn not_yet_valid() {
    let pki = Pki::new();
    let (chain, _) = pki.issue(&node(), NB + HOUR, NB + 2 * HOUR);
    assert_eq!(
        rejected(&pki, &chain),
        SvidError::NotYetValid {
            now: t(NB + 600),
            not_before: t(NB + HOUR),
        }
    );
}

#[test]
fn signed_by_the_wrong_key() {
    let pki = Pki::new();
    // Same issuer name as our CA, different key: only the signature betrays it.
    let impostor = Issuer::new(
        ca_params("tidemesh CA corp.example"),
        svid::generate_key().unwrap(),
    );
    let leaf = sign_leaf(&leaf_params(vec![uri(&node().to_string())]), &impostor);
    let leaf_issuer = x509_issuer(&leaf);
    assert_eq!(leaf_issuer, x509_subject(&pki.ca.cert_der()));
    assert_eq!(rejected(&pki, &[leaf]), SvidError::BadSignature);
}

#[test]
fn root_with_uri_name_constraints() {
    // The same root and leaf, once without and once with URI name constraints.
    for constrained in [false, true] {
        let key = svid::generate_key().unwrap();
        let mut p = ca_params("constrained CA");
        if constrained {
            p.custom_extensions = vec![uri_name_constraints("corp.example")];
        }
        let root = p.self_signed(&key).unwrap().der().clone();
        let issuer = Issuer::new(p, key);
        let leaf = sign_leaf(&leaf_params(vec![uri(&node().to_string())]), &issuer);
        let bundle = TrustBundle::new(td(), vec![root]);
        let expected = if constrained {
            Err(SvidError::UriNameConstraints)
        } else {
            Ok(node())
        };
        assert_eq!(verify(&[leaf], &bundle), expected);
    }
}

#[test]
fn intermediate_with_uri_name_constraints() {
    let pki = Pki::new();
    let inter_key = svid::generate_key().unwrap();
    let mut p = ca_params("constrained intermediate");
    p.custom_extensions = vec![uri_name_constraints("corp.example")];
    let inter = p
        .signed_by(&inter_key, &pki.issuer())
        .unwrap()
        .der()
        .clone();
    let inter_issuer = Issuer::new(p, inter_key);
    let leaf = sign_leaf(&leaf_params(vec![uri(&node().to_string())]), &inter_issuer);
    assert_eq!(
        rejected(&pki, &[leaf, inter]),
        SvidError::UriNameConstraints
    );
}

#[test]
fn garbage_is_malformed_not_a_panic() {
    let pki = Pki::new();
    for bytes in [vec![], vec![0x30], vec![0xff; 100], b"hello".to_vec()] {
        let r = verify(&[CertificateDer::from(bytes)], &pki.bundle());
        assert!(matches!(r, Err(SvidError::Malformed(_))), "{r:?}");
    }
    let bad_root = TrustBundle::new(td(), vec![CertificateDer::from(vec![0x30, 0x00])]);
    assert!(matches!(
        verify(&pki.good(), &bad_root),
        Err(SvidError::Malformed(_))
    ));
}

#[test]
fn errors_are_actionable_text() {
    let e = SvidError::Expired {
        now: t(NB),
        not_after: t(NB - HOUR),
    };
    let msg = e.to_string();
    assert!(msg.contains("2027-01-15"), "{msg}");
    assert!(msg.starts_with("certificate expired"), "{msg}");
}

fn x509_subject(der: &[u8]) -> Vec<u8> {
    let (_, c) = x509_parser::parse_x509_certificate(der).unwrap();
    c.subject().as_raw().to_vec()
}
fn x509_issuer(der: &[u8]) -> Vec<u8> {
    let (_, c) = x509_parser::parse_x509_certificate(der).unwrap();
    c.issuer().as_raw().to_vec()
}

#[test]
fn peer_id_reads_the_leaf() {
    let pki = Pki::new();
    assert_eq!(verify::peer_id(&pki.good()), Ok(node()));
    assert_eq!(verify::peer_id(&[]), Err(SvidError::NoCertificate));
}

// ----------------------------------------------- in-memory TLS handshakes

const ALPN: &[&[u8]] = &[b"tidemesh-ctl/1"];

fn clock_at(secs: u64) -> Arc<FixedClock> {
    Arc::new(FixedClock(t(secs)))
}

/// Moves TLS records between the two ends until neither has anything to say.
/// Returns each side's first error.
fn pump(
    client: &mut ClientConnection,
    server: &mut ServerConnection,
) -> (Option<rustls::Error>, Option<rustls::Error>) {
    fn hop<A, B>(
        from: &mut ConnectionCommon<A>,
        to: &mut ConnectionCommon<B>,
        to_err: &mut Option<rustls::Error>,
    ) -> bool {
        if !from.wants_write() {
            return false;
        }
        let mut buf = Vec::new();
        from.write_tls(&mut buf).unwrap();
        if buf.is_empty() || to_err.is_some() {
            return !buf.is_empty();
        }
        let mut rd = &buf[..];
        while !rd.is_empty() {
            to.read_tls(&mut rd).unwrap();
        }
        if let Err(e) = to.process_new_packets() {
            *to_err = Some(e);
        }
        true
    }
    let (mut ce, mut se) = (None, None);
    for _ in 0..64 {
        let a = hop(&mut **client, &mut **server, &mut se);
        let b = hop(&mut **server, &mut **client, &mut ce);
        if !a && !b {
            break;
        }
    }
    (ce, se)
}

/// SNI is required syntactically but plays no part in verification.
fn server_name() -> ServerName<'static> {
    ServerName::try_from("hub.tidemesh.invalid").unwrap()
}

struct Ends {
    hub_chain: Vec<CertificateDer<'static>>,
    hub_key: KeyPair,
    spoke_chain: Vec<CertificateDer<'static>>,
    spoke_key: KeyPair,
}

fn ends(pki: &Pki) -> Ends {
    let (hub_chain, hub_key) = pki.issue(&naming::hub_id(&td()), NB, NB + HOUR);
    let (spoke_chain, spoke_key) = pki.issue(&node(), NB, NB + HOUR);
    Ends {
        hub_chain,
        hub_key,
        spoke_chain,
        spoke_key,
    }
}

fn hub_server(pki: &Pki, e: &Ends, allow_anon: bool) -> ServerConnection {
    let cfg = server_config(
        pki.bundle(),
        e.hub_chain.clone(),
        &e.hub_key,
        Arc::new(AnyInTrustDomain),
        allow_anon,
        clock_at(NB + 600),
        ALPN,
    )
    .unwrap();
    ServerConnection::new(Arc::new(cfg)).unwrap()
}

fn spoke_client(
    bundle: TrustBundle,
    chain: Vec<CertificateDer<'static>>,
    key: &KeyPair,
    authorizer: Arc<dyn Authorizer>,
    clock_secs: u64,
) -> ClientConnection {
    let cfg = client_config(bundle, chain, key, authorizer, clock_at(clock_secs), ALPN).unwrap();
    ClientConnection::new(Arc::new(cfg), server_name()).unwrap()
}

#[test]
fn handshake_good_pair_sees_each_others_ids() {
    let pki = Pki::new();
    let e = ends(&pki);
    let mut server = hub_server(&pki, &e, false);
    let hub = Arc::new(ExactId(naming::hub_id(&td())));
    let mut client = spoke_client(
        pki.bundle(),
        e.spoke_chain.clone(),
        &e.spoke_key,
        hub,
        NB + 600,
    );
    let (ce, se) = pump(&mut client, &mut server);
    assert!(ce.is_none() && se.is_none(), "client {ce:?} server {se:?}");
    assert!(!client.is_handshaking() && !server.is_handshaking());
    assert_eq!(
        client.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    assert_eq!(client.alpn_protocol(), Some(&b"tidemesh-ctl/1"[..]));
    assert_eq!(
        verify::peer_id(client.peer_certificates().unwrap()),
        Ok(naming::hub_id(&td()))
    );
    assert_eq!(
        verify::peer_id(server.peer_certificates().unwrap()),
        Ok(node())
    );
}

#[test]
fn handshake_refuses_a_client_from_an_unknown_ca() {
    let pki = Pki::new();
    let rogue = Pki::rogue();
    let e = ends(&pki);
    let (rogue_leaf, rogue_key) = sign_leaf_keyed(
        &leaf_params(vec![uri(&node().to_string())]),
        &rogue.issuer(),
    );
    let rogue_chain = vec![rogue_leaf];
    let mut server = hub_server(&pki, &e, false);
    let mut client = spoke_client(
        pki.bundle(),
        rogue_chain,
        &rogue_key,
        Arc::new(AnyInTrustDomain),
        NB + 600,
    );
    let (ce, se) = pump(&mut client, &mut server);
    let se = se.expect("server must refuse the client");
    assert_eq!(
        verify::svid_error(&se),
        Some(&SvidError::UnknownIssuer),
        "{se:?}"
    );
    // TLS 1.3: the client finished first and learns of it from the alert.
    assert!(
        matches!(ce, Some(rustls::Error::AlertReceived(_))),
        "{ce:?}"
    );
}

#[test]
fn handshake_uses_the_injected_clock() {
    let pki = Pki::new();
    let e = ends(&pki);
    let mut server = hub_server(&pki, &e, false);
    // The spoke's clock says it is a year later: the hub's SVID has expired.
    let far = NB + 365 * DAY;
    let mut client = spoke_client(
        pki.bundle(),
        e.spoke_chain.clone(),
        &e.spoke_key,
        Arc::new(AnyInTrustDomain),
        far,
    );
    let (ce, _se) = pump(&mut client, &mut server);
    let ce = ce.expect("client must refuse the expired server");
    assert_eq!(
        verify::svid_error(&ce),
        Some(&SvidError::Expired {
            now: t(far),
            not_after: t(NB + HOUR),
        }),
        "{ce:?}"
    );
}

#[test]
fn handshake_refuses_an_unauthorized_server() {
    let pki = Pki::new();
    let e = ends(&pki);
    let mut server = hub_server(&pki, &e, false);
    let want = SpiffeId::parse("spiffe://corp.example/other-hub").unwrap();
    let mut client = spoke_client(
        pki.bundle(),
        e.spoke_chain.clone(),
        &e.spoke_key,
        Arc::new(ExactId(want)),
        NB + 600,
    );
    let (ce, _) = pump(&mut client, &mut server);
    let ce = ce.unwrap();
    assert!(
        matches!(
            verify::svid_error(&ce),
            Some(SvidError::Unauthorized { id, .. }) if id == &naming::hub_id(&td())
        ),
        "{ce:?}"
    );
}

#[test]
fn handshake_without_client_cert_needs_allow_unauthenticated() {
    let pki = Pki::new();
    let e = ends(&pki);
    let anon = || {
        let cfg = client_config_no_cert(
            pki.bundle(),
            Arc::new(AnyInTrustDomain),
            clock_at(NB + 600),
            ALPN,
        )
        .unwrap();
        ClientConnection::new(Arc::new(cfg), server_name()).unwrap()
    };
    let mut server = hub_server(&pki, &e, true);
    let mut client = anon();
    let (ce, se) = pump(&mut client, &mut server);
    assert!(ce.is_none() && se.is_none(), "client {ce:?} server {se:?}");
    assert!(server.peer_certificates().is_none());

    let mut strict = hub_server(&pki, &e, false);
    let mut client = anon();
    let (_, se) = pump(&mut client, &mut strict);
    assert!(
        matches!(se, Some(rustls::Error::NoCertificatesPresented)),
        "{se:?}"
    );
}

#[test]
fn enrollment_with_a_pinned_ca() {
    let pki = Pki::new();
    let e = ends(&pki);
    // The hub sends its CA along, so a spoke holding only the pin can verify it.
    let mut hub_chain = e.hub_chain.clone();
    hub_chain.push(pki.ca.cert_der());
    let server_cfg = server_config(
        pki.bundle(),
        hub_chain,
        &e.hub_key,
        Arc::new(AnyInTrustDomain),
        true,
        clock_at(NB + 600),
        ALPN,
    )
    .unwrap();
    let server_cfg = Arc::new(server_cfg);
    let pinned = |fingerprint: [u8; 32]| {
        let trust = ServerTrust::Pinned {
            trust_domain: td(),
            ca_fingerprint: fingerprint,
        };
        let hub = Arc::new(ExactId(naming::hub_id(&td())));
        let cfg = anonymous_client_config(trust, hub, clock_at(NB + 600), ALPN).unwrap();
        ClientConnection::new(Arc::new(cfg), server_name()).unwrap()
    };

    let mut server = ServerConnection::new(server_cfg.clone()).unwrap();
    let mut client = pinned(pki.ca.fingerprint());
    let (ce, se) = pump(&mut client, &mut server);
    assert!(ce.is_none() && se.is_none(), "client {ce:?} server {se:?}");

    let mut server = ServerConnection::new(server_cfg).unwrap();
    let mut client = pinned(Pki::new().ca.fingerprint());
    let (ce, _) = pump(&mut client, &mut server);
    assert_eq!(
        verify::svid_error(&ce.unwrap()),
        Some(&SvidError::PinMismatch)
    );
}
