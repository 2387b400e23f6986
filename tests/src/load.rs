//! A small mixed load for switchover tests: tokio-postgres clients doing prepared
//! inserts, reads, explicit transactions and simple queries through the proxy, keeping
//! every acknowledged row id and every error.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use tokio_postgres::NoTls;

/// The table the load writes (created by [`Load::prepare`]).
pub const TABLE: &str = "handoff_load";

/// What the load saw.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Requests that succeeded.
    pub ok: u64,
    /// Every error, as "SQLSTATE: message".
    pub errors: Vec<String>,
    /// Ids of rows whose insert was acknowledged (committed).
    pub acked: Vec<i64>,
    /// The most errors any one client saw.
    pub max_client_errors: usize,
}

/// Clients running until [`Load::stop`].
pub struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Outcome>>,
}

fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => format!("client: {e}"),
    }
}

impl Load {
    /// Creates the load's tables, directly on a server (the primary).
    pub async fn prepare(server: &str) -> Result<()> {
        let (c, conn) = tokio_postgres::connect(server, NoTls).await?;
        tokio::spawn(conn);
        c.batch_execute(&format!(
            "DROP TABLE IF EXISTS {TABLE}; \
             CREATE TABLE {TABLE} (id bigserial PRIMARY KEY, client int NOT NULL, seq int NOT NULL); \
             DROP TABLE IF EXISTS handoff_load_counter; \
             CREATE TABLE handoff_load_counter (client int PRIMARY KEY, n bigint NOT NULL DEFAULT 0); \
             INSERT INTO handoff_load_counter SELECT g FROM generate_series(0, 999) g;"
        ))
        .await?;
        Ok(())
    }

    /// Starts `clients` clients through the proxy at `addr`; each connects first (the
    /// call returns once all are connected).
    pub async fn start(addr: SocketAddr, clients: usize) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let url = format!(
            "host={} port={} user=postgres dbname=postgres connect_timeout=10",
            addr.ip(),
            addr.port()
        );
        let ready = Arc::new(tokio::sync::Barrier::new(clients + 1));
        let errors_at_connect = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for c in 0..clients {
            let (url, stop, ready) = (url.clone(), Arc::clone(&stop), Arc::clone(&ready));
            let connect_errors = Arc::clone(&errors_at_connect);
            tasks.push(tokio::spawn(async move {
                let mut out = Outcome::default();
                let client = match tokio_postgres::connect(&url, NoTls).await {
                    Ok((client, conn)) => {
                        tokio::spawn(conn);
                        client
                    }
                    Err(e) => {
                        connect_errors.lock().unwrap().push(describe(&e));
                        ready.wait().await;
                        return out;
                    }
                };
                let insert = client
                    .prepare(&format!(
                        "INSERT INTO {TABLE} (client, seq) VALUES ($1, $2) RETURNING id"
                    ))
                    .await;
                let read = client
                    .prepare(&format!("SELECT count(*) FROM {TABLE} WHERE client = $1"))
                    .await;
                ready.wait().await;
                let (insert, read) = match (insert, read) {
                    (Ok(i), Ok(r)) => (i, r),
                    (Err(e), _) | (_, Err(e)) => {
                        out.errors.push(describe(&e));
                        return out;
                    }
                };
                let me = c as i32;
                let mut client = client;
                let mut seq = 0i32;
                while !stop.load(Ordering::Relaxed) {
                    seq += 1;
                    let r: Result<Option<i64>, tokio_postgres::Error> = match seq % 4 {
                        0 => client
                            .query_one(&insert, &[&me, &seq])
                            .await
                            .map(|row| Some(row.get(0))),
                        1 => client.query_one(&read, &[&me]).await.map(|_| None),
                        2 => {
                            async {
                                let tx = client.transaction().await?;
                                let id: i64 = tx.query_one(&insert, &[&me, &seq]).await?.get(0);
                                tx.execute(
                                    "UPDATE handoff_load_counter SET n = n + 1 WHERE client = $1",
                                    &[&(me % 1000)],
                                )
                                .await?;
                                tx.commit().await?;
                                Ok(Some(id))
                            }
                            .await
                        }
                        _ => client.simple_query("SELECT 1").await.map(|_| None),
                    };
                    match r {
                        Ok(id) => {
                            out.ok += 1;
                            out.acked.extend(id);
                        }
                        Err(e) => {
                            out.errors.push(describe(&e));
                            if client.is_closed() {
                                return out;
                            }
                        }
                    }
                }
                out
            }));
        }
        ready.wait().await;
        let errs = errors_at_connect.lock().unwrap().clone();
        anyhow::ensure!(errs.is_empty(), "load clients could not connect: {errs:?}");
        Ok(Self { stop, tasks })
    }

    /// Stops every client and sums what they saw.
    pub async fn stop(self) -> Outcome {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = Outcome::default();
        for t in self.tasks {
            if let Ok(Ok(o)) = tokio::time::timeout(Duration::from_secs(30), t).await {
                total.ok += o.ok;
                total.max_client_errors = total.max_client_errors.max(o.errors.len());
                total.errors.extend(o.errors);
                total.acked.extend(o.acked);
            } else {
                total
                    .errors
                    .push("a load client did not stop within 30s".into());
            }
        }
        total
    }
}

