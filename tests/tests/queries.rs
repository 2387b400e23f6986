//! Queries through the proxy with real clients: simple and extended protocol,
//! transactions, errors, COPY, large values, LISTEN/NOTIFY, cancel, psql.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt, TryStreamExt};
use handoff_tests::{conn_str, eventually, start_proxy, Cluster};
use tokio_postgres::error::SqlState;
use tokio_postgres::{AsyncMessage, Client, NoTls};

const USERS: (&str, &str) = ("HANDOFF_USERS", "postgres=secret");

async fn connect(proxy: &handoff::Proxy) -> Client {
    let (client, conn) = tokio_postgres::connect(
        &conn_str(&proxy.listen_addr(), "postgres", "postgres", Some("secret")),
        NoTls,
    )
    .await
    .expect("connect through the proxy");
    tokio::spawn(conn);
    client
}

#[tokio::test]
async fn simple_extended_transactions_and_errors() {
    let cluster = Cluster::start(0).unwrap();
    let proxy = start_proxy(&cluster, &[USERS]).await.unwrap();
    let c = connect(&proxy).await;

    // Simple protocol, several statements in one Query.
    let msgs = c
        .simple_query("create table t (id int primary key, v text); insert into t values (1, 'a'); select v from t")
        .await
        .unwrap();
    let rows: Vec<_> = msgs
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap().to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(rows, vec!["a"]);

    // Extended protocol with parameters, prepared statements reused.
    let stmt = c.prepare("insert into t values ($1, $2)").await.unwrap();
    for i in 2..12 {
        c.execute(&stmt, &[&i, &format!("v{i}")]).await.unwrap();
    }
    let row = c
        .query_one("select count(*), max(v) from t where id > $1", &[&1i32])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 10);
    assert_eq!(row.get::<_, String>(1), "v9");

    // Transactions: rollback discards, commit keeps.
    c.batch_execute("begin; insert into t values (100, 'x'); rollback")
        .await
        .unwrap();
    c.batch_execute("begin; insert into t values (101, 'y'); commit")
        .await
        .unwrap();
    let n: i64 = c
        .query_one("select count(*) from t where id in (100, 101)", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);

    // A syntax error is reported with its SQLSTATE and the session continues.
    let err = c.simple_query("selec 1").await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::SYNTAX_ERROR));
    // An error inside a transaction aborts it; ROLLBACK recovers.
    c.batch_execute("begin").await.unwrap();
    let err = c
        .execute("insert into t values (1, 'dup')", &[])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::UNIQUE_VIOLATION));
    let err = c.query_one("select 1", &[]).await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::IN_FAILED_SQL_TRANSACTION));
    c.batch_execute("rollback").await.unwrap();
    let one: i32 = c.query_one("select 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn copy_in_and_out_and_a_10mb_value() {
    let cluster = Cluster::start(0).unwrap();
    let proxy = start_proxy(&cluster, &[USERS]).await.unwrap();
    let c = connect(&proxy).await;
    c.batch_execute("create table c (id int, v text)")
        .await
        .unwrap();

    let sink = c.copy_in("copy c from stdin").await.unwrap();
    futures_util::pin_mut!(sink);
    let mut data = String::new();
    for i in 0..5000 {
        data.push_str(&format!("{i}\trow {i}\n"));
    }
    sink.send(bytes::Bytes::from(data.clone())).await.unwrap();
    let copied = sink.finish().await.unwrap();
    assert_eq!(copied, 5000);

    let stream = c
        .copy_out("copy (select * from c order by id) to stdout")
        .await
        .unwrap();
    let chunks: Vec<bytes::Bytes> = stream.try_collect().await.unwrap();
    let out: Vec<u8> = chunks.concat();
    assert_eq!(String::from_utf8(out).unwrap(), data);

    // A COPY that fails midway is reported and the session goes on.
    let err = c
        .copy_out("copy nosuchtable to stdout")
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Some(&SqlState::UNDEFINED_TABLE));

    // 10 MB in both directions.
    let big: String = "0123456789abcdef".repeat(10 * 1024 * 1024 / 16);
    c.execute("insert into c values (-1, $1)", &[&big])
        .await
        .unwrap();
    let back: String = c
        .query_one("select v from c where id = -1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(back.len(), big.len());
    assert!(back == big);
    proxy.shutdown().await;
}

#[tokio::test]
async fn session_mode_clients_know_their_backends_real_pid() {
    let cluster = Cluster::start(0).unwrap();
    let proxy = start_proxy(&cluster, &[("HANDOFF_POOL_MODE", "session")])
        .await
        .unwrap();
    let mut raw =
        handoff_tests::raw::RawClient::login_trust(proxy.listen_addr(), "postgres", "postgres")
            .await
            .unwrap();
    let (pid, _) = raw.key_data.clone().expect("BackendKeyData at login");
    let direct = handoff_tests::admin::server(&cluster.primary);
    let (c, conn) = tokio_postgres::connect(&direct, NoTls).await.unwrap();
    tokio::spawn(conn);
    // It is a client backend on the server, the one serving this session.
    let row = c
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND backend_type = 'client backend'",
            &[&pid],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 1, "pid {pid} is not a backend");
    // Terminating it by that pid ends the client's session.
    let row = c
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0));
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match raw.read_message().await {
                Ok(Some(handoff_protocol::backend::BackendMessage::ErrorResponse(_)))
                | Ok(None)
                | Err(_) => return,
                Ok(Some(_)) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the session outlived its backend");
    proxy.shutdown().await;
}

