//! `isthmus-demo`: two clusters on this machine, and an app migrating between them live.
//!
//! Makes a CA and a SPIFFE identity per component, starts diego and k8s (route-sync, DNS
//! shim, egress, ingress replicas: real processes of this same executable), puts steady
//! load on four callers, walks `orders` from diego to k8s and back, prints a table of
//! requests, failures and latency per step, then keeps the world up with commands to try
//! until Ctrl+C (or exits with `--once`). Exits 1 if any call failed.
//!
//! `isthmus-demo component <route-sync|gateway|dns-shim> --config FILE` runs one component
//! (how the world starts its processes).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use isthmus_tests::world::net::{Cluster, host, port};
use isthmus_tests::world::scenario::{self, Pace};
use isthmus_tests::world::{App, Options, Say, Transport, World, ingress_replicas};

/// Two clusters on this machine, and an app migrating between them under load.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Walk the migration once, print the table and exit (no interactive phase).
    #[arg(long)]
    once: bool,
    /// Egress-to-ingress transport: tcp (TLS 1.3, HTTP/2 CONNECT) or quic.
    #[arg(long, default_value = "tcp")]
    transport: Transport,
    /// Where certificates, configs, route files, state and logs go (emptied first).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Second octet of every address: the world is 127.ID.1.x (diego), 127.ID.2.x (k8s).
    #[arg(long, default_value_t = 42)]
    id: u8,
    /// Put each cluster in its own network namespace joined by a veth pair (root only).
    #[arg(long)]
    netns: bool,
    /// Short steps (what the tests use) instead of ones a person can follow.
    #[arg(long)]
    quick: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run one component (used by the world to start its processes).
    #[command(hide = true)]
    Component {
        /// route-sync, gateway or dns-shim.
        kind: String,
        /// Its configuration file.
        #[arg(long)]
        config: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(Command::Component { kind, config }) = &args.command {
        return isthmus_tests::world::procs::run_component(kind, config);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let failures = runtime.block_on(demo(args))?;
    if failures > 0 {
        std::process::exit(1);
    }
    Ok(())
}

async fn demo(args: Args) -> anyhow::Result<usize> {
    anyhow::ensure!(
        (1..=254).contains(&args.id),
        "--id {}: expected 1 to 254",
        args.id
    );
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("isthmus-demo-{}", args.id)));
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("emptying {}", dir.display()))?;
    }
    let exe = std::env::current_exe().context("finding this executable")?;
    let mut opts = Options::new(args.id, &dir, exe);
    opts.transport = args.transport;
    opts.netns = args.netns;
    let pace = if args.quick {
        Pace::quick()
    } else {
        Pace::demo()
    };

    println!(
        "Isthmus demo: two clusters on this machine, tunnels over {:?}",
        args.transport
    );
    println!("  files and logs: {}", dir.display());
    let mut world = World::start(opts)
        .await
        .context("starting the two clusters")?;
    print_layout(&world);
    scenario::seed(&mut world, &pace).await?;
    println!();
    println!("Walking orders.apps.internal from diego to k8s and back, under steady load:");
    let say: Say = Arc::new(|line| println!("{line}"));
    let walked = scenario::walk(&mut world, pace, say).await?;
    let failures: usize = walked.rows.iter().map(|r| r.failures).sum();
    let requests: usize = walked.rows.iter().map(|r| r.requests).sum();
    println!();
    print!("{}", scenario::table(&walked.rows));
    println!();
    println!("{requests} requests, {failures} failed.");
    if args.once {
        world.shutdown().await;
        return Ok(failures);
    }
    print_try(&world);
    tokio::signal::ctrl_c().await?;
    println!("\nstopping...");
    world.shutdown().await;
    Ok(failures)
}

fn print_layout(world: &World) {
    let p = world.plan;
    for c in Cluster::ALL {
        let ingress: Vec<String> = (0..ingress_replicas(c))
            .map(|i| p.public_at(c, host::INGRESS + i, port::INGRESS).to_string())
            .collect();
        let vips = world
            .vip_range(c)
            .map(|r| format!(" (VIPs {r})"))
            .unwrap_or_default();
        println!(
            "  {c:<5}  route-sync {}  dns-shim {}  egress {}{vips}  ingress {}",
            p.public_at(c, host::ROUTE_SYNC, port::ROUTE_SYNC),
            world.shim_addr(c),
            world.egress_ip(c),
            ingress.join(" ")
        );
    }
    println!(
        "  {:<5}  Kubernetes API {} (a fixture: see docs/architecture.md), kubectl with KUBECONFIG={}",
        Cluster::K8s,
        world.kube_api().url(),
        world.kubeconfig().display()
    );
}

fn print_try(world: &World) {
    let (d, k) = (Cluster::Diego, Cluster::K8s);
    let shim = world.shim_addr(d);
    let dir = world.dir().display();
    println!();
    println!("The world keeps running. Try (Ctrl+C to stop):");
    println!(
        "  dig @{} -p {} orders.apps.internal +short            # diego's shim: a local instance",
        shim.ip(),
        shim.port()
    );
    println!(
        "  dig @{} -p {} echo.apps.internal +short              # homed in k8s: its VIP at diego's egress",
        shim.ip(),
        shim.port()
    );
    println!(
        "  curl -s -H 'Host: billing.apps.internal' http://{}:{}/   # k8s egress -> diego",
        world.egress_ip(k),
        App::Billing.port()
    );
    println!(
        "  curl -s -H 'Host: orders.apps.internal' http://{}:{}/    # same name, from k8s",
        world.egress_ip(k),
        App::Orders.port()
    );
    println!(
        "  curl -s http://{}:{}/metrics | grep isthmus_gateway_connections",
        world.egress_ip(k),
        port::ADMIN
    );
    println!(
        "  curl -sk https://{}/ ; echo \"exit $?\"   # no client certificate: refused",
        world.plan.public_at(k, host::INGRESS, port::INGRESS)
    );
    println!(
        "  cargo run -q -p isthmus-route-sync -- status --config {dir}/config/diego-route-sync.yaml"
    );
    println!(
        "  KUBECONFIG={} kubectl -n apps get services,endpointslices,serviceexports",
        world.kubeconfig().display()
    );
    println!("  tail -f {dir}/logs/*.log");
}
