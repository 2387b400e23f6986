//! Latency histograms counted into their buckets as they are recorded, for the series
//! the relay records at every request: `handoff_query_duration_seconds`,
//! `handoff_transaction_duration_seconds` and `handoff_pool_checkout_wait_seconds`.
//!
//! The Prometheus recorder keeps each histogram sample (with the time it was taken) in a
//! shared list until its upkeep folds the samples into buckets: a clock read, an epoch
//! guard and a list append for every sample, three samples a transaction. Here a sample
//! is two relaxed atomic additions — its bucket's count and the sum — and `/metrics`
//! reads the counts as they are, summed over the stripes each thread adds to (see
//! [`crate::sync::STRIPES`]). Same buckets as the recorder's other `_seconds`
//! histograms ([`super::LATENCY_BUCKETS`]), same exposition.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::LATENCY_BUCKETS;
use crate::sync::Locked;

const BUCKETS: usize = LATENCY_BUCKETS.len();

/// One series: its family, its labels as exposed, and its counts.
#[derive(Debug)]
pub struct Counted {
    family: &'static str,
    /// `name="value"` pairs, comma-separated; empty for none.
    labels: String,
    stripes: [Stripe; crate::sync::STRIPES],
    /// The bounds in nanoseconds, for the record path.
    bounds_ns: [u64; BUCKETS],
}

/// One thread's counts, on cache lines of their own.
#[derive(Debug)]
#[repr(align(128))]
struct Stripe {
    /// Per bucket (not cumulative), and above the last bound.
    counts: [AtomicU64; BUCKETS + 1],
    sum_ns: AtomicU64,
}

impl Stripe {
    fn new() -> Self {
        Self {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_ns: AtomicU64::new(0),
        }
    }
}

/// Every series made, for `/metrics`: kept for the process's life, as the recorder keeps
/// its own.
static ALL: Mutex<Vec<Arc<Counted>>> = Mutex::new(Vec::new());

impl Counted {
    /// The series of `family` with `labels`: the one already made if there is one
    /// (several proxies in one process share it, as they share the recorder).
    pub fn series(family: &'static str, labels: &[(&str, &str)]) -> Arc<Counted> {
        let mut rendered = String::new();
        for (i, (name, value)) in labels.iter().enumerate() {
            if i > 0 {
                rendered.push(',');
            }
            let _ = write!(rendered, "{name}=\"{}\"", escape(value));
        }
        let mut all = ALL.locked();
        if let Some(s) = all
            .iter()
            .find(|s| s.family == family && s.labels == rendered)
        {
            return Arc::clone(s);
        }
        let s = Arc::new(Counted {
            family,
            labels: rendered,
            stripes: std::array::from_fn(|_| Stripe::new()),
            bounds_ns: std::array::from_fn(|i| (LATENCY_BUCKETS[i] * 1e9).round() as u64),
        });
        all.push(Arc::clone(&s));
        s
    }

    /// Counts one sample.
    pub fn record(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = self.bounds_ns.partition_point(|&b| b < ns);
        let s = &self.stripes[crate::sync::stripe()];
        s.counts[i].fetch_add(1, Relaxed);
        s.sum_ns.fetch_add(ns, Relaxed);
    }

    /// Samples counted so far.
    pub fn count(&self) -> u64 {
        (0..=BUCKETS).map(|i| self.bucket(i)).sum()
    }

    /// Samples in bucket `i` (not cumulative), over all stripes.
    fn bucket(&self, i: usize) -> u64 {
        self.stripes.iter().map(|s| s.counts[i].load(Relaxed)).sum()
    }

    fn render(&self, out: &mut String) {
        let sep = if self.labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
            cumulative += self.bucket(i);
            let _ = writeln!(
                out,
                "{}_bucket{{{}{sep}le=\"{bound}\"}} {cumulative}",
                self.family, self.labels
            );
        }
        cumulative += self.bucket(BUCKETS);
        let _ = writeln!(
            out,
            "{}_bucket{{{}{sep}le=\"+Inf\"}} {cumulative}",
            self.family, self.labels
        );
        let braces = if self.labels.is_empty() {
            String::new()
        } else {
            format!("{{{}}}", self.labels)
        };
        let sum_ns: u64 = self.stripes.iter().map(|s| s.sum_ns.load(Relaxed)).sum();
        let sum = sum_ns as f64 / 1e9;
        let _ = writeln!(out, "{}_sum{braces} {sum}", self.family);
        let _ = writeln!(out, "{}_count{braces} {cumulative}", self.family);
    }
}

/// A label value as the exposition format writes it.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Appends every series, a family at a time with its `# HELP` and `# TYPE` from the
/// metrics table, in the recorder's format.
pub fn render(out: &mut String) {
    let mut all: Vec<Arc<Counted>> = ALL.locked().clone();
    all.sort_by(|a, b| (a.family, &a.labels).cmp(&(b.family, &b.labels)));
    let mut family = "";
    for s in &all {
        if s.family != family {
            family = s.family;
            if !out.is_empty() && !out.ends_with("\n\n") {
                out.push('\n');
            }
            if let Some(def) = super::all().find(|d| d.name == family) {
                let _ = writeln!(out, "# HELP {family} {}", def.help.replace('`', ""));
            }
            let _ = writeln!(out, "# TYPE {family} histogram");
        }
        s.render(out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_land_in_their_buckets_and_render_as_the_recorder_does() {
        let s = Counted::series(super::super::POOL_WAIT, &[("pool", "a\"b@db/main")]);
        let again = Counted::series(super::super::POOL_WAIT, &[("pool", "a\"b@db/main")]);
        assert!(Arc::ptr_eq(&s, &again), "one series per family and labels");
        let before = s.count();
        s.record(Duration::from_micros(100)); // on the first bound: in it
        s.record(Duration::from_micros(101)); // just above: the next
        s.record(Duration::from_millis(3));
        // From another thread: another stripe, the same series.
        let other = Arc::clone(&s);
        std::thread::spawn(move || other.record(Duration::from_secs(60))) // above the last bound
            .join()
            .unwrap();
        assert_eq!(s.count() - before, 4);
        let mut text = String::new();
        render(&mut text);
        let line = |series: &str| {
            text.lines()
                .find(|l| l.starts_with(series))
                .unwrap_or_else(|| panic!("{series} in\n{text}"))
                .rsplit(' ')
                .next()
                .unwrap()
                .parse::<f64>()
                .unwrap()
        };
        let p = "handoff_pool_checkout_wait_seconds";
        let l = r#"pool="a\"b@db/main""#;
        assert_eq!(line(&format!("{p}_bucket{{{l},le=\"0.0001\"}}")), 1.0);
        assert_eq!(line(&format!("{p}_bucket{{{l},le=\"0.00025\"}}")), 2.0);
        assert_eq!(line(&format!("{p}_bucket{{{l},le=\"0.005\"}}")), 3.0);
        assert_eq!(line(&format!("{p}_bucket{{{l},le=\"30\"}}")), 3.0);
        assert_eq!(line(&format!("{p}_bucket{{{l},le=\"+Inf\"}}")), 4.0);
        assert_eq!(line(&format!("{p}_count{{{l}}}")), 4.0);
        let sum = line(&format!("{p}_sum{{{l}}}"));
        assert!((sum - 60.003201).abs() < 1e-9, "{sum}");
        assert_eq!(
            text.matches(&format!("# TYPE {p} histogram")).count(),
            1,
            "one TYPE line per family"
        );
        assert!(text.contains(&format!(
            "# HELP {p} Time to get a server connection from the pool"
        )));
    }
}
