//! The route model every Isthmus component shares.
//!
//! A route is one internal name and port (`orders.apps.internal:8080`) with the cluster it is
//! homed in, whether that cluster exports it, who may call it, and where it runs locally.
//! Every value here is validated on construction: a `Route` that exists is a route that can
//! be served. No sockets, no clock.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use isthmus_certs::SpiffeId;

use crate::error::InvalidRoute;

/// A DNS host name a route answers to, normalised: lower case, no trailing dot.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RouteName(Arc<str>);

impl RouteName {
    /// Parses and normalises a host name (`Orders.Apps.Internal.` -> `orders.apps.internal`).
    ///
    /// # Errors
    /// When the name is empty, longer than 253 bytes, has fewer than two labels, or a label
    /// that is empty, longer than 63 bytes, starts or ends with `-`, or holds a character
    /// other than `a-z`, `0-9` and `-`. IP literals are not names.
    pub fn parse(input: &str) -> Result<Self, InvalidRoute> {
        let trimmed = input.strip_suffix('.').unwrap_or(input);
        // Names arrive in lower case almost always: lower only when needed, and check the
        // labels without collecting them (a peer's snapshot parses 250,000 names).
        let lowered;
        let name = if trimmed.bytes().any(|b| b.is_ascii_uppercase()) {
            lowered = trimmed.to_ascii_lowercase();
            lowered.as_str()
        } else {
            trimmed
        };
        let bad = |why: &str| InvalidRoute::Name {
            name: input.to_string(),
            expected: why.to_string(),
        };
        if name.is_empty() || name.len() > 253 {
            return Err(bad("a host name of 1 to 253 characters"));
        }
        let labels = || name.split('.');
        if labels().nth(1).is_none() {
            return Err(bad("a fully qualified name such as orders.apps.internal"));
        }
        for label in labels() {
            if label.is_empty() || label.len() > 63 {
                return Err(bad("labels of 1 to 63 characters"));
            }
            if label.starts_with('-') || label.ends_with('-') {
                return Err(bad("labels that do not start or end with '-'"));
            }
            if !label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            {
                return Err(bad("labels made of a-z, 0-9 and '-'"));
            }
        }
        if labels().all(|l| l.bytes().all(|b| b.is_ascii_digit())) {
            return Err(bad("a host name, not an IP address"));
        }
        Ok(Self(name.into()))
    }

    /// The normalised name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True when this name is `domain` or lies under it (`a.apps.internal` under `apps.internal`).
    pub fn is_within(&self, domain: &RouteName) -> bool {
        let (me, d) = (self.as_str(), domain.as_str());
        me == d
            || (me.len() > d.len()
                && me.ends_with(d)
                && me.as_bytes()[me.len() - d.len() - 1] == b'.')
    }
}

impl fmt::Display for RouteName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::borrow::Borrow<str> for RouteName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl FromStr for RouteName {
    type Err = InvalidRoute;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// The name of a cluster (`diego`, `k8s`, `k8s-eu-1`): 1 to 63 of `a-z`, `0-9`, `-`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClusterName(Arc<str>);

impl ClusterName {
    /// Parses a cluster name.
    ///
    /// # Errors
    /// When the name is empty, longer than 63 bytes, or holds anything but `a-z`, `0-9`, `-`
    /// (not first or last).
    pub fn parse(input: &str) -> Result<Self, InvalidRoute> {
        let ok = !input.is_empty()
            && input.len() <= 63
            && !input.starts_with('-')
            && !input.ends_with('-')
            && input
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if ok {
            Ok(Self(input.into()))
        } else {
            Err(InvalidRoute::Cluster {
                name: input.to_string(),
            })
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ClusterName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for ClusterName {
    type Err = InvalidRoute;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// What a route carries; decides how the egress may recognise it on a shared port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Protocol {
    /// Opaque TCP: recognised only by VIP or a dedicated port.
    #[default]
    Tcp,
    /// HTTP/1.x: also recognisable by its `Host` header on a shared port.
    Http,
    /// TLS: also recognisable by its SNI on a shared port.
    Tls,
}

impl Protocol {
    /// The lowercase wire and config name.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Http => "http",
            Protocol::Tls => "tls",
        }
    }
}

impl FromStr for Protocol {
    type Err = InvalidRoute;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Protocol::Tcp),
            "http" | "http1" => Ok(Protocol::Http),
            "tls" => Ok(Protocol::Tls),
            _ => Err(InvalidRoute::Protocol {
                value: s.to_string(),
            }),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What identifies a route: its name and port. `orders.apps.internal:8080`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RouteKey {
    /// The host name.
    pub name: RouteName,
    /// The port apps call it on.
    pub port: u16,
}

impl RouteKey {
    /// A key from parts.
    pub fn new(name: RouteName, port: u16) -> Self {
        Self { name, port }
    }

