//! Bad input and limits: each offending connection gets a precise error and is closed;
//! every other client is unaffected. Also the admin API.

use std::time::Duration;

use handoff_tests::raw::{http, RawClient};
use handoff_tests::{conn_str, eventually, start_proxy, Cluster};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};

async fn connect(proxy: &handoff::Proxy) -> Result<Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(
        &conn_str(&proxy.listen_addr(), "postgres", "postgres", None),
        NoTls,
    )
    .await?;
    tokio::spawn(conn);
    Ok(client)
}

async fn still_works(c: &Client, n: i32) {
    let got: i32 = c.query_one("select $1::int", &[&n]).await.unwrap().get(0);
    assert_eq!(got, n);
}

#[tokio::test]
async fn malformed_input_closes_only_the_offender() {
    let cluster = Cluster::start(0).unwrap();
    // No HANDOFF_USERS: loopback clients log in without a password.
    let proxy = start_proxy(&cluster, &[]).await.unwrap();
    let good = connect(&proxy).await.unwrap();
    good.batch_execute("begin").await.unwrap();
    still_works(&good, 1).await;

    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("length below 8", vec![0, 0, 0, 3]),
        ("negative length", vec![0xff, 0xff, 0xff, 0xf0]),
        ("length over 10000", 20_000i32.to_be_bytes().to_vec()),
        ("protocol 2.0", vec![0, 0, 0, 9, 0, 2, 0, 0, 0]),
        (
            "no user",
            vec![0, 0, 0, 13, 0, 3, 0, 0, b'a', 0, b'b', 0, 0],
        ),
        (
            "invalid utf-8",
            vec![0, 0, 0, 15, 0, 3, 0, 0, b'u', b's', b'e', b'r', 0, 0xff, 0],
        ),
    ];
    for (what, bytes) in cases {
        let mut raw = RawClient::connect(proxy.listen_addr()).await.unwrap();
        raw.send(&bytes).await.unwrap();
        let err = raw
            .expect_error_then_close()
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(err.code(), Some("08P01"), "{what}: {:?}", err.message());
        still_works(&good, 2).await;
    }

    // SSLRequest twice: the first is declined with 'N', the second is a violation.
    let mut raw = RawClient::connect(proxy.listen_addr()).await.unwrap();
    let ssl = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
    raw.send(&ssl).await.unwrap();
    let mut n = [0u8; 1];
    tokio::io::AsyncReadExt::read_exact(&mut raw.stream, &mut n)
        .await
        .unwrap();
    assert_eq!(&n, b"N");
    raw.send(&ssl).await.unwrap();
    let err = raw.expect_error_then_close().await.unwrap();
    assert_eq!(err.code(), Some("08P01"));

    // Garbage after login: a tagged message with length 1.
    let mut raw = RawClient::login_trust(proxy.listen_addr(), "postgres", "postgres")
        .await
        .unwrap();
    raw.send(&[b'Q', 0, 0, 0, 1]).await.unwrap();
    let err = raw.expect_error_then_close().await.unwrap();
    assert_eq!(err.code(), Some("08P01"));
    assert!(
        err.message().unwrap().contains("invalid message length"),
        "{:?}",
        err.message()
    );

    // An unknown message type is the server's to reject, and it does (08P01) and closes.
    let mut raw = RawClient::login_trust(proxy.listen_addr(), "postgres", "postgres")
        .await
        .unwrap();
    raw.send(&[b'!', 0, 0, 0, 4]).await.unwrap();
    let err = raw.expect_error_then_close().await.unwrap();
    assert_eq!(err.code(), Some("08P01"));

    // The well-behaved client's transaction is intact.
    still_works(&good, 3).await;
    good.batch_execute("commit").await.unwrap();
    proxy.shutdown().await;
}

