//! Latency and throughput accounting: an HDR histogram for the whole run, a timeline in
//! 100 ms buckets, errors by SQLSTATE and message, and the longest stall (the largest gap
//! between two completions, counting the run's start and end).

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;

/// Width of one timeline bucket.
pub const BUCKET: Duration = Duration::from_millis(100);

/// One timeline bucket's raw data.
#[derive(Debug, Default, Clone)]
pub struct Bucket {
    pub txns: u64,
    pub errors: u64,
    /// Latencies of the transactions that completed in this bucket, in µs.
    pub latencies: Vec<u64>,
}

/// What one worker (or, merged, the whole run) observed.
#[derive(Debug, Clone)]
pub struct Recorder {
    /// Latencies of successful transactions, in µs.
    pub hist: Histogram<u64>,
    pub buckets: Vec<Bucket>,
    pub errors: BTreeMap<String, u64>,
    /// Completion times (µs since the run's start) of every transaction, ok or not.
    pub completions: Vec<u64>,
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

/// The run's figures.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub txns: u64,
    pub errors: u64,
    pub tps: f64,
    /// Milliseconds.
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    /// The longest gap without any completion, and when it started (both ms).
    pub stall_ms: f64,
    pub stall_at_ms: f64,
    pub timeline: Vec<Point>,
}

/// One timeline point.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Point {
    /// Start of the bucket, seconds since the run's start.
    pub t: f64,
    pub txns: u64,
    pub errors: u64,
    /// p99 and max latency of the bucket, ms (0 when empty).
    pub p99: f64,
    pub max: f64,
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// The `q` quantile (0..=1) of `sorted`, nearest-rank.
fn quantile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

impl Recorder {
    pub fn new() -> Self {
        Self {
            // 1 µs to 1 hour, 3 significant digits.
            hist: Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds"),
            buckets: Vec::new(),
            errors: BTreeMap::new(),
            completions: Vec::new(),
        }
    }

    fn bucket(&mut self, at: Duration) -> &mut Bucket {
        let i = (at.as_micros() / BUCKET.as_micros()) as usize;
        if self.buckets.len() <= i {
            self.buckets.resize(i + 1, Bucket::default());
        }
        &mut self.buckets[i]
    }

    /// A transaction that completed `at` (since the run's start) after `latency`.
    pub fn ok(&mut self, at: Duration, latency: Duration) {
        let us = latency.as_micros().max(1) as u64;
        self.hist.saturating_record(us);
        let b = self.bucket(at);
        b.txns += 1;
        b.latencies.push(us);
        self.completions.push(at.as_micros() as u64);
    }

    /// A transaction that failed `at`, with its error key ("SQLSTATE message").
    pub fn error(&mut self, at: Duration, key: String) {
        self.bucket(at).errors += 1;
        *self.errors.entry(key).or_default() += 1;
        self.completions.push(at.as_micros() as u64);
    }

    /// Adds another worker's observations.
    pub fn merge(&mut self, other: Recorder) {
        self.hist.add(&other.hist).expect("same histogram bounds");
        if self.buckets.len() < other.buckets.len() {
            self.buckets.resize(other.buckets.len(), Bucket::default());
        }
        for (mine, theirs) in self.buckets.iter_mut().zip(other.buckets) {
            mine.txns += theirs.txns;
            mine.errors += theirs.errors;
            mine.latencies.extend(theirs.latencies);
        }
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
        self.completions.extend(other.completions);
    }

