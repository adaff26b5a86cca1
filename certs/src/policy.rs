//! Peer policies: which SPIFFE IDs may talk to us. Deny by default, pure logic.
//!
//! A policy is a list of rules; a peer is allowed when any rule matches. An empty policy
//! allows nobody, so forgetting to configure one fails closed.

use std::fmt;

use crate::spiffe::SpiffeId;

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