#[tokio::test]
async fn client_connection_limit() {
    let cluster = Cluster::start(0).unwrap();
    let proxy = start_proxy(&cluster, &[("HANDOFF_MAX_CLIENT_CONN", "2")])
        .await
        .unwrap();
    let a = connect(&proxy).await.unwrap();
    let b = connect(&proxy).await.unwrap();
    let err = connect(&proxy).await.err().unwrap();
    assert_eq!(err.code(), Some(&SqlState::TOO_MANY_CONNECTIONS), "{err:?}");
    let msg = err.as_db_error().unwrap().message().to_string();
    assert!(msg.contains("HANDOFF_MAX_CLIENT_CONN=2"), "{msg}");
    still_works(&a, 1).await;
    still_works(&b, 2).await;
    drop(a);
    // Once a client leaves, a new one gets in.
    eventually(Duration::from_secs(10), "a free client slot", || async {
        Ok(connect(&proxy).await.is_ok())
    })
    .await
    .unwrap();
    proxy.shutdown().await;
}

#[tokio::test]
async fn admin_endpoints() {
    let cluster = Cluster::start(0).unwrap();
    let proxy = start_proxy(&cluster, &[("HANDOFF_ADMIN_TOKEN", "tok")])
        .await
        .unwrap();
    let admin = proxy.admin_addr();
    let c = connect(&proxy).await.unwrap();
    still_works(&c, 5).await;
    let _ = c.simple_query("selec 1").await.unwrap_err();

    let (status, body) = http(admin, "GET", "/healthz", None).await.unwrap();
    assert_eq!((status, body.as_str()), (200, r#"{"status":"ok"}"#));
    let (status, body) = http(admin, "GET", "/readyz", None).await.unwrap();
    assert_eq!((status, body.as_str()), (200, r#"{"status":"ready"}"#));

    let (status, body) = http(admin, "GET", "/metrics", None).await.unwrap();
    assert_eq!(status, 401);
    assert!(body.contains(r#""error""#), "{body}");
    let (status, _) = http(admin, "GET", "/metrics", Some("wrong")).await.unwrap();
    assert_eq!(status, 401);
    let (status, body) = http(admin, "GET", "/metrics", Some("tok")).await.unwrap();
    assert_eq!(status, 200);
    for series in [
        "handoff_client_connections ",
        "handoff_server_connections ",
        "handoff_client_connections_total ",
        "handoff_query_duration_seconds_bucket",
        "handoff_transaction_duration_seconds_count",
        "handoff_bytes_total{direction=\"server_to_client\"}",
        "handoff_errors_total{source=\"server\",class=\"42\"}",
    ] {
        assert!(body.contains(series), "/metrics lacks {series}:\n{body}");
    }

    let (status, body) = http(admin, "GET", "/nope", Some("tok")).await.unwrap();
    assert_eq!(status, 404);
    assert!(body.contains("no such endpoint: GET /nope"), "{body}");
    let (status, body) = http(admin, "POST", "/healthz", None).await.unwrap();
    assert_eq!(status, 405);
    assert!(body.contains("not allowed"), "{body}");
    proxy.shutdown().await;
}

#[tokio::test]
async fn unreachable_primary_and_slow_login_get_clear_errors() {
    // No PostgreSQL needed: the shard points at a port nobody listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let config = handoff::Config::from_vars([
        ("HANDOFF_LISTEN", "127.0.0.1:0".to_string()),
        ("HANDOFF_ADMIN_LISTEN", "127.0.0.1:0".to_string()),
        ("HANDOFF_SHARDS", format!("orders={closed}")),
        ("HANDOFF_CLIENT_LOGIN_TIMEOUT", "300ms".to_string()),
        ("HANDOFF_BUFFER_WINDOW", "200ms".to_string()),
    ])
    .unwrap();
    // No primary at startup: the shard buffers while discovery looks for one, and a
    // client that waited the window gets 57P03 naming the shard.
    let proxy = handoff::Proxy::start(config).await.unwrap();
    let err = connect(&proxy).await.err().unwrap();
    assert_eq!(err.code(), Some(&SqlState::CANNOT_CONNECT_NOW), "{err:?}");
    let msg = err.as_db_error().unwrap().message().to_string();
    assert!(msg.contains("shard \"orders\""), "{msg}");
    let (status, body) = handoff_tests::raw::http(proxy.admin_addr(), "GET", "/v1/shards", None)
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert!(
        body.contains("no primary found at startup") && body.contains(&closed.to_string()),
        "{body}"
    );

    // A client that connects and says nothing is dropped after the login timeout.
    let mut raw = RawClient::connect(proxy.listen_addr()).await.unwrap();
    let err = tokio::time::timeout(Duration::from_secs(10), raw.expect_error_then_close())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(err.code(), Some("08P01"));
    assert!(
        err.message()
            .unwrap()
            .contains("HANDOFF_CLIENT_LOGIN_TIMEOUT"),
        "{:?}",
        err.message()
    );
    proxy.shutdown().await;
}

fn msg(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_default()
}

/// A simple Query message.
fn query(sql: &str) -> Vec<u8> {
    let mut m = vec![b'Q'];
    m.extend_from_slice(&((sql.len() + 5) as i32).to_be_bytes());
    m.extend_from_slice(sql.as_bytes());
    m.push(0);
    m
}

#[tokio::test]
async fn connection_limits_and_message_size_give_precise_errors() {
    let cluster = Cluster::start(0).unwrap();
    cluster.primary.psql("CREATE ROLE other LOGIN").unwrap();
    let proxy = start_proxy(
        &cluster,
        &[
            ("HANDOFF_MAX_USER_CLIENT_CONN", "2"),
            ("HANDOFF_MAX_DB_CLIENT_CONN", "3"),
            ("HANDOFF_MAX_MESSAGE_SIZE", "1kB"),
        ],
    )
    .await
    .unwrap();
    let as_user = |user: &'static str| {
        let url = conn_str(&proxy.listen_addr(), user, "postgres", None);
        async move {
            let (c, conn) = tokio_postgres::connect(&url, NoTls).await?;
            tokio::spawn(conn);
            Ok::<Client, tokio_postgres::Error>(c)
        }
    };
    let a = as_user("postgres").await.unwrap();
    let b = as_user("postgres").await.unwrap();
    let err = as_user("postgres").await.err().unwrap();
    assert_eq!(err.code(), Some(&SqlState::TOO_MANY_CONNECTIONS), "{err:?}");
    assert!(
        msg(&err).contains("HANDOFF_MAX_USER_CLIENT_CONN"),
        "{err:?}"
    );
    // The database's limit (3) counts every user.
    let o = as_user("other").await.unwrap();
    let err = as_user("other").await.err().unwrap();
    assert_eq!(err.code(), Some(&SqlState::TOO_MANY_CONNECTIONS), "{err:?}");
    assert!(msg(&err).contains("HANDOFF_MAX_DB_CLIENT_CONN"), "{err:?}");
    // A slot frees when its client leaves.
    drop(b);
    let b = eventually_connect(|| as_user("postgres")).await;
    still_works(&b, 1).await;
    still_works(&o, 2).await;

    // A message the proxy must parse (Parse) over HANDOFF_MAX_MESSAGE_SIZE: 54000 and
    // that client is closed; a long simple Query is relayed, not parsed.
    let long = format!("select '{}'::text", "x".repeat(2000));
    let rows = a.simple_query(&long).await.unwrap();
    let values: Vec<usize> = rows
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::len),
            _ => None,
        })
        .collect();
    assert_eq!(values, [2000]);
    let err = b.prepare(&long).await.unwrap_err();
    assert_eq!(
        err.code(),
        Some(&SqlState::PROGRAM_LIMIT_EXCEEDED),
        "{err:?}"
    );
    assert!(msg(&err).contains("HANDOFF_MAX_MESSAGE_SIZE"), "{err:?}");
    assert!(b.is_closed() || b.simple_query("select 1").await.is_err());
    still_works(&a, 3).await;
    proxy.shutdown().await;
}

