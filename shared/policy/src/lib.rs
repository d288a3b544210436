//! tidemesh policy: the mesh config model, its Istio-YAML input, and the
//! authorization and routing decisions made from it.
//!
//! What it is: the I/O-free core of the control plane's config. [`istio`]
//! parses multi-document YAML (Istio's `AuthorizationPolicy`,
//! `VirtualService`, `DestinationRule`, `ServiceEntry`, and tidemesh's own
//! kinds) into [`model`] types; [`MeshConfig::from_resources`] /
//! [`MeshConfig::apply`] check them across documents and build a
//! [`MeshConfig`], the value the hub versions and every spoke keeps as its
//! last-known-good replica; [`authz`] and [`routing`] compile it into
//! structures that answer per-request questions in microseconds, with the
//! evidence the seed document asks for; [`mode`] is the seed's mode matrix
//! as a state machine (Target, Degraded, Survival, Recovery) driven by
//! measured error rates, reachability and health checks. Who drives it: the
//! hub (apply, history, sync) and the spoke (per-request decisions, its mode). What it must not do:
//! file or network I/O, async runtimes, clocks (time and randomness are
//! passed in), panics on any input.
//!
//! ```
//! use tidemesh_policy::{CompiledRoutes, MeshConfig, NoHeaders, RouteRequest};
//!
//! let yaml = r#"
//! apiVersion: networking.istio.io/v1beta1
//! kind: DestinationRule
//! metadata: {name: pos, namespace: retail}
//! spec:
//!   host: pos
//!   subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
//! ---
//! apiVersion: networking.istio.io/v1beta1
//! kind: VirtualService
//! metadata: {name: pos, namespace: retail}
//! spec:
//!   hosts: [pos]
//!   http:
//!   - route:
//!     - {destination: {host: pos, subset: v1}, weight: 90}
//!     - {destination: {host: pos, subset: v2}, weight: 10}
//! "#;
//! let config = MeshConfig::from_yaml(yaml)?;
//! let routes = CompiledRoutes::from_config(&config)?;
//! let request = RouteRequest { path: "/sale", method: "POST", headers: &NoHeaders };
//! let decision = routes.route("pos.retail", &request, 0)?;
//! assert_eq!(decision.destination.subset.as_deref(), Some("v1"));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod authz;
mod config;
pub mod error;
pub mod istio;
pub mod jwt;
pub mod lifecycle;
pub mod mode;
pub mod model;
pub mod reqauthn;
pub mod request;
pub mod routing;
pub mod units;
pub mod vector;

pub use authz::{
    evaluate, evaluate_uncompiled, AuthzDecision, AuthzReason, AuthzRequest, AuthzVerdict,
    CompiledPolicies, WorkloadRef,
};
pub use config::Change;
pub use error::{ConfigError, ConfigIssue, DocumentRef};
pub use istio::{parse_documents, Object, ObjectKey, Resource};
pub use mode::ModeMachine;
pub use model::MeshConfig;
pub use request::{check_path, normalize_path, HeaderLookup, NoHeaders, PathError};
pub use routing::{
    CompiledRoutes, RouteDecision, RouteError, RouteReason, RouteRequest, RouteTarget,
};
