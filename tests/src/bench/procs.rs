//! Child processes of a run (backends, gateways, HAProxy), free ports, and what /proc says
//! about them. Every child belongs to a [`Procs`] guard that stops it when dropped, so a
//! failing measurement or a panic never leaves a gateway behind.

use std::fs::File;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::time::Instant;

/// How long a child gets to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// One child with its log file.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

/// Children that are stopped (SIGTERM, then SIGKILL after a grace period) when this guard is
/// dropped, last started first.
#[derive(Default)]
pub struct Procs {
    children: Vec<Proc>,
}

impl Procs {
    /// Starts `cmd` with stdin closed, stdout discarded and stderr appended to `log`.
    ///
    /// # Errors
    /// When the log file cannot be created or the program cannot be started.
    pub fn spawn(&mut self, name: &str, mut cmd: Command, log: &Path) -> anyhow::Result<u32> {
        let file = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(file));
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        let pid = child.id();
        self.children.push(Proc {
            name: name.into(),
            child,
            log: log.to_owned(),
        });
        Ok(pid)
    }

    /// Fails with the child's exit status and the end of its log if `pid` has exited.
    ///
    /// # Errors
    /// When the child has exited (it should not have).
    pub fn check_alive(&mut self, pid: u32) -> anyhow::Result<()> {
        let Some(p) = self.children.iter_mut().find(|p| p.child.id() == pid) else {
            bail!("no child with pid {pid}");
        };
        if let Ok(Some(status)) = p.child.try_wait() {
            bail!(
                "{} exited ({status}); end of {}:\n{}",
                p.name,
                p.log.display(),
                log_tail(&p.log, 15)
            );
        }
        Ok(())
    }

    /// Waits until `addr` accepts TCP connections, at most `limit`, failing early if `pid`
    /// exits.
    ///
    /// # Errors
    /// When the child exits or the port does not accept within `limit`.
    pub async fn wait_for_port(
        &mut self,
        pid: u32,
        addr: SocketAddr,
        limit: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            self.check_alive(pid)?;
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("nothing accepted connections on {addr} within {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until `GET path` on `addr` answers 200, at most `limit`, failing early if `pid`
    /// exits. Readiness of a gateway: a bare TCP connect to its tunnel port would count as a
    /// failed TLS handshake there.
    ///
    /// # Errors
    /// When the child exits or no 200 comes within `limit`.
    pub async fn wait_for_http_ok(
        &mut self,
        pid: u32,
        addr: SocketAddr,
        path: &str,
        limit: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            self.check_alive(pid)?;
            let last = match http_get(addr, path).await {
                Ok(head)
                    if head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200") =>
                {
                    return Ok(());
                }
                Ok(head) => head.lines().next().unwrap_or_default().to_owned(),
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                bail!("GET http://{addr}{path} gave no 200 within {limit:?} (last: {last})");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops every child, last started first: SIGTERM through `kill`, then SIGKILL if it has
    /// not exited within the grace period.
    pub fn stop_all(&mut self) {
        while let Some(mut p) = self.children.pop() {
            stop(&mut p);
        }
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        self.stop_all();
    }
}

fn stop(p: &mut Proc) {
    if let Ok(Some(_)) = p.child.try_wait() {
        return;
    }
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(p.child.id().to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let deadline = std::time::Instant::now() + STOP_GRACE;
    while std::time::Instant::now() < deadline {
        if let Ok(Some(_)) = p.child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "bench: {} did not exit within {STOP_GRACE:?} of SIGTERM; killing it",
        p.name
    );
    let _ = p.child.kill();
    let _ = p.child.wait();
}

/// `GET path` over HTTP/1.0: the whole answer, head and body.
///
/// # Errors
/// When `addr` cannot be reached or does not answer within five seconds.
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: bench\r\n\r\n").as_bytes())
            .await?;
        let mut answer = String::new();
        s.read_to_string(&mut answer).await?;
        Ok(answer)
    };
    tokio::time::timeout(Duration::from_secs(5), fetch)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer within 5s"))?
}

/// The last `lines` lines of a log file (empty if it cannot be read).
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// `n` distinct loopback ports free for TCP right now; with `udp_too`, free for UDP as well
/// (the Isthmus ingress binds the same port number for QUIC). Something else may take one
/// before it is used: the gateways then fail to bind and the path is reported as failed.
///
/// # Errors
/// When no port can be bound.
pub fn free_ports(n: usize, udp_too: bool) -> anyhow::Result<Vec<u16>> {
    let mut held = Vec::new();
    let mut ports = Vec::new();
    let mut tries = 0;
    while ports.len() < n {
        tries += 1;
        if tries > 100 * n {
            bail!("could not find {n} free loopback ports");
        }
        let tcp = TcpListener::bind("127.0.0.1:0").context("binding a loopback port")?;
        let port = tcp.local_addr()?.port();
        if udp_too {
            match UdpSocket::bind(("127.0.0.1", port)) {
                Ok(udp) => held.push((tcp, Some(udp))),
                Err(_) => continue,
            }
        } else {
            held.push((tcp, None));
        }
        ports.push(port);
    }
    Ok(ports)
}

/// VmRSS of a process in KiB.
///
/// # Errors
/// When /proc/PID/status cannot be read or has no VmRSS line.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    parse_vmrss(&status).with_context(|| format!("no VmRSS in /proc/{pid}/status"))
}

/// The `VmRSS:` value (kB) of a /proc/PID/status text.
pub fn parse_vmrss(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// CPU time (user + system, all threads) a process has used, in seconds.
///
/// # Errors
/// When /proc/PID/stat cannot be read or parsed.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    let ticks = parse_cpu_ticks(&stat).with_context(|| format!("parsing /proc/{pid}/stat"))?;
    Ok(ticks as f64 / clock_ticks_per_second() as f64)
}

/// utime + stime (fields 14 and 15, clock ticks) of a /proc/PID/stat line. The command name
/// in parentheses may hold spaces, so fields are counted after its closing parenthesis.
pub fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): utime is field 14, stime field 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn clock_ticks_per_second() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .filter(|&t| t > 0)
            .unwrap_or(100)
    })
}

