//! Where each cluster lives: the address plan, the network namespaces of root mode, and
//! the runtime that acts "inside" a cluster (its apps, its platform DNS, its clients).
//!
//! Every address of world `id` is `127.<id>.<cluster>.<host>`: on loopback (the default)
//! all of them answer on the one machine; in namespace mode each cluster has its own
//! loopback and only the addresses other clusters must reach (route-sync, ingress
//! replicas) are "public", `10.<id>.<cluster>.<host>` on the veth pair joining the two.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;

use anyhow::{Context as _, bail};

/// One of the two clusters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Cluster {
    /// CF on BOSH VMs.
    Diego,
    /// CF on Kubernetes.
    K8s,
}

impl Cluster {
    /// Both, in a fixed order.
    pub const ALL: [Cluster; 2] = [Cluster::Diego, Cluster::K8s];

    /// The cluster name, as in SPIFFE IDs and routes.
    pub fn name(self) -> &'static str {
        match self {
            Cluster::Diego => "diego",
            Cluster::K8s => "k8s",
        }
    }

    /// The other cluster.
    pub fn other(self) -> Cluster {
        match self {
            Cluster::Diego => Cluster::K8s,
            Cluster::K8s => Cluster::Diego,
        }
    }

    fn octet(self) -> u8 {
        match self {
            Cluster::Diego => 1,
            Cluster::K8s => 2,
        }
    }
}

impl fmt::Display for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The last octet of each component's address within its cluster.
pub mod host {
    /// The egress gateway (and the shared egress address the DNS shim hands out).
    pub const EGRESS: u8 = 1;
    /// The DNS shim.
    pub const DNS_SHIM: u8 = 2;
    /// route-sync (public).
    pub const ROUTE_SYNC: u8 = 3;
    /// Ingress replica `i` is `INGRESS + i` (public).
    pub const INGRESS: u8 = 4;
    /// The platform's own resolver (bosh-dns or CoreDNS stand-in).
    pub const PLATFORM_DNS: u8 = 8;
    /// The Kubernetes API server (the fixture; k8s only, private).
    pub const KUBE_API: u8 = 9;
    /// App instances from here up.
    pub const APPS: u8 = 10;
}

/// Ports, the same in every cluster (each component has its own address).
pub mod port {
    /// route-sync gRPC.
    pub const ROUTE_SYNC: u16 = 15010;
    /// Tunnels (TLS/TCP and QUIC).
    pub const INGRESS: u16 = 15008;
    /// Admin servers.
    pub const ADMIN: u16 = 15020;
    /// The Kubernetes API server.
    pub const KUBE_API: u16 = 6443;
    /// DNS (shim and platform resolver): unprivileged, so no root is needed.
    pub const DNS: u16 = 10053;
}

/// The address plan of one world.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    /// The world's number: the second octet of all its addresses.
    pub id: u8,
    /// Each cluster in its own network namespace.
    pub netns: bool,
}

impl Plan {
    /// A component's address inside its cluster.
    pub fn private(&self, cluster: Cluster, host: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(127, self.id, cluster.octet(), host))
    }

    /// The address other clusters reach a component on.
    pub fn public(&self, cluster: Cluster, host: u8) -> IpAddr {
        if self.netns {
            IpAddr::V4(Ipv4Addr::new(10, self.id, cluster.octet(), host))
        } else {
            self.private(cluster, host)
        }
    }

    /// `private(cluster, host):port`.
    pub fn private_at(&self, cluster: Cluster, host: u8, port: u16) -> SocketAddr {
        SocketAddr::new(self.private(cluster, host), port)
    }

    /// `public(cluster, host):port`.
    pub fn public_at(&self, cluster: Cluster, host: u8, port: u16) -> SocketAddr {
        SocketAddr::new(self.public(cluster, host), port)
    }

    /// The network namespace of a cluster (namespace mode).
    pub fn netns_name(&self, cluster: Cluster) -> String {
        format!("isthmus-{}-{}", self.id, cluster.name())
    }

    fn veth_name(&self, cluster: Cluster) -> String {
        format!("ism{}{}", self.id, &cluster.name()[..1])
    }
}

