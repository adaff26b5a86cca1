//! Pure arithmetic over measurements: percentiles, rates, ratios. No clock, no sockets.

use std::time::Duration;

/// Bytes in a mebibyte.
pub const MIB: f64 = 1024.0 * 1024.0;

/// The nearest-rank percentile `p` (0 ..= 100) of samples sorted ascending: the smallest
/// sample such that at least `p` percent of the samples are less than or equal to it.
/// `None` for no samples.
pub fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let p = p.clamp(0.0, 100.0);
    // The rank is 1-based; p = 0 means the smallest sample.
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Latency percentiles of one series of round trips, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatencySummary {
    /// Median round trip.
    pub p50_us: f64,
    /// 99th percentile round trip.
    pub p99_us: f64,
    /// Slowest round trip.
    pub max_us: f64,
    /// Number of round trips measured.
    pub samples: usize,
}

/// Summarises round-trip times given in nanoseconds (any order). `None` for no samples.
pub fn summarise_ns(mut samples_ns: Vec<u64>) -> Option<LatencySummary> {
    samples_ns.sort_unstable();
    let us = |ns: u64| ns as f64 / 1_000.0;
    Some(LatencySummary {
        p50_us: us(percentile(&samples_ns, 50.0)?),
        p99_us: us(percentile(&samples_ns, 99.0)?),
        max_us: us(*samples_ns.last()?),
        samples: samples_ns.len(),
    })
}

/// Throughput in MiB/s of `bytes` moved in `elapsed`; `None` for a zero duration.
pub fn mib_per_s(bytes: u64, elapsed: Duration) -> Option<f64> {
    let secs = elapsed.as_secs_f64();
    (secs > 0.0).then(|| bytes as f64 / MIB / secs)
}

/// `a / b` when both are known and `b` is positive.
pub fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

/// KiB per connection for an RSS growth of `delta_kib` over `conns` connections.
pub fn kib_per_conn(delta_kib: i64, conns: usize) -> Option<f64> {
    (conns > 0).then(|| delta_kib as f64 / conns as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let s: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&s, 50.0), Some(50));
        assert_eq!(percentile(&s, 99.0), Some(99));
        assert_eq!(percentile(&s, 100.0), Some(100));
        assert_eq!(percentile(&s, 0.0), Some(1));
        assert_eq!(percentile(&[7], 99.0), Some(7));
        assert_eq!(percentile(&[], 50.0), None);
        // Ten samples: p99 is the largest, p50 the fifth.
        let s: Vec<u64> = (1..=10).map(|x| x * 10).collect();
        assert_eq!(percentile(&s, 99.0), Some(100));
        assert_eq!(percentile(&s, 50.0), Some(50));
    }

    #[test]
    fn summary_sorts_and_converts_to_microseconds() {
        let s = summarise_ns(vec![3_000, 1_000, 2_000, 100_000]).unwrap();
        assert_eq!(s.p50_us, 2.0);
        assert_eq!(s.p99_us, 100.0);
        assert_eq!(s.max_us, 100.0);
        assert_eq!(s.samples, 4);
        assert!(summarise_ns(Vec::new()).is_none());
    }

    #[test]
    fn rates_and_ratios() {
        let r = mib_per_s(512 * 1024 * 1024, Duration::from_secs(2)).unwrap();
        assert!((r - 256.0).abs() < 1e-9);
        assert_eq!(mib_per_s(1, Duration::ZERO), None);
        assert_eq!(ratio(Some(3.0), Some(2.0)), Some(1.5));
        assert_eq!(ratio(Some(3.0), Some(0.0)), None);
        assert_eq!(ratio(None, Some(2.0)), None);
        assert_eq!(kib_per_conn(20_000, 10_000), Some(2.0));
        assert_eq!(kib_per_conn(-100, 100), Some(-1.0));
        assert_eq!(kib_per_conn(1, 0), None);
    }
}
