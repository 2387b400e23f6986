//! A 100 MB value in each direction streams through the proxy without being held whole:
//! the test process (which runs the proxy in-process and streams its own side too) must
//! not grow its peak memory by anything near the value's size.

use std::time::Duration;

use handoff_protocol::backend::BackendMessage;
use handoff_tests::raw::RawClient;
use handoff_tests::{start_proxy, Cluster};

const SIZE: usize = 100 * 1024 * 1024;

fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test]
async fn hundred_megabytes_each_way_in_bounded_memory() {
    let cluster = Cluster::start(0).unwrap();
    let proxy = start_proxy(&cluster, &[]).await.unwrap();
    let mut raw = RawClient::login_trust(proxy.listen_addr(), "postgres", "postgres")
        .await
        .unwrap();
    let before = peak_rss_kib();

    // Client to server: a Query whose text carries a 100 MB literal, written in 1 MB
    // pieces from one reused buffer.
    let head = b"select length('";
    let tail = b"')\0";
    let len = 4 + head.len() + SIZE + tail.len();
    let mut msg = vec![b'Q'];
    msg.extend_from_slice(&(len as i32).to_be_bytes());
    msg.extend_from_slice(head);
    raw.send(&msg).await.unwrap();
    let chunk = vec![b'x'; 1024 * 1024];
    for _ in 0..SIZE / chunk.len() {
        raw.send(&chunk).await.unwrap();
    }
    raw.send(tail).await.unwrap();
    let mut length = None;
    loop {
        match raw.read_message().await.unwrap().unwrap() {
            BackendMessage::Other(f) if f.tag == b'D' => {
                length = Some(String::from_utf8_lossy(&f.body[6..]).to_string());
            }
            BackendMessage::ReadyForQuery(_) => break,
            BackendMessage::ErrorResponse(e) => panic!("{:?}", e.message()),
            _ => {}
        }
    }
    assert_eq!(length.as_deref(), Some(SIZE.to_string().as_str()));

    // Server to client: a 100 MB DataRow, skipped chunk by chunk on our side.
    let mut q = vec![b'Q'];
    let sql = format!("select repeat('y', {SIZE})\0");
    q.extend_from_slice(&((sql.len() + 4) as i32).to_be_bytes());
    q.extend_from_slice(sql.as_bytes());
    raw.send(&q).await.unwrap();
    let (row_bytes, _) = raw.drain_until_ready().await.unwrap();
    assert_eq!(row_bytes as usize, 2 + 4 + SIZE);

    let grown_mib = (peak_rss_kib() - before) / 1024;
    eprintln!("peak RSS grew by {grown_mib} MiB while relaying 2 x 100 MiB");
    assert!(
        grown_mib < 32,
        "peak memory grew by {grown_mib} MiB while relaying 2 x 100 MiB"
    );
    proxy.shutdown().await;
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn query_msg(sql: &str) -> Vec<u8> {
    let mut q = vec![b'Q'];
    q.extend_from_slice(&((sql.len() + 5) as i32).to_be_bytes());
    q.extend_from_slice(sql.as_bytes());
    q.push(0);
    q
}

/// Backpressure: a client that stops reading a 1 GB result, and a server that stops
/// reading a COPY, hold the proxy to its fixed buffers; another client is unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_reader_on_either_side_keeps_memory_bounded() {
    let cluster = Cluster::start(0).unwrap();
    cluster
        .primary
        .psql("CREATE TABLE sink (line text)")
        .unwrap();
    for mode in ["transaction", "session"] {
        let proxy = start_proxy(&cluster, &[("HANDOFF_POOL_MODE", mode)])
            .await
            .unwrap();
        let (other, conn) = tokio_postgres::connect(
            &handoff_tests::conn_str(&proxy.listen_addr(), "postgres", "postgres", None),
            tokio_postgres::NoTls,
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        let before = rss_kib();

        // A client asks for ~1 GB and reads nothing.
        let mut lazy = RawClient::login_trust(proxy.listen_addr(), "postgres", "postgres")
            .await
            .unwrap();
        lazy.send(&query_msg(
            "select repeat('x', 1000) from generate_series(1, 1000000)",
        ))
        .await
        .unwrap();
        // A COPY into a locked table: the server waits for the lock and stops reading.
        let mut locker = RawClient::login_trust(proxy.listen_addr(), "postgres", "postgres")
            .await
            .unwrap();
        locker
            .send(&query_msg(
                "BEGIN; LOCK TABLE sink IN ACCESS EXCLUSIVE MODE",
            ))
            .await
            .unwrap();
        locker.drain_until_ready().await.unwrap();
        let mut copier = RawClient::login_trust(proxy.listen_addr(), "postgres", "postgres")
            .await
            .unwrap();
        copier
            .send(&query_msg("COPY sink FROM STDIN"))
            .await
            .unwrap();
        // 64 MB of CopyData; the writes must stall long before the end.
        let line = vec![b'y'; 64 * 1024 - 1];
        let mut msg = vec![b'd'];
        msg.extend_from_slice(&((line.len() + 1 + 4) as i32).to_be_bytes());
        msg.extend_from_slice(&line);
        msg.push(b'\n');
        let progress = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let writer = {
            let progress = std::sync::Arc::clone(&progress);
            tokio::spawn(async move {
                for _ in 0..1024 {
                    copier.send(&msg).await.unwrap();
                    progress.fetch_add(msg.len(), std::sync::atomic::Ordering::Relaxed);
                }
                copier
            })
        };
        // Meanwhile the other client works normally.
        for i in 0..50i32 {
            let got: i32 = other
                .query_one("select $1::int", &[&i])
                .await
                .unwrap()
                .get(0);
            assert_eq!(got, i);
        }
        // Stalled: no progress for a second.
        let mut sent = progress.load(std::sync::atomic::Ordering::Relaxed);
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now = progress.load(std::sync::atomic::Ordering::Relaxed);
            if now == sent {
                break;
            }
            sent = now;
        }
        assert!(
            !writer.is_finished(),
            "{mode}: 64 MB of COPY went into a server that reads nothing"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        let grown = rss_kib().saturating_sub(before) / 1024;
        eprintln!(
            "{mode}: COPY stalled after {} MiB; RSS grew {grown} MiB with a 1 GB unread result and a stalled COPY",
            sent >> 20
        );
        assert!(grown < 64, "{mode}: memory grew by {grown} MiB");
        assert!(
            sent < 64 << 20,
            "{mode}: {sent} bytes went in before the stall"
        );

        // Unblock: the COPY completes; the lazy client's connection is dropped.
        locker.send(&query_msg("COMMIT")).await.unwrap();
        locker.drain_until_ready().await.unwrap();
        let mut copier = tokio::time::timeout(Duration::from_secs(60), writer)
            .await
            .unwrap()
            .unwrap();
        copier.send(&[b'c', 0, 0, 0, 4]).await.unwrap();
        let (_, status) = tokio::time::timeout(Duration::from_secs(30), copier.drain_until_ready())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(status, handoff_protocol::backend::TransactionStatus::Idle);
        drop(lazy);
        proxy.shutdown().await;
        cluster.primary.psql("TRUNCATE sink").unwrap();
    }
}