async fn eventually_connect<F, Fut>(f: F) -> Client
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<Client, tokio_postgres::Error>>,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match f().await {
            Ok(c) => return c,
            Err(e) if std::time::Instant::now() < deadline => {
                assert_eq!(e.code(), Some(&SqlState::TOO_MANY_CONNECTIONS), "{e:?}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("no slot freed: {e:?}"),
        }
    }
}

#[tokio::test]
async fn idle_clients_and_idle_transactions_time_out() {
    let cluster = Cluster::start(0).unwrap();
    cluster.primary.psql("CREATE TABLE idle_t (n int)").unwrap();
    let proxy = start_proxy(
        &cluster,
        &[
            ("HANDOFF_CLIENT_IDLE_TIMEOUT", "1s"),
            ("HANDOFF_IDLE_TRANSACTION_TIMEOUT", "300ms"),
        ],
    )
    .await
    .unwrap();
    // Idle in a transaction: 25P03, and the transaction is rolled back.
    let mut raw = RawClient::login_trust(proxy.listen_addr(), "postgres", "postgres")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    raw.send(&query("BEGIN; INSERT INTO idle_t VALUES (1)"))
        .await
        .unwrap();
    raw.drain_until_ready().await.unwrap();
    let err = tokio::time::timeout(Duration::from_secs(5), raw.expect_error_then_close())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(err.code(), Some("25P03"), "{:?}", err.message());
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(err
        .message()
        .unwrap()
        .contains("HANDOFF_IDLE_TRANSACTION_TIMEOUT"));
    eventually(Duration::from_secs(5), "the rollback", || async {
        Ok(cluster.primary.psql("select count(*) from idle_t")? == "0"
            && cluster.primary.psql(
                "select count(*) from pg_stat_activity where state like 'idle in transaction%'",
            )? == "0")
    })
    .await
    .unwrap();

    // Idle outside a transaction: 57P05 after HANDOFF_CLIENT_IDLE_TIMEOUT; a busy client
    // is not affected.
    let mut idle = RawClient::login_trust(proxy.listen_addr(), "postgres", "postgres")
        .await
        .unwrap();
    let busy = connect(&proxy).await.unwrap();
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_millis(1500) {
        still_works(&busy, 7).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let err = tokio::time::timeout(Duration::from_secs(5), idle.expect_error_then_close())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(err.code(), Some("57P05"), "{:?}", err.message());
    assert!(err
        .message()
        .unwrap()
        .contains("HANDOFF_CLIENT_IDLE_TIMEOUT"));
    proxy.shutdown().await;
}

/// Found by the `session` fuzz target: a client that leaves half-way through sending a
/// message must not leave its server connection in the pool with that half message in
/// it (the next client's query would be read as the rest of it).
#[tokio::test]
async fn a_client_leaving_mid_message_does_not_poison_the_pool() {
    let cluster = Cluster::start(0).unwrap();
    let proxy = start_proxy(&cluster, &[("HANDOFF_POOL_SIZE", "1")])
        .await
        .unwrap();
    let good = connect(&proxy).await.unwrap();
    for tag in [b'd', b'Q'] {
        let mut raw = RawClient::login_trust(proxy.listen_addr(), "postgres", "postgres")
            .await
            .unwrap();
        // A message that says 100 bytes, 10 of them sent, then the client goes.
        raw.send(&[
            tag, 0, 0, 0, 100, b's', b'e', b'l', b'e', b'c', b't', b' ', b'1', b'2', b'3',
        ])
        .await
        .unwrap();
        drop(raw);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let got: i32 =
            tokio::time::timeout(Duration::from_secs(5), good.query_one("select 7", &[]))
                .await
                .expect("the pooled connection was left with a half message in it")
                .unwrap()
                .get(0);
        assert_eq!(got, 7);
    }
    proxy.shutdown().await;
}
