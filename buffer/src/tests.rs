//! The buffer's acceptance scenarios (docs/buffer.md, "How it is tested"), under paused tokio time, with exact
//! counter and gauge assertions read through a debugging recorder.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use tokio::sync::mpsc;

use super::*;

/// A recorder whose counters and gauges can be read any number of times (the
/// debugging recorder of metrics-util resets them on every snapshot).
#[derive(Debug, Default, Clone)]
struct TestRecorder {
    values: Arc<Mutex<HashMap<String, Arc<AtomicU64>>>>,
}

fn key_string(name: &str, labels: &mut Vec<(String, String)>) -> String {
    labels.sort();
    format!("{name}{labels:?}")
}

impl TestRecorder {
    fn cell(&self, key: &Key) -> Arc<AtomicU64> {
        let mut labels: Vec<(String, String)> = key
            .labels()
            .map(|l| (l.key().to_string(), l.value().to_string()))
            .collect();
        let k = key_string(key.name(), &mut labels);
        Arc::clone(self.values.lock().unwrap().entry(k).or_default())
    }
}

impl Recorder for TestRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(self.cell(key))
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(self.cell(key))
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

struct Metrics(TestRecorder);

impl Metrics {
    fn raw(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        let mut l: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let k = key_string(name, &mut l);
        let values = self.0.values.lock().unwrap();
        values
            .get(&k)
            .unwrap_or_else(|| panic!("no series {k}"))
            .load(Ordering::SeqCst)
    }

    fn counter(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.raw(name, labels)
    }

    fn gauge(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        f64::from_bits(self.raw(name, labels))
    }
}

/// Runs `test` on a paused current-thread runtime with a local metrics recorder.
fn run<F, Fut>(test: F)
where
    F: FnOnce(Metrics) -> Fut,
    Fut: Future<Output = ()>,
{
    let recorder = TestRecorder::default();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(test(Metrics(recorder.clone())));
}

const A: &[(&str, &str)] = &[("shard", "a")];

fn reason(r: &'static str) -> [(&'static str, &'static str); 2] {
    [("shard", "a"), ("reason", r)]
}

fn buffer(cfg: BufferConfig) -> Buffer {
    Buffer::new(cfg, &["a", "b"]).unwrap()
}

/// Spawns `n` waiters on shard `a` in order; each reports (index, outcome) when it gets
/// one and holds its release until `hold` passes.
async fn waiters(
    buf: &Buffer,
    n: usize,
    hold: Duration,
) -> mpsc::UnboundedReceiver<(usize, Result<(), BufferError>)> {
    let (tx, rx) = mpsc::unbounded_channel();
    for i in 0..n {
        let buf = buf.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            match buf.wait("a", 10).await {
                Ok(Admission::Released(r)) => {
                    let _ = tx.send((i, Ok(())));
                    tokio::time::sleep(hold).await;
                    drop(r);
                }
                Ok(Admission::Passed) => panic!("waiter {i} was not held"),
                Err(e) => {
                    let _ = tx.send((i, Err(e)));
                }
            }
        });
        // Let it enqueue before the next one, so arrival order is known.
        tokio::task::yield_now().await;
    }
    rx
}

#[test]
fn s01_idle_passes_through() {
    run(|m| async move {
        let b = buffer(BufferConfig::default());
        for _ in 0..100 {
            assert!(matches!(b.wait("a", 100).await, Ok(Admission::Passed)));
        }
        assert_eq!(b.depth("a"), 0);
        assert_eq!(b.bytes(), 0);
        assert_eq!(m.counter(metric::BUFFERED, A), 0);
        assert_eq!(m.gauge(metric::DEPTH, A), 0.0);
    });
}