#[tokio::test]
async fn listen_notify_and_cancel_in_session_mode() {
    let cluster = Cluster::start(0).unwrap();
    // LISTEN needs the same server connection for the whole session.
    let proxy = start_proxy(&cluster, &[USERS, ("HANDOFF_POOL_MODE", "session")])
        .await
        .unwrap();

    // A listener whose connection task forwards notifications to a channel.
    let (listener, mut conn) = tokio_postgres::connect(
        &conn_str(&proxy.listen_addr(), "postgres", "postgres", Some("secret")),
        NoTls,
    )
    .await
    .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            match m {
                AsyncMessage::Notification(n) => {
                    let _ = tx.send((n.channel().to_string(), n.payload().to_string()));
                }
                AsyncMessage::Notice(n) => {
                    let _ = tx.send(("notice".to_string(), n.message().to_string()));
                }
                _ => {}
            }
        }
    });
    listener.batch_execute("listen jobs").await.unwrap();
    let notifier = connect(&proxy).await;
    notifier
        .batch_execute("notify jobs, 'hello'")
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, ("jobs".to_string(), "hello".to_string()));

    // Cancel a running pg_sleep through the proxy's own key data.
    let sleeper = connect(&proxy).await;
    let token = sleeper.cancel_token();
    let running = tokio::spawn(async move {
        sleeper
            .simple_query("select pg_sleep(60)")
            .await
            .map(|_| ())
    });
    let primary = &cluster.primary;
    eventually(Duration::from_secs(10), "pg_sleep to be running", || async {
        let n = primary.psql("select count(*) from pg_stat_activity where query = 'select pg_sleep(60)' and state = 'active'")?;
        Ok(n == "1")
    })
    .await
    .unwrap();
    token.cancel_query(NoTls).await.unwrap();
    let res = tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(res.unwrap_err().code(), Some(&SqlState::QUERY_CANCELED));
    // The notifier's session was not touched by the cancel.
    let one: i32 = notifier.query_one("select 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn client_leaving_mid_transaction_frees_its_server_connection() {
    let cluster = Cluster::start(0).unwrap();
    let proxy = start_proxy(&cluster, &[USERS]).await.unwrap();
    let c = connect(&proxy).await;
    c.batch_execute("create table left_behind (id int)")
        .await
        .unwrap();

    let (leaver, conn) = tokio_postgres::connect(
        &format!(
            "{} application_name=leaver",
            conn_str(&proxy.listen_addr(), "postgres", "postgres", Some("secret"))
        ),
        NoTls,
    )
    .await
    .unwrap();
    let task = tokio::spawn(conn);
    leaver
        .batch_execute("begin; insert into left_behind values (1); select pg_advisory_xact_lock(7)")
        .await
        .unwrap();
    let primary = &cluster.primary;
    assert_eq!(
        primary
            .psql("select state from pg_stat_activity where application_name = 'leaver'")
            .unwrap(),
        "idle in transaction"
    );
    // The client vanishes without Terminate.
    task.abort();
    drop(leaver);
    eventually(
        Duration::from_secs(10),
        "the server connection to close",
        || async {
            Ok(primary
                .psql("select count(*) from pg_stat_activity where application_name = 'leaver'")?
                == "0")
        },
    )
    .await
    .unwrap();
    // Its transaction was rolled back and its lock released.
    let n: i64 = c
        .query_one("select count(*) from left_behind", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
    let locked: bool = c
        .query_one("select pg_try_advisory_lock(7)", &[])
        .await
        .unwrap()
        .get(0);
    assert!(locked);
    proxy.shutdown().await;
}

#[tokio::test]
async fn psql_through_the_proxy() {
    let cluster = Cluster::start(0).unwrap();
    let proxy = start_proxy(&cluster, &[USERS]).await.unwrap();
    let port = proxy.listen_addr().port().to_string();
    let bin = cluster.bin.bin("psql");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(bin)
            .args([
                "-X",
                "-A",
                "-t",
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "postgres",
                "-d",
                "postgres",
            ])
            .args(["-v", "ON_ERROR_STOP=1"])
            .args([
                "-c",
                "select 40 + 2",
                "-c",
                "select current_setting('application_name')",
            ])
            .env("PGPASSWORD", "secret")
            .env("PGAPPNAME", "from-psql")
            .env("PGSSLMODE", "prefer")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // psql's SSLRequest was declined with 'N', and its startup parameters reached the server.
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42\nfrom-psql");
    proxy.shutdown().await;
}

/// Logs in with a StartupMessage of protocol 3.`minor` and `params` besides the user
/// and database; returns the client, the NegotiateProtocolVersion answer (if any) and
/// the key data.
async fn login_with_version(
    proxy: &handoff::Proxy,
    minor: u16,
    extra: &[(&str, &str)],
) -> (
    handoff_tests::raw::RawClient,
    Option<(i32, Vec<String>)>,
    (i32, bytes::Bytes),
) {
    use handoff_protocol::backend::BackendMessage;
    use handoff_protocol::framing::StartupPacket;
    let mut raw = handoff_tests::raw::RawClient::connect(proxy.listen_addr())
        .await
        .unwrap();
    let mut params = vec![
        ("user".to_string(), "postgres".to_string()),
        ("database".to_string(), "postgres".to_string()),
    ];
    params.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let mut out = bytes::BytesMut::new();
    StartupPacket::Startup { minor, params }.encode(&mut out);
    raw.send(&out).await.unwrap();
    let (mut negotiated, mut key) = (None, None);
    loop {
        match raw
            .read_message()
            .await
            .unwrap()
            .expect("the login goes on")
        {
            BackendMessage::NegotiateProtocolVersion {
                newest_version,
                unrecognized,
            } => negotiated = Some((newest_version, unrecognized)),
            BackendMessage::BackendKeyData { pid, key: k } => key = Some((pid, k)),
            BackendMessage::ErrorResponse(e) => panic!("login refused: {e:?}"),
            BackendMessage::ReadyForQuery(_) => break,
            _ => {}
        }
    }
    (raw, negotiated, key.expect("BackendKeyData at login"))
}

#[tokio::test]
async fn protocol_versions_are_negotiated_as_postgresql_18_does() {
    use handoff_protocol::backend::BackendMessage;
    use handoff_protocol::framing::StartupPacket;
    let cluster = Cluster::start(0).unwrap();
    for mode in ["transaction", "session"] {
        let proxy = start_proxy(&cluster, &[("HANDOFF_POOL_MODE", mode)])
            .await
            .unwrap();
        // 3.0: as before, a 4-byte key and no negotiation.
        let (_, negotiated, (_, key)) = login_with_version(&proxy, 0, &[]).await;
        assert_eq!(negotiated, None, "{mode}");
        assert_eq!(key.len(), 4, "{mode}");
        // 3.0 with an option handoff does not know: told so, and served.
        let (_, negotiated, _) =
            login_with_version(&proxy, 0, &[("_pq_.unknown_option", "1")]).await;
        assert_eq!(
            negotiated,
            Some((3 << 16, vec!["_pq_.unknown_option".to_string()])),
            "{mode}"
        );
        // libpq's grease: a made-up minor version and option. The answer names 3.2 and
        // the option; the session speaks 3.2.
        let (_, negotiated, (_, key)) =
            login_with_version(&proxy, 9999, &[("_pq_.test_protocol_grease", "1")]).await;
        assert_eq!(
            negotiated,
            Some((3 << 16 | 2, vec!["_pq_.test_protocol_grease".to_string()])),
            "{mode}"
        );
        assert_eq!(key.len(), 32, "{mode}");
        // 3.2: no negotiation, a 32-byte key that cancels.
        let (mut raw, negotiated, (pid, key)) = login_with_version(&proxy, 2, &[]).await;
        assert_eq!(negotiated, None, "{mode}");
        assert_eq!(key.len(), 32, "{mode}");
        let mut q = bytes::BytesMut::new();
        handoff_protocol::frontend::FrontendMessage::Query {
            sql: bytes::Bytes::from_static(b"SELECT pg_sleep(60)"),
        }
        .encode(&mut q);
        raw.send(&q).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let addr = proxy.listen_addr();
        let cancel = |key: bytes::Bytes| async move {
            let mut c = handoff_tests::raw::RawClient::connect(addr).await.unwrap();
            let mut out = bytes::BytesMut::new();
            StartupPacket::Cancel { pid, key }.encode(&mut out);
            c.send(&out).await.unwrap();
            // The proxy closes the connection once the cancel is delivered.
            let _ = c.read_message().await;
        };
        // The first 4 bytes alone are not the key.
        cancel(key.slice(..4)).await;
        let early = tokio::time::timeout(Duration::from_millis(500), raw.read_message()).await;
        assert!(early.is_err(), "{mode}: a cut key cancelled: {early:?}");
        cancel(key.clone()).await;
        let code = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Some(BackendMessage::ErrorResponse(e)) = raw.read_message().await.unwrap() {
                    return e.code().map(str::to_string);
                }
            }
        })
        .await
        .expect("the query was cancelled");
        assert_eq!(code.as_deref(), Some("57014"), "{mode}");
        proxy.shutdown().await;
    }
}
