//! Assembles the whole process from its configuration: route source, DNS shim, admin, drain.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use isthmus_route_sync::RouteStore;
use isthmus_route_sync::source::file::FileSource;
use isthmus_runtime::admin::{AdminServer, Health};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::config::DnsShimConfig;
use crate::metrics::Metrics;
use crate::shim::{DnsShim, Settings};

/// The process with every socket bound, ready to [`run`](Server::run).
pub struct Server {
    /// The DNS server.
    pub shim: DnsShim,
    /// The admin server.
    pub admin: AdminServer,
    /// Health reported on the admin server.
    pub health: Health,
    /// The route table the answers follow.
    pub routes: RouteStore,
    source: Source,
    poll: Duration,
    drain: Duration,
}

/// Where the shim's routes come from.
enum Source {
    File(FileSource),
    /// Follows route-sync; its client certificate files are polled at the interval.
    RouteSync(
        isthmus_route_sync::client::RouteSyncSource,
        isthmus_certs::TlsFiles,
        std::time::Duration,
    ),
}

impl Server {
    /// Loads the routes, builds the upstream client and binds every socket.
    ///
    /// # Errors
    /// When a socket cannot be bound or the upstream cannot be set up. A route file that
    /// cannot be read is not fatal: the shim starts not ready (every name would be forwarded,
    /// so names homed elsewhere would get the platform's answer) and becomes ready once the
    /// file loads.
    pub async fn build(cfg: &DnsShimConfig) -> anyhow::Result<Self> {
        let routes = RouteStore::new();
        let health = Health::new();
        // The shim holds a mesh certificate only when it follows route-sync.
        let mut certificates = isthmus_runtime::metrics::CertificateMetrics::new();
        let mut route_file = None;
        let source = match (&cfg.routes.file, &cfg.routes.route_sync) {
            (Some(file), _) => {
                let source = FileSource::new(file);
                route_file = Some(isthmus_route_sync::source::file::RouteFileMetrics::new(
                    &source,
                ));
                match source.apply(&routes) {
                    Ok((applied, rejected)) => tracing::info!(
                        routes = routes.snapshot().len(),
                        revision = applied.revision,
                        rejected = rejected.len(),
                        "routes loaded"
                    ),
                    Err(e) => {
                        tracing::error!("{e}");
                        health.set_not_ready(format!("route file not loaded: {e}"));
                    }
                }
                Source::File(source)
            }
            (None, Some(rs)) => {
                let files = rs.tls.files();
                let tls = isthmus_certs::MeshTls::load(&files)
                    .context("loading the shim's mesh certificates")?;
                certificates = certificates.add("dns-shim", &files, &tls);
                // Not ready until route-sync (or the cache) gave a table.
                health.set_not_ready("waiting for route-sync");
                Source::RouteSync(
                    isthmus_route_sync::client::RouteSyncSource {
                        cluster: isthmus_route_sync::ClusterName::parse(&cfg.cluster)
                            .context("cluster")?,
                        trust_domain: rs.trust_domain.clone(),
                        endpoints: rs.endpoints.clone(),
                        tls,
                        cache: rs.cache.clone(),
                    },
                    files,
                    rs.tls.reload_interval.get(),
                )
            }
            (None, None) => anyhow::bail!("no route source configured"),
        };
        let metrics = Metrics::default();
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        certificates.register(&mut registry);
        if let Some(route_file) = route_file {
            route_file.register(&mut registry);
        }
        let settings = Settings::from_config(cfg).context("configuration")?;
        let shim = DnsShim::bind(settings, routes.clone(), metrics)
            .await
            .context("starting the DNS shim")?;
        let admin = AdminServer::bind(cfg.admin.listen, Arc::new(registry), health.clone())
            .await
            .with_context(|| format!("binding the admin server on {}", cfg.admin.listen))?;
        Ok(Self {
            shim,
            admin,
            health,
            routes,
            source,
            poll: cfg.routes.poll_interval.get(),
            drain: cfg.drain_timeout.get(),
        })
    }

    /// Serves until `shutdown`, then drains for at most the configured drain timeout.
    pub async fn run(self, shutdown: CancellationToken) {
        let background = CancellationToken::new();
        let mut file_stats = None;
        match self.source {
            Source::File(file) => {
                file_stats = Some(file.stats());
                let _watcher = file.watch(self.routes.clone(), self.poll, background.clone());
            }
            Source::RouteSync(rs, files, tls_poll) => {
                // New certificates are picked up for the next connection to route-sync.
                let _reload = rs.tls.watch(files, tls_poll, background.clone());
                let (state, _task) = rs.spawn(self.routes.clone(), background.clone());
                let (health, routes) = (self.health.clone(), self.routes.clone());
                // Ready once route-sync answered, or the cache gave a table to serve.
                let _report = state.report(background.clone(), move |stale| {
                    health.set_stale(stale);
                    if !stale || !routes.snapshot().is_empty() {
                        health.set_ready();
                    }
                });
            }
        }
        let admin = tokio::spawn(self.admin.serve(background.clone()));
        let health = self.health.clone();
        if health.is_ready() || health.not_ready_reason().as_deref() == Some("starting") {
            health.set_ready();
        } else {
            // Ready once the route file has loaded: a table change shows it, or the source's
            // count of good loads when the file holds no routes (`routes: []` changes no
            // table).
            let mut watch = self.routes.subscribe();
            let (h, stop) = (health.clone(), background.clone());
            let mut tick = tokio::time::interval(self.poll);
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        _ = watch.changed() => break,
                        _ = tick.tick() => {
                            let good = file_stats.as_ref().is_some_and(|s| {
                                s.loads_ok.load(std::sync::atomic::Ordering::Relaxed) > 0
                            });
                            if good {
                                break;
                            }
                        }
                    }
                }
                h.set_ready();
            });
        }
        let mut dns = tokio::spawn(self.shim.run(shutdown.clone()));
        tokio::select! {
            _ = &mut dns => {}
            () = shutdown.cancelled() => {
                health.set_not_ready("draining");
                tracing::info!(deadline = ?self.drain, "draining");
                if tokio::time::timeout(self.drain, &mut dns).await.is_err() {
                    tracing::warn!("drain deadline passed; closing what is left");
                    dns.abort();
                }
            }
        }
        background.cancel();
        let _ = admin.await;
        tracing::info!("stopped");
    }
}
