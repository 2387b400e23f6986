use handoff_tests::{conn_str, start_proxy, Cluster};

#[tokio::test]
async fn smoke() {
    let cluster = Cluster::start(1).unwrap();
    let proxy = start_proxy(&cluster, &[("HANDOFF_USERS", "postgres=secret")])
        .await
        .unwrap();
    let (client, conn) = tokio_postgres::connect(
        &conn_str(&proxy.listen_addr(), "postgres", "postgres", Some("secret")),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let row = client
        .query_one("select $1::int + 1", &[&41i32])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);
    drop(client);
    proxy.shutdown().await;
}