    /// The figures for a run that lasted `duration`.
    pub fn summary(&self, duration: Duration) -> Summary {
        let h = &self.hist;
        let txns = h.len();
        let errors: u64 = self.errors.values().sum();
        let pct = |q: f64| {
            if txns == 0 {
                0.0
            } else {
                ms(h.value_at_quantile(q))
            }
        };
        let mut done = self.completions.clone();
        done.sort_unstable();
        let end = duration.as_micros() as u64;
        let (mut stall, mut stall_at, mut prev) = (0u64, 0u64, 0u64);
        for &t in done.iter().chain(std::iter::once(&end.max(prev))) {
            if t.saturating_sub(prev) > stall {
                stall = t - prev;
                stall_at = prev;
            }
            prev = prev.max(t);
        }
        let buckets_in_run =
            (end.div_ceil(BUCKET.as_micros() as u64) as usize).max(self.buckets.len());
        let timeline = (0..buckets_in_run)
            .map(|i| {
                let b = self.buckets.get(i).cloned().unwrap_or_default();
                let mut l = b.latencies;
                l.sort_unstable();
                Point {
                    t: i as f64 * BUCKET.as_secs_f64(),
                    txns: b.txns,
                    errors: b.errors,
                    p99: ms(quantile(&l, 0.99)),
                    max: ms(l.last().copied().unwrap_or(0)),
                }
            })
            .collect();
        Summary {
            txns,
            errors,
            tps: txns as f64 / duration.as_secs_f64().max(1e-9),
            p50: pct(0.5),
            p90: pct(0.9),
            p99: pct(0.99),
            p999: pct(0.999),
            max: if txns == 0 { 0.0 } else { ms(h.max()) },
            stall_ms: ms(stall),
            stall_at_ms: ms(stall_at),
            timeline,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    #[test]
    fn known_latencies_give_known_percentiles() {
        let mut r = Recorder::new();
        // 1..=1000 ms, one each, completing every 1 ms over the first second.
        for i in 1..=1000u64 {
            r.ok(d(i), d(i));
        }
        let s = r.summary(d(1000));
        assert_eq!(s.txns, 1000);
        assert!((s.tps - 1000.0).abs() < 1e-9);
        // HDR with 3 significant digits: within 0.1%.
        for (got, want) in [
            (s.p50, 500.0),
            (s.p90, 900.0),
            (s.p99, 990.0),
            (s.p999, 999.0),
            (s.max, 1000.0),
        ] {
            assert!((got - want).abs() <= want * 0.001 + 1e-9, "{got} vs {want}");
        }
        // Buckets are [0,100) ms, [100,200) ms…: the completion at exactly 1000 ms opens
        // an eleventh bucket.
        assert_eq!(s.timeline.len(), 11);
        assert_eq!(s.timeline[0].txns, 99);
        assert_eq!(s.timeline[9].txns, 100);
        assert_eq!(s.timeline[10].txns, 1);
        assert!((s.timeline[9].max - 999.0).abs() < 1e-9);
    }

    #[test]
    fn stall_is_the_largest_gap_including_start_and_end() {
        let mut r = Recorder::new();
        for t in [50, 100, 150, 900, 950] {
            r.ok(d(t), d(1));
        }
        let s = r.summary(d(1000));
        assert_eq!((s.stall_ms, s.stall_at_ms), (750.0, 150.0));
        // A quiet tail counts too.
        let mut r = Recorder::new();
        r.ok(d(10), d(1));
        let s = r.summary(d(2000));
        assert_eq!((s.stall_ms, s.stall_at_ms), (1990.0, 10.0));
        // Nothing at all: the whole run is a stall.
        let s = Recorder::new().summary(d(500));
        assert_eq!(s.stall_ms, 500.0);
    }

    #[test]
    fn errors_and_merging() {
        let mut a = Recorder::new();
        let mut b = Recorder::new();
        a.ok(d(10), d(2));
        b.ok(d(250), d(4));
        b.error(d(260), "57P01 terminating".into());
        b.error(d(270), "57P01 terminating".into());
        a.error(d(20), "08006 lost".into());
        a.merge(b);
        let s = a.summary(d(300));
        assert_eq!((s.txns, s.errors), (2, 3));
        assert_eq!(a.errors["57P01 terminating"], 2);
        assert_eq!(s.timeline[2].errors, 2);
        assert_eq!(s.timeline[2].p99, 4.0);
        assert_eq!(s.timeline[1].txns, 0);
    }
}
