//! `isthmus-bench-gateway`: the gateway benchmark. Run it through `tests/bench/gateway.sh`,
//! which installs HAProxy and builds the release binaries first.
//!
//! ```sh
//! bash tests/bench/gateway.sh [--quick] [--json PATH]
//! ```
//!
//! See [`isthmus_tests::bench`] for what it measures.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context as _, bail};
use clap::Parser;
use isthmus_tests::bench::backend::{self, BackendKind};
use isthmus_tests::bench::report::PathKind;
use isthmus_tests::bench::run::{self, Options};
use isthmus_tests::bench::table;

/// Benchmarks the Isthmus gateway against a direct connection and a HAProxy mTLS pair.
#[derive(Parser, Debug)]
#[command(about)]
struct Args {
    /// Also write every number and target verdict as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Smaller sizes: about a minute instead of a few.
    #[arg(long)]
    quick: bool,
    /// The isthmus-gateway binary [default: beside this executable].
    #[arg(long)]
    gateway: Option<PathBuf>,
    /// The haproxy binary.
    #[arg(long, default_value = "haproxy")]
    haproxy: String,
    /// Paths to measure, comma-separated: direct, isthmus-tcp, isthmus-quic, haproxy.
    #[arg(long, value_delimiter = ',')]
    paths: Vec<String>,
    /// Directory for certificates, configurations and logs [default: a new /tmp/isthmus-bench-*].
    #[arg(long)]
    workdir: Option<PathBuf>,
    /// Internal: serve a backend on `--port` instead of benchmarking.
    #[arg(long, hide = true, value_enum)]
    serve_backend: Option<BackendKind>,
    /// Internal: the backend's port.
    #[arg(long, hide = true)]
    port: Option<u16>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if let Some(kind) = args.serve_backend {
        let port = args.port.context("--serve-backend needs --port")?;
        return rt.block_on(backend::serve(
            kind,
            SocketAddr::from(([127, 0, 0, 1], port)),
        ));
    }

    let self_exe = std::env::current_exe().context("finding this executable")?;
    let gateway = match args.gateway {
        Some(g) => g,
        None => self_exe.with_file_name("isthmus-gateway"),
    };
    if !gateway.is_file() {
        bail!(
            "{} not found: build it with `cargo build --release -p isthmus-gateway` or pass \
             --gateway",
            gateway.display()
        );
    }
    let paths = if args.paths.is_empty() {
        PathKind::ALL.to_vec()
    } else {
        let mut out = Vec::new();
        for name in &args.paths {
            out.push(PathKind::parse(name).with_context(|| {
                format!(
                    "unknown path {name:?}: expected direct, isthmus-tcp, isthmus-quic or haproxy"
                )
            })?);
        }
        // Table order, whatever the order given.
        PathKind::ALL
            .into_iter()
            .filter(|k| out.contains(k))
            .collect()
    };
    let workdir = match args.workdir {
        Some(d) => {
            std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
            d
        }
        None => tempfile::Builder::new()
            .prefix("isthmus-bench-")
            .tempdir()
            .context("creating a work directory")?
            .keep(),
    };
    let opts = Options {
        quick: args.quick,
        paths,
        gateway,
        haproxy: args.haproxy,
        self_exe,
        workdir,
    };

    let report = rt.block_on(run::run(&opts))?;
    println!();
    print!("{}", table::main_table(&report.paths, &report.params));
    println!();
    print!("{}", table::targets_table(&report.targets));
    if let Some(l) = report.machine.loadavg_end {
        println!(
            "\nload average at end: {} {} {} (the benchmark's own load included)",
            l[0], l[1], l[2]
        );
    }
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, json + "\n").with_context(|| format!("writing {}", path.display()))?;
        println!("\nJSON written to {}", path.display());
    }
    // Shut the runtime down without waiting on any task a timed-out measurement left behind.
    rt.shutdown_background();
    Ok(())
}
