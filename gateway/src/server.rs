//! Assembles a whole gateway from its configuration: identity, routes, roles, admin, drain.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use isthmus_certs::{MeshTls, TlsFiles};
use isthmus_route_sync::client::RouteSyncSource;
use isthmus_route_sync::source::file::FileSource;
use isthmus_route_sync::{ClusterName, RouteStore};
use isthmus_runtime::admin::{AdminServer, Health};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::config::GatewayConfig;
use crate::egress::Egress;
use crate::ingress::Ingress;
use crate::metrics::Metrics;
use crate::{Context, TableLoaded};

/// Where the gateway's routes come from.
enum Source {
    File(FileSource),
    RouteSync(RouteSyncSource),
}

/// A gateway with every socket bound, ready to [`run`](Gateway::run).
pub struct Gateway {
    /// The shared context (routes, identity, metrics).
    pub ctx: Context,
    /// The ingress role, when configured.
    pub ingress: Option<Ingress>,
    /// The egress role, when configured.
    pub egress: Option<Egress>,
    /// The admin server.
    pub admin: AdminServer,
    /// Health reported on the admin server.
    pub health: Health,
    source: Source,
    poll: Duration,
    tls_files: TlsFiles,
    tls_poll: Duration,
    drain: Duration,
}

impl Gateway {
    /// Loads the identity and the routes and binds every socket.
    ///
    /// # Errors
    /// When the certificate files cannot be loaded or a socket cannot be bound. A route file
    /// that cannot be read is not fatal: the gateway starts not ready (its ingress refuses
    /// streams `not_ready`) and becomes ready once the file watcher has loaded it.
    pub async fn build(cfg: &GatewayConfig) -> anyhow::Result<Self> {
        let tls_files = cfg.tls.files();
        let tls = MeshTls::load(&tls_files).context("loading the gateway's certificates")?;
        tracing::info!(id = %tls.local_id(), serial = %tls.serial(), "identity loaded");
        let routes = RouteStore::new();
        let health = Health::new();
        let loaded = TableLoaded::new(false);
        let mut route_file = None;
        let source = match (&cfg.routes.file, &cfg.routes.route_sync) {
            (Some(file), _) => {
                let source = FileSource::new(file);
                route_file = Some(isthmus_route_sync::source::file::RouteFileMetrics::new(
                    &source,
                ));
                match source.apply(&routes) {
                    Ok((applied, rejected)) => {
                        tracing::info!(
                            routes = routes.snapshot().len(),
                            revision = applied.revision,
                            rejected = rejected.len(),
                            "routes loaded"
                        );
                        loaded.set();
                    }
                    Err(e) => {
                        tracing::error!("{e}");
                        health.set_not_ready(format!("route file not loaded: {e}"));
                    }
                }
                Source::File(source)
            }
            (None, Some(rs)) => Source::RouteSync(RouteSyncSource {
                cluster: ClusterName::parse(&cfg.cluster).context("cluster")?,
                trust_domain: cfg.trust_domain.clone(),
                endpoints: rs.endpoints.clone(),
                tls: tls.clone(),
                cache: rs.cache.clone(),
            }),
            (None, None) => anyhow::bail!("no route source configured"),
        };
        let metrics = Metrics::default();
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        isthmus_runtime::metrics::CertificateMetrics::new()
            .add("gateway", &tls_files, &tls)
            .register(&mut registry);
        if let Some(route_file) = route_file {
            route_file.register(&mut registry);
        }
        let ctx = Context {
            cluster: ClusterName::parse(&cfg.cluster).context("cluster")?,
            trust_domain: cfg.trust_domain.clone(),
            routes,
            tls,
            metrics,
            loaded,
        };
        let admin = AdminServer::bind(cfg.admin.listen, Arc::new(registry), health.clone())
            .await
            .with_context(|| format!("binding the admin server on {}", cfg.admin.listen))?;
        let ingress = match &cfg.ingress {
            Some(c) => Some(
                Ingress::bind(ctx.clone(), c.clone())
                    .await
                    .with_context(|| format!("binding the ingress on {}", c.listen))?,
            ),
            None => None,
        };
        let egress = match &cfg.egress {
            Some(c) => Some(
                Egress::bind(ctx.clone(), c.clone())
                    .await
                    .context("binding the egress")?,
            ),
            None => None,
        };
        Ok(Self {
            ctx,
            ingress,
            egress,
            admin,
            health,
            source,
            poll: cfg.routes.poll_interval.get(),
            tls_files,
            tls_poll: cfg.tls.reload_interval.get(),
            drain: cfg.drain_timeout.get(),
        })
    }

