//! Apps calling apps: a DNS lookup through the cluster's shim, then a connection to the
//! answer, per request (as a CF app with TTL-0 internal names does), and steady load with
//! results kept per step of a scenario.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

use super::apps::AppKind;

/// Time allowed for each part of a call: lookup, connect, exchange.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// Resolves `name` (A) through the DNS server at `dns`, over UDP, retrying once on loss.
///
/// # Errors
/// No answer, an error code, or no A record.
pub async fn lookup(dns: SocketAddr, name: &str) -> anyhow::Result<IpAddr> {
    let mut q = Message::new(rand::random(), MessageType::Query, OpCode::Query);
    q.metadata.recursion_desired = true;
    q.add_query(Query::query(
        Name::from_ascii(name).with_context(|| format!("{name} is not a DNS name"))?,
        RecordType::A,
    ));
    let packet = q.to_vec()?;
    let bind: SocketAddr = match dns {
        SocketAddr::V4(_) => "0.0.0.0:0".parse()?,
        SocketAddr::V6(_) => "[::]:0".parse()?,
    };
    let socket = UdpSocket::bind(bind).await?;
    socket.connect(dns).await?;
    let mut buf = vec![0u8; 4096];
    for _ in 0..2 {
        socket.send(&packet).await?;
        let Ok(n) = timeout(Duration::from_secs(1), socket.recv(&mut buf)).await else {
            continue;
        };
        let reply = Message::from_vec(&buf[..n?])?;
        if reply.metadata.id != q.metadata.id {
            continue;
        }
        if reply.metadata.response_code != ResponseCode::NoError {
            bail!("{name}: {} from {dns}", reply.metadata.response_code);
        }
        return reply
            .answers
            .iter()
            .find_map(|r| match &r.data {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                _ => None,
            })
            .ok_or_else(|| anyhow!("{name}: no A record from {dns}"));
    }
    bail!("{name}: no answer from {dns} in 2 s")
}

/// Which app instance answered a call, as the app says it: `<app> served by
/// <cluster>/<instance>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Served {
    /// The app's short name (`orders`).
    pub app: String,
    /// The cluster it runs in.
    pub cluster: String,
    /// The instance (`orders-k8s-0`).
    pub instance: String,
}

impl Served {
    /// Parses the self-description every world app sends.
    ///
    /// # Errors
    /// Text of another shape.
    pub fn parse(text: &str) -> anyhow::Result<Served> {
        let line = text.lines().next().unwrap_or("").trim();
        let (app, place) = line
            .split_once(" served by ")
            .ok_or_else(|| anyhow!("{line:?} is not `<app> served by <cluster>/<instance>`"))?;
        let (cluster, instance) = place
            .split_once('/')
            .ok_or_else(|| anyhow!("{line:?}: no `<cluster>/<instance>`"))?;
        Ok(Served {
            app: app.to_string(),
            cluster: cluster.to_string(),
            instance: instance.to_string(),
        })
    }
}

impl std::fmt::Display for Served {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} served by {}/{}",
            self.app, self.cluster, self.instance
        )
    }
}

/// A reply from an app other than the one called: the worst outcome a mesh can have, so it
/// is its own error, counted apart from other failures.
#[derive(Debug, thiserror::Error)]
#[error("wrong app: called {wanted}, answered by {served}")]
pub struct WrongApp {
    /// The app the caller named.
    pub wanted: String,
    /// Who answered.
    pub served: Served,
}

fn expect_app(served: Served, wanted: &str) -> anyhow::Result<Served> {
    if served.app == wanted {
        Ok(served)
    } else {
        Err(WrongApp {
            wanted: wanted.to_string(),
            served,
        }
        .into())
    }
}

/// Calls an HTTP app: `GET /` with the route as Host, one request per connection. Returns
/// who served it, which must be `app`.
///
/// # Errors
/// Anything but a complete 200 from `app`; [`WrongApp`] when another app answered.
pub async fn call_http(addr: SocketAddr, host: &str, app: &str) -> anyhow::Result<Served> {
    let mut s = timeout(CALL_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| anyhow!("connect to {addr} timed out"))?
        .with_context(|| format!("connect to {addr}"))?;
    let request = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    let mut reply = Vec::new();
    timeout(CALL_TIMEOUT, async {
        s.write_all(request.as_bytes()).await?;
        s.read_to_end(&mut reply).await
    })
    .await
    .map_err(|_| anyhow!("{host} via {addr}: no complete reply in 3 s"))?
    .with_context(|| format!("{host} via {addr}"))?;
    let text = String::from_utf8_lossy(&reply);
    if !text.starts_with("HTTP/1.1 200") {
        bail!(
            "{host} via {addr}: {:?}",
            text.lines().next().unwrap_or("(empty reply)")
        );
    }
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let served = Served::parse(body).with_context(|| format!("{host} via {addr}"))?;
    expect_app(served, app)
}

