//! The human form of a node's status, as `isthmus-route-sync status` prints it.

use std::fmt::Write as _;

use crate::proto::StatusReply;

/// Renders `status`; `ours` are the trust anchors of the asking side, compared with the
/// node's and with each peer's so a half-finished CA rotation shows.
pub fn render(status: &StatusReply, ours: &[String]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "cluster     {}", status.cluster);
    let _ = writeln!(out, "identity    {}", status.identity);
    let _ = writeln!(
        out,
        "revision    {} (epoch {})",
        status.revision, status.epoch
    );
    let _ = writeln!(
        out,
        "routes      {} served, {} local, {} rejected",
        status.routes, status.local_routes, status.rejected
    );
    let _ = writeln!(
        out,
        "stale       {}",
        if status.stale {
            "YES (serving last known routes)"
        } else {
            "no"
        }
    );
    match &status.vips {
        Some(v) => {
            let _ = writeln!(
                out,
                "vips        {} (hold {}s): {} assigned, {} held, {} free, {} exhausted{}",
                v.range,
                v.hold_seconds,
                v.assigned,
                v.held,
                v.free,
                v.exhausted,
                if v.exhausted > 0 {
                    "  RANGE EXHAUSTED: names without a VIP"
                } else {
                    ""
                }
            );
        }
        None => {
            let _ = writeln!(out, "vips        (none configured)");
        }
    }
    match &status.mirror {
        Some(m) => {
            let writer = match (m.lease.is_empty(), m.writer) {
                (true, _) => "writer (no Lease)".to_string(),
                (false, true) => format!("writer (holds Lease {})", m.lease),
                (false, false) => format!("reader (Lease {} held elsewhere)", m.lease),
            };
            let _ = writeln!(
                out,
                "mirror      {} Services in {}, {writer}{}",
                m.services,
                m.namespace,
                if m.synced { "" } else { ", NOT LISTED YET" }
            );
            if !m.last_error.is_empty() {
                let _ = writeln!(out, "  watch error: {}", m.last_error);
            }
            for r in &m.refused {
                let _ = writeln!(out, "  refused: {r}");
            }
        }
        None => {
            let _ = writeln!(out, "mirror      (none configured)");
        }
    }
    let _ = writeln!(out, "\npeers");
    if status.peers.is_empty() {
        let _ = writeln!(out, "  (none)");
    }
    for p in &status.peers {
        let _ = writeln!(
            out,
            "  {:<12} {:<13} {:<22} revision {:<8} routes {:<7} snapshots {} deltas {}{}{}",
            p.cluster,
            p.state,
            p.endpoint,
            p.revision,
            p.routes,
            p.snapshots,
            p.deltas,
            if p.refused > 0 {
                format!(" refused {}", p.refused)
            } else {
                String::new()
            },
            if p.last_error.is_empty() {
                String::new()
            } else {
                format!("  last error: {}", p.last_error)
            }
        );
    }
    let _ = writeln!(out, "\nconflicts");
    if status.conflicts.is_empty() {
        let _ = writeln!(out, "  (none)");
    }
    for c in &status.conflicts {
        let _ = writeln!(
            out,
            "  {}:{} offered by {} -> {} wins",
            c.name,
            c.port,
            c.clusters.join(", "),
            c.winner
        );
    }
    let _ = writeln!(out, "\ntrust anchors");
    let mut anchors = vec![("this node", &status.trust_anchors)];
    anchors.extend(
        status
            .peers
            .iter()
            .map(|p| (p.cluster.as_str(), &p.trust_anchors)),
    );
    let _ = writeln!(out, "  {:<12} {}", "you", ours.join("; "));
    for (who, list) in anchors {
        let same = list.iter().any(|a| ours.contains(a));
        let mark = if list.is_empty() {
            "  (unknown)"
        } else if same {
            ""
        } else {
            "  NO ANCHOR IN COMMON WITH YOU"
        };
        let _ = writeln!(out, "  {:<12} {}{mark}", who, list.join("; "));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Conflict, PeerStatus};

    #[test]
    fn renders_peers_conflicts_and_anchor_mismatches() {
        let status = StatusReply {
            cluster: "k8s".into(),
            stale: true,
            trust_anchors: vec!["CA1".into()],
            peers: vec![PeerStatus {
                cluster: "diego".into(),
                state: "disconnected".into(),
                last_error: "connection refused".into(),
                trust_anchors: vec!["CA2".into()],
                ..PeerStatus::default()
            }],
            conflicts: vec![Conflict {
                name: "orders.apps.internal".into(),
                port: 8080,
                clusters: vec!["diego".into(), "k8s".into()],
                winner: "k8s".into(),
            }],
            vips: Some(crate::proto::VipStatus {
                range: "100.64.0.0/16".into(),
                hold_seconds: 3600,
                assigned: 3,
                exhausted: 1,
                ..crate::proto::VipStatus::default()
            }),
            mirror: Some(crate::proto::MirrorStatus {
                namespace: "isthmus".into(),
                lease: "isthmus-route-sync".into(),
                writer: false,
                synced: true,
                services: 2,
                refused: vec!["a.apps.internal: Service a is not managed".into()],
                last_error: String::new(),
            }),
            ..StatusReply::default()
        };
        let text = render(&status, &["CA1".to_string()]);
        assert!(
            text.contains("mirror      2 Services in isthmus, reader (Lease isthmus-route-sync held elsewhere)"),
            "{text}"
        );
        assert!(
            text.contains("  refused: a.apps.internal: Service a is not managed"),
            "{text}"
        );
        assert!(
            text.contains("100.64.0.0/16 (hold 3600s): 3 assigned"),
            "{text}"
        );
        assert!(text.contains("RANGE EXHAUSTED"));
        assert!(text.contains("YES"));
        assert!(text.contains("connection refused"));
        assert!(text.contains("orders.apps.internal:8080 offered by diego, k8s -> k8s wins"));
        assert!(text.contains("diego        CA2  NO ANCHOR IN COMMON WITH YOU"));
    }
}
