//! Graceful shutdown: new connections are refused, idle sessions are told 57P01, a
//! session inside a transaction may finish it, and then everything closes.

use std::time::Duration;

use handoff_tests::{conn_str, eventually, start_proxy, Cluster};
use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;

#[tokio::test]
async fn drains_sessions_at_transaction_boundaries() {
    let cluster = Cluster::start(0).unwrap();
    let proxy = start_proxy(&cluster, &[("HANDOFF_SHUTDOWN_TIMEOUT", "20s")])
        .await
        .unwrap();
    let addr = proxy.listen_addr();
    let url = conn_str(&addr, "postgres", "postgres", None);

    let (idle, idle_conn) = tokio_postgres::connect(&url, NoTls).await.unwrap();
    let idle_task = tokio::spawn(idle_conn);
    let (busy, busy_conn) = tokio_postgres::connect(&url, NoTls).await.unwrap();
    let busy_task = tokio::spawn(busy_conn);
    busy.batch_execute("create table kept (id int); begin; insert into kept values (1)")
        .await
        .unwrap();

    let shutdown = tokio::spawn(proxy.shutdown());

    // The idle session is closed with 57P01.
    let res = tokio::time::timeout(Duration::from_secs(10), idle_task)
        .await
        .unwrap()
        .unwrap();
    let err = res.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::ADMIN_SHUTDOWN), "{err:?}");
    assert!(idle.is_closed());
    // New clients are refused.
    eventually(Duration::from_secs(10), "the listener to close", || {
        let url = url.clone();
        async move { Ok(tokio_postgres::connect(&url, NoTls).await.is_err()) }
    })
    .await
    .unwrap();
    assert!(!shutdown.is_finished());

    // The transaction in flight finishes and commits, then that session is closed too.
    busy.batch_execute("insert into kept values (2); commit")
        .await
        .unwrap();
    let res = tokio::time::timeout(Duration::from_secs(10), busy_task)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(res.unwrap_err().code(), Some(&SqlState::ADMIN_SHUTDOWN));
    tokio::time::timeout(Duration::from_secs(10), shutdown)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        cluster.primary.psql("select count(*) from kept").unwrap(),
        "2"
    );
}

#[tokio::test]
async fn timeout_closes_sessions_stuck_in_a_transaction() {
    let cluster = Cluster::start(0).unwrap();
    let proxy = start_proxy(&cluster, &[("HANDOFF_SHUTDOWN_TIMEOUT", "300ms")])
        .await
        .unwrap();
    let url = conn_str(&proxy.listen_addr(), "postgres", "postgres", None);
    let (busy, conn) = tokio_postgres::connect(&url, NoTls).await.unwrap();
    let task = tokio::spawn(conn);
    busy.batch_execute("create table lost (id int)")
        .await
        .unwrap();
    busy.batch_execute("begin; insert into lost values (1)")
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), proxy.shutdown())
        .await
        .unwrap();
    let res = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(res.unwrap_err().code(), Some(&SqlState::ADMIN_SHUTDOWN));
    // The unfinished transaction was rolled back by the server.
    let primary = &cluster.primary;
    eventually(Duration::from_secs(10), "the rollback", || async {
        Ok(primary.psql("select count(*) from lost")? == "0")
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_64_clients_finishes_transactions_and_refuses_new_clients() {
    let cluster = Cluster::start(0).unwrap();
    cluster
        .primary
        .psql("CREATE TABLE term_t (id bigserial PRIMARY KEY, client int)")
        .unwrap();
    let port = handoff_tests::pg::free_port().unwrap();
    let admin = handoff_tests::pg::free_port().unwrap();
    let mut child = handoff_tests::handoff_command()
        .env("HANDOFF_LISTEN", format!("127.0.0.1:{port}"))
        .env("HANDOFF_ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
        .env("HANDOFF_SHARDS", format!("main={}", cluster.primary.addr()))
        .env("HANDOFF_POOL_SIZE", "16")
        .env("HANDOFF_SHUTDOWN_TIMEOUT", "10s")
        .env("HANDOFF_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let url = conn_str(&addr, "postgres", "postgres", None);
    eventually(Duration::from_secs(20), "handoff to listen", || {
        let url = url.clone();
        async move { Ok(tokio_postgres::connect(&url, NoTls).await.is_ok()) }
    })
    .await
    .unwrap();

    // 64 clients in explicit transactions that take a while (sleep inside).
    let mut tasks = Vec::new();
    for c in 0..64i32 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let (mut client, conn) = tokio_postgres::connect(&url, NoTls).await.unwrap();
            tokio::spawn(conn);
            let mut acked = Vec::new();
            loop {
                // Between transactions the session may be closed (57P01, or the
                // socket closing right after it): that is the end of this client.
                let tx = match client.transaction().await {
                    Ok(tx) => tx,
                    Err(e) => return (acked, e.code().cloned(), None),
                };
                let r: Result<i64, tokio_postgres::Error> = async {
                    let id: i64 = tx
                        .query_one(
                            "INSERT INTO term_t (client) VALUES ($1) RETURNING id",
                            &[&c],
                        )
                        .await?
                        .get(0);
                    tx.batch_execute("SELECT pg_sleep(0.05)").await?;
                    tx.commit().await?;
                    Ok(id)
                }
                .await;
                match r {
                    Ok(id) => acked.push(id),
                    // Inside a transaction: must not happen.
                    Err(e) => return (acked, e.code().cloned(), Some(format!("{e:?}"))),
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let sent = std::time::Instant::now();
    handoff_tests::signal(child.id(), "TERM").unwrap();
    // New clients are refused with 57P01 while the others finish.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let refused = tokio_postgres::connect(&url, NoTls).await.err();
    if let Some(e) = &refused {
        // Refused by the proxy (57P01), or the listener is already gone.
        assert!(
            e.code() == Some(&SqlState::ADMIN_SHUTDOWN) || e.code().is_none(),
            "{e:?}"
        );
    } else {
        panic!("a new client was accepted during shutdown");
    }
    let mut acked = Vec::new();
    let mut told = 0;
    for t in tasks {
        let (ids, code, mid_transaction) = tokio::time::timeout(Duration::from_secs(20), t)
            .await
            .unwrap()
            .unwrap();
        acked.extend(ids);
        // Each client ends between transactions, told 57P01 (or seeing the close that
        // follows it); none lost a transaction mid-way.
        assert_eq!(
            mid_transaction, None,
            "a transaction failed during shutdown"
        );
        assert!(
            code.is_none() || code == Some(SqlState::ADMIN_SHUTDOWN),
            "{code:?}"
        );
        told += usize::from(code.is_some());
    }
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    let took = sent.elapsed();
    assert!(status.success(), "{status:?}");
    assert!(took < Duration::from_secs(10), "exit took {took:?}");
    // Every acknowledged commit is there.
    let count: usize = cluster
        .primary
        .psql("select count(*) from term_t")
        .unwrap()
        .parse()
        .unwrap();
    assert!(count >= acked.len() && !acked.is_empty());
    assert!(told > 0, "no client was told 57P01");
    eprintln!(
        "{} transactions acknowledged; exit {took:?} after SIGTERM",
        acked.len()
    );
}
