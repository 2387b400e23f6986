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
