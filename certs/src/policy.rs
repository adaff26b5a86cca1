//! Peer policies: which SPIFFE IDs may talk to us. Deny by default, pure logic.
//!
//! A policy is a list of rules; a peer is allowed when any rule matches. An empty policy
//! allows nobody, so forgetting to configure one fails closed.
//!
//! Mesh components are told apart by [`Component`], the last segment of
//! `spiffe://<td>/cluster/<cluster>/<component>`: a rule that names a component
//! ([`PeerPolicy::component`]) matches that ID exactly, so a DNS shim's certificate cannot pass
//! where a gateway's is expected.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use crate::error::CertsError;
use crate::spiffe::SpiffeId;

/// The name of a mesh component: the last path segment of its ID
/// `spiffe://<td>/cluster/<cluster>/<component>`, one segment of `[A-Za-z0-9._-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Component(Cow<'static, str>);

impl Component {
    /// The gateway (egress and ingress roles share one identity).
    pub const GATEWAY: Component = Component(Cow::Borrowed("gateway"));
    /// route-sync, the control plane of one cluster.
    pub const ROUTE_SYNC: Component = Component(Cow::Borrowed("route-sync"));
    /// The DNS shim.
    pub const DNS_SHIM: Component = Component(Cow::Borrowed("dns-shim"));
    /// An operator's identity (for tooling that changes Isthmus state).
    pub const OPERATOR: Component = Component(Cow::Borrowed("operator"));

    /// Parses a component name.
    ///
    /// # Errors
    /// [`CertsError::InvalidSpiffeId`] when `name` is not one valid SPIFFE path segment.
    pub fn parse(name: &str) -> Result<Component, CertsError> {
        // The component is the last segment of a mesh ID: validate it in that position.
        SpiffeId::for_component("td", "c", name)?;
        Ok(Component(Cow::Owned(name.to_owned())))
    }

    /// The name, e.g. `gateway`.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Component {
    type Err = CertsError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Component::parse(s)
    }
}

impl fmt::Display for Component {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl PartialEq<str> for Component {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

/// One way of allowing a peer.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PeerRule {
    /// Exactly this ID.
    Exact(SpiffeId),
    /// Any ID in `trust_domain` whose path starts with `path_prefix` on a segment boundary:
    /// prefix `/cluster/k8s` matches `/cluster/k8s/gateway` and `/cluster/k8s` but not
    /// `/cluster/k8s2/x`. An empty prefix or `/` matches the whole trust domain. A missing
    /// leading `/` or a trailing `/` on the prefix is ignored.
    TrustDomain {
        /// Trust domain, compared without regard to ASCII case.
        trust_domain: String,
        /// Path prefix, matched segment by segment.
        path_prefix: String,
    },
    /// The ID of `component` of `cluster` in `trust_domain`, exactly
    /// `spiffe://<trust_domain>/cluster/<cluster>/<component>` (no further segments); without
    /// a cluster, that component of any cluster of the trust domain.
    Component {
        /// Trust domain, compared without regard to ASCII case.
        trust_domain: String,
        /// The cluster segment, or `None` for any cluster.
        cluster: Option<String>,
        /// The component segment.
        component: Component,
    },
}

impl PeerRule {
    /// Whether this rule allows `id`.
    pub fn matches(&self, id: &SpiffeId) -> bool {
        match self {
            PeerRule::Exact(allowed) => allowed == id,
            PeerRule::TrustDomain {
                trust_domain,
                path_prefix,
            } => {
                id.trust_domain().eq_ignore_ascii_case(trust_domain)
                    && path_has_prefix(id.path(), path_prefix)
            }
            PeerRule::Component {
                trust_domain,
                cluster,
                component,
            } => {
                id.trust_domain().eq_ignore_ascii_case(trust_domain)
                    && id.mesh_component().is_some_and(|(c, comp)| {
                        cluster.as_deref().is_none_or(|want| want == c) && component == comp
                    })
            }
        }
    }
}

/// Segment-boundary prefix match. `path` is a validated SPIFFE path (leading '/', no empty
/// segments).
fn path_has_prefix(path: &str, prefix: &str) -> bool {
    let prefix = prefix.trim_matches('/');
    if prefix.is_empty() {
        return true;
    }
    let path = path.trim_start_matches('/');
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

impl fmt::Display for PeerRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerRule::Exact(id) => write!(f, "exact {id}"),
            PeerRule::TrustDomain {
                trust_domain,
                path_prefix,
            } => {
                let prefix = path_prefix.trim_matches('/');
                if prefix.is_empty() {
                    write!(f, "trust domain {trust_domain}")
                } else {
                    write!(f, "trust domain {trust_domain} path prefix /{prefix}")
                }
            }
            PeerRule::Component {
                trust_domain,
                cluster: Some(cluster),
                component,
            } => write!(
                f,
                "component {component} of cluster {cluster} \
                 (spiffe://{trust_domain}/cluster/{cluster}/{component})"
            ),
            PeerRule::Component {
                trust_domain,
                cluster: None,
                component,
            } => write!(
                f,
                "component {component} of any cluster \
                 (spiffe://{trust_domain}/cluster/*/{component})"
            ),
        }
    }
}