#[test]
fn s02_s03_start_holds_and_stop_releases_fifo_with_bounded_concurrency() {
    for concurrency in [1usize, 2, 5] {
        run(|m| async move {
            let b = buffer(BufferConfig {
                drain_concurrency: concurrency,
                ..Default::default()
            });
            assert_eq!(b.start("a", 1, "test"), StartOutcome::Started);
            let mut rx = waiters(&b, 5, Duration::from_millis(100)).await;
            assert_eq!(b.depth("a"), 5);
            assert_eq!(b.bytes(), 50);
            assert_eq!(m.gauge(metric::DEPTH, A), 5.0);
            assert_eq!(m.counter(metric::BUFFERED, A), 5);
            assert!(b.stop("a", 1, StopReason::NewPrimary));
            let mut order = Vec::new();
            let mut max_out = 0;
            let start = Instant::now();
            while let Some((i, r)) = rx.recv().await {
                assert_eq!(r, Ok(()));
                order.push(i);
                // Each holds 100 ms: at most `concurrency` released per 100 ms step.
                let step = (start.elapsed().as_millis() / 100) as usize;
                max_out = max_out.max(order.len() - step * concurrency);
                if order.len() == 5 {
                    break;
                }
            }
            assert_eq!(order, vec![0, 1, 2, 3, 4], "FIFO");
            assert!(
                max_out <= concurrency,
                "{max_out} released at once with concurrency {concurrency}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
            assert_eq!(b.state("a"), Some(State::Idle));
            assert_eq!(m.counter(metric::DRAINED, A), 5);
            assert_eq!(m.counter(metric::STARTS, A), 1);
            assert_eq!(m.counter(metric::STOPS, &reason("new_primary")), 1);
            assert_eq!(m.gauge(metric::DEPTH, A), 0.0);
            assert_eq!(b.bytes(), 0);
        });
    }
}

#[test]
fn s04_dry_run_holds_nothing() {
    run(|m| async move {
        let b = buffer(BufferConfig {
            dry_run: true,
            ..Default::default()
        });
        b.start("a", 1, "test");
        assert_eq!(b.state("a"), Some(State::Buffering));
        for _ in 0..3 {
            assert!(matches!(b.wait("a", 1).await, Ok(Admission::Passed)));
        }
        assert_eq!(m.counter(metric::BUFFERED_DRY_RUN, A), 3);
        assert_eq!(m.counter(metric::BUFFERED, A), 0);
        assert!(b.stop("a", 1, StopReason::NewPrimary));
        assert_eq!(b.state("a"), Some(State::Idle));
    });
}

#[test]
fn s05_stale_epochs_are_ignored() {
    run(|m| async move {
        let b = buffer(BufferConfig::default());
        assert_eq!(b.start("a", 5, "x"), StartOutcome::Started);
        assert!(
            !b.stop("a", 4, StopReason::NewPrimary),
            "a stop for another epoch"
        );
        assert!(b.stop("a", 5, StopReason::NewPrimary));
        assert_eq!(b.start("a", 5, "x"), StartOutcome::StaleEpoch);
        assert_eq!(b.start("a", 3, "x"), StartOutcome::StaleEpoch);
        // Right after a completed cycle, a newer epoch buffers again (no time heuristic).
        assert_eq!(b.start("a", 6, "y"), StartOutcome::Started);
        assert_eq!(m.counter(metric::STARTS, A), 2);
        let mut rx = waiters(&b, 1, Duration::ZERO).await;
        assert_eq!(b.depth("a"), 1);
        assert!(b.stop("a", 6, StopReason::Aborted));
        assert_eq!(rx.recv().await, Some((0, Ok(()))));
        assert_eq!(m.counter(metric::STOPS, &reason("aborted")), 1);
    });
}

#[test]
fn s05b_back_to_back_switchovers_hold_the_rest_again() {
    run(|m| async move {
        let b = buffer(BufferConfig {
            drain_concurrency: 1,
            ..Default::default()
        });
        b.start("a", 1, "first");
        let mut rx = waiters(&b, 3, Duration::from_secs(1)).await;
        b.stop("a", 1, StopReason::NewPrimary);
        assert_eq!(rx.recv().await.unwrap(), (0, Ok(())));
        // The next switchover starts while two requests still wait to be drained.
        assert_eq!(b.start("a", 2, "second"), StartOutcome::Started);
        assert_eq!(b.state("a"), Some(State::Buffering));
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(
            b.depth("a"),
            2,
            "held again, not released to the old primary"
        );
        assert!(
            !b.stop("a", 1, StopReason::NewPrimary),
            "the old epoch's stop is stale"
        );
        assert!(b.stop("a", 2, StopReason::NewPrimary));
        assert_eq!(rx.recv().await.unwrap(), (1, Ok(())));
        assert_eq!(rx.recv().await.unwrap(), (2, Ok(())));
        assert_eq!(m.counter(metric::STARTS, A), 2);
        assert_eq!(m.counter(metric::DRAINED, A), 3);
        // A newer start during a cycle keeps it going under that epoch.
        b.start("a", 3, "third");
        assert_eq!(b.start("a", 4, "fourth"), StartOutcome::AlreadyBuffering);
        assert!(!b.stop("a", 3, StopReason::NewPrimary));
        assert!(b.stop("a", 4, StopReason::NewPrimary));
        assert_eq!(b.state("a"), Some(State::Idle));
    });
}

#[test]
fn s06_min_time_between_failovers() {
    run(|m| async move {
        let b = buffer(BufferConfig {
            min_time_between_failovers: Duration::from_secs(60),
            ..Default::default()
        });
        b.start("a", 1, "x");
        b.stop("a", 1, StopReason::NewPrimary);
        assert_eq!(b.start("a", 2, "x"), StartOutcome::LastFailoverTooRecent);
        assert_eq!(
            m.counter(metric::STARTS_SKIPPED, &reason("last_failover_too_recent")),
            1
        );
        assert!(matches!(b.wait("a", 1).await, Ok(Admission::Passed)));
        tokio::time::sleep(Duration::from_secs(61)).await;
        assert_eq!(b.start("a", 3, "x"), StartOutcome::Started);
        assert_eq!(m.counter(metric::STARTS, A), 2);
    });
}

#[test]
fn s07_arrivals_while_draining_wait_behind() {
    run(|_m| async move {
        let b = buffer(BufferConfig {
            drain_concurrency: 1,
            ..Default::default()
        });
        b.start("a", 1, "x");
        let mut first = waiters(&b, 3, Duration::from_millis(100)).await;
        b.stop("a", 1, StopReason::NewPrimary);
        assert_eq!(b.state("a"), Some(State::Draining));
        // A newcomer arrives while the drain is under way.
        let late = {
            let b = b.clone();
            tokio::spawn(async move {
                let r = b.wait("a", 1).await;
                (Instant::now(), matches!(r, Ok(Admission::Released(_))))
            })
        };
        let mut last = Instant::now();
        for _ in 0..3 {
            assert_eq!(first.recv().await.unwrap().1, Ok(()));
            last = Instant::now();
        }
        let (at, released) = late.await.unwrap();
        assert!(released);
        assert!(at >= last, "the newcomer went before a held request");
    });
}

#[test]
fn s08_disabled_shards_are_skipped() {
    run(|m| async move {
        let b = buffer(BufferConfig {
            shards: Some(vec!["b".into()]),
            ..Default::default()
        });
        b.start("a", 1, "x");
        assert!(matches!(b.wait("a", 1).await, Ok(Admission::Passed)));
        assert_eq!(m.counter(metric::SKIPPED, &reason("disabled")), 1);
        let off = buffer(BufferConfig {
            enabled: false,
            ..Default::default()
        });
        off.start("a", 1, "x");
        assert!(matches!(off.wait("a", 1).await, Ok(Admission::Passed)));
        assert_eq!(m.counter(metric::SKIPPED, &reason("disabled")), 2);
    });
}

#[test]
fn s09_a_cancelled_waiter_frees_its_slot() {
    run(|m| async move {
        let b = buffer(BufferConfig::default());
        b.start("a", 1, "x");
        let mut rx = waiters(&b, 1, Duration::ZERO).await;
        let gone = {
            let b = b.clone();
            tokio::spawn(async move { b.wait("a", 1000).await.map(|_| ()) })
        };
        tokio::task::yield_now().await;
        let mut rx2 = waiters(&b, 1, Duration::ZERO).await;
        assert_eq!(b.depth("a"), 3);
        assert_eq!(b.bytes(), 1020);
        gone.abort();
        let _ = gone.await;
        assert_eq!(b.depth("a"), 2);
        assert_eq!(b.bytes(), 20);
        assert_eq!(m.counter(metric::EVICTED, &reason("context_done")), 1);
        b.stop("a", 1, StopReason::NewPrimary);
        assert_eq!(rx.recv().await.unwrap().1, Ok(()));
        assert_eq!(rx2.recv().await.unwrap().1, Ok(()));
        assert_eq!(m.counter(metric::DRAINED, A), 2);
    });
}

#[test]
fn s10_window_expiry_oldest_first() {
    run(|m| async move {
        let b = buffer(BufferConfig {
            window: Duration::from_secs(10),
            ..Default::default()
        });
        b.start("a", 1, "x");
        let mut early = waiters(&b, 1, Duration::ZERO).await;
        tokio::time::sleep(Duration::from_secs(4)).await;
        let mut later = waiters(&b, 1, Duration::ZERO).await;
        tokio::time::sleep(Duration::from_secs(7)).await;
        assert_eq!(
            early.recv().await.unwrap().1,
            Err(BufferError::WindowExceeded)
        );
        assert_eq!(b.depth("a"), 1, "the later request keeps waiting");
        assert_eq!(m.counter(metric::EVICTED, &reason("window_exceeded")), 1);
        b.stop("a", 1, StopReason::NewPrimary);
        assert_eq!(later.recv().await.unwrap().1, Ok(()));
    });
}

#[test]
fn s11_full_queue_evicts_the_oldest() {
    run(|m| async move {
        let b = buffer(BufferConfig {
            size: 2,
            ..Default::default()
        });
        b.start("a", 1, "x");
        let mut rx = waiters(&b, 3, Duration::ZERO).await;
        assert_eq!(rx.recv().await.unwrap(), (0, Err(BufferError::Evicted)));
        assert_eq!(b.depth("a"), 2);
        assert_eq!(m.counter(metric::EVICTED, &reason("buffer_full")), 1);
        b.stop("a", 1, StopReason::NewPrimary);
        let mut got = vec![rx.recv().await.unwrap(), rx.recv().await.unwrap()];
        got.sort_by_key(|g| g.0);
        assert_eq!(got, vec![(1, Ok(())), (2, Ok(()))]);
    });
}

#[test]
fn s12_byte_cap() {
    run(|m| async move {
        let b = buffer(BufferConfig {
            max_bytes: 25,
            ..Default::default()
        });
        b.start("a", 1, "x");
        b.start("b", 1, "x");
        let _held = waiters(&b, 2, Duration::ZERO).await; // 20 bytes on shard a
                                                          // Shard b: 6 bytes would exceed 25 and b has nothing to evict.
        assert_eq!(b.wait("b", 6).await.err(), Some(BufferError::BufferFull));
        assert_eq!(
            m.counter(
                metric::SKIPPED,
                &[("shard", "b"), ("reason", "buffer_full")]
            ),
            1
        );
        // Larger than everything: refused without evicting anyone on a.
        assert_eq!(b.wait("a", 26).await.err(), Some(BufferError::BufferFull));
        assert_eq!(b.depth("a"), 2);
        assert_eq!(b.bytes(), 20);
    });
}

#[test]
fn s13_max_failover_duration() {
    run(|m| async move {
        let b = buffer(BufferConfig {
            window: Duration::from_secs(20),
            max_failover_duration: Duration::from_secs(20),
            ..Default::default()
        });
        b.start("a", 1, "x");
        let mut rx = waiters(&b, 3, Duration::ZERO).await;
        tokio::time::sleep(Duration::from_millis(19_900)).await;
        assert_eq!(b.depth("a"), 3);
        tokio::time::sleep(Duration::from_millis(200)).await;
        for _ in 0..3 {
            assert_eq!(
                rx.recv().await.unwrap().1,
                Err(BufferError::FailoverTimeout)
            );
        }
        assert_eq!(m.counter(metric::EVICTED, &reason("max_duration")), 3);
        assert_eq!(
            m.counter(metric::STOPS, &reason("max_duration_exceeded")),
            1
        );
        assert!(
            !b.stop("a", 1, StopReason::NewPrimary),
            "a late stop is ignored"
        );
        assert_eq!(b.state("a"), Some(State::Idle));
    });
}

#[test]
fn s14_shutdown() {
    run(|m| async move {
        let b = buffer(BufferConfig::default());
        b.start("a", 1, "x");
        let mut rx = waiters(&b, 2, Duration::ZERO).await;
        b.shutdown();
        for _ in 0..2 {
            assert_eq!(rx.recv().await.unwrap().1, Err(BufferError::ShuttingDown));
        }
        assert_eq!(m.counter(metric::EVICTED, &reason("shutdown")), 2);
        assert!(matches!(b.wait("a", 1).await, Ok(Admission::Passed)));
        assert_eq!(m.counter(metric::SKIPPED, &reason("shutdown")), 1);
        assert_eq!(b.start("a", 2, "x"), StartOutcome::ShuttingDown);
        assert_eq!(BufferError::ShuttingDown.sqlstate(), "57P01");
    });
}

#[test]
fn s15_shards_are_independent() {
    run(|m| async move {
        let b = buffer(BufferConfig::default());
        b.start("a", 1, "x");
        b.start("b", 7, "y");
        let mut ra = waiters(&b, 2, Duration::ZERO).await;
        let held_b = {
            let b = b.clone();
            tokio::spawn(async move { b.wait("b", 3).await.map(|_| ()) })
        };
        tokio::task::yield_now().await;
        b.stop("a", 1, StopReason::NewPrimary);
        assert_eq!(ra.recv().await.unwrap().1, Ok(()));
        assert_eq!(ra.recv().await.unwrap().1, Ok(()));
        assert_eq!(
            b.state("b"),
            Some(State::Buffering),
            "b still waits for its own primary"
        );
        assert_eq!(b.depth("b"), 1);
        b.stop("b", 7, StopReason::NewPrimary);
        assert_eq!(held_b.await.unwrap(), Ok(()));
        assert_eq!(m.counter(metric::DRAINED, &[("shard", "b")]), 1);
    });
}

#[test]
fn s17_stress_many_waiters_multi_thread() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let b = Buffer::new(
            BufferConfig {
                size: 5000,
                drain_concurrency: 16,
                ..Default::default()
            },
            &["a"],
        )
        .unwrap();
        b.start("a", 1, "x");
        let released = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for i in 0..4000 {
            let b = b.clone();
            let released = Arc::clone(&released);
            tasks.push(tokio::spawn(async move {
                let r = b.wait("a", 1).await;
                if i % 10 == 0 {
                    return r.map(|_| ()); // some finish at once
                }
                if let Ok(Admission::Released(rel)) = r {
                    released.fetch_add(1, Ordering::Relaxed);
                    tokio::task::yield_now().await;
                    drop(rel);
                    return Ok(());
                }
                r.map(|_| ())
            }));
        }
        while b.depth("a") < 4000 {
            tokio::task::yield_now().await;
        }
        b.stop("a", 1, StopReason::NewPrimary);
        let all = tokio::time::timeout(Duration::from_secs(30), async {
            let mut ok = 0;
            for t in tasks {
                if t.await.unwrap().is_ok() {
                    ok += 1;
                }
            }
            ok
        })
        .await
        .expect("no deadlock: every waiter got its outcome");
        assert_eq!(all, 4000);
        assert_eq!(b.depth("a"), 0);
        assert_eq!(b.bytes(), 0);
        assert_eq!(b.state("a"), Some(State::Idle));
    });
}

