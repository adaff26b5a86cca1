//! A two-cluster world on one machine: "diego" and "k8s", each with its route-sync, DNS
//! shim, egress gateway and ingress gateway(s) (two replicas in k8s) as real processes, and
//! app instances plus a platform resolver inside the cluster's network. The demo
//! (`isthmus-demo`) and the end-to-end tests drive the same world.
//!
//! ```text
//!   diego (127.<id>.1.x)                                 k8s (127.<id>.2.x)
//!   app ─dns─▶ shim .2 ─(other names)─▶ platform DNS .8   app ─dns─▶ shim .2 ─▶ platform DNS .8
//!   app ─tcp─▶ egress .1 ══ mTLS h2/QUIC ══▶ ingress .4/.5 ─▶ app instance .1x
//!   route-sync .3 ◀════════ mTLS gRPC ═════════▶ route-sync .3
//! ```

pub mod apps;
pub mod client;
pub mod kube;
pub mod net;
pub mod procs;
pub mod scenario;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use isthmus_certs::ca::{LeafSpec, MeshCa};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use apps::{AppKind, Instance, PlatformDns};
use kube::{Kube, KubeApp};
use net::{Cluster, ClusterNet, Namespaces, Plan, host, port};
use procs::{Kind, Proc};

/// The mesh trust domain of every world.
pub const TRUST_DOMAIN: &str = "mesh.local";

/// How egress gateways reach the other cluster's ingress.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Transport {
    /// TLS 1.3 over TCP, HTTP/2 CONNECT.
    #[default]
    Tcp,
    /// QUIC streams.
    Quic,
}

impl Transport {
    fn as_str(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Quic => "quic",
        }
    }
}

impl std::str::FromStr for Transport {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tcp" => Ok(Transport::Tcp),
            "quic" => Ok(Transport::Quic),
            other => Err(format!("transport {other:?}: expected tcp or quic")),
        }
    }
}

/// The apps of the scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum App {
    /// `orders.apps.internal:8080`, HTTP: the app that migrates.
    Orders,
    /// `billing.apps.internal:8080`, HTTP: stays in diego, called from k8s.
    Billing,
    /// `echo.apps.internal:9000`, TCP: lives in k8s, called from diego.
    Echo,
}

impl App {
    /// The short name.
    pub fn short(self) -> &'static str {
        match self {
            App::Orders => "orders",
            App::Billing => "billing",
            App::Echo => "echo",
        }
    }

    /// The internal route name.
    pub fn host(self) -> String {
        format!("{}.apps.internal", self.short())
    }

    /// The route port.
    pub fn port(self) -> u16 {
        match self {
            App::Orders | App::Billing => 8080,
            App::Echo => 9000,
        }
    }

    /// HTTP or echo.
    pub fn kind(self) -> AppKind {
        match self {
            App::Orders | App::Billing => AppKind::Http,
            App::Echo => AppKind::Echo,
        }
    }

    fn protocol(self) -> &'static str {
        match self.kind() {
            AppKind::Http => "http",
            AppKind::Echo => "tcp",
        }
    }

    fn host_octet(self) -> u8 {
        host::APPS
            + match self {
                App::Orders => 0,
                App::Billing => 1,
                App::Echo => 2,
            }
    }
}

/// How to build a world.
#[derive(Clone, Debug)]
pub struct Options {
    /// Second octet of every address (1..=254); worlds side by side need different ones.
    pub id: u8,
    /// Each cluster in its own network namespace (root only).
    pub netns: bool,
    /// Egress-to-ingress transport.
    pub transport: Transport,
    /// Where certificates, configs, route files, state and logs go.
    pub dir: PathBuf,
    /// The multi-call executable that runs components (`isthmus-demo`).
    pub exe: PathBuf,
    /// How often route-sync reads its route file and gateways their certificates.
    pub poll: Duration,
}

impl Options {
    /// Defaults for `dir` and `exe`, on loopback, over TCP.
    pub fn new(id: u8, dir: impl Into<PathBuf>, exe: impl Into<PathBuf>) -> Options {
        Options {
            id,
            netns: false,
            transport: Transport::Tcp,
            dir: dir.into(),
            exe: exe.into(),
            poll: Duration::from_millis(100),
        }
    }
}

