//! SPIFFE IDs: a validated newtype, parsed once at the edge and trusted afterwards.
//!
//! The grammar follows the SPIFFE ID standard for *workload* IDs: `spiffe://<trust-domain>/<path>`
//! with a lowercase trust domain (`[a-z0-9._-]`, at most 255 bytes), a path of one or more
//! non-empty segments of `[A-Za-z0-9._-]` that are not `.` or `..`, no query, no fragment, no
//! port or user info, and at most 2048 bytes in all. Pure logic: no I/O, no clock.

use std::fmt;
use std::str::FromStr;

use crate::error::CertsError;

const SCHEME: &str = "spiffe://";
const MAX_ID_LEN: usize = 2048;
const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// Why a string is not a valid SPIFFE ID or trust domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SpiffeIdError {
    /// The string does not start with `spiffe://`.
    #[error("must start with \"spiffe://\"")]
    MissingScheme,
    /// Nothing between `spiffe://` and the path.
    #[error("the trust domain is empty")]
    EmptyTrustDomain,
    /// The trust domain is over 255 bytes.
    #[error("the trust domain is longer than 255 bytes")]
    TrustDomainTooLong,
    /// A character outside `[a-z0-9._-]` in the trust domain.
    #[error(
        "the trust domain contains {0:?}; only lowercase letters, digits, '.', '-' and '_' are allowed"
    )]
    TrustDomainChar(char),
    /// No path at all: a workload ID needs at least one segment.
    #[error(
        "the path is empty; a workload ID needs one, e.g. spiffe://mesh.example.org/cluster/k8s/gateway"
    )]
    EmptyPath,
    /// `//` inside the path or a trailing `/`.
    #[error("the path has an empty segment (a doubled or trailing '/')")]
    EmptySegment,
    /// A `.` or `..` segment.
    #[error("the path segment {0:?} is not allowed ('.' and '..' are reserved)")]
    DotSegment(String),
    /// A character outside `[A-Za-z0-9._-]` in the path.
    #[error("the path contains {0:?}; only letters, digits, '.', '-' and '_' are allowed")]
    PathChar(char),
    /// A `?` or `#`.
    #[error("a query ('?') or fragment ('#') is not allowed")]
    QueryOrFragment,
    /// Longer than 2048 bytes.
    #[error("it is {0} bytes long; the maximum is 2048")]
    TooLong(usize),
    /// A `/` inside a single path segment given to [`SpiffeId::for_component`].
    #[error("{0:?} must be a single path segment without '/'")]
    NotASegment(String),
}

/// A validated SPIFFE workload ID such as `spiffe://mesh.example.org/cluster/k8s/gateway`.
///
/// Ordering, equality and hashing are those of the string form, which is canonical because
/// the trust domain must already be lowercase.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    /// The full ID.
    id: String,
    /// Byte offset of the path's leading '/'.
    path_start: usize,
}

impl SpiffeId {
    /// Parses and validates a SPIFFE workload ID.
    ///
    /// # Errors
    /// [`CertsError::InvalidSpiffeId`] naming the input and the rule it broke.
    pub fn parse(s: &str) -> Result<SpiffeId, CertsError> {
        validate(s).map_err(|reason| CertsError::InvalidSpiffeId {
            input: truncate_for_display(s),
            reason,
        })
    }

    /// Builds the mesh's component ID `spiffe://<trust_domain>/cluster/<cluster>/<component>`.
    ///
    /// # Errors
    /// [`CertsError::InvalidTrustDomain`] or [`CertsError::InvalidSpiffeId`] when a part is not
    /// valid; `cluster` and `component` must each be one path segment.
    pub fn for_component(
        trust_domain: &str,
        cluster: &str,
        component: &str,
    ) -> Result<SpiffeId, CertsError> {
        validate_trust_domain(trust_domain)?;
        let id = format!("{SCHEME}{trust_domain}/cluster/{cluster}/{component}");
        for part in [cluster, component] {
            if part.contains('/') {
                return Err(CertsError::InvalidSpiffeId {
                    input: truncate_for_display(&id),
                    reason: SpiffeIdError::NotASegment(part.to_owned()),
                });
            }
        }
        SpiffeId::parse(&id)
    }

    /// The trust domain, e.g. `mesh.example.org`.
    pub fn trust_domain(&self) -> &str {
        &self.id[SCHEME.len()..self.path_start]
    }

    /// The path including its leading `/`, e.g. `/cluster/k8s/gateway`.
    pub fn path(&self) -> &str {
        &self.id[self.path_start..]
    }

    /// The whole ID as a string.
    pub fn as_str(&self) -> &str {
        &self.id
    }

