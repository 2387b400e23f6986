//! The failover buffer: the Idle pass-through (one atomic load per request), alone and
//! with two threads contending, and the cost of holding and releasing 1,000 and 10,000
//! requests.

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use handoff_buffer::{Admission, Buffer, BufferConfig, StopReason};

/// Polls a `wait` on an idle shard once: it must be ready at once.
fn pass(b: &Buffer) {
    let mut cx = Context::from_waker(Waker::noop());
    let fut = pin!(b.wait("a", 64));
    match fut.poll(&mut cx) {
        Poll::Ready(Ok(Admission::Passed)) => {}
        _ => panic!("an idle shard must pass at once"),
    }
}

fn bench(c: &mut Criterion) {
    let b = Buffer::new(BufferConfig::default(), &["a", "b"]).unwrap();
    let mut g = c.benchmark_group("buffer");
    g.bench_function("idle_passthrough", |bench| {
        bench.iter(|| pass(black_box(&b)))
    });
    g.bench_function("idle_passthrough_2_threads", |bench| {
        bench.iter_custom(|iters| {
            let start = Instant::now();
            std::thread::scope(|s| {
                for _ in 0..2 {
                    s.spawn(|| {
                        for _ in 0..iters {
                            pass(black_box(&b));
                        }
                    });
                }
            });
            // The time each of the two contending threads took per request.
            start.elapsed()
        })
    });
    for n in [1_000usize, 10_000] {
        g.bench_function(format!("hold_and_release_{n}"), |bench| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let mut epoch = 0;
            bench.iter(|| {
                epoch += 1;
                rt.block_on(async {
                    let buf = Buffer::new(
                        BufferConfig {
                            size: n,
                            drain_concurrency: 64,
                            window: Duration::from_secs(60),
                            max_failover_duration: Duration::from_secs(60),
                            ..Default::default()
                        },
                        &["a"],
                    )
                    .unwrap();
                    buf.start("a", epoch, "bench");
                    let tasks: Vec<_> = (0..n)
                        .map(|_| {
                            let buf = buf.clone();
                            tokio::spawn(async move { buf.wait("a", 64).await.is_ok() })
                        })
                        .collect();
                    while buf.depth("a") < n {
                        tokio::task::yield_now().await;
                    }
                    buf.stop("a", epoch, StopReason::NewPrimary);
                    for t in tasks {
                        assert!(t.await.unwrap());
                    }
                })
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
