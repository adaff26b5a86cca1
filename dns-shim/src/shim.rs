//! [`DnsShim`]: the DNS server, bound and ready to run.
//!
//! `bind` sets up every socket and the engine and computes the first snapshot from the route
//! store, so a query answered right after `bind` returns already sees the routes. `run`
//! serves until the shutdown token fires, keeping the snapshot in step with the route store
//! on a task of its own: the table is re-read and the remote set, with each name's VIP as
//! its routes carry it, rebuilt (on a blocking thread: 50,000 names take tens of
//! milliseconds) and swapped in whole. Queries never wait for that.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use isthmus_route_sync::{ClusterName, RouteName, RouteStore};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{DnsShimConfig, UpstreamConfig};
use crate::decide::Policy;
use crate::engine::{Engine, EngineSettings};
use crate::error::ShimError;
use crate::metrics::Metrics;
use crate::snapshot::{AnswerMode, Snapshot};
use crate::transport::{TcpSettings, serve_tcp, serve_udp, udp_socket};
use crate::upstream::Upstream;

/// Everything [`DnsShim::bind`] needs, as checked values.
#[derive(Debug, Clone)]
pub struct Settings {
    /// This cluster.
    pub cluster: ClusterName,
    /// The internal domains.
    pub domains: Vec<RouteName>,
    /// UDP and TCP address; port 0 picks a free port, the same for both.
    pub listen: SocketAddr,
    /// TTL of egress answers.
    pub ttl: u32,
    /// SOA minimum and TTL of negative answers.
    pub negative_ttl: u32,
    /// VIPs or shared addresses.
    pub mode: AnswerMode,
    /// The platform resolver.
    pub upstream: UpstreamConfig,
    /// Budget of one forwarded query.
    pub upstream_timeout: Duration,
    /// TCP idle limit.
    pub tcp_idle_timeout: Duration,
    /// UDP sockets on the port; 0 means one per CPU.
    pub udp_sockets: usize,
    /// EDNS payload advertised and UDP reply cap.
    pub edns_udp_payload: u16,
    /// Forwarded queries in flight at most.
    pub max_forwarded_in_flight: usize,
    /// Open TCP connections at most.
    pub max_tcp_connections: usize,
}

impl Settings {
    /// The settings of a validated configuration.
    ///
    /// # Errors
    /// [`ShimError::InvalidUrl`] should a value slip past validation (it cannot when the
    /// configuration came through `Validate`).
    pub fn from_config(cfg: &DnsShimConfig) -> Result<Self, ShimError> {
        let invalid = |url: &str, reason| ShimError::InvalidUrl {
            url: url.to_string(),
            reason,
        };
        let cluster = ClusterName::parse(&cfg.cluster)
            .map_err(|_| invalid(&cfg.cluster, "cluster: not a cluster name"))?;
        let domains = cfg
            .domains
            .iter()
            .map(|d| RouteName::parse(d).map_err(|_| invalid(d, "domains: not a domain")))
            .collect::<Result<Vec<_>, _>>()?;
        let mode = match cfg.answer.vip {
            true => AnswerMode::Vip,
            false => AnswerMode::Shared {
                v4: cfg
                    .answer
                    .egress
                    .iter()
                    .filter_map(|ip| match ip {
                        IpAddr::V4(v4) => Some(*v4),
                        IpAddr::V6(_) => None,
                    })
                    .collect(),
                v6: cfg
                    .answer
                    .egress
                    .iter()
                    .filter_map(|ip| match ip {
                        IpAddr::V6(v6) => Some(*v6),
                        IpAddr::V4(_) => None,
                    })
                    .collect(),
            },
        };
        Ok(Self {
            cluster,
            domains,
            listen: cfg.listen,
            ttl: cfg.ttl,
            negative_ttl: cfg.negative_ttl,
            mode,
            upstream: cfg.upstream.clone(),
            upstream_timeout: cfg.upstream_timeout.get(),
            tcp_idle_timeout: cfg.tcp_idle_timeout.get(),
            udp_sockets: cfg.udp_sockets,
            edns_udp_payload: cfg.edns_udp_payload,
            max_forwarded_in_flight: cfg.max_forwarded_in_flight,
            max_tcp_connections: cfg.max_tcp_connections,
        })
    }
}

/// The DNS server with its sockets bound.
#[derive(Debug)]
pub struct DnsShim {
    engine: Arc<Engine>,
    udp: Vec<Arc<UdpSocket>>,
    tcp: TcpListener,
    local_addr: SocketAddr,
    routes: RouteStore,
    cluster: ClusterName,
    mode: AnswerMode,
    tcp_settings: TcpSettings,
}