/// The set of peers a TLS endpoint accepts. Deny by default: an empty policy allows nobody.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerPolicy {
    rules: Vec<PeerRule>,
}

impl PeerPolicy {
    /// A policy allowing a peer when any of `rules` matches.
    pub fn new(rules: Vec<PeerRule>) -> Self {
        PeerPolicy { rules }
    }

    /// Any ID in the trust domain `td`.
    pub fn trust_domain(td: &str) -> Self {
        PeerPolicy::new(vec![PeerRule::TrustDomain {
            trust_domain: td.to_owned(),
            path_prefix: String::new(),
        }])
    }

    /// Exactly the mesh ID of `component` of `cluster` in `trust_domain`:
    /// `spiffe://<trust_domain>/cluster/<cluster>/<component>`. The one way to say "the
    /// gateway of cluster k8s": a prefix on the cluster would let any other component of that
    /// cluster (a DNS shim, say) pose as it.
    pub fn component(trust_domain: &str, cluster: &str, component: Component) -> Self {
        PeerPolicy::new(vec![PeerRule::Component {
            trust_domain: trust_domain.to_owned(),
            cluster: Some(cluster.to_owned()),
            component,
        }])
    }

    /// Any of `components`, of `cluster` or (with `None`) of any cluster of `trust_domain`.
    /// No components: nobody.
    pub fn components(
        trust_domain: &str,
        cluster: Option<&str>,
        components: impl IntoIterator<Item = Component>,
    ) -> Self {
        PeerPolicy::new(
            components
                .into_iter()
                .map(|component| PeerRule::Component {
                    trust_domain: trust_domain.to_owned(),
                    cluster: cluster.map(str::to_owned),
                    component,
                })
                .collect(),
        )
    }

    /// Exactly the given IDs.
    pub fn exact(ids: impl IntoIterator<Item = SpiffeId>) -> Self {
        PeerPolicy::new(ids.into_iter().map(PeerRule::Exact).collect())
    }

    /// The rules, in order.
    pub fn rules(&self) -> &[PeerRule] {
        &self.rules
    }

    /// Allows `id` or says why not.
    ///
    /// # Errors
    /// [`PolicyDenied`] naming the presented ID and the rules it failed.
    pub fn check(&self, id: &SpiffeId) -> Result<(), PolicyDenied> {
        if self.rules.iter().any(|rule| rule.matches(id)) {
            Ok(())
        } else {
            Err(PolicyDenied {
                presented: id.clone(),
                policy: self.to_string(),
            })
        }
    }
}

impl fmt::Display for PeerPolicy {
    /// `[rule, rule, …]`, or a note that the policy is empty.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.rules.is_empty() {
            return f.write_str("[] (empty policy: nobody is allowed)");
        }
        f.write_str("[")?;
        for (i, rule) in self.rules.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{rule}")?;
        }
        f.write_str("]")
    }
}

/// A peer's SPIFFE ID did not satisfy the policy.
///
/// `Debug` prints the same sentence as `Display`: rustls shows this error through `Debug`
/// when it reports a refused certificate, and the sentence is what an operator needs there.
#[derive(Clone, PartialEq, Eq, thiserror::Error)]
#[error("peer {presented} is not allowed: expected one of {policy}")]
pub struct PolicyDenied {
    /// The ID the peer presented.
    pub presented: SpiffeId,
    /// The policy it failed, in its human form.
    pub policy: String,
}

