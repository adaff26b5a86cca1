//! The route-sync process: config in, a running node (gRPC, admin, file source) out.
//!
//! `isthmus-route-sync` is a thin shell around [`run`] and [`status`]; the two-cluster
//! harness (`isthmus-tests`) runs the same code in its own processes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use isthmus_certs::{Component, MeshTls, PeerPolicy, TlsFiles};
use isthmus_runtime::admin::{AdminServer, Health};
use tokio_util::sync::CancellationToken;

use crate::config::RouteSyncConfig;
use crate::model::ClusterName;
use crate::node::{Keepalive, Node, NodeSettings, PeerLimits, PeerSpec, VipSettings};
use crate::proto;
use crate::source::RouteSource as _;
use crate::source::file::FileSource;
use crate::source::kubernetes::KubernetesSource;
use crate::vip::VipRange;

fn load_tls(cfg: &RouteSyncConfig) -> anyhow::Result<(MeshTls, TlsFiles)> {
    let files = cfg.tls.files();
    let tls = MeshTls::load(&files).context("loading the route-sync certificates")?;
    Ok((tls, files))
}

/// Runs a node from its configuration until `stop` is cancelled, then drains.
///
/// # Errors
/// The certificates do not load, or the gRPC or admin address cannot be bound.
pub async fn run(cfg: RouteSyncConfig, stop: CancellationToken) -> anyhow::Result<()> {
    let (tls, files) = load_tls(&cfg)?;
    let settings = NodeSettings {
        cluster: ClusterName::parse(&cfg.cluster)?,
        trust_domain: cfg.trust_domain.clone(),
        tls: tls.clone(),
        peers: cfg
            .peers
            .iter()
            .map(|p| {
                Ok(PeerSpec {
                    cluster: ClusterName::parse(&p.cluster)?,
                    endpoints: p.endpoints.clone(),
                })
            })
            .collect::<Result<_, crate::InvalidRoute>>()?,
        state_dir: cfg.state_dir.clone(),
        handshake_timeout: Duration::from_secs(5),
        vips: match &cfg.vips {
            Some(v) => Some(VipSettings {
                range: VipRange::parse(&v.range)?,
                hold: v.hold.get(),
            }),
            None => None,
        },
        limits: PeerLimits {
            max_batch_chunks: cfg.limits.max_batch_chunks,
            max_batch_routes: cfg.limits.max_batch_routes,
            max_routes_per_peer: cfg.limits.max_routes_per_peer,
        },
        keepalive: Keepalive {
            interval: cfg.keepalive.interval.get(),
            timeout: cfg.keepalive.timeout.get(),
        },
    };
    let node = Node::bind(settings, cfg.listen)
        .await
        .with_context(|| format!("binding route-sync gRPC on {}", cfg.listen))?;
    let mut registry = prometheus_client::registry::Registry::default();
    node.metrics().register(&mut registry);
    isthmus_runtime::metrics::CertificateMetrics::new()
        .add("route-sync", &files, &tls)
        .register(&mut registry);
    let health = Health::new();
    let lease = start_local_source(&cfg, &node, &mut registry, &health, &stop).await?;
    let admin = AdminServer::bind(cfg.admin.listen, Arc::new(registry), health.clone())
        .await
        .with_context(|| format!("binding the admin server on {}", cfg.admin.listen))?;
    let _reload = tls.watch(files, cfg.tls.reload_interval.get(), stop.clone());
    tracing::info!(addr = %node.local_addr()?, "route-sync serving");
    let admin_task = tokio::spawn(admin.serve(stop.clone()));
    health.set_ready();
    node.run(stop.clone()).await;
    health.set_not_ready("stopped");
    let _ = admin_task.await;
    if let Some(lease) = lease {
        // The holder releases the Lease on the way out (bounded inside), so the other
        // replica takes over at its next attempt instead of after the whole duration.
        let _ = lease.await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// Starts the local route source the configuration names (`source.file` or
/// `source.kubernetes`), registers its metrics, and keeps the node's and health's
/// freshness current. Returns the Lease elector's task when a mirror runs.
async fn start_local_source(
    cfg: &RouteSyncConfig,
    node: &Node,
    registry: &mut prometheus_client::registry::Registry,
    health: &Health,
    stop: &CancellationToken,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    let handle = node.handle();
    let mut lease = None;
    if let Some(k8s) = &cfg.source.kubernetes {
        let client = crate::k8s::client(k8s).await?;
        // With a mirror, the Lease holder alone writes (mirror Services and ServiceExport
        // status); without one, this is the only replica that writes.
        let leadership = match &cfg.mirror {
            Some(mirror) => {
                let (leadership, task) =
                    start_mirror(mirror, client.clone(), handle.clone(), registry, stop)?;
                lease = Some(task);
                leadership
            }
            None => crate::k8s::Leadership::always(),
        };
        let source = KubernetesSource::new(
            client,
            ClusterName::parse(&cfg.cluster)?,
            k8s.namespaces.clone(),
            leadership,
        )
        .with_node(handle.clone());
        crate::source::kubernetes::KubernetesMetrics::new(&source).register(registry);
        tracing::info!(source = %source.describe(), "local routes from the Kubernetes API");
        let _watch = source.watch(node.local_store(), stop.clone());
    } else {
        let Some(file) = &cfg.source.file else {
            anyhow::bail!("source: set `file` or `kubernetes`");
        };
        let source = FileSource::new(file);
        crate::source::file::RouteFileMetrics::new(&source).register(registry);
        // The first load decides freshness; then the file is watched.
        match source.apply(&node.local_store()) {
            Ok(_) => handle.local_loaded(),
            Err(e) => tracing::error!("{e}; serving the last known local routes until it loads"),
        }
        let _watch = source.clone().watch(
            node.local_store(),
            cfg.source.poll_interval.get(),
            stop.clone(),
        );
        let stats = source.stats();
        let handle = handle.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                if stats.loads_ok.load(std::sync::atomic::Ordering::Relaxed) > 0 {
                    handle.local_loaded();
                }
            }
        });
    }
    {
        // Keep health's stale flag current (peers and the local source both count).
        let health = health.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                health.set_stale(handle.is_stale());
            }
        });
    }
    Ok(lease)
}