/// The two namespaces and the veth pair of namespace mode; removed on drop.
pub struct Namespaces {
    plan: Plan,
}

impl Namespaces {
    /// Creates `isthmus-<id>-diego` and `isthmus-<id>-k8s`, each with its loopback up, and a
    /// veth pair between them carrying the public addresses of `public_hosts`.
    ///
    /// # Errors
    /// Not root, no `ip` command, or the kernel refuses: said plainly, never skipped.
    pub fn create(plan: Plan, public_hosts: &[u8]) -> anyhow::Result<Namespaces> {
        if !nix::unistd::geteuid().is_root() {
            bail!(
                "network namespace mode needs root (euid is {})",
                nix::unistd::geteuid()
            );
        }
        if Command::new("ip").arg("-V").output().is_err() {
            bail!("network namespace mode needs the `ip` command (Debian package iproute2)");
        }
        let ns = Namespaces { plan };
        ns.remove();
        for c in Cluster::ALL {
            ip(&["netns", "add", &plan.netns_name(c)])?;
            ip(&["-n", &plan.netns_name(c), "link", "set", "lo", "up"])?;
        }
        let (d, k) = (plan.veth_name(Cluster::Diego), plan.veth_name(Cluster::K8s));
        ip(&["link", "add", &d, "type", "veth", "peer", "name", &k])?;
        for c in Cluster::ALL {
            let (veth, name) = (plan.veth_name(c), plan.netns_name(c));
            ip(&["link", "set", &veth, "netns", &name])?;
            for &h in public_hosts {
                let addr = format!("{}/16", plan.public(c, h));
                ip(&["-n", &name, "addr", "add", &addr, "dev", &veth])?;
            }
            ip(&["-n", &name, "link", "set", &veth, "up"])?;
        }
        Ok(ns)
    }

    fn remove(&self) {
        for c in Cluster::ALL {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.plan.netns_name(c)])
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        self.remove();
    }
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .with_context(|| format!("running ip {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A tokio runtime whose sockets live in a cluster's network: the current one on loopback,
/// a thread that entered the cluster's namespace otherwise. Sockets keep the namespace they
/// were made in, whichever thread later polls them.
pub struct ClusterNet {
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ClusterNet {
    /// The caller's runtime (loopback mode).
    pub fn here() -> ClusterNet {
        ClusterNet {
            handle: tokio::runtime::Handle::current(),
            stop: None,
            thread: None,
        }
    }

    /// A runtime on a thread inside network namespace `name`.
    ///
    /// # Errors
    /// The namespace cannot be opened or entered.
    pub fn inside(name: &str) -> anyhow::Result<ClusterNet> {
        let path = format!("/run/netns/{name}");
        let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(format!("net-{name}"))
            .spawn(move || {
                let entered = nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|e| anyhow::anyhow!("entering the network namespace: {e}"))
                    .and_then(|()| {
                        tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                            .map_err(anyhow::Error::from)
                    });
                match entered {
                    Ok(rt) => {
                        let _ = tx.send(Ok(rt.handle().clone()));
                        rt.block_on(async move {
                            let _ = stopped.await;
                        });
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            })?;
        let handle = rx
            .recv()
            .context("the namespace thread ended before starting")??;
        Ok(ClusterNet {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Runs `fut` on this cluster's network and waits for it.
    pub async fn run<F>(&self, fut: F) -> F::Output
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        match self.handle.spawn(fut).await {
            Ok(out) => out,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }

    /// Spawns `fut` on this cluster's network.
    pub fn spawn<F>(&self, fut: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle.spawn(fut)
    }
}

impl Drop for ClusterNet {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
