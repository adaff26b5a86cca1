//! A corpus of malformed packets over UDP and TCP: the shim drops or FORMERRs each, counts
//! it, and goes on serving.

mod common;

use common::*;
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RecordType;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpStream, UdpSocket};

const ROUTES: &str = "routes:
  - {name: orders.apps.internal, port: 8080, home_cluster: k8s, vip: 100.64.105.32}
";

fn header(id: u16, flags: u16, counts: [u16; 4]) -> Vec<u8> {
    let mut h = id.to_be_bytes().to_vec();
    h.extend_from_slice(&flags.to_be_bytes());
    for c in counts {
        h.extend_from_slice(&c.to_be_bytes());
    }
    h
}

/// Packets that are certainly not usable queries, each of which must be counted.
fn corpus() -> Vec<Vec<u8>> {
    let good = query("orders.apps.internal.", RecordType::A, None);
    let mut out: Vec<Vec<u8>> = (0..12).map(|n| good[..n].to_vec()).collect(); // 0-length and truncated headers
    out.push(header(1, 0x0100, [1, 0, 0, 0])); // a question promised, none there
    out.push(good[..good.len() - 3].to_vec()); // question cut short
    let mut long_label = header(2, 0x0100, [1, 0, 0, 0]);
    long_label.extend_from_slice(&[63, b'a', b'b']); // label runs past the end
    out.push(long_label);
    let mut reserved = header(3, 0x0100, [1, 0, 0, 0]);
    reserved.extend_from_slice(&[0x40, 1, 2, 0, 0, 1, 0, 1]); // reserved label type 01
    out.push(reserved);
    let mut self_loop = header(4, 0x0100, [1, 0, 0, 0]);
    self_loop.extend_from_slice(&[0xC0, 12, 0, 1, 0, 1]); // a name pointing at itself
    out.push(self_loop);
    let mut two_loop = header(5, 0x0100, [1, 0, 0, 0]);
    two_loop.extend_from_slice(&[1, b'a', 0xC0, 14, 0xC0, 12, 0, 1, 0, 1]); // a <-> b
    out.push(two_loop);
    let mut forward = header(6, 0x0100, [1, 0, 0, 0]);
    forward.extend_from_slice(&[0xC0, 40, 0, 1, 0, 1]); // pointer past the end
    out.push(forward);
    let mut huge = good.clone();
    huge[6..12].copy_from_slice(&[0xff; 6]); // 65,535 answers, authorities and additionals
    out.push(huge);
    let mut no_question = good.clone();
    no_question[4..6].copy_from_slice(&[0, 0]);
    out.push(no_question);
    let mut two_questions = good.clone();
    two_questions[4..6].copy_from_slice(&[0, 2]);
    out.push(two_questions);
    let mut response = good.clone();
    response[2] |= 0x80; // QR: a response, never answered
    out.push(response);
    let mut two_opts = query("orders.apps.internal.", RecordType::A, Some(1232));
    let opt = two_opts[two_opts.len() - 11..].to_vec();
    two_opts.extend_from_slice(&opt);
    two_opts[11] = 2;
    out.push(two_opts);
    out
}

/// Random bytes: some may happen to be valid, so they are not counted, only survived.
fn random_packets(n: usize) -> Vec<Vec<u8>> {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..n)
        .map(|_| {
            let len = (next() % 600) as usize;
            (0..len).map(|_| next() as u8).collect()
        })
        .collect()
}

async fn world() -> (tempfile::TempDir, Authority, Running) {
    let dir = tempfile::tempdir().unwrap();
    let routes = dir.path().join("routes.yaml");
    write_routes(&routes, ROUTES);
    let upstream = authority().await;
    let shim = start(config(&routes, vips(), dns_upstream(&[upstream.addr]))).await;
    (dir, upstream, shim)
}

fn still_answers(m: &Message) {
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert_eq!(m.answers.len(), 1, "a good query is answered afterwards");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_udp_packets_are_counted_and_survived() {
    let (_dir, _upstream, shim) = world().await;
    let corpus = corpus();
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for packet in corpus.iter().chain(random_packets(300).iter()) {
        within(socket.send_to(packet, shim.dns)).await.unwrap();
    }
    still_answers(
        &udp(
            shim.dns,
            &query("orders.apps.internal.", RecordType::A, None),
        )
        .await,
    );
    let expected = corpus.len() as u64;
    eventually(T, "every malformed UDP packet counted", || {
        shim.malformed() >= expected
    })
    .await;
    shim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_tcp_messages_are_counted_and_survived() {
    let (_dir, _upstream, shim) = world().await;
    let corpus = corpus();
    // Every corpus message framed on one connection, then a good query on the same one.
    let mut s = within(TcpStream::connect(shim.dns)).await.unwrap();
    let mut framed = Vec::new();
    for packet in &corpus {
        framed.extend_from_slice(&(packet.len() as u16).to_be_bytes());
        framed.extend_from_slice(packet);
    }
    within(s.write_all(&framed)).await.unwrap();
    let good = query("orders.apps.internal.", RecordType::A, None);
    let mut framed_good = (good.len() as u16).to_be_bytes().to_vec();
    framed_good.extend_from_slice(&good);
    within(s.write_all(&framed_good)).await.unwrap();
    // FORMERR replies come first (in order); the last reply is the good one.
    let answer = within(async {
        loop {
            let mut len = [0u8; 2];
            tokio::io::AsyncReadExt::read_exact(&mut s, &mut len)
                .await
                .unwrap();
            let mut reply = vec![0u8; u16::from_be_bytes(len) as usize];
            tokio::io::AsyncReadExt::read_exact(&mut s, &mut reply)
                .await
                .unwrap();
            let m = Message::from_vec(&reply).unwrap();
            if m.metadata.response_code != ResponseCode::FormErr {
                return m;
            }
        }
    })
    .await;
    still_answers(&answer);
    assert!(shim.malformed() >= corpus.len() as u64);

    // Random bytes with broken framing on fresh connections; the server stays up.
    for packet in random_packets(50) {
        let mut s = within(TcpStream::connect(shim.dns)).await.unwrap();
        let _ = within(s.write_all(&packet)).await;
    }
    still_answers(&tcp(shim.dns, &good).await);
    shim.stop().await;
}
