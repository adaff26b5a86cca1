//! From a packet to a reply: parse, decide, answer or forward, count.
//!
//! [`Engine::handle`] is synchronous and does everything a local answer needs, so the UDP
//! loop answers those inline without spawning. A query for the platform resolver comes back
//! as a [`Forward`] job holding one of `max_forwarded_in_flight` permits; the caller runs
//! [`Engine::forward`] where it likes. Over budget, the client gets SERVFAIL at once rather
//! than a queue. A forwarded query ends within `upstream_timeout` with the upstream's answer
//! or SERVFAIL: the shim never leaves a client hanging.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use hickory_proto::op::{Message, MessageType, ResponseCode};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::decide::{Answer, Decision, Policy, address_record, decide};
use crate::error::ShimError;
use crate::metrics::{FailureLabels, Metrics, Source, UpstreamLabels};
use crate::snapshot::Snapshot;
use crate::upstream::{Reply, Synth, Upstream};
use crate::wire::{self, MAX_TCP_MESSAGE, Rejected, Request};

/// How a packet arrived, which decides how large a reply may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// UDP: the client's EDNS size (512 without EDNS), capped by ours.
    Udp,
    /// TCP: up to 65,535 bytes.
    Tcp,
}

impl Transport {
    /// `udp` or `tcp`.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        }
    }
}

/// What to do with a packet.
#[derive(Debug)]
pub enum Step {
    /// Send these bytes back.
    Reply(Vec<u8>),
    /// Send nothing.
    Drop,
    /// Ask the upstream, then send what [`Engine::forward`] returns.
    Forward(Forward),
}

/// A query on its way to the upstream.
#[derive(Debug)]
pub struct Forward {
    request: Request,
    packet: Vec<u8>,
    zone: usize,
    limit: usize,
    transport: Transport,
    _permit: OwnedSemaphorePermit,
}

/// The fixed settings of an [`Engine`].
#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// The answering rules.
    pub policy: Policy,
    /// The EDNS payload size advertised and the UDP reply cap.
    pub edns_udp_payload: u16,
    /// The whole budget of a forwarded query.
    pub upstream_timeout: Duration,
    /// Forwarded queries in flight at most.
    pub max_forwarded_in_flight: usize,
}

/// Answers packets; shared by every socket task.
#[derive(Debug)]
pub struct Engine {
    settings: EngineSettings,
    snapshot: ArcSwap<Snapshot>,
    upstream: Upstream,
    metrics: Metrics,
    in_flight: Arc<Semaphore>,
    failure_log: LogLimiter,
}

impl Engine {
    /// An engine answering from `snapshot` until [`Engine::publish`] replaces it.
    pub fn new(
        settings: EngineSettings,
        snapshot: Snapshot,
        upstream: Upstream,
        metrics: Metrics,
    ) -> Self {
        let in_flight = Arc::new(Semaphore::new(settings.max_forwarded_in_flight));
        Self {
            settings,
            snapshot: ArcSwap::from_pointee(snapshot),
            upstream,
            metrics,
            in_flight,
            failure_log: LogLimiter::default(),
        }
    }

    /// The snapshot queries are answered from.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Replaces the snapshot; queries already being answered keep the one they loaded.
    pub fn publish(&self, snapshot: Snapshot) {
        self.metrics.remote_names.set(snapshot.len() as i64);
        self.metrics
            .table_revision
            .set(i64::try_from(snapshot.revision()).unwrap_or(i64::MAX));
        self.snapshot.store(Arc::new(snapshot));
    }