/// Reads the echo app's first line (who it is), sends 64 random bytes, half-closes, and
/// checks they all come back. Returns who served it, which must be `app`.
///
/// # Errors
/// A connection failure, different bytes; [`WrongApp`] when another app answered.
pub async fn call_echo(addr: SocketAddr, app: &str) -> anyhow::Result<Served> {
    let mut s = timeout(CALL_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| anyhow!("connect to {addr} timed out"))?
        .with_context(|| format!("connect to {addr}"))?;
    let sent: [u8; 64] = rand::random();
    let mut back = Vec::new();
    timeout(CALL_TIMEOUT, async {
        s.write_all(&sent).await?;
        s.shutdown().await?;
        s.read_to_end(&mut back).await
    })
    .await
    .map_err(|_| anyhow!("echo via {addr}: no complete reply in 3 s"))?
    .with_context(|| format!("echo via {addr}"))?;
    let Some(newline) = back.iter().position(|b| *b == b'\n') else {
        bail!(
            "echo via {addr}: no `served by` line in {} bytes",
            back.len()
        );
    };
    let served = Served::parse(&String::from_utf8_lossy(&back[..newline]))
        .with_context(|| format!("echo via {addr}"))?;
    let served = expect_app(served, app)?;
    let echoed = &back[newline + 1..];
    if echoed != sent {
        bail!(
            "echo via {addr}: {} bytes back, not the 64 sent",
            echoed.len()
        );
    }
    Ok(served)
}

/// One stream of calls: from a cluster, to a route, by name.
#[derive(Clone, Debug)]
pub struct Caller {
    /// `diego → orders`.
    pub label: String,
    /// The calling app's DNS server (its cluster's shim).
    pub dns: SocketAddr,
    /// The route name.
    pub name: String,
    /// The app that must answer (its short name, as it introduces itself).
    pub app: String,
    /// The route port.
    pub port: u16,
    /// HTTP or echo.
    pub kind: AppKind,
}

impl Caller {
    /// One call: lookup, connect, exchange. Returns who served it.
    ///
    /// # Errors
    /// Any part failing; [`WrongApp`] when an app other than `app` answered.
    pub async fn call(&self) -> anyhow::Result<Served> {
        let ip = lookup(self.dns, &self.name).await?;
        let addr = SocketAddr::new(ip, self.port);
        match self.kind {
            AppKind::Http => {
                call_http(addr, &format!("{}:{}", self.name, self.port), &self.app).await
            }
            AppKind::Echo => call_echo(addr, &self.app).await,
        }
    }
}

/// One finished call.
#[derive(Clone, Debug)]
struct Sample {
    caller: usize,
    step: usize,
    latency: Duration,
    outcome: Result<Served, Failure>,
}

/// A failed call: why, and whether another app answered.
#[derive(Clone, Debug)]
struct Failure {
    message: String,
    wrong_app: bool,
}

/// Results of calls, kept by scenario step, and the calls still in flight by epoch (the
/// world bumps the epoch when it moves a route, to wait for calls that began before).
#[derive(Default)]
pub struct Recorder {
    step: AtomicUsize,
    samples: Mutex<Vec<Sample>>,
    epochs: Mutex<Vec<usize>>,
    callers: Mutex<Vec<String>>,
}

impl Recorder {
    /// A recorder at step 0, epoch 0.
    pub fn new() -> Arc<Recorder> {
        let r = Recorder::default();
        r.epochs.lock().unwrap().push(0);
        Arc::new(r)
    }

    /// Calls from now on count towards `step`.
    pub fn set_step(&self, step: usize) {
        self.step.store(step, Ordering::SeqCst);
    }

    /// Starts a new epoch and returns the previous one.
    pub fn bump_epoch(&self) -> usize {
        let mut e = self.epochs.lock().unwrap();
        e.push(0);
        e.len() - 2
    }

    /// Calls that began in `epoch` or earlier and have not finished.
    pub fn in_flight_until(&self, epoch: usize) -> usize {
        self.epochs.lock().unwrap()[..=epoch].iter().sum()
    }

    fn begin(&self) -> (usize, usize) {
        let mut e = self.epochs.lock().unwrap();
        let epoch = e.len() - 1;
        e[epoch] += 1;
        (epoch, self.step.load(Ordering::SeqCst))
    }

    fn end(&self, epoch: usize, sample: Sample) {
        self.epochs.lock().unwrap()[epoch] -= 1;
        self.samples.lock().unwrap().push(sample);
    }