/// What a cluster's DNS shim answers for a name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// The local egress (its shared address, or a VIP in the cluster's range): the route is
    /// homed in the other cluster.
    Egress,
    /// A local instance's address: the route is homed here.
    Local,
}

struct ClusterState {
    net: ClusterNet,
    dns: PlatformDns,
    instances: HashMap<App, Instance>,
    generation: HashMap<App, usize>,
    exported: BTreeMap<App, SocketAddr>,
    /// Routes besides the apps', as a test sets them ([`World::set_extra_routes`]).
    extra: Vec<ExtraRoute>,
}

/// A route a test adds to a cluster's route file besides the apps': homed and exported
/// there, callable from the other cluster, raw TCP (recognised only by its VIP).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtraRoute {
    /// The route name.
    pub name: String,
    /// The route port.
    pub port: u16,
    /// Its one backend.
    pub backend: SocketAddr,
}

/// A running two-cluster world. Dropping it kills every process and removes namespaces.
pub struct World {
    /// The address plan.
    pub plan: Plan,
    opts: Options,
    ca: MeshCa,
    procs: BTreeMap<String, Proc>,
    clusters: BTreeMap<Cluster, ClusterState>,
    stop: CancellationToken,
    /// The k8s cluster's API server (a fixture) and kubectl.
    kube: Kube,
    // Last: namespaces go after the processes and threads inside them.
    _ns: Option<Namespaces>,
}

/// Ingress replicas per cluster: two in k8s (a Deployment), one on the Diego VM.
pub fn ingress_replicas(c: Cluster) -> u8 {
    match c {
        Cluster::Diego => 1,
        Cluster::K8s => 2,
    }
}

impl World {
    /// Makes certificates and configs, starts every component, and waits until each
    /// answers `/readyz`.
    ///
    /// # Errors
    /// A component does not come up within 20 s (its log tail is in the error), or the
    /// namespaces cannot be made.
    pub async fn start(opts: Options) -> anyhow::Result<World> {
        let plan = Plan {
            id: opts.id,
            netns: opts.netns,
        };
        for sub in ["certs", "config", "state", "logs"] {
            std::fs::create_dir_all(opts.dir.join(sub))
                .with_context(|| format!("creating {}", opts.dir.join(sub).display()))?;
        }
        let ca = MeshCa::generate(TRUST_DOMAIN)?;
        ca.write(&opts.dir.join("certs/ca"))?;
        let ns = if opts.netns {
            Some(Namespaces::create(
                plan,
                &[host::ROUTE_SYNC, host::INGRESS, host::INGRESS + 1],
            )?)
        } else {
            None
        };
        let stop = CancellationToken::new();
        let mut clusters = BTreeMap::new();
        for c in Cluster::ALL {
            let net = if opts.netns {
                ClusterNet::inside(&plan.netns_name(c))?
            } else {
                ClusterNet::here()
            };
            let dns = PlatformDns::default();
            let (d, s, addr) = (
                dns.clone(),
                stop.clone(),
                plan.private_at(c, host::PLATFORM_DNS, port::DNS),
            );
            net.run(async move { d.serve(addr, s).await })
                .await
                .with_context(|| format!("{c}: binding the platform resolver on {addr}"))?;
            clusters.insert(
                c,
                ClusterState {
                    net,
                    dns,
                    instances: HashMap::new(),
                    generation: HashMap::new(),
                    exported: BTreeMap::new(),
                    extra: Vec::new(),
                },
            );
        }
        let kube = Kube::start(
            &clusters[&Cluster::K8s].net,
            plan.private_at(Cluster::K8s, host::KUBE_API, port::KUBE_API),
            &opts.dir,
            opts.netns.then(|| plan.netns_name(Cluster::K8s)),
        )
        .await
        .context("k8s: starting the Kubernetes API server fixture")?;
        let mut world = World {
            plan,
            opts,
            ca,
            procs: BTreeMap::new(),
            clusters,
            stop,
            kube,
            _ns: ns,
        };
        world.write_routes(Cluster::Diego)?;
        for c in Cluster::ALL {
            world.spawn(c, "route-sync", Kind::RouteSync, world.route_sync_config(c))?;
            for i in 0..ingress_replicas(c) {
                let name = format!("ingress-{i}");
                world.spawn(c, &name, Kind::Gateway, world.ingress_config(c, i))?;
            }
            world.spawn(c, "egress", Kind::Gateway, world.egress_config(c))?;
            world.spawn(c, "dns-shim", Kind::DnsShim, world.shim_config(c))?;
        }
        let names: Vec<String> = world.procs.keys().cloned().collect();
        for name in names {
            world.wait_ready(&name, Duration::from_secs(20)).await?;
        }
        Ok(world)
    }