    /// The metrics this engine counts into.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    fn payload(&self) -> u16 {
        self.settings.edns_udp_payload
    }

    fn limit(&self, request: &Request, transport: Transport) -> usize {
        match transport {
            Transport::Udp => wire::udp_limit(request.edns.as_ref(), self.payload()),
            Transport::Tcp => MAX_TCP_MESSAGE,
        }
    }

    /// Handles one packet: everything but talking to the upstream.
    pub fn handle(&self, packet: &[u8], transport: Transport) -> Step {
        let t = transport.as_str();
        let request = match wire::parse(packet).map_err(|e| *e) {
            Ok(request) => request,
            Err(Rejected::Drop(why)) => {
                self.metrics.malformed(t, why.label());
                return Step::Drop;
            }
            Err(Rejected::Reply {
                metadata,
                rcode,
                query,
                edns,
                malformed,
            }) => {
                if let Some(why) = malformed {
                    self.metrics.malformed(t, why.label());
                }
                let qtype = query.as_ref().map(|q| q.query_type());
                self.metrics.reply(qtype, rcode, Source::Local, t);
                let edns = wire::reply_edns(edns.as_ref(), self.payload());
                return Step::Reply(wire::error_reply(&metadata, rcode, query.as_ref(), edns));
            }
        };
        let snapshot = self.snapshot.load();
        match decide(&request.query, &snapshot, &self.settings.policy) {
            Decision::Answer(answer) => {
                Step::Reply(self.reply(&request, answer, transport, Source::Local))
            }
            Decision::Refuse => {
                let refused = Answer {
                    rcode: ResponseCode::Refused,
                    answers: Vec::new(),
                    authorities: Vec::new(),
                };
                Step::Reply(self.reply(&request, refused, transport, Source::Local))
            }
            Decision::Forward { zone } => match Arc::clone(&self.in_flight).try_acquire_owned() {
                Ok(permit) => Step::Forward(Forward {
                    limit: self.limit(&request, transport),
                    request,
                    packet: packet.to_vec(),
                    zone,
                    transport,
                    _permit: permit,
                }),
                Err(_) => {
                    self.upstream_failed(&ShimError::Overloaded);
                    Step::Reply(self.servfail(&request, transport))
                }
            },
        }
    }

    /// Asks the upstream for a [`Forward`] job's answer and returns the reply to send: the
    /// upstream's answer, or SERVFAIL once it failed or `upstream_timeout` passed.
    pub async fn forward(&self, job: Forward) -> Vec<u8> {
        let started = tokio::time::Instant::now();
        let result = tokio::time::timeout(
            self.settings.upstream_timeout,
            self.upstream.resolve(&job.request, &job.packet),
        )
        .await
        .unwrap_or(Err(ShimError::UpstreamTimeout));
        self.metrics
            .upstream_latency
            .get_or_create(&UpstreamLabels {
                kind: self.upstream.kind(),
            })
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(Reply::Raw(bytes)) => self.relay(&job, bytes),
            Ok(Reply::Synth(synth)) => self.synthesise(&job, synth),
            Err(e) => {
                self.upstream_failed(&e);
                self.servfail(&job.request, job.transport)
            }
        }
    }

    /// A DNS upstream's reply, under the client's id, truncated if it does not fit.
    fn relay(&self, job: &Forward, mut bytes: Vec<u8>) -> Vec<u8> {
        let rcode = bytes
            .get(3)
            .map_or(ResponseCode::ServFail, |b| ResponseCode::from(0, b & 0x0f));
        let t = job.transport.as_str();
        self.metrics.reply(
            Some(job.request.query.query_type()),
            rcode,
            Source::Upstream,
            t,
        );
        if bytes.len() > job.limit {
            self.metrics
                .truncated
                .get_or_create(&crate::metrics::TransportLabels { transport: t })
                .inc();
            let mut message = self.base_reply(&job.request, rcode);
            message.metadata.truncation = true;
            return wire::encode(&message, job.limit);
        }
        if let Some(head) = bytes.get_mut(0..2) {
            head.copy_from_slice(&job.request.metadata.id.to_be_bytes());
        }
        bytes
    }

    /// An HTTP upstream's addresses as a DNS reply; a negative one carries the SOA.
    fn synthesise(&self, job: &Forward, synth: Synth) -> Vec<u8> {
        let Synth {
            rcode,
            answers,
            truncated,
        } = synth;
        let owner = job.request.query.name();
        let mut answer = if answers.is_empty()
            && matches!(rcode, ResponseCode::NoError | ResponseCode::NXDomain)
        {
            let serial = self.snapshot.load().revision();
            self.settings.policy.negative(rcode, job.zone, serial)
        } else {
            Answer {
                rcode,
                answers: answers
                    .into_iter()
                    .map(|(ip, ttl)| address_record(owner, ttl, ip))
                    .collect(),
                authorities: Vec::new(),
            }
        };
        if truncated {
            // Pass the upstream's TC on, without a partial answer.
            answer.answers.clear();
            let mut message = self.message(&job.request, answer);
            message.metadata.truncation = true;
            self.count(&job.request, rcode, Source::Upstream, job.transport);
            return wire::truncated(&message);
        }
        self.reply(&job.request, answer, job.transport, Source::Upstream)
    }

    fn upstream_failed(&self, e: &ShimError) {
        let kind = self.upstream.kind();
        self.metrics
            .upstream_failures
            .get_or_create(&FailureLabels {
                kind,
                reason: e.reason(),
            })
            .inc();
        if let Some(suppressed) = self.failure_log.allow() {
            tracing::warn!(upstream = kind, error = %e, suppressed, "upstream failed; answering SERVFAIL");
        }
    }

    fn servfail(&self, request: &Request, transport: Transport) -> Vec<u8> {
        let fail = Answer {
            rcode: ResponseCode::ServFail,
            answers: Vec::new(),
            authorities: Vec::new(),
        };
        // Failures are counted as the upstream's: it is the upstream that did not answer.
        self.reply(request, fail, transport, Source::Upstream)
    }

    fn base_reply(&self, request: &Request, rcode: ResponseCode) -> Message {
        let mut message = Message::new(
            request.metadata.id,
            MessageType::Response,
            request.metadata.op_code,
        );
        message.metadata = wire::reply_metadata(&request.metadata);
        message.metadata.response_code = rcode;
        message.add_query(request.query.clone());
        if let Some(edns) = wire::reply_edns(request.edns.as_ref(), self.payload()) {
            message.set_edns(edns);
        }
        message
    }

    fn message(&self, request: &Request, answer: Answer) -> Message {
        let mut message = self.base_reply(request, answer.rcode);
        message.metadata.authoritative =
            matches!(answer.rcode, ResponseCode::NoError | ResponseCode::NXDomain);
        message.answers = answer.answers;
        message.authorities = answer.authorities;
        message
    }

    fn count(&self, request: &Request, rcode: ResponseCode, source: Source, transport: Transport) {
        self.metrics.reply(
            Some(request.query.query_type()),
            rcode,
            source,
            transport.as_str(),
        );
    }

    fn reply(
        &self,
        request: &Request,
        answer: Answer,
        transport: Transport,
        source: Source,
    ) -> Vec<u8> {
        let rcode = answer.rcode;
        self.count(request, rcode, source, transport);
        let limit = self.limit(request, transport);
        let bytes = wire::encode(&self.message(request, answer), limit);
        // The TC bit is byte 2, bit 1.
        if bytes.get(2).is_some_and(|b| b & 0x02 != 0) {
            self.metrics
                .truncated
                .get_or_create(&crate::metrics::TransportLabels {
                    transport: transport.as_str(),
                })
                .inc();
        }
        bytes
    }
}

/// Lets a warning through at most once a second, saying how many were held back.
#[derive(Debug, Default)]
struct LogLimiter {
    last_ms: AtomicU64,
    suppressed: AtomicU64,
}

impl LogLimiter {
    /// `Some(count held back since the last one)` when a line may be logged now.
    fn allow(&self) -> Option<u64> {
        static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        let now = u64::try_from(
            START
                .get_or_init(std::time::Instant::now)
                .elapsed()
                .as_millis(),
        )
        .unwrap_or(u64::MAX)
        .saturating_add(1_000);
        let last = self.last_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= 1_000
            && self
                .last_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}