#[test]
fn config_validation_names_variables() {
    let ok = BufferConfig::default();
    assert!(ok.validate(&["a"]).is_ok());
    let var = |c: BufferConfig| c.validate(&["a"]).unwrap_err().var;
    assert_eq!(
        var(BufferConfig {
            window: Duration::ZERO,
            ..ok.clone()
        }),
        "HANDOFF_BUFFER_WINDOW"
    );
    assert_eq!(
        var(BufferConfig {
            window: Duration::from_secs(30),
            ..ok.clone()
        }),
        "HANDOFF_BUFFER_WINDOW"
    );
    assert_eq!(
        var(BufferConfig {
            size: 0,
            ..ok.clone()
        }),
        "HANDOFF_BUFFER_SIZE"
    );
    assert_eq!(
        var(BufferConfig {
            drain_concurrency: 0,
            ..ok.clone()
        }),
        "HANDOFF_BUFFER_DRAIN_CONCURRENCY"
    );
    assert_eq!(
        var(BufferConfig {
            shards: Some(vec!["zz".into()]),
            ..ok
        }),
        "HANDOFF_BUFFER_SHARDS"
    );
}

#[derive(Debug, Clone)]
enum Op {
    Arrive(usize),
    Cancel(usize),
    Finish(usize),
    Start,
    Stop(bool),
    Advance(u64),
    Shutdown,
}