    /// The directory holding everything.
    pub fn dir(&self) -> &Path {
        &self.opts.dir
    }

    /// The transport in use.
    pub fn transport(&self) -> Transport {
        self.opts.transport
    }

    /// The names of the component processes (`diego/egress`, `k8s/ingress-1`, ...).
    pub fn proc_names(&self) -> Vec<String> {
        self.procs.keys().cloned().collect()
    }

    /// The route cache file of a gateway or DNS shim process (`k8s/ingress-0`).
    pub fn cache_of(&self, name: &str) -> PathBuf {
        let (c, component) = split_name(name);
        self.opts
            .dir
            .join(format!("state/{c}-{component}-routes.pb"))
    }

    /// Replaces the extra routes of `c` (see [`ExtraRoute`]): diego's route file is
    /// rewritten; in k8s each is a Service exported by annotation, with an EndpointSlice.
    ///
    /// # Errors
    /// The file or the API objects cannot be written.
    pub fn set_extra_routes(&mut self, c: Cluster, routes: Vec<ExtraRoute>) -> anyhow::Result<()> {
        let state = self.clusters.get_mut(&c).expect("both clusters exist");
        let old = std::mem::replace(&mut state.extra, routes);
        match c {
            Cluster::Diego => self.write_routes(c),
            Cluster::K8s => self.kube.set_extra_routes(
                &old,
                &self.clusters[&c].extra,
                &format!("cluster:{}", c.other()),
            ),
        }
    }

    /// A process by name.
    ///
    /// # Panics
    /// When there is no such process.
    pub fn proc(&mut self, name: &str) -> &mut Proc {
        self.procs
            .get_mut(name)
            .unwrap_or_else(|| panic!("no process {name}"))
    }

    /// A cluster's network, to run clients on.
    pub fn net(&self, c: Cluster) -> &ClusterNet {
        &self.clusters[&c].net
    }

    /// The DNS shim of a cluster: what its apps use as their resolver.
    pub fn shim_addr(&self, c: Cluster) -> SocketAddr {
        self.plan.private_at(c, host::DNS_SHIM, port::DNS)
    }

    /// The egress address the shim hands out for names homed elsewhere, where the cluster
    /// has no VIP range.
    pub fn egress_ip(&self, c: Cluster) -> IpAddr {
        self.plan.private(c, host::EGRESS)
    }

    /// The VIP range of `c`, if it answers names homed elsewhere with per-route VIPs.
    ///
    /// diego does (`127.<id>.128.0/17`, 32,766 VIPs on the cluster's loopback, bound per VIP
    /// by the egress): the raw-TCP `echo` route it calls can be told apart only by its
    /// address.
    /// k8s answers the one shared egress address, and its egress tells routes apart by
    /// Host header or SNI, so the world runs both ways of identifying a connection.
    pub fn vip_range(&self, c: Cluster) -> Option<isthmus_route_sync::vip::VipRange> {
        match c {
            Cluster::Diego => {
                isthmus_route_sync::vip::VipRange::parse(&format!("127.{}.128.0/17", self.plan.id))
                    .ok()
            }
            Cluster::K8s => None,
        }
    }

    /// Where an app's instance listens in a cluster.
    pub fn instance_addr(&self, c: Cluster, app: App) -> SocketAddr {
        self.plan.private_at(c, app.host_octet(), app.port())
    }

    /// A caller in `from` calling `app` by name.
    pub fn caller(&self, from: Cluster, app: App) -> client::Caller {
        client::Caller {
            label: format!("{from} → {}", app.short()),
            dns: self.shim_addr(from),
            name: app.host(),
            app: app.short().to_string(),
            port: app.port(),
            kind: app.kind(),
        }
    }