    /// Parses `host:port`, the form of an HBONE `:authority`.
    ///
    /// # Errors
    /// When there is no port, the port is not 1..=65535, or the host is not a route name
    /// (IP literals and single-label names such as `localhost` are refused).
    pub fn parse_authority(authority: &str) -> Result<Self, InvalidRoute> {
        let (host, port) = authority
            .rsplit_once(':')
            .ok_or_else(|| InvalidRoute::Authority {
                authority: authority.to_string(),
            })?;
        let port: u16 =
            port.parse()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| InvalidRoute::Authority {
                    authority: authority.to_string(),
                })?;
        Ok(Self::new(RouteName::parse(host)?, port))
    }
}

impl fmt::Display for RouteKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, self.port)
    }
}

/// Who may call a route through its home cluster's ingress.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PeerSelector {
    /// Any gateway of the named cluster (its SPIFFE ID path starts `/cluster/<name>/`),
    /// in the mesh trust domain.
    Cluster(ClusterName),
    /// Exactly this SPIFFE ID.
    Identity(SpiffeId),
}

impl PeerSelector {
    /// Parses `cluster:<name>` or a `spiffe://` ID.
    ///
    /// # Errors
    /// When the text is neither form, or the part after the prefix is invalid.
    pub fn parse(input: &str) -> Result<Self, InvalidRoute> {
        if let Some(cluster) = input.strip_prefix("cluster:") {
            return Ok(Self::Cluster(ClusterName::parse(cluster)?));
        }
        if input.starts_with("spiffe://") {
            return SpiffeId::parse(input)
                .map(Self::Identity)
                .map_err(|e| InvalidRoute::Peer {
                    value: input.to_string(),
                    reason: e.to_string(),
                });
        }
        Err(InvalidRoute::Peer {
            value: input.to_string(),
            reason: "expected `cluster:<name>` or a `spiffe://` ID".to_string(),
        })
    }

    /// Whether a caller with this verified identity is selected. `trust_domain` is the mesh
    /// trust domain a `Cluster` selector is scoped to.
    pub fn matches(&self, caller: &SpiffeId, trust_domain: &str) -> bool {
        match self {
            PeerSelector::Identity(id) => id == caller,
            PeerSelector::Cluster(c) => {
                caller.trust_domain() == trust_domain && caller.cluster() == Some(c.as_str())
            }
        }
    }
}

impl PeerSelector {
    /// Whether some caller of cluster `cluster` could be selected: `cluster:<cluster>`, or
    /// an exact ID of that cluster in the mesh trust domain. What a peer route-sync may
    /// learn about a route follows from it.
    pub fn admits_cluster(&self, cluster: &ClusterName, trust_domain: &str) -> bool {
        match self {
            PeerSelector::Cluster(c) => c == cluster,
            PeerSelector::Identity(id) => {
                id.trust_domain() == trust_domain && id.cluster() == Some(cluster.as_str())
            }
        }
    }
}

impl fmt::Display for PeerSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerSelector::Cluster(c) => write!(f, "cluster:{c}"),
            PeerSelector::Identity(id) => write!(f, "{id}"),
        }
    }
}

/// Where a route runs inside its home cluster: `host:port`, host an IP or a DNS name
/// (a Kubernetes Service). Backends never leave the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    host: Arc<str>,
    port: u16,
}