/// Panics unless the load made progress and every write `out` saw acknowledged is in
/// the load table of the server at `server` (`name` in the message).
pub async fn assert_acked_on(server: &str, name: &str, out: &Outcome) {
    assert!(out.ok > 0, "the load made no progress");
    let present = ids(server).await.unwrap();
    let missing: Vec<i64> = out
        .acked
        .iter()
        .filter(|id| !present.contains(id))
        .copied()
        .collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged writes missing on {name}: {:?}",
        missing.len(),
        &missing[..missing.len().min(20)]
    );
}

/// [`assert_acked_on`], and no client saw an error.
pub async fn assert_nothing_lost(server: &str, name: &str, out: &Outcome) {
    assert!(
        out.errors.is_empty(),
        "clients saw errors: {:?}",
        out.errors
    );
    assert_acked_on(server, name, out).await;
}

/// The ids in the load table of the server at `server`.
pub async fn ids(server: &str) -> Result<std::collections::HashSet<i64>> {
    ids_in(server, TABLE).await
}

/// The `id` column of `table` on the server at `server`.
pub async fn ids_in(server: &str, table: &str) -> Result<std::collections::HashSet<i64>> {
    let (c, conn) = tokio_postgres::connect(server, NoTls).await?;
    tokio::spawn(conn);
    let rows = c.query(&format!("SELECT id FROM {table}"), &[]).await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// pgbench's tpcb-like script through the proxy on `port`: `clients` clients for `secs`.
pub fn pgbench(
    cluster: &crate::Cluster,
    port: u16,
    clients: u32,
    secs: u32,
) -> std::process::Child {
    cluster
        .pgbench(port)
        .args([
            "-c",
            &clients.to_string(),
            "-j",
            "1",
            "-T",
            &secs.to_string(),
            "-n",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("pgbench starts")
}

/// pgbench's count of committed transactions; panics on any failed one (or an
/// aborted client: pgbench then exits with an error).
pub fn pgbench_done(who: &str, child: std::process::Child) -> u64 {
    let out = child.wait_with_output().expect("pgbench ends");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("number of failed transactions: 0"),
        "pgbench through {who}:\n{stdout}\n{stderr}"
    );
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no count in pgbench's output:\n{stdout}"))
}

/// Rows in pgbench's history table on `node`'s server: one per committed transaction.
pub async fn history(node: &crate::Node) -> u64 {
    let url = crate::admin::server(node);
    let (c, conn) = tokio_postgres::connect(&url, NoTls)
        .await
        .expect("the server answers");
    tokio::spawn(conn);
    let n: i64 = c
        .query_one("SELECT count(*) FROM pgbench_history", &[])
        .await
        .expect("pgbench's tables exist")
        .get(0);
    n as u64
}
