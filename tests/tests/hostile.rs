//! Hostile input against the running proxy: every malformed case gets its documented
//! error (`08P01` unless stated) and a close, or just a close; nothing panics; a
//! well-behaved client running queries the whole time sees every one succeed; random
//! CancelRequests cancel nothing; and a storm of connections dropped mid-startup leaves
//! the connection count and memory where they were.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use handoff_protocol::backend::BackendMessage;
use handoff_tests::raw::{http, RawClient};
use handoff_tests::{conn_str, eventually, start_proxy, Cluster};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::NoTls;

/// A small deterministic generator (xorshift64*), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn startup_bytes(params: &[(&[u8], &[u8])], version: u32, terminate: bool) -> Vec<u8> {
    let mut body = version.to_be_bytes().to_vec();
    for (k, v) in params {
        body.extend_from_slice(k);
        body.push(0);
        body.extend_from_slice(v);
        body.push(0);
    }
    if terminate {
        body.push(0);
    }
    let mut out = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    out
}

/// What the proxy did with a connection after the bytes were sent: the SQLSTATE of the
/// ErrorResponse it sent before closing, or `None` if it closed without one.
async fn outcome(raw: &mut RawClient) -> Result<Option<String>, String> {
    let read = async {
        let mut code = None;
        loop {
            match raw.read_message().await {
                Ok(Some(BackendMessage::ErrorResponse(f))) => {
                    code = f.code().map(str::to_string);
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return code,
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .map_err(|_| "the connection stayed open".to_string())
}

/// Reads up to ReadyForQuery (the session must stay open); returns the SQLSTATE of the
/// ErrorResponse on the way, if any.
async fn error_then_ready(raw: &mut RawClient, what: &str) -> Option<String> {
    let mut code = None;
    loop {
        match raw.read_message().await.unwrap() {
            Some(BackendMessage::ErrorResponse(f)) => code = f.code().map(str::to_string),
            Some(BackendMessage::ReadyForQuery(_)) => return code,
            Some(_) => {}
            None => panic!("closed after {what}"),
        }
    }
}

async fn gauge(proxy: &handoff::Proxy, name: &str) -> f64 {
    let (_, body) = http(proxy.admin_addr(), "GET", "/metrics", None)
        .await
        .unwrap();
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Opens `n` connections (200 at a time), sends each a piece of a startup packet and
/// drops it.
async fn storm(addr: std::net::SocketAddr, n: usize, seed: u64) {
    let mut rng = Rng(seed);
    for _ in 0..n / 200 {
        let mut tasks = Vec::new();
        for _ in 0..200 {
            let n = (rng.next() % 7) as usize;
            let junk = rng.bytes(n);
            tasks.push(tokio::spawn(async move {
                if let Ok(mut s) = tokio::net::TcpStream::connect(addr).await {
                    let _ = s.write_all(&junk).await;
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_gets_precise_errors_and_harms_nobody_else() {
    let cluster = Cluster::start(0).unwrap();
    let proxy = start_proxy(&cluster, &[("HANDOFF_CLIENT_LOGIN_TIMEOUT", "2s")])
        .await
        .unwrap();
    let addr = proxy.listen_addr();

    // The well-behaved client: queries back to back for the whole test.
    let (good, conn) =
        tokio_postgres::connect(&conn_str(&addr, "postgres", "postgres", None), NoTls)
            .await
            .unwrap();
    tokio::spawn(conn);
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let worker = {
        let (stop, done) = (Arc::clone(&stop), Arc::clone(&done));
        tokio::spawn(async move {
            let mut i = 0i64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let got: i64 = good
                    .query_one("select $1::bigint", &[&i])
                    .await
                    .map_err(|e| format!("the good client failed: {e:?}"))?
                    .get(0);
                if got != i {
                    return Err(format!("wrong answer {got} for {i}"));
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, String>(good)
        })
    };

    let user = (&b"user"[..], &b"postgres"[..]);
    let ssl = [0u8, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
    let mut cases: Vec<(String, Vec<u8>, &[&str])> = vec![
        ("startup length 0".into(), vec![0, 0, 0, 0], &["08P01"]),
        ("startup length 3".into(), vec![0, 0, 0, 3], &["08P01"]),
        (
            "startup length 7".into(),
            vec![0, 0, 0, 7, 0, 3, 0],
            &["08P01"],
        ),
        (
            "startup length 2^31-1".into(),
            vec![0x7f, 0xff, 0xff, 0xff],
            &["08P01"],
        ),
        (
            "startup length -1".into(),
            vec![0xff, 0xff, 0xff, 0xff],
            &["08P01"],
        ),
        (
            "startup length i32::MIN".into(),
            vec![0x80, 0, 0, 0],
            &["08P01"],
        ),
        (
            "protocol 4.0".into(),
            startup_bytes(&[user], 0x0004_0000, true),
            &["08P01", "0A000"],
        ),
        (
            "no user".into(),
            startup_bytes(&[(b"database", b"postgres")], 196608, true),
            &["08P01"],
        ),
        (
            "invalid UTF-8 value".into(),
            startup_bytes(&[(b"user", b"\xff\xfe")], 196608, true),
            &["08P01"],
        ),
        (
            "invalid UTF-8 name".into(),
            startup_bytes(&[(b"\xc3\x28", b"x"), user], 196608, true),
            &["08P01"],
        ),
        (
            "parameters not terminated".into(),
            startup_bytes(&[user], 196608, false),
            &["08P01"],
        ),
        (
            "name without a value".into(),
            {
                let mut b = 196608u32.to_be_bytes().to_vec();
                b.extend_from_slice(b"user\0");
                let mut out = ((b.len() + 4) as i32).to_be_bytes().to_vec();
                out.extend_from_slice(&b);
                out
            },
            &["08P01"],
        ),
        ("SSLRequest twice".into(), [ssl, ssl].concat(), &["08P01"]),
    ];
    let mut rng = Rng(0x5eed_cafe);
    for i in 0..30 {
        let n = 1 + (rng.next() % 300) as usize;
        cases.push((
            format!("random startup bytes #{i} ({n} bytes)"),
            rng.bytes(n),
            &[],
        ));
    }
    // Each case on its own connection; the count is reported by the test output.
    let mut run = 0;
    for (what, bytes, codes) in &cases {
        let mut raw = RawClient::connect(addr).await.unwrap();
        raw.send(bytes).await.unwrap();
        let got = outcome(&mut raw)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        match (&got, codes.is_empty()) {
            // Random bytes: any error must still be a protocol error or a timeout of
            // the login; a close without a word is fine too.
            (Some(c), true) => assert!(c == "08P01" || c == "0A000", "{what}: {c}"),
            (None, true) => {}
            (Some(c), false) => assert!(codes.contains(&c.as_str()), "{what}: {c}"),
            (None, false) => panic!("{what}: closed without an error"),
        }
        run += 1;
    }

    // After a normal login.
    let after_login: Vec<(String, Vec<u8>, Option<&str>)> = vec![
        ("length 0".into(), vec![b'Q', 0, 0, 0, 0], Some("08P01")),
        ("length 3".into(), vec![b'Q', 0, 0, 0, 3], Some("08P01")),
        (
            "length 2^31-1".into(),
            vec![b'Q', 0x7f, 0xff, 0xff, 0xff],
            Some("08P01"),
        ),
        (
            "length -1".into(),
            vec![b'P', 0xff, 0xff, 0xff, 0xff],
            Some("08P01"),
        ),
        ("unknown tag".into(), vec![b'!', 0, 0, 0, 4], Some("08P01")),
        (
            "unknown tag with a body".into(),
            vec![0xee, 0, 0, 0, 6, 1, 2],
            Some("08P01"),
        ),
        (
            "Parse without its fields".into(),
            vec![b'P', 0, 0, 0, 5, b'x'],
            Some("08P01"),
        ),
    ];
    for (what, bytes, code) in &after_login {
        let mut raw = RawClient::login_trust(addr, "postgres", "postgres")
            .await
            .unwrap();
        raw.send(bytes).await.unwrap();
        let got = outcome(&mut raw)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(got.as_deref(), *code, "{what}");
        run += 1;
    }
    for i in 0..20 {
        let mut raw = RawClient::login_trust(addr, "postgres", "postgres")
            .await
            .unwrap();
        let n = 1 + (rng.next() % 200) as usize;
        let mut bytes = rng.bytes(n);
        // A tag the server knows half the time, so some reach it.
        if i % 2 == 0 {
            bytes[0] = b"QPBDESCHFdcf"[(rng.next() % 12) as usize];
        }
        raw.send(&bytes).await.unwrap();
        // Random bytes may also be a valid prefix: then close our side and the proxy
        // must close too.
        let _ = raw.stream.shutdown().await;
        let got = outcome(&mut raw)
            .await
            .unwrap_or_else(|e| panic!("random bytes after login #{i}: {e}"));
        if let Some(c) = got {
            // Either the proxy's 08P01 or whatever the server said of them.
            assert!(c.len() == 5, "random bytes after login #{i}: {c}");
        }
        run += 1;
    }
    // A truncated message, then the client leaves.
    let mut raw = RawClient::login_trust(addr, "postgres", "postgres")
        .await
        .unwrap();
    raw.send(&[b'Q', 0, 0, 1, 0, b's', b'e']).await.unwrap();
    drop(raw);
    run += 1;

    // Errors the server answers keep the session usable.
    let mut raw = RawClient::login_trust(addr, "postgres", "postgres")
        .await
        .unwrap();
    let mut bind = vec![b'B'];
    let body = b"\0nosuch\0\0\0\0\0\0\0";
    bind.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    bind.extend_from_slice(body);
    bind.extend_from_slice(&[b'S', 0, 0, 0, 4]);
    raw.send(&bind).await.unwrap();
    assert_eq!(
        error_then_ready(&mut raw, "a Bind to an unknown statement")
            .await
            .as_deref(),
        Some("26000")
    );
    // A Bind whose parameter count runs past its end: the server's own 08P01 for that
    // request, and the session goes on (as with PostgreSQL directly).
    let mut batch = vec![b'P', 0, 0, 0, 16, 0];
    batch.extend_from_slice(b"select 1\0\0\0");
    batch.extend_from_slice(&[
        b'B', 0, 0, 0, 11, 0, 0, 0, 0, 0x7f, 0xff, 0, b'S', 0, 0, 0, 4,
    ]);
    raw.send(&batch).await.unwrap();
    assert_eq!(
        error_then_ready(&mut raw, "a short Bind").await.as_deref(),
        Some("08P01")
    );
    raw.send(&[
        b'Q', 0, 0, 0, 13, b's', b'e', b'l', b'e', b'c', b't', b' ', b'1', 0,
    ])
    .await
    .unwrap();
    raw.drain_until_ready().await.unwrap();
    run += 1;

    // CancelRequests with random keys never cancel the good client's query.
    let (sleeper, conn) =
        tokio_postgres::connect(&conn_str(&addr, "postgres", "postgres", None), NoTls)
            .await
            .unwrap();
    tokio::spawn(conn);
    let slow = tokio::spawn(async move { sleeper.simple_query("select pg_sleep(1)").await });
    for _ in 0..200 {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut msg = vec![0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e];
        msg.extend_from_slice(&rng.bytes(8));
        s.write_all(&msg).await.unwrap();
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
        assert!(rest.is_empty(), "a CancelRequest got an answer");
    }
    slow.await
        .unwrap()
        .expect("a random CancelRequest cancelled someone else's query");
    run += 1;

    // Connection storms: dropped mid-startup. The count returns to where it was and a
    // second storm does not grow memory (no leak per connection).
    let baseline = gauge(&proxy, "handoff_client_connections").await;
    storm(addr, 2000, 1).await;
    eventually(
        Duration::from_secs(15),
        "storm connections to close",
        || async { Ok(gauge(&proxy, "handoff_client_connections").await <= baseline) },
    )
    .await
    .unwrap();
    let after_first = rss_kib();
    storm(addr, 2000, 2).await;
    eventually(
        Duration::from_secs(15),
        "storm connections to close",
        || async { Ok(gauge(&proxy, "handoff_client_connections").await <= baseline) },
    )
    .await
    .unwrap();
    let after_second = rss_kib();
    eprintln!(
        "hostile cases run: {run}; RSS after storm 1: {after_first} KiB, after storm 2: {after_second} KiB"
    );
    assert!(
        after_second <= after_first + 16 * 1024,
        "memory grew by {} KiB over 2000 dropped connections",
        after_second.saturating_sub(after_first)
    );
    run += 2;

    stop.store(true, Ordering::Relaxed);
    let good = worker.await.unwrap().unwrap();
    assert!(
        done.load(Ordering::Relaxed) > 50,
        "the good client barely ran"
    );
    good.simple_query("select 1").await.unwrap();
    assert!(run >= 70);
    proxy.shutdown().await;
}
