//! Pool checkout and return on the idle path (a connection is free), which should cost a
//! mutex and a pointer move, no allocation.
//!
//! The server side is a minimal stand-in that answers a login with AuthenticationOk,
//! BackendKeyData and ReadyForQuery and then stays silent: the benchmark never talks to
//! it after the first checkout, so a real PostgreSQL would add nothing but setup time.

use std::time::Duration;

use bytes::BytesMut;
use criterion::{black_box, criterion_group, criterion_main, Criterion};
use handoff::backend::pool::{PoolKey, Pools};
use handoff::config::{HostPort, PoolSettings};
use handoff_protocol::backend::{Authentication, BackendMessage, TransactionStatus};
use handoff_protocol::framing::decode_startup;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

async fn stand_in_server() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let mut buf = BytesMut::new();
            while decode_startup(&mut buf).unwrap().is_none() {
                if s.read_buf(&mut buf).await.unwrap() == 0 {
                    break;
                }
            }
            let mut out = BytesMut::new();
            BackendMessage::Authentication(Authentication::Ok).encode(&mut out);
            BackendMessage::BackendKeyData {
                pid: 1,
                key: bytes::Bytes::from_static(&[0, 0, 0, 2]),
            }
            .encode(&mut out);
            BackendMessage::ReadyForQuery(TransactionStatus::Idle).encode(&mut out);
            s.write_all(&out).await.unwrap();
            held.push(s);
        }
    });
    addr
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let pool = rt.block_on(async {
        let addr = stand_in_server().await;
        let settings = PoolSettings {
            size: 4,
            min_idle: 0,
            query_wait_timeout: Duration::from_secs(5),
            idle_timeout: Duration::ZERO,
            lifetime: Duration::ZERO,
            max_prepared: 16,
        };
        let pools = Box::leak(Box::new(Pools::new(
            settings,
            Duration::from_secs(5),
            Default::default(),
        )));
        let key = PoolKey {
            user: "bench".into(),
            database: "bench".into(),
            addr: HostPort {
                host: "127.0.0.1".into(),
                port: addr.port(),
            },
        };
        let pool = pools.get(&key, &handoff::backend::Credentials::None, "main");
        let b = pool.checkout().await.unwrap();
        pool.checkin(b);
        pool
    });
    let mut g = c.benchmark_group("pool");
    g.bench_function("block_on_baseline", |b| {
        b.iter(|| rt.block_on(async { black_box(1) }))
    });
    g.bench_function("checkout_checkin_idle", |b| {
        b.iter(|| {
            rt.block_on(async {
                let conn = pool.checkout().await.unwrap();
                pool.checkin(black_box(conn));
            })
        })
    });
    // What a transaction's attach does when a connection is free: no future, no
    // block_on (so no baseline to subtract).
    g.bench_function("try_checkout_checkin_idle", |b| {
        rt.block_on(async {
            b.iter(|| {
                let conn = pool.try_checkout().expect("an idle connection");
                pool.checkin(black_box(conn));
            })
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