/// Starts the Lease elector and the mirror Services task of `mirror`, registering their
/// metrics; returns the Leadership the Lease keeps and the elector's task.
fn start_mirror(
    mirror: &crate::config::MirrorConfig,
    client: kube::Client,
    node: crate::node::NodeHandle,
    registry: &mut prometheus_client::registry::Registry,
    stop: &CancellationToken,
) -> anyhow::Result<(crate::k8s::Leadership, tokio::task::JoinHandle<()>)> {
    let egress_ports = crate::config::parse_port_range(&mirror.egress_ports)
        .map_err(|e| anyhow::anyhow!("mirror.egress_ports: {e}"))?;
    let identity = lease_identity(mirror.lease.identity.as_deref())?;
    let metrics = crate::k8s::mirror::MirrorMetrics::default();
    metrics.register(registry);
    let lease = crate::k8s::lease::LeaseSettings {
        namespace: mirror.namespace.clone(),
        name: mirror.lease.name.clone(),
        identity: identity.clone(),
        duration: mirror.lease.duration.get(),
    };
    tracing::info!(
        namespace = %mirror.namespace,
        lease = %lease.name,
        %identity,
        duration = ?lease.duration,
        "mirror Services: written by the Lease holder"
    );
    let (leadership, lease_task) =
        crate::k8s::lease::spawn(client.clone(), lease, metrics.clone(), stop.clone());
    let settings = crate::k8s::mirror::MirrorSettings {
        namespace: mirror.namespace.clone(),
        egress_selector: mirror.egress_selector.clone(),
        egress_ports,
        resync: MIRROR_RESYNC,
        lease: Some(mirror.lease.name.clone()),
    };
    tokio::spawn(crate::k8s::mirror::run(
        client,
        settings,
        node,
        leadership.clone(),
        metrics,
        stop.clone(),
    ));
    Ok((leadership, lease_task))
}

/// How often the mirror reconciles even when it saw no change, and looks again at Services
/// in the way.
const MIRROR_RESYNC: Duration = Duration::from_secs(60);

/// This replica's Lease identity: the configured one, else `$POD_NAME` (the Deployment sets
/// it from the downward API), else the host name. Read here, at the process edge.
fn lease_identity(configured: Option<&str>) -> anyhow::Result<String> {
    if let Some(id) = configured {
        return Ok(id.to_string());
    }
    if let Ok(pod) = std::env::var("POD_NAME")
        && !pod.is_empty()
    {
        return Ok(pod);
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    anyhow::ensure!(
        !host.is_empty(),
        "mirror.lease.identity: not set, no $POD_NAME and no host name; set it in the config"
    );
    Ok(host)
}

/// Asks a running node (`server`, else the config's `listen`) for its status, rendered as
/// text.
///
/// # Errors
/// The certificates do not load, or the node does not answer within 5 s.
pub async fn status(cfg: &RouteSyncConfig, server: Option<SocketAddr>) -> anyhow::Result<String> {
    let (tls, _) = load_tls(cfg)?;
    let mut addr = server.unwrap_or(cfg.listen);
    if addr.ip().is_unspecified() {
        addr.set_ip([127, 0, 0, 1].into());
    }
    let policy = PeerPolicy::component(
        &cfg.trust_domain,
        cfg.cluster.as_str(),
        Component::ROUTE_SYNC,
    );
    let channel = crate::grpc::channel(addr, tls.client_config(policy, &[b"h2"]))?;
    let mut client = proto::route_sync_client::RouteSyncClient::new(channel);
    let reply = tokio::time::timeout(
        Duration::from_secs(5),
        client.status(proto::StatusRequest {}),
    )
    .await
    .with_context(|| format!("route-sync at {addr} did not answer within 5 s"))?
    .with_context(|| format!("asking route-sync at {addr} for its status"))?
    .into_inner();
    Ok(crate::status::render(&reply, &tls.trust_anchors()))
}