    /// Starts an instance of `app` in `c` (`orders-k8s-0`, then `-1`...) and lists it in the
    /// cluster's platform resolver; in k8s also as a ready endpoint of the app's Service
    /// (created, plain, the first time). Returns the instance name.
    ///
    /// # Errors
    /// Its address cannot be bound, or the API objects cannot be written.
    pub async fn start_app(&mut self, c: Cluster, app: App) -> anyhow::Result<String> {
        let addr = self.instance_addr(c, app);
        let state = self.clusters.get_mut(&c).expect("both clusters exist");
        let generation = state.generation.entry(app).or_default();
        let name = format!("{}-{c}-{generation}", app.short());
        *generation += 1;
        let (n, a) = (name.clone(), app.short());
        let instance = state
            .net
            .run(async move { Instance::start(addr, app.kind(), a, c.name(), &n).await })
            .await
            .with_context(|| format!("starting {name} on {addr}"))?;
        state.instances.insert(app, instance);
        state.dns.set(&app.host(), vec![addr.ip()]);
        if c == Cluster::K8s {
            self.kube.instance_started(&self.kube_app(app), addr)?;
        }
        Ok(name)
    }

    /// Removes `app` from the platform resolver and drains its instance in `c`. In k8s its
    /// endpoint turns terminating first and leaves the EndpointSlice once drained (the
    /// Service stays, as a Deployment scaled to zero leaves it).
    ///
    /// # Errors
    /// The EndpointSlice cannot be written.
    pub async fn stop_app(&mut self, c: Cluster, app: App) -> anyhow::Result<()> {
        let addr = self.instance_addr(c, app);
        let kube_app = self.kube_app(app);
        let state = self.clusters.get_mut(&c).expect("both clusters exist");
        state.dns.set(&app.host(), Vec::new());
        let Some(instance) = state.instances.remove(&app) else {
            return Ok(());
        };
        if c == Cluster::K8s {
            self.kube.instance_terminating(&kube_app, addr)?;
        }
        state.net.run(instance.stop()).await;
        if c == Cluster::K8s {
            self.kube.instance_gone(&kube_app)?;
        }
        Ok(())
    }

    /// Marks `app` as served by `c` and exported to the other cluster: in diego's route
    /// file; in k8s with kubectl (the route annotations on the app's Service, then its MCS
    /// ServiceExport), as docs/migration.md shows. Returns the kubectl commands run.
    ///
    /// # Errors
    /// The route file cannot be written, or a kubectl command fails.
    pub async fn export(&mut self, c: Cluster, app: App) -> anyhow::Result<Vec<String>> {
        let addr = self.instance_addr(c, app);
        self.clusters
            .get_mut(&c)
            .expect("both clusters exist")
            .exported
            .insert(app, addr);
        match c {
            Cluster::Diego => self.write_routes(c).map(|()| Vec::new()),
            Cluster::K8s => self.kube.export(&self.kube_app(app)).await,
        }
    }

    /// Takes `app`'s route away in `c`: from diego's route file; in k8s with kubectl
    /// (delete the ServiceExport, remove the route annotations). Returns the kubectl
    /// commands run.
    ///
    /// # Errors
    /// The route file cannot be written, or a kubectl command fails.
    pub async fn withdraw(&mut self, c: Cluster, app: App) -> anyhow::Result<Vec<String>> {
        self.clusters
            .get_mut(&c)
            .expect("both clusters exist")
            .exported
            .remove(&app);
        match c {
            Cluster::Diego => self.write_routes(c).map(|()| Vec::new()),
            Cluster::K8s => self.kube.withdraw(&self.kube_app(app)).await,
        }
    }

