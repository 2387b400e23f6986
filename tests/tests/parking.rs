//! Transaction mode sets a quiet client's relay aside ("parked": only its socket and its
//! session's state are kept) and makes it again when the client sends. Sessions,
//! named statements, open transactions and shutdown behave as without it, and every
//! acknowledged write is on the server. (Its own binary: the parked gauge is
//! process-wide.)

use std::net::SocketAddr;
use std::time::Duration;

use handoff_tests::raw::http;
use handoff_tests::{conn_str, eventually, start_proxy, Cluster};
use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;

/// `handoff_clients_parked` now.
async fn parked(admin: SocketAddr) -> anyhow::Result<f64> {
    let (status, text) = http(admin, "GET", "/metrics", None).await?;
    anyhow::ensure!(status == 200, "/metrics answered {status}");
    text.lines()
        .find_map(|l| l.strip_prefix("handoff_clients_parked "))
        .ok_or_else(|| anyhow::anyhow!("no handoff_clients_parked in /metrics"))?
        .trim()
        .parse()
        .map_err(Into::into)
}

async fn until_parked(admin: SocketAddr, n: f64, what: &str) {
    eventually(Duration::from_secs(10), what, || async move {
        Ok(parked(admin).await? == n)
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_quiet_client_is_parked_and_picked_up_again() {
    let cluster = Cluster::start(0).unwrap();
    let proxy = start_proxy(
        &cluster,
        &[
            ("HANDOFF_POOL_MODE", "transaction"),
            ("HANDOFF_SHUTDOWN_TIMEOUT", "20s"),
        ],
    )
    .await
    .unwrap();
    let admin = proxy.admin_addr();
    let url = conn_str(&proxy.listen_addr(), "postgres", "postgres", None);
    assert_eq!(parked(admin).await.unwrap(), 0.0);

    let (client, conn) = tokio_postgres::connect(&url, NoTls).await.unwrap();
    let conn = tokio::spawn(conn);
    client
        .batch_execute("create table parked_writes (id int primary key)")
        .await
        .unwrap();
    until_parked(admin, 1.0, "the quiet client to be parked").await;

    // Picked up by each request, parked again after it; a named statement prepared
    // before a park is used after one (the session's state is kept).
    let insert = client
        .prepare("insert into parked_writes values ($1)")
        .await
        .unwrap();
    until_parked(admin, 1.0, "parked after preparing").await;
    for i in 0..3i32 {
        assert_eq!(client.execute(&insert, &[&i]).await.unwrap(), 1);
        until_parked(admin, 1.0, "parked after a write").await;
    }

    // An open transaction holds its server connection: never parked, however quiet.
    client
        .batch_execute("begin; insert into parked_writes values (10)")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        parked(admin).await.unwrap(),
        0.0,
        "a client inside a transaction was parked"
    );
    client.batch_execute("commit").await.unwrap();
    until_parked(admin, 1.0, "parked after the commit").await;

    // A parked client is told the proxy is shutting down, as an idle one is.
    let shutdown = tokio::spawn(proxy.shutdown());
    let res = tokio::time::timeout(Duration::from_secs(10), conn)
        .await
        .expect("the parked session was closed by the shutdown")
        .unwrap();
    let err = res.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::ADMIN_SHUTDOWN), "{err:?}");
    tokio::time::timeout(Duration::from_secs(20), shutdown)
        .await
        .unwrap()
        .unwrap();

    // Every acknowledged write is on the server.
    assert_eq!(
        cluster
            .primary
            .psql("select string_agg(id::text, ',' order by id) from parked_writes")
            .unwrap(),
        "0,1,2,10"
    );
}
