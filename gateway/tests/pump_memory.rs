//! Memory held by a tunneled stream follows the bytes in flight, not buffer capacity.
//!
//! Its own test binary: the global allocator counts every heap byte of the process, and
//! nothing else may run beside it.

use std::alloc::System;
use std::future::pending;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use isthmus_gateway::tunnel::pump::{Moved, pump};
use isthmus_gateway::tunnel::{StreamRecv, StreamSend};
use stats_alloc::{INSTRUMENTED_SYSTEM, StatsAlloc};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

fn live_bytes() -> i64 {
    let s = GLOBAL.stats();
    s.bytes_allocated as i64 - s.bytes_deallocated as i64 + s.bytes_reallocated as i64
}

/// A tunnel whose far side does not read: every chunk is accepted and kept, as h2 and
/// quinn queue chunks (counting their length, not their allocation) until the peer reads.
#[derive(Clone, Default)]
struct StalledTunnel(Arc<Mutex<Vec<Bytes>>>);

impl StreamSend for StalledTunnel {
    async fn send(&mut self, data: Bytes) -> io::Result<()> {
        self.0.lock().unwrap().push(data);
        Ok(())
    }
    async fn finish(&mut self) -> io::Result<()> {
        Ok(())
    }
    fn reset(&mut self) {}
}

/// A tunnel that never sends anything back.
struct Silent;

impl StreamRecv for Silent {
    async fn recv(&mut self) -> io::Result<Option<Bytes>> {
        pending().await
    }
}

const STREAMS: usize = 200;
const WRITES: usize = 5;

#[tokio::test(flavor = "current_thread")]
async fn one_byte_writes_hold_bytes_not_buffers() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let mut apps = Vec::new();
    let mut pumps = Vec::new();
    for _ in 0..STREAMS {
        let app = TcpStream::connect(addr).await.unwrap();
        let (socket, _) = listener.accept().await.unwrap();
        let tunnel = StalledTunnel::default();
        let moved = Arc::new(Moved::default());
        let task = tokio::spawn({
            let (tunnel, moved, stop) = (tunnel.clone(), Arc::clone(&moved), stop.clone());
            async move {
                let _ = pump(socket, Bytes::new(), tunnel, Silent, moved, &stop).await;
            }
        });
        apps.push(app);
        pumps.push((tunnel, moved, task));
    }
    tokio::task::yield_now().await;
    let before = live_bytes();

    // Each app writes one byte at a time; each byte is read (and queued) on its own.
    for round in 1..=WRITES {
        for app in &mut apps {
            app.write_all(b"x").await.unwrap();
        }
        for (_, moved, _) in &pumps {
            tokio::time::timeout(Duration::from_secs(10), async {
                while moved.into_tunnel.load(Ordering::Relaxed) < round as u64 {
                    tokio::task::yield_now().await;
                }
            })
            .await
            .expect("the pump read the byte");
        }
    }
    let queued: usize = pumps
        .iter()
        .map(|(t, _, _)| t.0.lock().unwrap().len())
        .sum();
    assert_eq!(
        queued,
        STREAMS * WRITES,
        "every byte is queued as its own chunk"
    );

    let held = live_bytes() - before;
    // 1,000 one-byte chunks: a few hundred KiB covers the queue vectors and the chunks;
    // a 64 KiB buffer behind each chunk would be ~64 MiB.
    let bound = 1024 * 1024;
    assert!(
        held < bound,
        "{held} bytes live for {} bytes in flight (bound {bound})",
        STREAMS * WRITES
    );

    stop.cancel();
    for (_, _, task) in pumps {
        task.await.unwrap();
    }
}
