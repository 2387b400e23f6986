//! The campaign's clients: each keeps one connection to one proxy (reconnecting when
//! it loses it) and records every request it makes — what, through which proxy, when it
//! started and ended, and how it ended — into one history the checkers read.
//!
//! - **Writers** run a tpcb-like transaction with a unique id: `BEGIN`, an insert of the
//!   id into `chaos_writes` (with the timeline the row was written on), an update of
//!   one of `chaos_accounts`' balances, `COMMIT`. A commit that answered is an
//!   acknowledged write.
//! - **Readers** run a prepared point read on the primary.
//! - **Replica readers** run the same read through `postgres@replica` (standbys).
//!
//! Every client uses prepared statements (tokio-postgres names them), so the proxy in
//! session mode carries named statements across its whole session, and the ones in
//! transaction mode re-prepare them on whatever server connection they get.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Result;
use tokio::time::Instant;
use tokio_postgres::NoTls;

/// The clients' password (`HANDOFF_USERS`).
pub const PASSWORD: &str = "chaos-password";

/// Accounts the writers update.
pub const ACCOUNTS: i32 = 100;

/// Creates the campaign's tables on the primary (`server`: a connection string).
pub async fn prepare(server: &str) -> Result<()> {
    let (c, conn) = tokio_postgres::connect(server, NoTls).await?;
    tokio::spawn(conn);
    // No unique key on chaos_writes: a write applied twice would show as two rows.
    c.batch_execute(&format!(
        "DROP TABLE IF EXISTS chaos_writes, chaos_accounts; \
         CREATE TABLE chaos_writes (id bigint NOT NULL, client int NOT NULL, timeline int NOT NULL); \
         CREATE TABLE chaos_accounts (aid int PRIMARY KEY, balance bigint NOT NULL DEFAULT 0); \
         INSERT INTO chaos_accounts (aid) SELECT g FROM generate_series(1, {ACCOUNTS}) g;"
    ))
    .await?;
    Ok(())
}

/// What a request was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A login (after the first: a reconnection).
    Connect,
    Write,
    Read,
    ReplicaRead,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Connect => "connect",
            Kind::Write => "write",
            Kind::Read => "read",
            Kind::ReplicaRead => "replica-read",
        }
    }
}

/// One request in the history.
#[derive(Debug, Clone)]
pub struct Op {
    pub client: u32,
    /// Index of the proxy it went through.
    pub proxy: usize,
    pub kind: Kind,
    /// Since the campaign started.
    pub start: Duration,
    pub end: Duration,
    /// A write's id.
    pub id: Option<i64>,
    /// The timeline an acknowledged write was written on.
    pub timeline: Option<i32>,
    /// `None`: it succeeded; else the SQLSTATE (`client` for a connection-level
    /// failure, `timeout` when the client gave up waiting) and the message.
    pub error: Option<(String, String)>,
}

impl Op {
    pub fn ok(&self) -> bool {
        self.error.is_none()
    }

    /// One line for a report.
    pub fn describe(&self) -> String {
        let outcome = match &self.error {
            None => "ok".to_string(),
            Some((code, msg)) => format!("{code}: {msg}"),
        };
        format!(
            "{:>9.3}s..{:>9.3}s client {} via p{} {}{} {outcome}",
            self.start.as_secs_f64(),
            self.end.as_secs_f64(),
            self.client,
            self.proxy + 1,
            self.kind.as_str(),
            self.id.map(|i| format!(" #{i:x}")).unwrap_or_default(),
        )
    }
}

/// Who the clients are.
#[derive(Debug, Clone, Copy)]
pub struct Mix {
    /// Per proxy.
    pub writers: usize,
    pub readers: usize,
    pub replica_readers: usize,
    /// Pause between a client's requests.
    pub think: Duration,
    /// Longest a client waits for one answer before it records a timeout and
    /// reconnects.
    pub give_up: Duration,
}

/// The proxies' client addresses, by index; a restarted proxy's is replaced.
pub type Targets = Arc<RwLock<Vec<SocketAddr>>>;

/// Clients running until [`Workload::stop`].
pub struct Workload {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Vec<Op>>>,
}

fn classify(e: &tokio_postgres::Error) -> (String, String) {
    match e.as_db_error() {
        Some(db) => (db.code().code().to_string(), db.message().to_string()),
        None => ("client".to_string(), e.to_string()),
    }
}

/// Whether the connection is over after `e`: closed, or a FATAL (the server side
/// closes right after it, though the client may not have read the end yet).
fn ends_connection(client: &tokio_postgres::Client, e: &tokio_postgres::Error) -> bool {
    client.is_closed()
        || e.as_db_error()
            .is_some_and(|db| db.severity() == "FATAL" || db.severity() == "PANIC")
}

impl Workload {
    /// Starts `mix` through every proxy in `targets`; times are measured from `epoch`.
    pub fn start(targets: &Targets, mix: Mix, epoch: Instant) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let proxies = targets.read().expect("targets").len();
        let mut tasks = Vec::new();
        let mut client = 0u32;
        for proxy in 0..proxies {
            for (kind, n) in [
                (Kind::Write, mix.writers),
                (Kind::Read, mix.readers),
                (Kind::ReplicaRead, mix.replica_readers),
            ] {
                for _ in 0..n {
                    let c = Client {
                        id: client,
                        proxy,
                        kind,
                        targets: Arc::clone(targets),
                        stop: Arc::clone(&stop),
                        mix,
                        epoch,
                        history: Vec::new(),
                    };
                    tasks.push(tokio::spawn(c.run()));
                    client += 1;
                }
            }
        }
        Self { stop, tasks }
    }

    /// Stops every client and returns the whole history, ordered by start.
    pub async fn stop(self) -> Vec<Op> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for t in self.tasks {
            if let Ok(ops) = t.await {
                all.extend(ops);
            }
        }
        all.sort_by_key(|o| o.start);
        all
    }
}