fn op() -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::*;
    prop_oneof![
        6 => (1usize..8).prop_map(Op::Arrive),
        2 => any::<usize>().prop_map(Op::Cancel),
        2 => any::<usize>().prop_map(Op::Finish),
        2 => Just(Op::Start),
        2 => any::<bool>().prop_map(Op::Stop),
        3 => (0u64..3000).prop_map(Op::Advance),
        1 => Just(Op::Shutdown),
    ]
}

/// Lets every runnable task run.
async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

fn check_interleaving(ops: Vec<Op>) {
    run(|m| async move {
        let cfg = BufferConfig {
            size: 4,
            max_bytes: 20,
            window: Duration::from_secs(2),
            max_failover_duration: Duration::from_secs(5),
            drain_concurrency: 2,
            ..Default::default()
        };
        let b = Buffer::new(cfg, &["a"]).unwrap();
        let (tx, mut outcomes) = mpsc::unbounded_channel::<(usize, bool)>();
        let mut tasks = Vec::new();
        let mut finishers: Vec<Option<tokio::sync::oneshot::Sender<()>>> = Vec::new();
        let mut cancelled = Vec::new();
        let mut epoch = 0;
        for op in ops {
            match op {
                Op::Arrive(bytes) => {
                    let i = tasks.len();
                    let (fin_tx, fin_rx) = tokio::sync::oneshot::channel::<()>();
                    let (b, tx) = (b.clone(), tx.clone());
                    tasks.push(tokio::spawn(async move {
                        match b.wait("a", bytes).await {
                            Ok(Admission::Released(r)) => {
                                let _ = tx.send((i, true));
                                let _ = fin_rx.await;
                                drop(r);
                            }
                            _ => {
                                let _ = tx.send((i, false));
                            }
                        }
                    }));
                    finishers.push(Some(fin_tx));
                }
                Op::Cancel(k) if !tasks.is_empty() => {
                    let k = k % tasks.len();
                    if !tasks[k].is_finished() {
                        tasks[k].abort();
                        cancelled.push(k);
                    }
                }
                Op::Finish(k) if !finishers.is_empty() => {
                    let k = k % finishers.len();
                    finishers[k].take();
                }
                Op::Start => {
                    epoch += 1;
                    b.start("a", epoch, "prop");
                }
                Op::Stop(new_primary) => {
                    let reason = if new_primary {
                        StopReason::NewPrimary
                    } else {
                        StopReason::Aborted
                    };
                    b.stop("a", epoch, reason);
                }
                Op::Advance(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
                Op::Shutdown => b.shutdown(),
                _ => {}
            }
            settle().await;
            assert!(b.depth("a") <= 4, "count bound exceeded");
            assert!(b.bytes() <= 20, "byte bound exceeded: {}", b.bytes());
        }
        // End everything: shutdown fails what is held; finishing lets releases go.
        b.shutdown();
        finishers.clear();
        tokio::time::sleep(Duration::from_secs(10)).await;
        settle().await;
        for t in tasks.iter() {
            assert!(t.is_finished(), "a request was left waiting");
        }
        drop(tx);
        let mut seen = vec![0u32; tasks.len()];
        let mut released = Vec::new();
        while let Some((i, ok)) = outcomes.recv().await {
            seen[i] += 1;
            if ok {
                released.push(i);
            }
        }
        for (i, n) in seen.iter().enumerate() {
            let expected = if cancelled.contains(&i) {
                [0, 1].contains(n)
            } else {
                *n == 1
            };
            assert!(expected, "request {i} got {n} outcomes");
        }
        assert!(
            released.windows(2).all(|w| w[0] < w[1]),
            "releases out of FIFO order: {released:?}"
        );
        assert_eq!(b.depth("a"), 0);
        assert_eq!(b.bytes(), 0);
        let evicted: u64 = [
            "window_exceeded",
            "buffer_full",
            "context_done",
            "max_duration",
            "shutdown",
        ]
        .iter()
        .map(|r| m.counter(metric::EVICTED, &reason(r)))
        .sum();
        assert_eq!(
            m.counter(metric::BUFFERED, A),
            m.counter(metric::DRAINED, A) + evicted,
            "buffered = drained + evicted"
        );
    });
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
    #[test]
    fn s16_random_interleavings_keep_every_invariant(ops in proptest::collection::vec(op(), 1..50)) {
        check_interleaving(ops);
    }
}