    /// Runs `kubectl <args>` against the k8s cluster's API (the fixture), as the operator.
    ///
    /// # Errors
    /// kubectl fails; its stderr is in the error.
    pub async fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        self.kube.kubectl(args).await
    }

    /// The operator's kubeconfig for the k8s cluster's API: `KUBECONFIG=<this> kubectl ...`
    /// works against the running world.
    pub fn kubeconfig(&self) -> &Path {
        &self.kube.kubeconfig
    }

    /// The k8s cluster's API server fixture, for checks of what is stored.
    pub fn kube_api(&self) -> &crate::kubeapi::ApiServer {
        self.kube.api()
    }

    fn kube_app(&self, app: App) -> KubeApp {
        KubeApp {
            service: app.short().to_owned(),
            route: app.host(),
            port: app.port(),
            kind: app.kind(),
            allowed_peers: format!("cluster:{}", Cluster::K8s.other()),
        }
    }

    /// The address `c`'s shim answers for `app` now.
    ///
    /// # Errors
    /// The lookup fails.
    pub async fn resolve(&self, c: Cluster, app: App) -> anyhow::Result<IpAddr> {
        let dns = self.shim_addr(c);
        let name = app.host();
        self.net(c)
            .run(async move { client::lookup(dns, &name).await })
            .await
    }

    /// What `c`'s shim answers for `app` now.
    ///
    /// # Errors
    /// The lookup fails.
    pub async fn answer(&self, c: Cluster, app: App) -> anyhow::Result<Answer> {
        let ip = self.resolve(c, app).await?;
        if ip == self.egress_ip(c) || self.vip_range(c).is_some_and(|r| r.contains(ip)) {
            Ok(Answer::Egress)
        } else if ip == self.instance_addr(c, app).ip() {
            Ok(Answer::Local)
        } else {
            bail!("{c}'s shim answered {} with {ip}", app.host())
        }
    }

    /// Waits until `c`'s shim answers `app` with `want`.
    ///
    /// # Errors
    /// Not within `limit`.
    pub async fn wait_answer(
        &self,
        c: Cluster,
        app: App,
        want: Answer,
        limit: Duration,
    ) -> anyhow::Result<Duration> {
        let start = Instant::now();
        let mut last = String::new();
        while start.elapsed() < limit {
            match self.answer(c, app).await {
                Ok(a) if a == want => return Ok(start.elapsed()),
                Ok(a) => last = format!("{a:?}"),
                Err(e) => last = format!("{e:#}"),
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        bail!(
            "{c}'s shim did not answer {} with {want:?} within {limit:?} (last: {last})",
            app.host()
        )
    }

    /// Waits until k8s's route-sync has set `condition` (`Valid`, `Conflict`) of `app`'s
    /// ServiceExport to `status` (`True`/`False`), as the operator would wait for it: with
    /// `kubectl wait --for=jsonpath=...` (a watch), then `kubectl get -o jsonpath` for the
    /// condition's reason, which it returns.
    ///
    /// # Errors
    /// Not within `limit` (kubectl's message is in the error).
    pub async fn wait_export_condition(
        &self,
        app: App,
        condition: &str,
        status: &str,
        limit: Duration,
    ) -> anyhow::Result<String> {
        let at = format!("{{.status.conditions[?(@.type==\"{condition}\")]");
        let export = format!("serviceexport/{}", app.short());
        let until = format!("--for=jsonpath={at}.status}}={status}");
        let timeout = format!("--timeout={}ms", limit.as_millis());
        // The watch may last the whole limit: no shorter per-request timeout (the later
        // flag wins over the wrapper's default).
        let request = format!("--request-timeout={}ms", limit.as_millis() + 5000);
        self.kubectl(&[
            "-n",
            kube::APPS_NAMESPACE,
            "wait",
            &request,
            &until,
            &timeout,
            &export,
        ])
        .await
        .with_context(|| {
            format!(
                "ServiceExport {}/{}: condition {condition} not {status} within {limit:?}",
                kube::APPS_NAMESPACE,
                app.short()
            )
        })?;
        let reason = format!("jsonpath={at}.reason}}");
        let out = self
            .kubectl(&["-n", kube::APPS_NAMESPACE, "get", &export, "-o", &reason])
            .await?;
        Ok(out.trim().to_owned())
    }

    /// How many routes `c`'s route-sync holds from `origin` (`local` or a cluster name).
    ///
    /// # Errors
    /// The admin server does not answer.
    pub async fn route_count(&self, c: Cluster, origin: &str) -> anyhow::Result<i64> {
        let admin = self.plan.private_at(c, host::ROUTE_SYNC, port::ADMIN);
        let body = self
            .net(c)
            .run(async move { http_get(admin, "/metrics").await })
            .await?
            .1;
        let needle = format!("isthmus_route_sync_routes{{origin=\"{origin}\"}} ");
        Ok(body
            .lines()
            .find_map(|l| l.strip_prefix(&needle))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0))
    }

    /// Waits until `c`'s route-sync holds `n` routes from `origin`.
    ///
    /// # Errors
    /// Not within `limit`.
    pub async fn wait_route_count(
        &self,
        c: Cluster,
        origin: &str,
        n: i64,
        limit: Duration,
    ) -> anyhow::Result<()> {
        let start = Instant::now();
        let mut last = -1;
        while start.elapsed() < limit {
            if let Ok(got) = self.route_count(c, origin).await {
                if got == n {
                    return Ok(());
                }
                last = got;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        bail!("{c}'s route-sync holds {last} routes from {origin}, not {n}, after {limit:?}")
    }

    /// Waits for `/readyz` of a process to answer 200.
    ///
    /// # Errors
    /// Not within `limit`, or the process exited; the error carries its log's tail.
    pub async fn wait_ready(&mut self, name: &str, limit: Duration) -> anyhow::Result<()> {
        let (c, admin) = self.admin_of(name);
        let start = Instant::now();
        loop {
            if let Some(status) = self.proc(name).exited() {
                bail!(
                    "{name} exited ({status}) while starting; its log ends:\n{}",
                    self.proc(name).log_tail(20)
                );
            }
            let ok = self
                .net(c)
                .run(async move { http_get(admin, "/readyz").await })
                .await
                .is_ok_and(|(status, _)| status == 200);
            if ok {
                return Ok(());
            }
            if start.elapsed() > limit {
                bail!(
                    "{name} not ready at {admin} after {limit:?}; its log ends:\n{}",
                    self.proc(name).log_tail(20)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// What a process's admin server answers on `/metrics` (Prometheus text format).
    ///
    /// # Errors
    /// The admin server does not answer, or answers other than 200.
    pub async fn metrics(&self, name: &str) -> anyhow::Result<String> {
        let (c, admin) = self.admin_of(name);
        let (status, body) = self
            .net(c)
            .run(async move { http_get(admin, "/metrics").await })
            .await?;
        if status != 200 {
            bail!("{name}: GET /metrics at {admin} answered {status}: {body}");
        }
        Ok(body)
    }

    /// Issues a new leaf certificate (new key, new serial) for a process and writes it over
    /// the old one, as cert-manager or BOSH would. Returns the new serial.
    ///
    /// # Errors
    /// Issuing or writing fails.
    pub fn rotate(&self, name: &str) -> anyhow::Result<String> {
        let (c, component) = split_name(name);
        let kind = if component == "route-sync" {
            Kind::RouteSync
        } else if component == "dns-shim" {
            Kind::DnsShim
        } else {
            Kind::Gateway
        };
        self.issue(c, component, kind)
    }

    /// Handshakes (mTLS, as a gateway of the other cluster would) with the ingress replica
    /// `i` of `c` and returns the serial of the certificate it presents.
    ///
    /// # Errors
    /// The handshake fails.
    pub async fn ingress_serial(&self, c: Cluster, i: u8) -> anyhow::Result<String> {
        let tls = self.ca.mesh_tls(&LeafSpec::new(
            c.other().name(),
            "gateway",
            Duration::from_secs(600),
        ))?;
        let policy = isthmus_certs::PeerPolicy::component(
            TRUST_DOMAIN,
            c.name(),
            isthmus_certs::Component::GATEWAY,
        );
        let connector = tokio_rustls::TlsConnector::from(tls.client_config(policy, &[b"h2"]));
        let addr = self.plan.public_at(c, host::INGRESS + i, port::INGRESS);
        let stream = self
            .net(c.other())
            .run(async move {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
                connector.connect(name, tcp).await
            })
            .await
            .with_context(|| format!("handshake with {addr}"))?;
        let cert = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .ok_or_else(|| anyhow!("{addr} presented no certificate"))?;
        Ok(isthmus_certs::serial_of(cert)?)
    }

    fn issue(&self, c: Cluster, component: &str, kind: Kind) -> anyhow::Result<String> {
        let leaf = self.ca.issue(&LeafSpec::new(
            c.name(),
            kind.as_str(),
            Duration::from_secs(24 * 3600),
        ))?;
        leaf.write(&self.cert_dir(c, component), &self.ca.cert_pem())?;
        Ok(leaf.serial)
    }

    fn cert_dir(&self, c: Cluster, component: &str) -> PathBuf {
        self.opts.dir.join(format!("certs/{c}-{component}"))
    }

    fn admin_of(&self, name: &str) -> (Cluster, SocketAddr) {
        let (c, component) = split_name(name);
        let h = match component {
            "route-sync" => host::ROUTE_SYNC,
            "egress" => host::EGRESS,
            "dns-shim" => host::DNS_SHIM,
            other => {
                let i: u8 = other
                    .strip_prefix("ingress-")
                    .and_then(|i| i.parse().ok())
                    .unwrap_or(0);
                host::INGRESS + i
            }
        };
        (c, self.plan.private_at(c, h, port::ADMIN))
    }

    fn spawn(
        &mut self,
        c: Cluster,
        component: &str,
        kind: Kind,
        yaml: String,
    ) -> anyhow::Result<()> {
        let name = format!("{c}/{component}");
        self.issue(c, component, kind)?;
        let config = self.opts.dir.join(format!("config/{c}-{component}.yaml"));
        std::fs::write(&config, yaml).with_context(|| format!("writing {}", config.display()))?;
        let log = self.opts.dir.join(format!("logs/{c}-{component}.log"));
        let netns = self.opts.netns.then(|| self.plan.netns_name(c));
        let proc = Proc::spawn(&self.opts.exe, &name, kind, &config, netns, &log)?;
        self.procs.insert(name, proc);
        Ok(())
    }

    fn routes_file(&self, c: Cluster) -> PathBuf {
        self.opts.dir.join(format!("config/{c}-routes.yaml"))
    }

    /// Writes `c`'s route file atomically (temporary file, then rename).
    fn write_routes(&self, c: Cluster) -> anyhow::Result<()> {
        let mut yaml = String::from("routes:\n");
        for (app, addr) in &self.clusters[&c].exported {
            yaml.push_str(&format!(
                "  - {{name: {}, port: {}, protocol: {}, home_cluster: {c}, exported: true, \
                 allowed_peers: [\"cluster:{}\"], backends: [\"{addr}\"]}}\n",
                app.host(),
                app.port(),
                app.protocol(),
                c.other(),
            ));
        }
        for r in &self.clusters[&c].extra {
            yaml.push_str(&format!(
                "  - {{name: {}, port: {}, protocol: tcp, home_cluster: {c}, exported: true, \
                 allowed_peers: [\"cluster:{}\"], backends: [\"{}\"]}}\n",
                r.name,
                r.port,
                c.other(),
                r.backend,
            ));
        }
        if self.clusters[&c].exported.is_empty() && self.clusters[&c].extra.is_empty() {
            yaml = "routes: []\n".into();
        }
        let path = self.routes_file(c);
        let tmp = path.with_extension("yaml.tmp");
        std::fs::write(&tmp, yaml).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))?;
        Ok(())
    }

    fn tls_block(&self, c: Cluster, component: &str) -> String {
        let d = self.cert_dir(c, component);
        format!(
            "{{cert: {}, key: {}, bundle: {}, reload_interval: {}ms}}",
            d.join("cert.pem").display(),
            d.join("key.pem").display(),
            d.join("ca.pem").display(),
            self.opts.poll.as_millis()
        )
    }

    fn route_sync_endpoint(&self, c: Cluster) -> SocketAddr {
        self.plan.public_at(c, host::ROUTE_SYNC, port::ROUTE_SYNC)
    }

    fn route_sync_config(&self, c: Cluster) -> String {
        let p = &self.plan;
        let source = match c {
            Cluster::Diego => format!(
                "{{file: {}, poll_interval: {}ms}}",
                self.routes_file(c).display(),
                self.opts.poll.as_millis()
            ),
            Cluster::K8s => format!(
                "{{kubernetes: {{namespaces: [{}], kubeconfig: {}}}}}",
                kube::APPS_NAMESPACE,
                self.kube.route_sync_kubeconfig.display()
            ),
        };
        format!(
            "cluster: {c}\ntrust_domain: {TRUST_DOMAIN}\ntls: {}\nlisten: \"{}\"\n\
             admin: {{listen: \"{}\"}}\nsource: {source}\n\
             peers:\n  - {{cluster: {}, endpoints: [\"{}\"]}}\nstate_dir: {}\n{}",
            self.tls_block(c, "route-sync"),
            self.route_sync_endpoint(c),
            p.private_at(c, host::ROUTE_SYNC, port::ADMIN),
            c.other(),
            self.route_sync_endpoint(c.other()),
            self.opts
                .dir
                .join(format!("state/{c}-route-sync"))
                .display(),
            self.vip_range(c)
                .map(|r| format!("vips: {{range: \"{r}\"}}\n"))
                .unwrap_or_default(),
        )
    }

    fn gateway_head(&self, c: Cluster, component: &str, h: u8) -> String {
        format!(
            "cluster: {c}\ntrust_domain: {TRUST_DOMAIN}\ntls: {}\n\
             routes: {{route_sync: {{endpoints: [\"{}\"], cache: {}}}}}\n\
             admin: {{listen: \"{}\"}}\ndrain_timeout: 2s\n",
            self.tls_block(c, component),
            self.route_sync_endpoint(c),
            self.cache_of(&format!("{c}/{component}")).display(),
            self.plan.private_at(c, h, port::ADMIN),
        )
    }

    fn ingress_config(&self, c: Cluster, i: u8) -> String {
        let h = host::INGRESS + i;
        format!(
            "{}ingress: {{listen: \"{}\", quic: true}}\n",
            self.gateway_head(c, &format!("ingress-{i}"), h),
            self.plan.public_at(c, h, port::INGRESS),
        )
    }

    fn egress_config(&self, c: Cluster) -> String {
        let o = c.other();
        let endpoints: Vec<String> = (0..ingress_replicas(o))
            .map(|i| {
                format!(
                    "\"{}\"",
                    self.plan.public_at(o, host::INGRESS + i, port::INGRESS)
                )
            })
            .collect();
        format!(
            "{}egress:\n  peers:\n    - {{cluster: {o}, endpoints: [{}], transport: {}}}\n  \
             listen_address: {}\n  pool: {{connect_timeout: 500ms, handshake_timeout: 2s}}\n{}",
            self.gateway_head(c, "egress", host::EGRESS),
            endpoints.join(", "),
            self.opts.transport.as_str(),
            self.egress_ip(c),
            self.vip_range(c)
                .map(|r| format!("  vip_range: \"{r}\"\n  bind_vips: true\n"))
                .unwrap_or_default(),
        )
    }

    fn shim_config(&self, c: Cluster) -> String {
        format!(
            "cluster: {c}\ndomains: [apps.internal]\nlisten: \"{}\"\nudp_sockets: 1\n\
             answer: {}\n\
             upstream: {{kind: dns, servers: [\"{}\"]}}\nupstream_timeout: 1s\n\
             routes:\n  route_sync:\n    endpoints: [\"{}\"]\n    trust_domain: {TRUST_DOMAIN}\n    \
             tls: {}\n    cache: {}\n\
             admin: {{listen: \"{}\"}}\ndrain_timeout: 1s\n",
            self.shim_addr(c),
            match self.vip_range(c) {
                Some(_) => "{vip: true}".to_string(),
                None => format!("{{egress: [{}]}}", self.egress_ip(c)),
            },
            self.plan.private_at(c, host::PLATFORM_DNS, port::DNS),
            self.route_sync_endpoint(c),
            self.tls_block(c, "dns-shim"),
            self.opts
                .dir
                .join(format!("state/{c}-dns-shim-routes.pb"))
                .display(),
            self.plan.private_at(c, host::DNS_SHIM, port::ADMIN),
        )
    }

    /// Stops every process gracefully (SIGTERM and drain), then the in-cluster apps.
    pub async fn shutdown(mut self) {
        for p in self.procs.values_mut() {
            p.terminate();
        }
        self.stop.cancel();
        let clusters = std::mem::take(&mut self.clusters);
        for (_, mut state) in clusters {
            for (_, i) in state.instances.drain() {
                state.net.run(i.stop()).await;
            }
        }
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn split_name(name: &str) -> (Cluster, &str) {
    let (c, component) = name.split_once('/').unwrap_or(("diego", name));
    let c = if c == "k8s" {
        Cluster::K8s
    } else {
        Cluster::Diego
    };
    (c, component)
}

/// A bare HTTP/1.1 GET: (status, body).
///
/// # Errors
/// Connection or parse failure within 2 s.
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        anyhow::Ok(String::from_utf8_lossy(&out).into_owned())
    };
    let text = tokio::time::timeout(Duration::from_secs(2), fut)
        .await
        .map_err(|_| anyhow!("GET {path} from {addr} timed out"))??;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("GET {path} from {addr}: not HTTP"))?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    Ok((status, body.to_string()))
}

/// Shared handle for printing progress.
pub type Say = Arc<dyn Fn(String) + Send + Sync>;
