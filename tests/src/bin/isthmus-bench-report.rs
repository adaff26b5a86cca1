//! `isthmus-bench-report`: one table from the gateway, DNS shim and route-sync benchmarks'
//! JSON documents. `tests/bench/all.sh` runs the three benchmarks and then this.
//!
//! ```sh
//! bash tests/bench/all.sh [--quick] [--json PATH]
//! isthmus-bench-report --gateway g.json --dns d.json --route-sync r.json [--json all.json]
//! ```
//!
//! A document that is missing or not JSON makes its component "failed"; so does `--failed
//! COMPONENT=REASON`, which the script passes for a benchmark that exited non-zero. Missing
//! figures print as `-`. See [`isthmus_tests::bench::combined`] for the targets.
//!
//! Exits 0 whenever it printed the table, whatever the verdicts: the script decides its own
//! exit status from the benchmarks'.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use clap::Parser;
use isthmus_tests::bench::combined::{self, Combined, Component, Source};

/// Prints the gateway, DNS shim and route-sync benchmark results as one table of targets.
#[derive(Parser, Debug)]
#[command(about)]
struct Args {
    /// The gateway benchmark's JSON (`tests/bench/gateway.sh --json`).
    #[arg(long)]
    gateway: Option<PathBuf>,
    /// The DNS shim benchmark's JSON (`dns-shim/bench/dns.sh --json`).
    #[arg(long)]
    dns: Option<PathBuf>,
    /// The route-sync benchmark's JSON (`cargo run -p isthmus-route-sync --example bench --
    /// --json`).
    #[arg(long)]
    route_sync: Option<PathBuf>,
    /// COMPONENT=REASON: the benchmark of COMPONENT (gateway, dns, route-sync) failed, for
    /// REASON (its exit status and log, say). Repeatable.
    #[arg(long, value_name = "COMPONENT=REASON")]
    failed: Vec<String>,
    /// Also write the combined report, with each benchmark's own document, as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn read(path: Option<&Path>) -> Source {
    match path {
        // Not asked for: its rows print as not measured.
        None => Source::default(),
        Some(p) => Source::from_file(
            &p.display().to_string(),
            std::fs::read_to_string(p).map_err(|e| e.to_string()),
        ),
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut gateway = read(args.gateway.as_deref());
    let mut dns = read(args.dns.as_deref());
    let mut route_sync = read(args.route_sync.as_deref());
    for f in &args.failed {
        let Some((name, why)) = f.split_once('=') else {
            bail!("--failed {f:?}: expected COMPONENT=REASON");
        };
        match Component::parse(name) {
            Some(Component::Gateway) => gateway.fail(why),
            Some(Component::Dns) => dns.fail(why),
            Some(Component::RouteSync) => route_sync.fail(why),
            None => bail!(
                "--failed {f:?}: unknown component {name:?}: expected gateway, dns or route-sync"
            ),
        }
    }
    let report = Combined::new(vec![
        combined::gateway(&gateway),
        combined::dns(&dns),
        combined::route_sync(&route_sync),
    ]);
    print!("{}", combined::table(&report));
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, json + "\n").with_context(|| format!("writing {}", path.display()))?;
        println!("JSON written to {}", path.display());
    }
    Ok(())
}
