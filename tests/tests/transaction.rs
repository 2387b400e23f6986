//! Transaction pooling: many clients share few server connections, with prepared
//! statements, startup parameters and cancel following each client.

use std::collections::HashSet;
use std::time::Duration;

use bytes::BytesMut;
use handoff_protocol::backend::BackendMessage;
use handoff_protocol::frontend::{FrontendMessage, Target};
use handoff_tests::door::Door;
use handoff_tests::raw::{http, RawClient};
use handoff_tests::{conn_str, eventually, start_proxy, Cluster};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};

async fn connect_with(
    proxy: &handoff::Proxy,
    extra: &str,
) -> Result<Client, tokio_postgres::Error> {
    let url = format!(
        "{} {extra}",
        conn_str(&proxy.listen_addr(), "postgres", "postgres", None)
    );
    let (client, conn) = tokio_postgres::connect(&url, NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

async fn connect(proxy: &handoff::Proxy) -> Client {
    connect_with(proxy, "").await.unwrap()
}

fn pgbench(cluster: &Cluster, port: u16, mode: &str) -> String {
    let out = cluster
        .pgbench(port)
        .args(["-S", "-c", "64", "-j", "2", "-T", "5", "-n", "-M", mode])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "-M {mode}: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_64_clients_every_query_mode() {
    let cluster = Cluster::start(0).unwrap();
    cluster.pgbench_init(1).unwrap();
    let proxy = start_proxy(&cluster, &[("HANDOFF_POOL_SIZE", "10")])
        .await
        .unwrap();
    let port = proxy.listen_addr().port();
    for mode in ["simple", "extended", "prepared"] {
        let out = tokio::task::block_in_place(|| pgbench(&cluster, port, mode));
        let field = |name: &str| -> u64 {
            out.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap_or_else(|| panic!("no '{name}' in:\n{out}"))
        };
        assert_eq!(
            field("number of failed transactions:"),
            0,
            "-M {mode}:\n{out}"
        );
        assert!(
            field("number of transactions actually processed:") > 500,
            "-M {mode}:\n{out}"
        );
    }
    // 64 clients never had more than the pool's 10 server connections.
    let n: i64 = cluster
        .primary
        .psql("select count(*) from pg_stat_activity where backend_type = 'client backend' and application_name = ''")
        .unwrap()
        .parse()
        .unwrap();
    assert!(n <= 11, "{n} server connections");
    let (_, metrics) = http(proxy.admin_addr(), "GET", "/metrics", None)
        .await
        .unwrap();
    assert!(
        metrics.contains("handoff_prepared_statements_total{result=\"hit\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("handoff_pool_idle_connections{pool=\"postgres@postgres/main\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("handoff_pool_checkout_wait_seconds_count"),
        "{metrics}"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_clients_share_ten_connections_with_prepared_statements() {
    let cluster = Cluster::start(0).unwrap();
    let proxy = start_proxy(&cluster, &[("HANDOFF_POOL_SIZE", "10")])
        .await
        .unwrap();
    let setup = connect(&proxy).await;
    setup
        .batch_execute("create table kv (k int primary key, v int); insert into kv select g, g * 10 from generate_series(1, 1000) g")
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for i in 0..200i32 {
        let addr = proxy.listen_addr();
        tasks.push(tokio::spawn(async move {
            let (c, conn) =
                tokio_postgres::connect(&conn_str(&addr, "postgres", "postgres", None), NoTls)
                    .await
                    .unwrap();
            tokio::spawn(conn);
            let get = c
                .prepare("select v, pg_backend_pid() from kv where k = $1")
                .await
                .unwrap();
            let add = c.prepare("select $1::int + $2::int").await.unwrap();
            let mut pids = HashSet::new();
            for j in 0..20i32 {
                let k = (i * 7 + j) % 1000 + 1;
                let row = c.query_one(&get, &[&k]).await.unwrap();
                assert_eq!(row.get::<_, i32>(0), k * 10);
                pids.insert(row.get::<_, i32>(1));
                let sum: i32 = c.query_one(&add, &[&i, &j]).await.unwrap().get(0);
                assert_eq!(sum, i + j);
                tokio::task::yield_now().await;
            }
            pids
        }));
    }
    let mut all = HashSet::new();
    let mut moved = 0;
    for t in tasks {
        let pids = t.await.unwrap();
        if pids.len() > 1 {
            moved += 1;
        }
        all.extend(pids);
    }
    assert!(all.len() <= 10, "{} server connections used", all.len());
    assert!(
        moved > 0,
        "no client's statements ever ran on a second server connection"
    );
    proxy.shutdown().await;
}

/// Sends `msgs` and collects replies until `syncs` ReadyForQuery messages arrived.
async fn exchange(raw: &mut RawClient, msgs: &[FrontendMessage], syncs: usize) -> Vec<String> {
    let mut buf = BytesMut::new();
    for m in msgs {
        m.encode(&mut buf);
    }
    raw.send(&buf).await.unwrap();
    let mut seen = Vec::new();
    let mut ready = 0;
    while ready < syncs {
        let m = tokio::time::timeout(Duration::from_secs(10), raw.read_message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        seen.push(match m {
            BackendMessage::ParseComplete => "ParseComplete".to_string(),
            BackendMessage::BindComplete => "BindComplete".to_string(),
            BackendMessage::CloseComplete => "CloseComplete".to_string(),
            BackendMessage::CommandComplete { tag } => format!("Complete {tag}"),
            BackendMessage::ErrorResponse(e) => format!("Error {}", e.code().unwrap_or("")),
            BackendMessage::ReadyForQuery(s) => {
                ready += 1;
                format!("Ready {}", s.as_byte() as char)
            }
            BackendMessage::Other(f) if f.tag == b'D' => {
                format!("Row {}", String::from_utf8_lossy(&f.body[6..]))
            }
            other => format!("{other:?}"),
        });
    }
    seen
}

fn parse(name: &str, sql: &str) -> FrontendMessage {
    FrontendMessage::Parse {
        name: name.as_bytes().to_vec().into(),
        sql: sql.as_bytes().to_vec().into(),
        param_types: vec![],
    }
}

fn bind(stmt: &str) -> FrontendMessage {
    FrontendMessage::Bind {
        portal: bytes::Bytes::new(),
        statement: stmt.as_bytes().to_vec().into(),
        rest: bytes::Bytes::from_static(&[0, 0, 0, 0, 0, 0]),
    }
}

fn execute() -> FrontendMessage {
    FrontendMessage::Execute {
        portal: bytes::Bytes::new(),
        max_rows: 0,
    }
}

#[tokio::test]
async fn statement_names_pipelines_and_errors() {
    let cluster = Cluster::start(0).unwrap();
    // One server connection: every client's statements land on the same one.
    let proxy = start_proxy(&cluster, &[("HANDOFF_POOL_SIZE", "1")])
        .await
        .unwrap();
    let addr = proxy.listen_addr();
    let mut a = RawClient::login_trust(addr, "postgres", "postgres")
        .await
        .unwrap();
    let mut b = RawClient::login_trust(addr, "postgres", "postgres")
        .await
        .unwrap();
    use FrontendMessage::Sync;

    // Same name, different SQL, two clients.
    let got = exchange(&mut a, &[parse("st", "select 'from a'"), Sync], 1).await;
    assert_eq!(got, ["ParseComplete", "Ready I"]);
    let got = exchange(&mut b, &[parse("st", "select 'from b'"), Sync], 1).await;
    assert_eq!(got, ["ParseComplete", "Ready I"]);
    let got = exchange(&mut a, &[bind("st"), execute(), Sync], 1).await;
    assert_eq!(
        got,
        ["BindComplete", "Row from a", "Complete SELECT 1", "Ready I"]
    );
    let got = exchange(&mut b, &[bind("st"), execute(), Sync], 1).await;
    assert_eq!(
        got,
        ["BindComplete", "Row from b", "Complete SELECT 1", "Ready I"]
    );

    // Close, then Parse the same name with new SQL.
    let close = FrontendMessage::Close {
        target: Target::Statement,
        name: "st".as_bytes().to_vec().into(),
    };
    let got = exchange(
        &mut a,
        &[
            close.clone(),
            Sync,
            parse("st", "select 'again'"),
            bind("st"),
            execute(),
            Sync,
        ],
        2,
    )
    .await;
    assert_eq!(
        got,
        [
            "CloseComplete",
            "Ready I",
            "ParseComplete",
            "BindComplete",
            "Row again",
            "Complete SELECT 1",
            "Ready I"
        ]
    );
    // After Close the name is gone for that client: the server reports it unknown.
    let got = exchange(&mut a, &[close, bind("st"), execute(), Sync], 1).await;
    assert_eq!(got, ["CloseComplete", "Error 26000", "Ready I"]);

    // An error mid-pipeline: the rest up to Sync is skipped, the next Sync recovers.
    let got = exchange(
        &mut b,
        &[
            parse("ok1", "select 1"),
            bind("ok1"),
            execute(),
            parse("bad", "selec 2"),
            bind("bad"),
            execute(),
            parse("never", "select 3"),
            Sync,
            parse("ok2", "select 4"),
            bind("ok2"),
            execute(),
            Sync,
        ],
        2,
    )
    .await;
    assert_eq!(
        got,
        [
            "ParseComplete",
            "BindComplete",
            "Row 1",
            "Complete SELECT 1",
            "Error 42601",
            "Ready I",
            "ParseComplete",
            "BindComplete",
            "Row 4",
            "Complete SELECT 1",
            "Ready I"
        ]
    );
    // 'never' was skipped by the server, so it was never prepared: using it re-prepares it.
    let got = exchange(&mut b, &[bind("never"), execute(), Sync], 1).await;
    assert_eq!(
        got,
        ["Error 26000", "Ready I"],
        "a skipped Parse must not define the name"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn prepared_statement_cache_evicts_lru() {
    let cluster = Cluster::start(0).unwrap();
    let proxy = start_proxy(
        &cluster,
        &[
            ("HANDOFF_POOL_SIZE", "1"),
            ("HANDOFF_MAX_PREPARED_STATEMENTS", "3"),
        ],
    )
    .await
    .unwrap();
    let c = connect(&proxy).await;
    let mut stmts = Vec::new();
    for i in 0..6 {
        stmts.push(c.prepare(&format!("select {i}::int")).await.unwrap());
    }
    for _ in 0..3 {
        for (i, s) in stmts.iter().enumerate() {
            let v: i32 = c.query_one(s, &[]).await.unwrap().get(0);
            assert_eq!(v, i as i32);
        }
    }
    // Through the proxy this runs on the pool's only server connection.
    let held: i64 = c
        .query_one("select count(*) from pg_prepared_statements", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        held <= 3,
        "{held} statements held on a connection capped at 3"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn cancel_and_dirty_connections() {
    let cluster = Cluster::start(0).unwrap();
    let proxy = start_proxy(&cluster, &[("HANDOFF_POOL_SIZE", "1")])
        .await
        .unwrap();

    // Cancel in transaction mode reaches the connection running the query.
    let sleeper = connect(&proxy).await;
    let token = sleeper.cancel_token();
    // Nothing runs yet: a cancel now is harmless.
    token.cancel_query(NoTls).await.unwrap();
    let one: i32 = sleeper.query_one("select 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
    let running = tokio::spawn(async move {
        sleeper
            .simple_query("select pg_sleep(60)")
            .await
            .map(|_| ())
    });
    let primary = &cluster.primary;
    eventually(Duration::from_secs(10), "pg_sleep to run", || async {
        Ok(primary.psql("select count(*) from pg_stat_activity where query = 'select pg_sleep(60)' and state = 'active'")? == "1")
    })
    .await
    .unwrap();
    token.cancel_query(NoTls).await.unwrap();
    let res = tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(res.unwrap_err().code(), Some(&SqlState::QUERY_CANCELED));

    // A client killed mid-transaction: its connection is not handed to anyone else dirty.
    let setup = connect(&proxy).await;
    setup
        .batch_execute("create table dirt (id int)")
        .await
        .unwrap();
    drop(setup);
    let (victim, conn) = tokio_postgres::connect(
        &conn_str(&proxy.listen_addr(), "postgres", "postgres", None),
        NoTls,
    )
    .await
    .unwrap();
    let task = tokio::spawn(conn);
    victim
        .batch_execute("begin; insert into dirt values (1); select pg_advisory_xact_lock(9)")
        .await
        .unwrap();
    task.abort();
    drop(victim);
    let next = connect(&proxy).await;
    let row = next
        .query_one("select pg_try_advisory_lock(9), (select count(*) from dirt), now() = statement_timestamp()", &[])
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0), "lock left behind");
    assert_eq!(row.get::<_, i64>(1), 0, "uncommitted row visible");
    proxy.shutdown().await;
}

/// A cancel request that reaches PostgreSQL only after its query has ended (a slow path
/// to the server, a busy machine) lands on whatever that backend runs by then. The
/// connection it is on its way to must not serve the next client before it lands.
#[tokio::test]
async fn a_late_cancel_never_reaches_the_next_clients_query() {
    let cluster = Cluster::start(0).unwrap();
    let door = Door::open(cluster.primary.socket_addr()).await.unwrap();
    let shards = format!("main={}", door.addr());
    let proxy = start_proxy(
        &cluster,
        &[("HANDOFF_POOL_SIZE", "1"), ("HANDOFF_SHARDS", &shards)],
    )
    .await
    .unwrap();
    let first = connect(&proxy).await;
    let next = connect(&proxy).await;
    let token = first.cancel_token();
    let running =
        tokio::spawn(async move { first.simple_query("select pg_sleep(1)").await.map(|_| ()) });
    let primary = &cluster.primary;
    eventually(Duration::from_secs(10), "pg_sleep to run", || async {
        Ok(primary.psql("select count(*) from pg_stat_activity where query = 'select pg_sleep(1)' and state = 'active'")? == "1")
    })
    .await
    .unwrap();
    // The cancel takes two seconds to reach the server: the query ends first.
    door.hold_new(Duration::from_secs(2));
    token.cancel_query(NoTls).await.unwrap();
    let first_result = tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .unwrap()
        .unwrap();
    assert!(
        first_result.is_ok(),
        "the cancel landed in time after all: {first_result:?}"
    );
    // The pool's only connection: it serves this query once the cancel has landed.
    let slept = tokio::time::timeout(
        Duration::from_secs(15),
        next.simple_query("select pg_sleep(1.5)"),
    )
    .await
    .unwrap();
    assert!(
        slept.is_ok(),
        "the next client's query was cancelled: {slept:?}"
    );
    assert_eq!(door.cancels(), 1, "the cancel went to the server");
    door.hold_new(Duration::ZERO);
    let after: i32 = next.query_one("select 1", &[]).await.unwrap().get(0);
    assert_eq!(after, 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn pool_exhaustion_waits_then_times_out() {
    let cluster = Cluster::start(0).unwrap();
    let proxy = start_proxy(
        &cluster,
        &[
            ("HANDOFF_POOL_SIZE", "1"),
            ("HANDOFF_QUERY_WAIT_TIMEOUT", "1s"),
        ],
    )
    .await
    .unwrap();
    let holder = connect(&proxy).await;
    holder.batch_execute("begin").await.unwrap();
    let waiter = connect_with(&proxy, "").await;
    // Login itself needs a connection: it waits, then times out with a clear error.
    let err = waiter.err().unwrap();
    assert_eq!(err.code(), Some(&SqlState::TOO_MANY_CONNECTIONS), "{err:?}");
    let msg = err.as_db_error().unwrap().message().to_string();
    assert!(msg.contains("HANDOFF_QUERY_WAIT_TIMEOUT"), "{msg}");
    holder.batch_execute("commit").await.unwrap();

    // A waiting client gets the connection as soon as the holder's transaction ends.
    let second = connect(&proxy).await;
    holder.batch_execute("begin; select 1").await.unwrap();
    let q = tokio::spawn(async move {
        second
            .query_one("select 42", &[])
            .await
            .map(|r| r.get::<_, i32>(0))
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!q.is_finished(), "the second client should be waiting");
    holder.batch_execute("commit").await.unwrap();
    assert_eq!(q.await.unwrap().unwrap(), 42);
    proxy.shutdown().await;
}

#[tokio::test]
async fn startup_parameters_follow_each_client() {
    let cluster = Cluster::start(0).unwrap();
    let proxy = start_proxy(&cluster, &[("HANDOFF_POOL_SIZE", "1")])
        .await
        .unwrap();
    let a = connect_with(&proxy, "application_name=alpha options='-c TimeZone=UTC'")
        .await
        .unwrap();
    let b = connect_with(&proxy, "application_name=beta").await.unwrap();
    b.batch_execute("set timezone = 'America/New_York'")
        .await
        .unwrap();
    let c = connect(&proxy).await;
    for _ in 0..3 {
        let row = a
            .query_one(
                "select current_setting('application_name'), pg_backend_pid()",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), "alpha");
        let pid_a: i32 = row.get(1);
        let row = b
            .query_one("select current_setting('application_name'), current_setting('TimeZone'), pg_backend_pid()", &[])
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), "beta");
        assert_eq!(
            row.get::<_, String>(1),
            "America/New_York",
            "a client's own SET of a reported parameter sticks"
        );
        assert_eq!(row.get::<_, i32>(2), pid_a, "one shared server connection");
        let app: String = c
            .query_one("select current_setting('application_name')", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(app, "", "a client that set nothing gets the server default");
    }
    proxy.shutdown().await;
}

/// Clients that log in with the same startup parameters share one copy of them in the
/// proxy: one client's own SET must change only its own, not the others' nor what the
/// next client with those parameters gets.
#[tokio::test]
async fn a_set_changes_only_its_own_clients_shared_startup_parameters() {
    let cluster = Cluster::start(0).unwrap();
    let proxy = start_proxy(&cluster, &[("HANDOFF_POOL_SIZE", "1")])
        .await
        .unwrap();
    let params = "application_name=same";
    let a = connect_with(&proxy, params).await.unwrap();
    let b = connect_with(&proxy, params).await.unwrap();
    let default_zone = settings(&b).await.1;
    assert_ne!(default_zone, "Asia/Tokyo");
    a.batch_execute("set timezone = 'Asia/Tokyo'")
        .await
        .unwrap();
    let c = connect_with(&proxy, params).await.unwrap();
    for _ in 0..3 {
        assert_eq!(settings(&a).await, ("same".into(), "Asia/Tokyo".into()));
        assert_eq!(
            settings(&b).await,
            ("same".into(), default_zone.clone()),
            "another client's SET leaked into a client with the same startup parameters"
        );
        assert_eq!(settings(&c).await, ("same".into(), default_zone.clone()));
    }
    proxy.shutdown().await;
}

/// The client's application_name and TimeZone, as its server connection has them.
async fn settings(c: &tokio_postgres::Client) -> (String, String) {
    let row = c
        .query_one(
            "select current_setting('application_name'), current_setting('TimeZone')",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

#[tokio::test]
async fn flush_without_sync_keeps_the_connection() {
    let cluster = Cluster::start(0).unwrap();
    let proxy = start_proxy(&cluster, &[("HANDOFF_POOL_SIZE", "1")])
        .await
        .unwrap();
    let mut a = RawClient::login_trust(proxy.listen_addr(), "postgres", "postgres")
        .await
        .unwrap();
    let other = connect(&proxy).await;
    // Parse/Bind/Execute/Flush: results come back, but the batch is still open.
    let mut buf = BytesMut::new();
    for m in [
        parse("", "select 7"),
        bind(""),
        execute(),
        FrontendMessage::Flush,
    ] {
        m.encode(&mut buf);
    }
    a.send(&buf).await.unwrap();
    let mut got = Vec::new();
    while got.len() < 4 {
        let m = tokio::time::timeout(Duration::from_secs(10), a.read_message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        got.push(format!("{m:?}"));
    }
    assert!(got[3].contains("SELECT 1"), "{got:?}");
    // The only server connection stays with `a` until its Sync: `other` must wait.
    let q = tokio::spawn(async move {
        other
            .query_one("select 8", &[])
            .await
            .map(|r| r.get::<_, i32>(0))
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!q.is_finished(), "the connection was released before Sync");
    let got = exchange(&mut a, &[FrontendMessage::Sync], 1).await;
    assert_eq!(got, ["Ready I"]);
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(10), q)
            .await
            .unwrap()
            .unwrap()
            .unwrap(),
        8
    );
    proxy.shutdown().await;
}

/// Server-side pids of the proxy's connections (they carry no application_name).
fn proxy_backends(cluster: &Cluster) -> Vec<i32> {
    let out = cluster
        .primary
        .psql("select pid from pg_stat_activity where backend_type = 'client backend' and application_name = '' order by pid")
        .unwrap();
    out.lines().filter_map(|l| l.trim().parse().ok()).collect()
}

#[tokio::test]
async fn pool_maintenance_min_idle_eviction_and_lifetime() {
    let cluster = Cluster::start(0).unwrap();
    let proxy = start_proxy(
        &cluster,
        &[
            ("HANDOFF_POOL_SIZE", "4"),
            ("HANDOFF_POOL_MIN_IDLE", "2"),
            ("HANDOFF_SERVER_LIFETIME", "2s"),
        ],
    )
    .await
    .unwrap();
    let c = connect(&proxy).await;
    let first: i32 = c
        .query_one("select pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    // The pool tops itself up to two idle connections.
    eventually(
        Duration::from_secs(10),
        "two pooled server connections",
        || async { Ok(proxy_backends(&cluster).len() >= 2) },
    )
    .await
    .unwrap();
    // An idle connection whose server goes away is evicted, never handed out.
    let victims = proxy_backends(&cluster);
    cluster
        .primary
        .psql(&format!(
            "select pg_terminate_backend(pid) from pg_stat_activity where pid in ({})",
            victims
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join(",")
        ))
        .unwrap();
    // pg_terminate_backend only signals, and a backend leaves pg_stat_activity a moment
    // before its socket closes: wait until the pool itself has replaced them (it opens
    // new idle connections only once the dead ones are evicted). A connection that dies
    // at the very moment it is checked out is issue 7's business.
    eventually(
        Duration::from_secs(10),
        "the pool to replace the terminated connections",
        || async {
            let now = proxy_backends(&cluster);
            Ok(now.len() >= 2 && now.iter().all(|p| !victims.contains(p)))
        },
    )
    .await
    .unwrap();
    for _ in 0..5 {
        let pid: i32 = c
            .query_one("select pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0);
        assert!(
            !victims.contains(&pid),
            "a terminated connection was reused"
        );
    }
    // Past HANDOFF_SERVER_LIFETIME the connection that served `first` is gone.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let _ = c.query_one("select 1", &[]).await.unwrap();
    eventually(
        Duration::from_secs(10),
        "old connections to be retired",
        || async { Ok(!proxy_backends(&cluster).contains(&first)) },
    )
    .await
    .unwrap();
    proxy.shutdown().await;
}

#[tokio::test]
async fn idle_timeout_closes_pooled_connections() {
    let cluster = Cluster::start(0).unwrap();
    let proxy = start_proxy(&cluster, &[("HANDOFF_SERVER_IDLE_TIMEOUT", "1s")])
        .await
        .unwrap();
    let c = connect(&proxy).await;
    let _ = c.query_one("select 1", &[]).await.unwrap();
    assert_eq!(proxy_backends(&cluster).len(), 1);
    eventually(
        Duration::from_secs(10),
        "the idle server connection to close",
        || async { Ok(proxy_backends(&cluster).is_empty()) },
    )
    .await
    .unwrap();
    // The client is unaffected: its next transaction gets a new connection.
    let v: i32 = c.query_one("select 5", &[]).await.unwrap().get(0);
    assert_eq!(v, 5);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_backend_ends_its_session_while_the_primary_serves() {
    let cluster = Cluster::start(0).unwrap();
    let proxy = start_proxy(&cluster, &[]).await.unwrap();
    let victim = connect(&proxy).await;
    let bystander = connect(&proxy).await;
    bystander.simple_query("SELECT 1").await.unwrap();
    // The client's own backend, terminated from inside its transaction: PostgreSQL
    // ends such a session with FATAL 57P01, and so does handoff.
    let err = victim
        .simple_query("SELECT pg_terminate_backend(pg_backend_pid())")
        .await
        .expect_err("the backend was terminated under the request");
    assert_eq!(err.code(), Some(&SqlState::ADMIN_SHUTDOWN), "{err:?}");
    eventually(Duration::from_secs(10), "the session to end", || {
        let closed = victim.is_closed();
        async move { Ok(closed) }
    })
    .await
    .unwrap();
    // Nobody else noticed: the primary was never revoked.
    bystander.simple_query("SELECT 1").await.unwrap();
    let again = connect(&proxy).await;
    again.simple_query("SELECT 1").await.unwrap();
    let st = handoff_tests::admin::shard_state(&proxy).await;
    assert_eq!(st["state"], "serving", "{st}");
    assert_eq!(st["epoch"], 1, "{st}");
    proxy.shutdown().await;
}

#[tokio::test]
async fn listen_is_refused_at_once_in_transaction_mode() {
    let cluster = Cluster::start(0).unwrap();
    let proxy = start_proxy(&cluster, &[]).await.unwrap();
    let client = connect(&proxy).await;
    for sql in [
        "LISTEN jobs",
        "SELECT 1; listen jobs",
        "/* x */ Listen \"Jobs\"",
    ] {
        let err = tokio::time::timeout(Duration::from_secs(10), client.batch_execute(sql))
            .await
            .expect("answered at once, not a hang")
            .expect_err("LISTEN is refused");
        assert_eq!(
            err.code(),
            Some(&SqlState::FEATURE_NOT_SUPPORTED),
            "{sql}: {err:?}"
        );
        let db = err.as_db_error().unwrap();
        assert!(db.message().contains("transaction pooling"), "{db:?}");
        assert!(db.hint().unwrap_or("").contains("session mode"), "{db:?}");
    }
    // The extended protocol too.
    let err = client
        .execute("LISTEN jobs", &[])
        .await
        .expect_err("refused");
    assert_eq!(
        err.code(),
        Some(&SqlState::FEATURE_NOT_SUPPORTED),
        "{err:?}"
    );
    // A client that sends Flush after its Parse (asyncpg prepares this way) hears of
    // it at once, not at its Sync.
    let mut raw = RawClient::login_trust(proxy.listen_addr(), "postgres", "postgres")
        .await
        .unwrap();
    let mut buf = BytesMut::new();
    parse("lst", "LISTEN jobs").encode(&mut buf);
    FrontendMessage::Describe {
        target: Target::Statement,
        name: bytes::Bytes::from_static(b"lst"),
    }
    .encode(&mut buf);
    FrontendMessage::Flush.encode(&mut buf);
    raw.send(&buf).await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), raw.read_message())
        .await
        .expect("answered before any Sync")
        .unwrap()
        .unwrap();
    match first {
        BackendMessage::ErrorResponse(e) => assert_eq!(e.code(), Some("0A000")),
        other => panic!("expected the refusal, got {other:?}"),
    }
    let got = exchange(&mut raw, &[FrontendMessage::Sync], 1).await;
    assert_eq!(got, ["Ready I"]);
    // The session goes on; nothing reached the server.
    client.simple_query("SELECT 1").await.unwrap();
    client
        .batch_execute("UNLISTEN *; SELECT 'listen x'")
        .await
        .unwrap();
    let listening = cluster
        .primary
        .psql("SELECT count(*) FROM pg_stat_activity WHERE query ILIKE '%listen jobs%' AND pid <> pg_backend_pid()")
        .unwrap();
    assert_eq!(listening, "0");
    proxy.shutdown().await;
}

/// The first column of the first row `sql` returns (simple query protocol).
async fn first_value(client: &Client, sql: &str) -> Result<String, tokio_postgres::Error> {
    for m in client.simple_query(sql).await? {
        if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
            return Ok(r.get(0).unwrap_or("NULL").to_string());
        }
    }
    Ok("no rows".to_string())
}

fn code_of(r: Result<impl std::fmt::Debug, tokio_postgres::Error>) -> String {
    match r {
        Ok(v) => format!("ok: {v:?}"),
        Err(e) => e.code().map_or(format!("{e}"), |c| c.code().to_string()),
    }
}

#[tokio::test]
async fn sql_level_prepared_statements_are_each_clients_own() {
    let cluster = Cluster::start(0).unwrap();
    // One server connection: both clients' statements land on it.
    let proxy = start_proxy(&cluster, &[("HANDOFF_POOL_SIZE", "1")])
        .await
        .unwrap();
    let a = connect(&proxy).await;
    let b = connect(&proxy).await;
    a.batch_execute("PREPARE foo AS SELECT 'a'").await.unwrap();
    b.batch_execute("prepare FOO (int) as select 'b' || $1")
        .await
        .unwrap();
    assert_eq!(first_value(&a, "EXECUTE foo").await.unwrap(), "a");
    assert_eq!(first_value(&b, "EXECUTE foo(1)").await.unwrap(), "b1");
    // In a transaction block, and through the extended protocol (a named Parse of
    // "EXECUTE foo", as asyncpg and tokio-postgres send it).
    a.batch_execute("BEGIN").await.unwrap();
    assert_eq!(first_value(&a, "execute \"foo\"").await.unwrap(), "a");
    a.batch_execute("COMMIT").await.unwrap();
    let row = a.query_one("EXECUTE foo", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "a");
    let row = b.query_one("EXECUTE foo(2)", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "b2");

    // A name the client already has: 42P05 naming it, the first one kept.
    let err = b
        .batch_execute("PREPARE foo AS SELECT 1")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::DUPLICATE_PSTATEMENT), "{err:?}");
    assert!(
        err.as_db_error()
            .unwrap()
            .message()
            .contains("prepared statement \"foo\" already exists"),
        "{err:?}"
    );
    assert_eq!(first_value(&b, "EXECUTE foo(3)").await.unwrap(), "b3");

    // DEALLOCATE takes only the client's own name.
    a.batch_execute("DEALLOCATE foo").await.unwrap();
    let err = first_value(&a, "EXECUTE foo").await;
    assert_eq!(code_of(err), "26000");
    assert_eq!(first_value(&b, "EXECUTE foo(4)").await.unwrap(), "b4");
    let err = a.batch_execute("DEALLOCATE PREPARE nothing").await;
    assert_eq!(
        code_of(err),
        "26000",
        "an unknown name is the server's 26000"
    );

    // A statement survives its server connection: the next one is given it. The
    // backend is terminated while idle in the pool, and the test waits (the timeout
    // argument) until it has exited, so its FATAL is on the pooled socket before the
    // next request: without the wait the request can reach the backend before it acts
    // on the signal, and then it is that request the backend ends under — the client's
    // session ends, as on PostgreSQL (a request the backend is terminated under is not
    // retried: whatever it was doing may have had effects).
    proxy_backends(&cluster).into_iter().for_each(|pid| {
        let out = cluster
            .primary
            .psql(&format!("SELECT pg_terminate_backend({pid}, 10000)"))
            .unwrap();
        assert_eq!(out.trim(), "t", "backend {pid} did not exit");
    });
    eventually(
        Duration::from_secs(10),
        "EXECUTE on a new connection",
        || async { Ok(first_value(&b, "EXECUTE foo(5)").await? == "b5") },
    )
    .await
    .unwrap();

    // DEALLOCATE ALL and DISCARD ALL end the client's statements, not the other's; the
    // other's cached protocol-level statements are prepared again where needed.
    let st = a.prepare("SELECT 'cached ' || $1::int").await.unwrap();
    assert_eq!(
        a.query_one(&st, &[&1i32])
            .await
            .unwrap()
            .get::<_, String>(0),
        "cached 1"
    );
    b.batch_execute("DEALLOCATE ALL").await.unwrap();
    assert_eq!(code_of(first_value(&b, "EXECUTE foo(6)").await), "26000");
    assert_eq!(
        a.query_one(&st, &[&2i32])
            .await
            .unwrap()
            .get::<_, String>(0),
        "cached 2"
    );
    b.batch_execute("PREPARE foo AS SELECT 'again'")
        .await
        .unwrap();
    a.batch_execute("PREPARE bar AS SELECT 'bar'")
        .await
        .unwrap();
    a.batch_execute("DISCARD ALL").await.unwrap();
    assert_eq!(code_of(first_value(&a, "EXECUTE bar").await), "26000");
    assert_eq!(first_value(&b, "EXECUTE foo").await.unwrap(), "again");
    // DISCARD PLANS keeps statements.
    b.batch_execute("DISCARD PLANS").await.unwrap();
    assert_eq!(first_value(&b, "EXECUTE foo").await.unwrap(), "again");
    proxy.shutdown().await;
}

#[tokio::test]
async fn protocol_level_names_answer_as_postgresql_does() {
    let cluster = Cluster::start(0).unwrap();
    let proxy = start_proxy(&cluster, &[("HANDOFF_POOL_SIZE", "1")])
        .await
        .unwrap();
    let mut raw = RawClient::login_trust(proxy.listen_addr(), "postgres", "postgres")
        .await
        .unwrap();
    use FrontendMessage::{Query, Sync};
    let got = exchange(&mut raw, &[parse("st", "select 'first'"), Sync], 1).await;
    assert_eq!(got, ["ParseComplete", "Ready I"]);
    // A second Parse of the name: 42P05, the first statement kept.
    let got = exchange(&mut raw, &[parse("st", "select 'second'"), Sync], 1).await;
    assert_eq!(got, ["Error 42P05", "Ready I"]);
    let got = exchange(&mut raw, &[bind("st"), execute(), Sync], 1).await;
    assert_eq!(
        got,
        ["BindComplete", "Row first", "Complete SELECT 1", "Ready I"]
    );
    // DEALLOCATE of a protocol-level name, sent as SQL.
    let q = |sql: &str| Query {
        sql: sql.as_bytes().to_vec().into(),
    };
    let got = exchange(&mut raw, &[q("DEALLOCATE st")], 1).await;
    assert_eq!(got, ["Complete DEALLOCATE", "Ready I"]);
    let got = exchange(&mut raw, &[bind("st"), execute(), Sync], 1).await;
    assert_eq!(got, ["Error 26000", "Ready I"]);
    // The name is free again; a Close then a Parse with other types is a new statement.
    let got = exchange(&mut raw, &[parse("st", "select 'third'"), Sync], 1).await;
    assert_eq!(got, ["ParseComplete", "Ready I"]);
    let close = FrontendMessage::Close {
        target: Target::Statement,
        name: bytes::Bytes::from_static(b"st"),
    };
    let typed = FrontendMessage::Parse {
        name: bytes::Bytes::from_static(b"st"),
        sql: bytes::Bytes::from_static(b"select $1::text || ' typed'"),
        param_types: vec![25],
    };
    let got = exchange(&mut raw, &[close, typed, Sync], 1).await;
    assert_eq!(got, ["CloseComplete", "ParseComplete", "Ready I"]);
    let bind_text = FrontendMessage::Bind {
        portal: bytes::Bytes::new(),
        statement: bytes::Bytes::from_static(b"st"),
        // No format codes, one parameter "x", no result format codes.
        rest: bytes::Bytes::from_static(&[0, 0, 0, 1, 0, 0, 0, 1, b'x', 0, 0]),
    };
    let got = exchange(&mut raw, &[bind_text, execute(), Sync], 1).await;
    assert_eq!(
        got,
        [
            "BindComplete",
            "Row x typed",
            "Complete SELECT 1",
            "Ready I"
        ]
    );
    // In a transaction block a duplicate aborts the block, as on a direct connection.
    let got = exchange(&mut raw, &[q("BEGIN"), q("PREPARE st AS SELECT 1")], 2).await;
    assert_eq!(got, ["Complete BEGIN", "Ready T", "Error 42P05", "Ready E"]);
    let got = exchange(&mut raw, &[q("ROLLBACK")], 1).await;
    assert_eq!(got, ["Complete ROLLBACK", "Ready I"]);
    proxy.shutdown().await;
}

#[tokio::test]
async fn statements_changed_under_the_cache_are_prepared_again() {
    let cluster = Cluster::start(0).unwrap();
    let proxy = start_proxy(&cluster, &[("HANDOFF_POOL_SIZE", "1")])
        .await
        .unwrap();
    let a = connect(&proxy).await;
    a.batch_execute("CREATE TABLE shapes (x int); INSERT INTO shapes VALUES (1)")
        .await
        .unwrap();
    let st = a.prepare("SELECT * FROM shapes").await.unwrap();
    assert_eq!(a.query(&st, &[]).await.unwrap().len(), 1);
    // The table changes shape: the statement cached on the connection no longer fits.
    a.batch_execute("ALTER TABLE shapes ADD COLUMN y text DEFAULT 'y'")
        .await
        .unwrap();
    // A client preparing the same SQL now gets the new shape, as it would directly.
    let b = connect(&proxy).await;
    let rows = b.query("SELECT * FROM shapes", &[]).await.unwrap();
    assert_eq!(rows[0].len(), 2, "the new shape");
    assert_eq!(rows[0].get::<_, String>(1), "y");
    // The server forgets statements behind the proxy's back (a DEALLOCATE ALL inside a
    // function): the next use is prepared again, without an error.
    let st2 = b.prepare("SELECT count(*) FROM shapes").await.unwrap();
    assert_eq!(b.query_one(&st2, &[]).await.unwrap().get::<_, i64>(0), 1);
    b.batch_execute("DO $$BEGIN EXECUTE 'DEALLOCATE ALL'; END$$")
        .await
        .unwrap();
    assert_eq!(b.query_one(&st2, &[]).await.unwrap().get::<_, i64>(0), 1);
    let c = connect(&proxy).await;
    let rows = c.query("SELECT * FROM shapes", &[]).await.unwrap();
    assert_eq!(rows[0].len(), 2);
    let (_, retried) = http(proxy.admin_addr(), "GET", "/metrics", None)
        .await
        .unwrap();
    assert!(
        retried.contains("reason=\"stale_statement\""),
        "the retries are counted"
    );
    proxy.shutdown().await;
}

async fn connect_db(proxy: &handoff::Proxy, db: &str) -> Result<Client, tokio_postgres::Error> {
    let url = conn_str(&proxy.listen_addr(), "postgres", db, None);
    let (client, conn) = tokio_postgres::connect(&url, NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

#[tokio::test]
async fn idle_pooled_connections_do_not_block_dropping_a_database() {
    let cluster = Cluster::start(0).unwrap();
    // Two idle connections kept per pool: more for a DROP DATABASE to trip over.
    let proxy = start_proxy(&cluster, &[("HANDOFF_POOL_MIN_IDLE", "2")])
        .await
        .unwrap();
    let admin = connect(&proxy).await;
    let use_db = |db: &'static str| {
        let proxy = &proxy;
        async move {
            let c = connect_db(proxy, db).await.unwrap();
            c.batch_execute("CREATE TABLE IF NOT EXISTS t (x int); INSERT INTO t VALUES (1)")
                .await
                .unwrap();
        }
    };
    let on_server = |db: &str| {
        cluster
            .primary
            .psql(&format!(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}'"
            ))
            .unwrap()
    };
    admin.batch_execute("CREATE DATABASE dropme").await.unwrap();
    use_db("dropme").await;
    eventually(
        Duration::from_secs(10),
        "idle pooled connections",
        || async { Ok(on_server("dropme") != "0") },
    )
    .await
    .unwrap();
    admin.batch_execute("DROP DATABASE dropme").await.unwrap();

    // Renaming, and copying as a template, need the database to themselves too.
    admin
        .batch_execute("CREATE DATABASE renameme")
        .await
        .unwrap();
    use_db("renameme").await;
    admin
        .batch_execute("ALTER DATABASE renameme RENAME TO renamed")
        .await
        .unwrap();
    use_db("renamed").await;
    admin
        .batch_execute("CREATE DATABASE copied TEMPLATE renamed")
        .await
        .unwrap();
    use_db("copied").await;

    // A dropped database has no pool: nothing tries to keep connections to it.
    let err = connect_db(&proxy, "dropme").await.err();
    let err = match err {
        Some(e) => e,
        None => connect_db(&proxy, "dropme")
            .await
            .unwrap()
            .simple_query("SELECT 1")
            .await
            .unwrap_err(),
    };
    assert_eq!(err.code(), Some(&SqlState::INVALID_CATALOG_NAME), "{err:?}");
    admin.batch_execute("DROP DATABASE renamed").await.unwrap();
    let before =
        handoff_tests::admin::metric(&proxy, "handoff_server_connect_errors_total", &[]).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let after =
        handoff_tests::admin::metric(&proxy, "handoff_server_connect_errors_total", &[]).await;
    assert_eq!(
        before, after,
        "no pool keeps connecting to a dropped database"
    );
    proxy.shutdown().await;
}
