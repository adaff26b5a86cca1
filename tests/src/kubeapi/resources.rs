//! The resources the fixture serves and the discovery documents that describe them.

use serde_json::{Value, json};

/// The MCS group (KEP-1645).
pub const MCS_GROUP: &str = "multicluster.x-k8s.io";

/// A version of the ServiceExport "CRD".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum McsVersion {
    /// `multicluster.x-k8s.io/v1alpha1`.
    V1alpha1,
    /// `multicluster.x-k8s.io/v1beta1`.
    V1beta1,
}

impl McsVersion {
    /// The version string.
    pub fn as_str(self) -> &'static str {
        match self {
            McsVersion::V1alpha1 => "v1alpha1",
            McsVersion::V1beta1 => "v1beta1",
        }
    }

    /// Parses a version string.
    pub fn parse(s: &str) -> Option<McsVersion> {
        match s {
            "v1alpha1" => Some(McsVersion::V1alpha1),
            "v1beta1" => Some(McsVersion::V1beta1),
            _ => None,
        }
    }
}

/// A resource the fixture stores. The storage key is version-independent: a ServiceExport
/// stored through one MCS version is read through the other.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// core v1 namespaces (cluster-scoped).
    Namespace,
    /// core v1 services.
    Service,
    /// discovery.k8s.io/v1 endpointslices.
    EndpointSlice,
    /// coordination.k8s.io/v1 leases.
    Lease,
    /// multicluster.x-k8s.io serviceexports (v1alpha1 and/or v1beta1).
    ServiceExport,
}

/// What discovery says about one resource.
#[derive(Debug)]
pub struct Meta {
    /// API group ("" for core).
    pub group: &'static str,
    /// Plural resource name (the path segment).
    pub plural: &'static str,
    /// Singular name.
    pub singular: &'static str,
    /// The kind.
    pub kind: &'static str,
    /// Namespaced or cluster-scoped.
    pub namespaced: bool,
    /// kubectl short names.
    pub short_names: &'static [&'static str],
    /// Whether a `/status` subresource exists (main-resource writes then ignore `status`).
    pub status_subresource: bool,
}

/// The verbs every served resource supports.
pub const VERBS: &[&str] = &[
    "create", "delete", "get", "list", "patch", "update", "watch",
];

impl Kind {
    /// Every kind, in discovery order.
    pub const ALL: [Kind; 5] = [
        Kind::Namespace,
        Kind::Service,
        Kind::EndpointSlice,
        Kind::Lease,
        Kind::ServiceExport,
    ];

    /// Discovery facts.
    pub fn meta(self) -> &'static Meta {
        match self {
            Kind::Namespace => &Meta {
                group: "",
                plural: "namespaces",
                singular: "namespace",
                kind: "Namespace",
                namespaced: false,
                short_names: &["ns"],
                status_subresource: false,
            },
            Kind::Service => &Meta {
                group: "",
                plural: "services",
                singular: "service",
                kind: "Service",
                namespaced: true,
                short_names: &["svc"],
                status_subresource: false,
            },
            Kind::EndpointSlice => &Meta {
                group: "discovery.k8s.io",
                plural: "endpointslices",
                singular: "endpointslice",
                kind: "EndpointSlice",
                namespaced: true,
                short_names: &[],
                status_subresource: false,
            },
            Kind::Lease => &Meta {
                group: "coordination.k8s.io",
                plural: "leases",
                singular: "lease",
                kind: "Lease",
                namespaced: true,
                short_names: &[],
                status_subresource: false,
            },
            Kind::ServiceExport => &Meta {
                group: MCS_GROUP,
                plural: "serviceexports",
                singular: "serviceexport",
                kind: "ServiceExport",
                namespaced: true,
                short_names: &["svcex"],
                status_subresource: true,
            },
        }
    }

    /// The fixed version of a built-in kind (`None` for ServiceExport, whose versions vary).
    pub fn builtin_version(self) -> Option<&'static str> {
        match self {
            Kind::ServiceExport => None,
            _ => Some("v1"),
        }
    }

    /// Finds the kind served at `group`/`plural`.
    pub fn by_plural(group: &str, plural: &str) -> Option<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| k.meta().group == group && k.meta().plural == plural)
    }

    /// Finds the kind for an object's `apiVersion` group and `kind`.
    pub fn by_kind(group: &str, kind: &str) -> Option<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| k.meta().group == group && k.meta().kind == kind)
    }
}