    /// Serves until `shutdown`, then drains for at most the configured drain timeout and
    /// force-closes what is left. `/readyz` turns ready once the route table is loaded (the
    /// file, route-sync, or a cache holding routes) and not ready again at `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let force = CancellationToken::new();
        let background = CancellationToken::new();
        let _reload = self
            .ctx
            .tls
            .watch(self.tls_files, self.tls_poll, background.clone());
        let loaded = self.ctx.loaded.clone();
        match self.source {
            Source::File(file) => {
                if !loaded.get() {
                    // The file could not be read at start: loaded once the watcher applied it,
                    // which a table change shows, or the source's count of good loads when
                    // the file proved to hold no routes (`routes: []` changes no table).
                    let mut watch = self.ctx.routes.subscribe();
                    let (loaded, stop, stats) = (loaded.clone(), background.clone(), file.stats());
                    let mut tick = tokio::time::interval(self.poll);
                    tokio::spawn(async move {
                        loop {
                            tokio::select! {
                                () = stop.cancelled() => return,
                                _ = watch.changed() => break,
                                _ = tick.tick() => {
                                    if stats.loads_ok.load(std::sync::atomic::Ordering::Relaxed) > 0 {
                                        break;
                                    }
                                }
                            }
                        }
                        loaded.set();
                    });
                }
                let _routes = file.watch(self.ctx.routes.clone(), self.poll, background.clone());
            }
            Source::RouteSync(rs) => {
                if !loaded.get() {
                    self.health.set_not_ready("waiting for route-sync");
                }
                let (state, _task) = rs.spawn(self.ctx.routes.clone(), background.clone());
                // Health says "stale" while the table is last-known-good. The table counts as
                // loaded once route-sync answered, or the cache gave routes to serve (an
                // empty cache proves nothing: it may predate every export).
                let (health, routes, loaded) =
                    (self.health.clone(), self.ctx.routes.clone(), loaded.clone());
                let _report = state.report(background.clone(), move |stale| {
                    health.set_stale(stale);
                    if !stale || !routes.snapshot().is_empty() {
                        loaded.set();
                    }
                });
            }
        }
        let admin = tokio::spawn(self.admin.serve(background.clone()));
        let mut roles = tokio::task::JoinSet::new();
        if let Some(ingress) = self.ingress {
            tracing::info!(addr = ?ingress.local_addr().ok(), quic = ?ingress.quic_addr(), "ingress serving");
            roles.spawn(ingress.run(shutdown.clone(), force.clone()));
        }
        if let Some(egress) = self.egress {
            roles.spawn(egress.run(shutdown.clone(), force.clone()));
        }
        // Ready only once the table is loaded: before that the ingress refuses every stream
        // `not_ready` and the egress knows no route, so a load balancer should send nothing.
        tokio::select! {
            () = loaded.wait() => self.health.set_ready(),
            () = shutdown.cancelled() => {}
        }
        shutdown.cancelled().await;
        self.health.set_not_ready("draining");
        tracing::info!(deadline = ?self.drain, "draining");
        let drained = tokio::time::timeout(self.drain, async {
            while roles.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!("drain deadline passed; closing the connections left");
            force.cancel();
            while roles.join_next().await.is_some() {}
        }
        background.cancel();
        let _ = admin.await;
        tracing::info!("stopped");
    }
}
