//! Writers that bypass handoff: clients connected straight to a server (another
//! application, a cron job, a migration tool), each committing one insert per
//! transaction in a loop and reconnecting on any error. They keep the id and time of
//! every commit the server acknowledged, so a test can check that none is missing from
//! the new primary and that none was acknowledged after the fence.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use tokio_postgres::NoTls;

/// The table the writers insert into (created by [`prepare`]).
pub const TABLE: &str = "handoff_bypass";

/// How a writer gets past a read-only default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `BEGIN READ WRITE; INSERT …; COMMIT`.
    BeginReadWrite,
    /// `SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE` once per connection, then
    /// autocommit inserts (what some drivers send when a connection is switched back to
    /// read-write).
    SessionCharacteristics,
    /// `BEGIN; SET transaction_read_only = off; INSERT …; COMMIT`.
    SetTransactionReadOnlyOff,
}

impl Mode {
    pub const ALL: [Mode; 3] = [
        Mode::BeginReadWrite,
        Mode::SessionCharacteristics,
        Mode::SetTransactionReadOnlyOff,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Mode::BeginReadWrite => "BEGIN READ WRITE",
            Mode::SessionCharacteristics => "SET SESSION CHARACTERISTICS … READ WRITE",
            Mode::SetTransactionReadOnlyOff => "SET transaction_read_only = off",
        }
    }
}

/// Creates the writers' table on a server (the primary), as `postgres`, and lets
/// `grant_to` (if any) insert into it.
pub async fn prepare(server: &str, grant_to: Option<&str>) -> Result<()> {
    let (c, conn) = tokio_postgres::connect(server, NoTls).await?;
    tokio::spawn(conn);
    c.batch_execute(&format!(
        "DROP TABLE IF EXISTS {TABLE}; \
         CREATE TABLE {TABLE} (id bigserial PRIMARY KEY, writer int NOT NULL, seq int NOT NULL)"
    ))
    .await?;
    if let Some(role) = grant_to {
        c.batch_execute(&format!(
            "GRANT INSERT, SELECT ON {TABLE} TO {role}; GRANT USAGE ON SEQUENCE {TABLE}_id_seq TO {role}"
        ))
        .await?;
    }
    Ok(())
}

/// One acknowledged commit.
#[derive(Debug, Clone, Copy)]
pub struct Ack {
    pub id: i64,
    pub at: Instant,
}

/// What one writer saw.
#[derive(Debug, Clone)]
pub struct WriterOutcome {
    pub writer: i32,
    pub mode: Mode,
    pub user: String,
    pub acks: Vec<Ack>,
    /// Start times of every transaction attempted (successful or not).
    pub attempts: Vec<Instant>,
    /// Distinct errors with their counts.
    pub errors: Vec<(String, usize)>,
}

impl WriterOutcome {
    /// Commits acknowledged at or after `t`.
    pub fn acked_after(&self, t: Instant) -> usize {
        self.acks.iter().filter(|a| a.at >= t).count()
    }

    /// Transactions attempted at or after `t`.
    pub fn attempted_after(&self, t: Instant) -> usize {
        self.attempts.iter().filter(|a| **a >= t).count()
    }
}

/// Writers running until [`Writers::stop`].
pub struct Writers {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<WriterOutcome>>,
}

fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => format!("client: {e}"),
    }
}

fn count(errors: &mut Vec<(String, usize)>, e: String) {
    match errors.iter_mut().find(|(k, _)| *k == e) {
        Some((_, n)) => *n += 1,
        None => errors.push((e, 1)),
    }
}

impl Writers {
    /// Starts one writer per `(mode, user)` against `host:port` (database `postgres`).
    pub fn start(host_port: &str, writers: &[(Mode, &str)]) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (host, port) = host_port.rsplit_once(':').expect("host:port");
        let mut tasks = Vec::new();
        for (i, (mode, user)) in writers.iter().enumerate() {
            let url = format!(
                "host={host} port={port} user={user} dbname=postgres connect_timeout=2 application_name=bypassing-writer"
            );
            let (stop, mode, user) = (Arc::clone(&stop), *mode, user.to_string());
            let writer = i as i32;
            tasks.push(tokio::spawn(async move {
                let mut out = WriterOutcome {
                    writer,
                    mode,
                    user,
                    acks: Vec::new(),
                    attempts: Vec::new(),
                    errors: Vec::new(),
                };
                let insert =
                    format!("INSERT INTO {TABLE} (writer, seq) VALUES ($1, $2) RETURNING id");
                let mut seq = 0i32;
                while !stop.load(Ordering::Relaxed) {
                    out.attempts.push(Instant::now());
                    let client = match tokio_postgres::connect(&url, NoTls).await {
                        Ok((c, conn)) => {
                            tokio::spawn(conn);
                            c
                        }
                        Err(e) => {
                            count(&mut out.errors, describe(&e));
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    };
                    if mode == Mode::SessionCharacteristics {
                        if let Err(e) = client
                            .batch_execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE")
                            .await
                        {
                            count(&mut out.errors, describe(&e));
                            continue;
                        }
                    }
                    while !stop.load(Ordering::Relaxed) {
                        seq += 1;
                        out.attempts.push(Instant::now());
                        let r: Result<i64, tokio_postgres::Error> = async {
                            match mode {
                                Mode::BeginReadWrite => {
                                    client.batch_execute("BEGIN READ WRITE").await?;
                                }
                                Mode::SetTransactionReadOnlyOff => {
                                    client
                                        .batch_execute("BEGIN; SET transaction_read_only = off")
                                        .await?;
                                }
                                Mode::SessionCharacteristics => {}
                            }
                            let id: i64 = client.query_one(&insert, &[&writer, &seq]).await?.get(0);
                            if mode != Mode::SessionCharacteristics {
                                client.batch_execute("COMMIT").await?;
                            }
                            Ok(id)
                        }
                        .await;
                        match r {
                            Ok(id) => out.acks.push(Ack {
                                id,
                                at: Instant::now(),
                            }),
                            Err(e) => {
                                count(&mut out.errors, describe(&e));
                                if client.is_closed() {
                                    break;
                                }
                                let _ = client.batch_execute("ROLLBACK").await;
                            }
                        }
                    }
                }
                out
            }));
        }
        Self { stop, tasks }
    }

    /// Stops every writer and returns what each saw.
    pub async fn stop(self) -> Vec<WriterOutcome> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for t in self.tasks {
            if let Ok(Ok(o)) = tokio::time::timeout(Duration::from_secs(30), t).await {
                all.push(o);
            }
        }
        all
    }
}

/// The ids in the writers' table of the server at `server`.
pub async fn ids(server: &str) -> Result<std::collections::HashSet<i64>> {
    crate::load::ids_in(server, TABLE).await
}