    /// Calls finished so far in `step`, per caller.
    pub fn counts(&self, step: usize) -> Vec<usize> {
        let n = self.callers.lock().unwrap().len();
        let mut counts = vec![0; n];
        for s in self.samples.lock().unwrap().iter() {
            if s.step == step {
                counts[s.caller] += 1;
            }
        }
        counts
    }

    /// Replies from an app other than the one called, so far, all steps (also counted
    /// in [`failures`](Recorder::failures)).
    pub fn wrong_app(&self) -> usize {
        self.samples
            .lock()
            .unwrap()
            .iter()
            .filter(|s| matches!(&s.outcome, Err(f) if f.wrong_app))
            .count()
    }

    /// Failures so far, all steps.
    pub fn failures(&self) -> usize {
        self.samples
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.outcome.is_err())
            .count()
    }

    /// Per step and caller: counts, failures, latency percentiles, who served.
    pub fn summary(&self) -> Vec<Row> {
        let callers = self.callers.lock().unwrap().clone();
        let samples = self.samples.lock().unwrap();
        let mut rows: BTreeMap<(usize, usize), Row> = BTreeMap::new();
        let mut latencies: BTreeMap<(usize, usize), Vec<Duration>> = BTreeMap::new();
        for s in samples.iter() {
            let row = rows.entry((s.step, s.caller)).or_insert_with(|| Row {
                step: s.step,
                caller: callers[s.caller].clone(),
                ..Row::default()
            });
            row.requests += 1;
            match &s.outcome {
                Ok(served) => {
                    *row.served_by.entry(served.cluster.clone()).or_default() += 1;
                }
                Err(e) => {
                    row.failures += 1;
                    row.wrong_app += usize::from(e.wrong_app);
                    if row.errors.len() < 3 {
                        row.errors.push(e.message.clone());
                    }
                }
            }
            latencies
                .entry((s.step, s.caller))
                .or_default()
                .push(s.latency);
        }
        for (key, mut l) in latencies {
            l.sort();
            let row = rows.get_mut(&key).expect("row of each sample");
            row.p50 = percentile(&l, 0.50);
            row.p99 = percentile(&l, 0.99);
        }
        rows.into_values().collect()
    }
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// One line of the closing table.
#[derive(Clone, Debug, Default)]
pub struct Row {
    /// Scenario step.
    pub step: usize,
    /// The caller's label.
    pub caller: String,
    /// Calls finished.
    pub requests: usize,
    /// Calls failed, wrong-app replies included.
    pub failures: usize,
    /// Calls answered by an app other than the one called.
    pub wrong_app: usize,
    /// Median latency of a whole call (lookup, connect, exchange).
    pub p50: Duration,
    /// 99th percentile latency.
    pub p99: Duration,
    /// Successful calls (the right app answered) by the cluster that served them.
    pub served_by: BTreeMap<String, usize>,
    /// The first few errors.
    pub errors: Vec<String>,
}

/// Steady load: each caller calls every `interval` from `workers` tasks, on its cluster's
/// network, until stopped.
pub struct Load {
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    /// Starts the callers; `spawn` puts each worker on its caller's cluster network.
    pub fn start(
        recorder: &Arc<Recorder>,
        callers: Vec<(Caller, &super::net::ClusterNet)>,
        workers: usize,
        interval: Duration,
    ) -> Load {
        let stop = CancellationToken::new();
        let mut tasks = Vec::new();
        let mut names = recorder.callers.lock().unwrap();
        for (caller, net) in callers {
            let index = names.len();
            names.push(caller.label.clone());
            let caller = Arc::new(caller);
            for w in 0..workers {
                let (caller, recorder, stop) =
                    (Arc::clone(&caller), Arc::clone(recorder), stop.clone());
                tasks.push(net.spawn(async move {
                    // Spread the workers over the interval.
                    let offset = interval * w as u32 / workers as u32;
                    let mut tick =
                        tokio::time::interval_at(tokio::time::Instant::now() + offset, interval);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    loop {
                        tokio::select! {
                            () = stop.cancelled() => return,
                            _ = tick.tick() => {}
                        }
                        let (epoch, step) = recorder.begin();
                        let started = Instant::now();
                        let outcome = caller.call().await.map_err(|e| Failure {
                            wrong_app: e.downcast_ref::<WrongApp>().is_some(),
                            message: format!("{e:#}"),
                        });
                        recorder.end(
                            epoch,
                            Sample {
                                caller: index,
                                step,
                                latency: started.elapsed(),
                                outcome,
                            },
                        );
                    }
                }));
            }
        }
        Load { stop, tasks }
    }

    /// Stops calling and waits for calls in flight.
    pub async fn stop(self) {
        self.stop.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
    }
}
