//! Mesh config documents the end-to-end tests share.

use std::net::SocketAddr;

use super::TD;

/// An ALLOW policy: only frontend may call the workloads labelled `app`.
pub fn frontend_only(name: &str, namespace: &str, app: &str) -> String {
    format!(
        r#"---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  selector:
    matchLabels: {{app: {app}}}
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["{TD}/store/sf01/sa/frontend"]
"#
    )
}

/// A `ServiceEntry` for `NAME.cloud` in namespace cloud: one endpoint at
/// `addr`, labelled `app: NAME`, its port of `protocol`.
pub fn cloud_entry(name: &str, addr: SocketAddr, protocol: &str) -> String {
    service_entry(name, "cloud", name, addr, protocol)
}

/// A `ServiceEntry` for `NAME.cloud` in `namespace`: one endpoint at
/// `addr`, labelled `app: APP` (what authorization policies select), its
/// port of `protocol`.
pub fn service_entry(
    name: &str,
    namespace: &str,
    app: &str,
    addr: SocketAddr,
    protocol: &str,
) -> String {
    format!(
        r#"---
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  hosts: [{name}.cloud]
  location: MESH_EXTERNAL
  ports:
  - {{number: {port}, name: {lower}, protocol: {protocol}}}
  resolution: STATIC
  endpoints:
  - address: {ip}
    labels: {{app: {app}}}
"#,
        port = addr.port(),
        ip = addr.ip(),
        lower = protocol.to_ascii_lowercase(),
    )
}