impl Backend {
    /// Parses `host:port` or `[v6]:port`.
    ///
    /// # Errors
    /// When the port is missing or 0, or the host is empty or holds spaces or slashes.
    pub fn parse(input: &str) -> Result<Self, InvalidRoute> {
        let bad = || InvalidRoute::Backend {
            value: input.to_string(),
        };
        let (host, port) = input.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().ok().filter(|p| *p != 0).ok_or_else(bad)?;
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if host.is_empty() || host.contains(['/', ' ', '[', ']']) {
            return Err(bad());
        }
        if host.contains(':') && host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(bad());
        }
        Ok(Self {
            host: host.into(),
            port,
        })
    }

    /// The host part, without brackets.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Parses each item with `parse` into a vector of exactly their number: a `collect` of
/// `Result`s cannot know the length and reserves room for four, which at 250,000 routes is
/// tens of megabytes of empty slots.
pub(crate) fn parse_list<T>(
    items: &[String],
    mut parse: impl FnMut(&str) -> Result<T, InvalidRoute>,
) -> Result<Vec<T>, InvalidRoute> {
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        out.push(parse(item)?);
    }
    Ok(out)
}

/// One internal route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Name and port.
    pub key: RouteKey,
    /// What it carries.
    pub protocol: Protocol,
    /// The cluster whose ingress serves it.
    pub home_cluster: ClusterName,
    /// Whether the home cluster lets other clusters reach it. Deny by default.
    pub exported: bool,
    /// Who may call it across clusters; empty means nobody.
    pub allowed_peers: Vec<PeerSelector>,
    /// Where it runs in its home cluster. Never sent to other clusters.
    pub backends: Vec<Backend>,
    /// Traffic share per cluster, for gradual shifting. Empty means all to `home_cluster`.
    pub weights: BTreeMap<ClusterName, u32>,
    /// The virtual IP this cluster's route-sync assigned to the route's name: the one
    /// address the DNS shim answers and the egress recognises for it. Assigned only by the
    /// merged table of a cluster (never by a source, never taken from a peer), the same for
    /// every port of the name, and kept as long as the name exists. `None` when the cluster
    /// has no VIP range.
    pub vip: Option<std::net::IpAddr>,
    /// The egress port that stands for this route in this cluster: on Kubernetes, the
    /// target port of the route's mirror Service, which is all the egress sees of a call
    /// that kube-proxy translated from the Service's ClusterIP. Set, like `vip`, only by the
    /// merged table of the cluster that serves it; `None` elsewhere.
    pub egress_port: Option<u16>,
    /// The table revision at which this route last changed.
    pub revision: u64,
}

impl Route {
    /// Whether a caller with this verified identity may use the route through its home
    /// ingress: the route must be exported and one selector must match. Deny by default.
    pub fn allows(&self, caller: &SpiffeId, trust_domain: &str) -> bool {
        self.exported
            && self
                .allowed_peers
                .iter()
                .any(|sel| sel.matches(caller, trust_domain))
    }

    /// Whether some caller of cluster `cluster` may use the route: exported, and one
    /// selector admits that cluster (see [`PeerSelector::admits_cluster`]).
    pub fn admits_cluster(&self, cluster: &ClusterName, trust_domain: &str) -> bool {
        self.exported
            && self
                .allowed_peers
                .iter()
                .any(|sel| sel.admits_cluster(cluster, trust_domain))
    }

    /// Same route ignoring `revision`: what decides whether an update is a change.
    pub fn same_content(&self, other: &Route) -> bool {
        self.key == other.key
            && self.protocol == other.protocol
            && self.home_cluster == other.home_cluster
            && self.exported == other.exported
            && self.allowed_peers == other.allowed_peers
            && self.backends == other.backends
            && self.weights == other.weights
            && self.vip == other.vip
            && self.egress_port == other.egress_port
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsed_lists_hold_exactly_their_items() {
        let items = vec!["10.0.0.1:80".to_string()];
        let parsed = parse_list(&items, Backend::parse).unwrap();
        assert_eq!((parsed.len(), parsed.capacity()), (1, 1));
        let bad = vec!["10.0.0.1:80".to_string(), "nope".to_string()];
        assert!(parse_list(&bad, Backend::parse).is_err());
    }
}
