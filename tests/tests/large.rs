//! A 100 MB value in each direction streams through the proxy without being held whole:
//! the test process (which runs the proxy in-process and streams its own side too) must
//! not grow its peak memory by anything near the value's size.

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