/// The hard limit on open files of this process, from /proc/self/limits.
pub fn nofile_hard_limit() -> Option<u64> {
    parse_nofile_hard(&std::fs::read_to_string("/proc/self/limits").ok()?)
}

/// The hard `Max open files` value of a /proc/PID/limits text (`None` for unlimited).
pub fn parse_nofile_hard(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let mut fields = line["Max open files".len()..].split_whitespace();
    let _soft = fields.next()?;
    fields.next()?.parse().ok()
}

/// The first `model name` of /proc/cpuinfo.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// The 1, 5 and 15 minute load averages from /proc/loadavg.
pub fn loadavg() -> Option<[f64; 3]> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let mut it = text.split_whitespace().map(|v| v.parse::<f64>().ok());
    Some([it.next()??, it.next()??, it.next()??])
}

/// The kernel release.
pub fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_vmrss() {
        let status = "Name:\tx\nVmPeak:\t  9999 kB\nVmRSS:\t   12345 kB\nThreads:\t3\n";
        assert_eq!(parse_vmrss(status), Some(12345));
        assert_eq!(parse_vmrss("Name: x\n"), None);
    }

    #[test]
    fn reads_cpu_ticks_past_a_command_with_spaces() {
        let stat = "1234 (tokio rt) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 3 0";
        assert_eq!(parse_cpu_ticks(stat), Some(325));
        assert_eq!(parse_cpu_ticks("1234 (x) S 1"), None);
    }

    #[test]
    fn reads_the_hard_nofile_limit() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max processes             unlimited            unlimited            processes \n\
                      Max open files            1024                 20000                files     \n";
        assert_eq!(parse_nofile_hard(limits), Some(20000));
        let unlimited =
            "Max open files            unlimited            unlimited            files\n";
        assert_eq!(parse_nofile_hard(unlimited), None);
    }

    #[test]
    fn free_ports_are_distinct() {
        let ports = free_ports(4, true).unwrap();
        let mut sorted = ports.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 4);
    }
}