/// A kind at one served version: what a request path or an object's apiVersion names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gvk {
    /// The kind.
    pub kind: Kind,
    /// The version ("v1", or an MCS version).
    pub version: &'static str,
}

impl Gvk {
    /// The `apiVersion` string (`v1`, `discovery.k8s.io/v1`).
    pub fn api_version(&self) -> String {
        let group = self.kind.meta().group;
        if group.is_empty() {
            self.version.to_owned()
        } else {
            format!("{group}/{}", self.version)
        }
    }
}

/// Splits an `apiVersion` into group and version.
pub fn split_api_version(api_version: &str) -> (&str, &str) {
    match api_version.split_once('/') {
        Some((g, v)) => (g, v),
        None => ("", api_version),
    }
}

/// Resolves `group`/`version` for `kind` against what is served now.
pub fn resolve(kind: Kind, version: &str, mcs: &[McsVersion]) -> Option<Gvk> {
    match kind.builtin_version() {
        Some(v) if v == version => Some(Gvk { kind, version: v }),
        Some(_) => None,
        None => McsVersion::parse(version)
            .filter(|v| mcs.contains(v))
            .map(|v| Gvk {
                kind,
                version: v.as_str(),
            }),
    }
}

/// The groups (other than core) served now, each with its versions, preferred first.
fn groups(mcs: &[McsVersion]) -> Vec<(&'static str, Vec<&'static str>)> {
    let mut out = vec![
        ("discovery.k8s.io", vec!["v1"]),
        ("coordination.k8s.io", vec!["v1"]),
    ];
    // Preferred first, as the real server orders versions: v1beta1 over v1alpha1.
    let mut versions: Vec<McsVersion> = mcs.to_vec();
    versions.sort();
    versions.dedup();
    versions.reverse();
    if !versions.is_empty() {
        out.push((MCS_GROUP, versions.iter().map(|v| v.as_str()).collect()));
    }
    out
}

/// `GET /version`.
pub fn version_doc() -> Value {
    json!({
        "major": "1",
        "minor": "34",
        "gitVersion": "v1.34.0-isthmus-fixture",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2026-01-01T00:00:00Z",
        "goVersion": "go1.24.0",
        "compiler": "gc",
        "platform": "linux/amd64"
    })
}

/// `GET /api` (APIVersions).
pub fn core_versions(server_address: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}]
    })
}

fn group_doc(name: &str, versions: &[&str]) -> Value {
    let versions: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{name}/{v}"), "version": v}))
        .collect();
    json!({
        "name": name,
        "versions": versions,
        "preferredVersion": versions[0],
    })
}

/// `GET /apis` (APIGroupList).
pub fn group_list(mcs: &[McsVersion]) -> Value {
    let groups: Vec<Value> = groups(mcs)
        .iter()
        .map(|(name, versions)| group_doc(name, versions))
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// `GET /apis/<group>` (APIGroup), or `None` when the group is not served.
pub fn group(name: &str, mcs: &[McsVersion]) -> Option<Value> {
    groups(mcs)
        .iter()
        .find(|(g, _)| *g == name)
        .map(|(g, versions)| {
            let mut doc = group_doc(g, versions);
            doc["kind"] = "APIGroup".into();
            doc["apiVersion"] = "v1".into();
            doc
        })
}

/// `GET /api/v1` or `GET /apis/<group>/<version>` (APIResourceList), or `None` when that
/// group version is not served.
pub fn resource_list(group: &str, version: &str, mcs: &[McsVersion]) -> Option<Value> {
    let mut resources = Vec::new();
    for kind in Kind::ALL {
        let meta = kind.meta();
        if meta.group != group || resolve(kind, version, mcs).is_none() {
            continue;
        }
        resources.push(json!({
            "name": meta.plural,
            "singularName": meta.singular,
            "namespaced": meta.namespaced,
            "kind": meta.kind,
            "verbs": VERBS,
            "shortNames": meta.short_names,
        }));
        if meta.status_subresource {
            resources.push(json!({
                "name": format!("{}/status", meta.plural),
                "singularName": "",
                "namespaced": meta.namespaced,
                "kind": meta.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
    }
    if resources.is_empty() {
        return None;
    }
    let group_version = if group.is_empty() {
        version.to_owned()
    } else {
        format!("{group}/{version}")
    };
    Some(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": resources,
    }))
}