    /// The cluster and component when the path is exactly the mesh's
    /// `/cluster/<cluster>/<component>`, e.g. `("k8s", "gateway")`.
    pub fn mesh_component(&self) -> Option<(&str, &str)> {
        let mut segments = self.path()[1..].split('/');
        match (
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
        ) {
            (Some("cluster"), Some(cluster), Some(component), None) => Some((cluster, component)),
            _ => None,
        }
    }

    /// The cluster name when the path has the mesh's `/cluster/<cluster>/...` form.
    pub fn cluster(&self) -> Option<&str> {
        let mut segments = self.path()[1..].split('/');
        match (segments.next(), segments.next(), segments.next()) {
            (Some("cluster"), Some(cluster), Some(_)) => Some(cluster),
            _ => None,
        }
    }
}

impl FromStr for SpiffeId {
    type Err = CertsError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SpiffeId::parse(s)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

impl AsRef<str> for SpiffeId {
    fn as_ref(&self) -> &str {
        &self.id
    }
}

/// Checks a bare trust domain name (`mesh.example.org`).
///
/// # Errors
/// [`CertsError::InvalidTrustDomain`] naming the input and the rule it broke.
pub fn validate_trust_domain(td: &str) -> Result<(), CertsError> {
    check_trust_domain(td).map_err(|reason| CertsError::InvalidTrustDomain {
        input: truncate_for_display(td),
        reason,
    })
}

/// Extracts the trust domain from a trust-domain ID `spiffe://<td>` (as carried by the mesh CA).
pub(crate) fn trust_domain_of_uri(uri: &str) -> Option<&str> {
    let td = uri.strip_prefix(SCHEME)?;
    let td = td.strip_suffix('/').unwrap_or(td);
    check_trust_domain(td).ok().map(|()| td)
}

fn check_trust_domain(td: &str) -> Result<(), SpiffeIdError> {
    if td.is_empty() {
        return Err(SpiffeIdError::EmptyTrustDomain);
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(SpiffeIdError::TrustDomainTooLong);
    }
    match td
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_'))
    {
        Some('?' | '#') => Err(SpiffeIdError::QueryOrFragment),
        Some(c) => Err(SpiffeIdError::TrustDomainChar(c)),
        None => Ok(()),
    }
}

fn validate(s: &str) -> Result<SpiffeId, SpiffeIdError> {
    if s.len() > MAX_ID_LEN {
        return Err(SpiffeIdError::TooLong(s.len()));
    }
    let rest = s.strip_prefix(SCHEME).ok_or(SpiffeIdError::MissingScheme)?;
    if rest.contains(['?', '#']) {
        return Err(SpiffeIdError::QueryOrFragment);
    }
    let (td, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    check_trust_domain(td)?;
    if path.is_empty() {
        return Err(SpiffeIdError::EmptyPath);
    }
    for segment in path[1..].split('/') {
        if segment.is_empty() {
            return Err(SpiffeIdError::EmptySegment);
        }
        if segment == "." || segment == ".." {
            return Err(SpiffeIdError::DotSegment(segment.to_owned()));
        }
        if let Some(c) = segment
            .chars()
            .find(|c| !matches!(c, 'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_'))
        {
            return Err(SpiffeIdError::PathChar(c));
        }
    }
    Ok(SpiffeId {
        id: s.to_owned(),
        path_start: SCHEME.len() + td.len(),
    })
}

/// Error messages quote the input; keep a hostile multi-kilobyte input from flooding a log line.
fn truncate_for_display(s: &str) -> String {
    const MAX: usize = 256;
    if s.len() <= MAX {
        return s.to_owned();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(s: &str) -> SpiffeIdError {
        match SpiffeId::parse(s) {
            Err(CertsError::InvalidSpiffeId { reason, .. }) => reason,
            other => panic!("expected InvalidSpiffeId for {s:?}, got {other:?}"),
        }
    }

    #[test]
    fn parses_component_ids() {
        let id = SpiffeId::parse("spiffe://mesh.example.org/cluster/k8s/gateway").unwrap();
        assert_eq!(id.trust_domain(), "mesh.example.org");
        assert_eq!(id.path(), "/cluster/k8s/gateway");
        assert_eq!(id.cluster(), Some("k8s"));
        assert_eq!(id.mesh_component(), Some(("k8s", "gateway")));
        for other in [
            "spiffe://td/cluster/k8s",
            "spiffe://td/cluster/k8s/gateway/x",
            "spiffe://td/clusters/k8s/gateway",
        ] {
            assert_eq!(
                SpiffeId::parse(other).unwrap().mesh_component(),
                None,
                "{other}"
            );
        }
        assert_eq!(id.as_str(), "spiffe://mesh.example.org/cluster/k8s/gateway");
        assert_eq!(id.to_string(), id.as_str());
        let same: SpiffeId = "spiffe://mesh.example.org/cluster/k8s/gateway"
            .parse()
            .unwrap();
        assert_eq!(id, same);
    }

    #[test]
    fn for_component_builds_the_mesh_form() {
        let id = SpiffeId::for_component("td_1.example-x", "diego", "route-sync").unwrap();
        assert_eq!(
            id.as_str(),
            "spiffe://td_1.example-x/cluster/diego/route-sync"
        );
        assert_eq!(id.cluster(), Some("diego"));
        assert!(matches!(
            SpiffeId::for_component("TD", "a", "b"),
            Err(CertsError::InvalidTrustDomain { .. })
        ));
        assert!(matches!(
            SpiffeId::for_component("td", "a/b", "c"),
            Err(CertsError::InvalidSpiffeId {
                reason: SpiffeIdError::NotASegment(_),
                ..
            })
        ));
        assert!(SpiffeId::for_component("td", "", "c").is_err());
        assert!(SpiffeId::for_component("td", "k8s", "..").is_err());
    }

    #[test]
    fn cluster_needs_the_cluster_prefix_and_a_name_after_it() {
        let id = |s| SpiffeId::parse(s).unwrap();
        assert_eq!(id("spiffe://td/ns/default/sa/x").cluster(), None);
        assert_eq!(id("spiffe://td/cluster/k8s").cluster(), None);
        assert_eq!(id("spiffe://td/cluster/k8s/a/b").cluster(), Some("k8s"));
    }

    #[test]
    fn rejects_each_malformation_with_its_reason() {
        assert_eq!(reason("http://td/x"), SpiffeIdError::MissingScheme);
        assert_eq!(reason("SPIFFE://td/x"), SpiffeIdError::MissingScheme);
        assert_eq!(reason("spiffe:///x"), SpiffeIdError::EmptyTrustDomain);
        assert_eq!(reason("spiffe://Td/x"), SpiffeIdError::TrustDomainChar('T'));
        assert_eq!(
            reason("spiffe://td:8080/x"),
            SpiffeIdError::TrustDomainChar(':')
        );
        assert_eq!(
            reason("spiffe://user@td/x"),
            SpiffeIdError::TrustDomainChar('@')
        );
        assert_eq!(reason("spiffe://td"), SpiffeIdError::EmptyPath);
        assert_eq!(reason("spiffe://td/"), SpiffeIdError::EmptySegment);
        assert_eq!(reason("spiffe://td/a//b"), SpiffeIdError::EmptySegment);
        assert_eq!(reason("spiffe://td/a/"), SpiffeIdError::EmptySegment);
        assert_eq!(
            reason("spiffe://td/a/./b"),
            SpiffeIdError::DotSegment(".".into())
        );
        assert_eq!(
            reason("spiffe://td/a/.."),
            SpiffeIdError::DotSegment("..".into())
        );
        assert_eq!(reason("spiffe://td/a?b=c"), SpiffeIdError::QueryOrFragment);
        assert_eq!(reason("spiffe://td/a#frag"), SpiffeIdError::QueryOrFragment);
        assert_eq!(reason("spiffe://td/a b"), SpiffeIdError::PathChar(' '));
        assert_eq!(reason("spiffe://td/a%20b"), SpiffeIdError::PathChar('%'));
        assert_eq!(reason("spiffe://td/é"), SpiffeIdError::PathChar('é'));
        let long = format!("spiffe://td/{}", "a".repeat(2048));
        assert_eq!(reason(&long), SpiffeIdError::TooLong(long.len()));
        let long_td = format!("spiffe://{}/a", "a".repeat(256));
        assert_eq!(reason(&long_td), SpiffeIdError::TrustDomainTooLong);
    }

    #[test]
    fn accepts_the_edges_of_the_grammar() {
        for ok in [
            "spiffe://a/b",
            "spiffe://td/A-Z_0.9",
            "spiffe://td/...",
            "spiffe://td/.hidden",
            "spiffe://1.2.3.4/x",
        ] {
            SpiffeId::parse(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        let max = format!("spiffe://td/{}", "a".repeat(MAX_ID_LEN - 12));
        assert_eq!(max.len(), MAX_ID_LEN);
        SpiffeId::parse(&max).unwrap();
    }

    #[test]
    fn error_message_names_input_and_rule() {
        let msg = SpiffeId::parse("spiffe://td/a//b").unwrap_err().to_string();
        assert!(msg.contains("spiffe://td/a//b"), "{msg}");
        assert!(msg.contains("empty segment"), "{msg}");
    }

    #[test]
    fn trust_domain_uri_of_the_ca() {
        assert_eq!(
            trust_domain_of_uri("spiffe://mesh.local"),
            Some("mesh.local")
        );
        assert_eq!(
            trust_domain_of_uri("spiffe://mesh.local/"),
            Some("mesh.local")
        );
        assert_eq!(trust_domain_of_uri("spiffe://mesh.local/x"), None);
        assert_eq!(trust_domain_of_uri("https://mesh.local"), None);
    }
}
