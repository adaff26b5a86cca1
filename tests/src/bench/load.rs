//! The load the client puts on a path: bulk transfers, connection churn, ping-pong, and idle
//! connections held open. Every network wait is bounded.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::{Instant, timeout};

use super::report::ConnRate;
use super::stats::{self, MIB};

/// Time allowed for one connect, one message or one echo.
const STEP: Duration = Duration::from_secs(10);

async fn step<T>(what: &str, f: impl Future<Output = std::io::Result<T>>) -> anyhow::Result<T> {
    match timeout(STEP, f).await {
        Ok(r) => r.with_context(|| what.to_owned()),
        Err(_) => bail!("{what}: no progress within {STEP:?}"),
    }
}

/// Opens `streams` connections to a sink at `addr`, sends `mib_each` MiB on each, half-closes,
/// and waits for every byte count. Returns MiB/s over all streams, from the first connect to
/// the last count. Fails if the whole test takes longer than `limit`.
///
/// # Errors
/// When a stream fails, a count does not match what was sent, or `limit` passes.
pub async fn bulk(
    addr: SocketAddr,
    streams: usize,
    mib_each: u64,
    limit: Duration,
) -> anyhow::Result<f64> {
    let bytes_each = mib_each * MIB as u64;
    let start = Instant::now();
    let mut set = JoinSet::new();
    for _ in 0..streams {
        set.spawn(one_bulk(addr, bytes_each));
    }
    let all = async {
        while let Some(done) = set.join_next().await {
            done.context("bulk stream task")??;
        }
        anyhow::Ok(())
    };
    match timeout(limit, all).await {
        Ok(r) => r?,
        Err(_) => bail!(
            "{streams} x {mib_each} MiB did not finish within {limit:?} (below {:.0} MiB/s)",
            (streams as u64 * mib_each) as f64 / limit.as_secs_f64()
        ),
    }
    stats::mib_per_s(streams as u64 * bytes_each, start.elapsed())
        .context("the transfer took no time")
}

async fn one_bulk(addr: SocketAddr, bytes: u64) -> anyhow::Result<()> {
    let mut s = step("connect", TcpStream::connect(addr)).await?;
    s.set_nodelay(true)?;
    let chunk = vec![0x5au8; 256 * 1024];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        step("send", s.write_all(&chunk[..n])).await?;
        left -= n as u64;
    }
    step("half-close", s.shutdown()).await?;
    let mut count = [0u8; 8];
    step("read the byte count", s.read_exact(&mut count)).await?;
    let got = u64::from_be_bytes(count);
    ensure!(
        got == bytes,
        "the sink counted {got} bytes, {bytes} were sent"
    );
    Ok(())
}

/// Runs `workers` loops for `duration`, each connecting to an echo at `addr`, writing 32
/// bytes, reading them back and closing.
pub async fn conn_rate(addr: SocketAddr, workers: usize, duration: Duration) -> ConnRate {
    let ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let start = Instant::now();
    let deadline = start + duration;
    let mut set = JoinSet::new();
    for _ in 0..workers {
        let (ok, errors, first_error) = (ok.clone(), errors.clone(), first_error.clone());
        set.spawn(async move {
            while Instant::now() < deadline {
                match one_conn(addr).await {
                    Ok(()) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        first_error
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .get_or_insert_with(|| format!("{e:#}"));
                        // A refused connect fails at once: do not spin on it.
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
        });
    }
    while set.join_next().await.is_some() {}
    let seconds = start.elapsed().as_secs_f64();
    let ok = ok.load(Ordering::Relaxed);
    let first_error = first_error.lock().unwrap_or_else(|e| e.into_inner()).take();
    ConnRate {
        per_s: ok as f64 / seconds,
        ok,
        errors: errors.load(Ordering::Relaxed),
        seconds,
        workers,
        first_error,
    }
}

async fn one_conn(addr: SocketAddr) -> anyhow::Result<()> {
    let mut s = step("connect", TcpStream::connect(addr)).await?;
    s.set_nodelay(true)?;
    let msg = [0xa5u8; 32];
    step("write 32 bytes", s.write_all(&msg)).await?;
    let mut back = [0u8; 32];
    step("read the 32-byte echo", s.read_exact(&mut back)).await?;
    ensure!(back == msg, "the echo differs from what was sent");
    Ok(())
}

/// Ping-pongs `size`-byte messages on one connection to an echo at `addr`: `warmup` round
/// trips unmeasured, then `iterations` measured. Returns the round-trip times in ns.
///
/// # Errors
/// When the connection fails or an echo differs.
pub async fn ping_pong(
    addr: SocketAddr,
    size: usize,
    warmup: usize,
    iterations: usize,
) -> anyhow::Result<Vec<u64>> {
    let mut s = step("connect", TcpStream::connect(addr)).await?;
    s.set_nodelay(true)?;
    let msg: Vec<u8> = (0..size).map(|i| i as u8).collect();
    let mut back = vec![0u8; size];
    let mut samples = Vec::with_capacity(iterations);
    for i in 0..warmup + iterations {
        let t = Instant::now();
        step("write a ping", s.write_all(&msg)).await?;
        step("read the pong", s.read_exact(&mut back)).await?;
        let rtt = t.elapsed();
        ensure!(back == msg, "round trip {i}: the echo differs");
        if i >= warmup {
            samples.push(rtt.as_nanos() as u64);
        }
    }
    Ok(samples)
}

/// Opens `n` connections to an echo at `addr`, at most `parallel` at a time, sends one byte
/// on each and reads it back, and returns them open.
///
/// # Errors
/// When any connection fails: the figure would not be about `n` connections.
pub async fn hold_idle(
    addr: SocketAddr,
    n: usize,
    parallel: usize,
) -> anyhow::Result<Vec<TcpStream>> {
    let gate = Arc::new(Semaphore::new(parallel));
    let mut set = JoinSet::new();
    for _ in 0..n {
        let gate = gate.clone();
        set.spawn(async move {
            let _permit = gate.acquire_owned().await?;
            let mut s = step("connect", TcpStream::connect(addr)).await?;
            step("write one byte", s.write_all(b"i")).await?;
            let mut b = [0u8; 1];
            step("read the echo", s.read_exact(&mut b)).await?;
            anyhow::Ok(s)
        });
    }
    let mut held = Vec::with_capacity(n);
    let mut failed = 0usize;
    let mut first = None;
    while let Some(done) = set.join_next().await {
        match done.context("idle connection task").and_then(|r| r) {
            Ok(s) => held.push(s),
            Err(e) => {
                failed += 1;
                first.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first {
        bail!(
            "{failed} of {n} idle connections failed ({} established); first: {e:#}",
            held.len()
        );
    }
    Ok(held)
}

/// Sends `payload` to an echo at `addr` and checks it comes back.
///
/// # Errors
/// When the round trip fails or the echo differs.
pub async fn probe(addr: SocketAddr) -> anyhow::Result<()> {
    let mut s = step("connect", TcpStream::connect(addr)).await?;
    let msg = b"isthmus-bench probe";
    step("write the probe", s.write_all(msg)).await?;
    let mut back = [0u8; 19];
    step("read the probe echo", s.read_exact(&mut back)).await?;
    ensure!(&back == msg, "the probe echo differs");
    Ok(())
}