impl DnsShim {
    /// Builds the upstream client, binds TCP and the UDP sockets on the same port, and
    /// computes the first snapshot from `routes`.
    ///
    /// # Errors
    /// When a socket cannot be bound, or the upstream cannot be set up (unreadable SDC
    /// certificates, a bad URL).
    pub async fn bind(
        settings: Settings,
        routes: RouteStore,
        metrics: Metrics,
    ) -> Result<Self, ShimError> {
        let upstream =
            Upstream::from_config(&settings.upstream, settings.upstream_timeout, settings.ttl)?;
        let sockets = match settings.udp_sockets {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let (tcp, udp) = bind_pair(settings.listen, sockets).await?;
        let local_addr = tcp.local_addr().map_err(|source| ShimError::Bind {
            transport: "tcp",
            addr: settings.listen,
            source,
        })?;
        let policy = Policy::new(
            &settings.domains,
            &settings.mode,
            settings.ttl,
            settings.negative_ttl,
        );
        let first = Snapshot::build(&routes.snapshot(), &settings.cluster, &settings.mode);
        note_without_vip(&metrics, 0, &first);
        let engine = Engine::new(
            EngineSettings {
                policy,
                edns_udp_payload: settings.edns_udp_payload,
                upstream_timeout: settings.upstream_timeout,
                max_forwarded_in_flight: settings.max_forwarded_in_flight,
            },
            Snapshot::empty(),
            upstream,
            metrics,
        );
        engine.publish(first);
        Ok(Self {
            engine: Arc::new(engine),
            udp: udp.into_iter().map(Arc::new).collect(),
            tcp,
            local_addr,
            routes,
            cluster: settings.cluster,
            mode: settings.mode,
            tcp_settings: TcpSettings {
                idle: settings.tcp_idle_timeout,
                limit: Arc::new(Semaphore::new(settings.max_tcp_connections)),
            },
        })
    }

    /// The address UDP and TCP listen on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The engine, for inspecting the snapshot in force.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Serves until `shutdown`, then stops receiving, lets queries in flight finish (each is
    /// bounded by `upstream_timeout`; TCP connections close at their next wait) and returns.
    pub async fn run(self, shutdown: CancellationToken) {
        let tracker = TaskTracker::new();
        let follower = tokio::spawn(follow_routes(
            Arc::clone(&self.engine),
            self.routes.clone(),
            self.cluster.clone(),
            self.mode.clone(),
            shutdown.clone(),
        ));
        tracing::info!(addr = %self.local_addr, udp_sockets = self.udp.len(), "DNS shim listening (UDP and TCP)");
        let mut loops = tokio::task::JoinSet::new();
        for socket in self.udp {
            loops.spawn(serve_udp(
                socket,
                Arc::clone(&self.engine),
                shutdown.clone(),
                tracker.clone(),
            ));
        }
        loops.spawn(serve_tcp(
            self.tcp,
            Arc::clone(&self.engine),
            self.tcp_settings,
            shutdown.clone(),
            tracker.clone(),
        ));
        while let Some(joined) = loops.join_next().await {
            if let Err(e) = joined
                && e.is_panic()
            {
                tracing::error!(error = %e, "a DNS listener task panicked");
            }
        }
        tracker.close();
        tracker.wait().await;
        let _ = follower.await;
        tracing::info!(addr = %self.local_addr, "DNS shim stopped");
    }
}

/// TCP on `listen`, then `count` UDP sockets on the port TCP got. With port 0 the UDP twin
/// of the kernel's TCP choice may be taken; another port is tried then.
async fn bind_pair(
    listen: SocketAddr,
    count: usize,
) -> Result<(TcpListener, Vec<UdpSocket>), ShimError> {
    let bind_err = |transport, addr, source| ShimError::Bind {
        transport,
        addr,
        source,
    };
    let mut last = None;
    for _ in 0..16 {
        let tcp = TcpListener::bind(listen)
            .await
            .map_err(|e| bind_err("tcp", listen, e))?;
        let addr = tcp.local_addr().map_err(|e| bind_err("tcp", listen, e))?;
        let mut udp = Vec::with_capacity(count);
        let mut failed = None;
        for _ in 0..count {
            match udp_socket(addr) {
                Ok(socket) => udp.push(socket),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        match failed {
            None => return Ok((tcp, udp)),
            Some(e) if listen.port() == 0 => last = Some(bind_err("udp", addr, e)),
            Some(e) => return Err(bind_err("udp", addr, e)),
        }
    }
    Err(last.unwrap_or_else(|| bind_err("udp", listen, std::io::Error::other("no free port pair"))))
}

/// Keeps the count of remote names without a VIP in the metrics, and logs when some appear
/// (once, until they are gone again) and when none is left.
fn note_without_vip(metrics: &Metrics, before: usize, now: &Snapshot) {
    let count = now.without_vip();
    metrics
        .remote_names_without_vip
        .set(i64::try_from(count).unwrap_or(i64::MAX));
    if before == 0 && count > 0 {
        tracing::error!(
            names = count,
            "names homed elsewhere carry no VIP (route-sync's VIP range exhausted, or none configured there): they get SERVFAIL"
        );
    } else if before > 0 && count == 0 {
        tracing::info!("every name homed elsewhere has a VIP again");
    }
}

/// Rebuilds the snapshot whenever the route table changes, until `stop`.
async fn follow_routes(
    engine: Arc<Engine>,
    routes: RouteStore,
    cluster: ClusterName,
    mode: AnswerMode,
    stop: CancellationToken,
) {
    let mut watch = routes.subscribe();
    let mut table = watch.current();
    loop {
        let previous = engine.snapshot();
        if table.revision() != previous.revision() {
            let (cluster, mode) = (cluster.clone(), mode.clone());
            let built =
                tokio::task::spawn_blocking(move || Snapshot::build(&table, &cluster, &mode)).await;
            match built {
                Ok(built) => {
                    note_without_vip(engine.metrics(), previous.without_vip(), &built);
                    tracing::info!(
                        revision = built.revision(),
                        remote_names = built.len(),
                        "DNS answers updated"
                    );
                    engine.publish(built);
                }
                Err(e) => tracing::error!(error = %e, "rebuilding the DNS answers failed"),
            }
        }
        table = tokio::select! {
            () = stop.cancelled() => return,
            table = watch.changed() => table,
        };
    }
}