struct Client {
    id: u32,
    proxy: usize,
    kind: Kind,
    targets: Targets,
    stop: Arc<AtomicBool>,
    mix: Mix,
    epoch: Instant,
    history: Vec<Op>,
}

/// A connected client's statements.
struct Session {
    client: tokio_postgres::Client,
    /// The insert and the update (writers only: a standby refuses to prepare the
    /// insert, which calls `pg_current_wal_insert_lsn()`).
    write: Option<(tokio_postgres::Statement, tokio_postgres::Statement)>,
    read: tokio_postgres::Statement,
}

impl Client {
    fn record(&mut self, kind: Kind, start: Instant, outcome: Outcome) {
        let (id, timeline, error) = outcome;
        self.history.push(Op {
            client: self.id,
            proxy: self.proxy,
            kind,
            start: start - self.epoch,
            end: Instant::now() - self.epoch,
            id,
            timeline,
            error,
        });
    }

    async fn connect(&self) -> Result<Session, (String, String)> {
        let addr = self.targets.read().expect("targets")[self.proxy];
        let db = if self.kind == Kind::ReplicaRead {
            "postgres@replica"
        } else {
            "postgres"
        };
        let url = format!(
            "host={} port={} user=postgres password={PASSWORD} dbname={db} connect_timeout=10",
            addr.ip(),
            addr.port()
        );
        let (client, conn) = tokio_postgres::connect(&url, NoTls)
            .await
            .map_err(|e| classify(&e))?;
        tokio::spawn(conn);
        let prepare = async {
            let write = if self.kind == Kind::Write {
                let insert = client
                    .prepare(
                        "INSERT INTO chaos_writes (id, client, timeline) VALUES ($1, $2, \
                         ('x' || substr(pg_walfile_name(pg_current_wal_insert_lsn()), 1, 8))::bit(32)::int) \
                         RETURNING timeline",
                    )
                    .await?;
                let update = client
                    .prepare("UPDATE chaos_accounts SET balance = balance + 1 WHERE aid = $1")
                    .await?;
                Some((insert, update))
            } else {
                None
            };
            let read = client
                .prepare("SELECT balance FROM chaos_accounts WHERE aid = $1")
                .await?;
            Ok::<_, tokio_postgres::Error>((write, read))
        };
        let (write, read) = prepare.await.map_err(|e| classify(&e))?;
        Ok(Session {
            client,
            write,
            read,
        })
    }

    async fn run(mut self) -> Vec<Op> {
        let mut seq: i64 = 0;
        while !self.stop.load(Ordering::Relaxed) {
            let started = Instant::now();
            let session = match tokio::time::timeout(self.mix.give_up, self.connect()).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    self.record(Kind::Connect, started, (None, None, Some(e)));
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
                Err(_) => {
                    let e = ("timeout".into(), "no login within the give-up time".into());
                    self.record(Kind::Connect, started, (None, None, Some(e)));
                    continue;
                }
            };
            self.record(Kind::Connect, started, (None, None, None));
            while !self.stop.load(Ordering::Relaxed) {
                seq += 1;
                let started = Instant::now();
                let aid = (seq % ACCOUNTS as i64) as i32 + 1;
                let id = ((self.id as i64) << 32) | seq;
                let work = async {
                    match &session.write {
                        Some(w) => write(&session.client, w, id, self.id as i32, aid).await,
                        None => {
                            session.client.query_one(&session.read, &[&aid]).await?;
                            Ok(None)
                        }
                    }
                };
                let outcome = tokio::time::timeout(self.mix.give_up, work).await;
                let id = (self.kind == Kind::Write).then_some(id);
                let closed = match outcome {
                    Ok(Ok(timeline)) => {
                        self.record(self.kind, started, (id, timeline, None));
                        false
                    }
                    Ok(Err(e)) => {
                        self.record(self.kind, started, (id, None, Some(classify(&e))));
                        ends_connection(&session.client, &e)
                    }
                    Err(_) => {
                        let e = ("timeout".into(), "no answer within the give-up time".into());
                        self.record(self.kind, started, (id, None, Some(e)));
                        true
                    }
                };
                if closed {
                    break;
                }
                tokio::time::sleep(self.mix.think).await;
            }
        }
        self.history
    }
}

/// What a request returned: a write's id and timeline, or the error.
type Outcome = (Option<i64>, Option<i32>, Option<(String, String)>);

/// The writers' transaction; the timeline its row was written on.
async fn write(
    c: &tokio_postgres::Client,
    (insert, update): &(tokio_postgres::Statement, tokio_postgres::Statement),
    id: i64,
    client: i32,
    aid: i32,
) -> Result<Option<i32>, tokio_postgres::Error> {
    c.batch_execute("BEGIN").await?;
    let body = async {
        let timeline: i32 = c.query_one(insert, &[&id, &client]).await?.get(0);
        c.execute(update, &[&aid]).await?;
        Ok::<_, tokio_postgres::Error>(timeline)
    };
    match body.await {
        Ok(timeline) => {
            c.batch_execute("COMMIT").await?;
            Ok(Some(timeline))
        }
        Err(e) => {
            // The transaction is aborted (or the connection gone): end it if possible.
            let _ = c.batch_execute("ROLLBACK").await;
            Err(e)
        }
    }
}