impl fmt::Debug for PolicyDenied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PolicyDenied({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    fn prefix(td: &str, p: &str) -> PeerRule {
        PeerRule::TrustDomain {
            trust_domain: td.into(),
            path_prefix: p.into(),
        }
    }

    #[test]
    fn empty_policy_allows_nobody() {
        let denied = PeerPolicy::default()
            .check(&id("spiffe://td/cluster/k8s/gateway"))
            .unwrap_err();
        assert!(denied.to_string().contains("nobody"), "{denied}");
        assert!(PeerPolicy::new(vec![]).check(&id("spiffe://td/x")).is_err());
        assert!(PeerPolicy::exact([]).check(&id("spiffe://td/x")).is_err());
    }

    #[test]
    fn exact_matches_only_that_id() {
        let p = PeerPolicy::exact([id("spiffe://td/cluster/k8s/gateway")]);
        assert!(p.check(&id("spiffe://td/cluster/k8s/gateway")).is_ok());
        assert!(p.check(&id("spiffe://td/cluster/k8s/gateway2")).is_err());
        assert!(p.check(&id("spiffe://td/cluster/k8s")).is_err());
        assert!(p.check(&id("spiffe://td2/cluster/k8s/gateway")).is_err());
    }

    #[test]
    fn prefix_matches_on_segment_boundaries() {
        let r = prefix("td", "/cluster/k8s");
        assert!(r.matches(&id("spiffe://td/cluster/k8s/gateway")));
        assert!(r.matches(&id("spiffe://td/cluster/k8s")));
        assert!(!r.matches(&id("spiffe://td/cluster/k8s2/x")));
        assert!(!r.matches(&id("spiffe://td/cluster/k8")));
        assert!(!r.matches(&id("spiffe://td/cluster")));
        assert!(!r.matches(&id("spiffe://td/other/cluster/k8s/x")));
        assert!(!r.matches(&id("spiffe://other/cluster/k8s/gateway")));
        // Sloppy spelling of the prefix means the same thing.
        for p in ["cluster/k8s", "/cluster/k8s/", "cluster/k8s/"] {
            assert!(
                prefix("td", p).matches(&id("spiffe://td/cluster/k8s/x")),
                "{p}"
            );
            assert!(
                !prefix("td", p).matches(&id("spiffe://td/cluster/k8s2")),
                "{p}"
            );
        }
    }

    #[test]
    fn empty_or_root_prefix_is_the_whole_trust_domain() {
        for p in ["", "/"] {
            let r = prefix("td", p);
            assert!(r.matches(&id("spiffe://td/anything/at/all")));
            assert!(!r.matches(&id("spiffe://td2/anything")));
            assert!(!r.matches(&id("spiffe://t/anything")));
        }
        let p = PeerPolicy::trust_domain("td");
        assert!(p.check(&id("spiffe://td/x")).is_ok());
        assert!(p.check(&id("spiffe://td.evil/x")).is_err());
    }

    #[test]
    fn any_rule_suffices() {
        let p = PeerPolicy::new(vec![
            PeerRule::Exact(id("spiffe://a/x")),
            prefix("b", "/cluster/diego"),
        ]);
        assert!(p.check(&id("spiffe://a/x")).is_ok());
        assert!(p.check(&id("spiffe://b/cluster/diego/gateway")).is_ok());
        assert!(p.check(&id("spiffe://a/y")).is_err());
    }

    #[test]
    fn component_matches_exactly_that_component_of_that_cluster() {
        let p = PeerPolicy::component("td", "k8s", Component::GATEWAY);
        assert!(p.check(&id("spiffe://td/cluster/k8s/gateway")).is_ok());
        for refused in [
            "spiffe://td/cluster/k8s/dns-shim",
            "spiffe://td/cluster/k8s/route-sync",
            "spiffe://td/cluster/k8s/gateway/extra",
            "spiffe://td/cluster/k8s/gateway2",
            "spiffe://td/cluster/k8s2/gateway",
            "spiffe://td/cluster/diego/gateway",
            "spiffe://td/other/k8s/gateway",
            "spiffe://td2/cluster/k8s/gateway",
            "spiffe://td/cluster/k8s",
        ] {
            let denied = p.check(&id(refused)).unwrap_err();
            assert_eq!(
                denied.to_string(),
                format!(
                    "peer {refused} is not allowed: expected one of [component gateway of \
                     cluster k8s (spiffe://td/cluster/k8s/gateway)]"
                )
            );
        }
    }

    #[test]
    fn components_of_any_cluster() {
        let p = PeerPolicy::components("td", None, [Component::GATEWAY, Component::OPERATOR]);
        assert!(p.check(&id("spiffe://td/cluster/k8s/gateway")).is_ok());
        assert!(p.check(&id("spiffe://td/cluster/diego/operator")).is_ok());
        let denied = p
            .check(&id("spiffe://td/cluster/k8s/dns-shim"))
            .unwrap_err();
        assert!(
            denied
                .to_string()
                .contains("component gateway of any cluster (spiffe://td/cluster/*/gateway)"),
            "{denied}"
        );
        assert!(p.check(&id("spiffe://other/cluster/k8s/gateway")).is_err());
        assert!(
            PeerPolicy::components("td", None, [])
                .check(&id("spiffe://td/cluster/k8s/gateway"))
                .is_err()
        );
    }

    #[test]
    fn component_names_are_single_segments() {
        assert_eq!(Component::parse("gateway").unwrap(), Component::GATEWAY);
        assert_eq!(
            "dns-shim".parse::<Component>().unwrap(),
            Component::DNS_SHIM
        );
        for bad in ["", "a/b", "..", "gate way", "gät"] {
            assert!(Component::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn denial_names_presented_id_and_rules() {
        let p = PeerPolicy::new(vec![
            PeerRule::Exact(id("spiffe://td/cluster/k8s/gateway")),
            prefix("td", "/cluster/k8s"),
            prefix("other", ""),
        ]);
        let denied = p.check(&id("spiffe://x/y")).unwrap_err();
        assert_eq!(denied.presented, id("spiffe://x/y"));
        assert_eq!(
            denied.to_string(),
            "peer spiffe://x/y is not allowed: expected one of [exact spiffe://td/cluster/k8s/gateway, \
             trust domain td path prefix /cluster/k8s, trust domain other]"
        );
        assert!(format!("{denied:?}").contains("spiffe://x/y"));
    }
}
