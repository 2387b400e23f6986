//! The fence: after it, no session on a server — new or existing, through handoff or
//! not, superuser or not — can commit a write there (docs/fence.md).
//!
//! PostgreSQL has no `super_read_only`: `default_transaction_read_only` is only a default
//! that any session overrides (`BEGIN READ WRITE`, `SET SESSION CHARACTERISTICS …`). A
//! session can write only if it exists, so the fence removes every session but
//! handoff's own and keeps new ones from starting:
//!
//! 1. every database that accepts connections is switched to `ALLOW_CONNECTIONS false`
//!    (`datallowconn`, checked for every role, superusers included, and persistent
//!    across restarts). PostgreSQL refuses to do that to the database a session is
//!    connected to, so a second admin session in another database fences the first
//!    session's own database;
//! 2. every other backend attached to a database (client sessions, background workers,
//!    logical walsenders, and backends that were logging in when step 1 committed,
//!    found through their virtual-transaction locks) is sent `pg_terminate_backend` and
//!    waited for, until two scans in a row find none (a backend leaves
//!    `pg_stat_activity` only after its transaction has ended). A backend that starts logging in later reads the new `datallowconn` and is
//!    refused, so a storm of reconnecting clients cannot keep the fence from closing;
//! 3. a tiny transaction of handoff's own flushes the WAL, and only then is the flush
//!    LSN read: every commit anyone was told about lies below it.
//!
//! Autovacuum workers and physical walsenders (the standbys' streams) are left alone:
//! they commit no client's data. [`Fence::lift`] turns back on exactly the databases
//! the fence turned off. The change is an ordinary catalog update, so standbys replay
//! it: a promoted target turns its databases back on with [`restore`].

use std::time::Duration;

use tokio::time::Instant;
use tokio_postgres::Client;

use crate::backend::admin::{AdminDb, AdminSession};
use crate::config::HostPort;

/// Why a fence could not be applied or lifted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum FenceError {
    #[error("cannot connect to {addr} as {user}: {message}")]
    Connect {
        addr: String,
        user: String,
        message: String,
    },
    #[error("{addr}: {message}")]
    Sql { addr: String, message: String },
    #[error("{addr}: no database other than \"{own}\" accepts connections, so the admin session's own database cannot be fenced")]
    NoSecondDatabase { addr: String, own: String },
    #[error("{addr}: {count} session(s) still connected after {waited:?} ({sessions}){hint}")]
    SessionsRemain {
        addr: String,
        count: usize,
        waited: Duration,
        sessions: String,
        hint: &'static str,
    },
    #[error("{addr}: databases {databases} still refuse connections after the fence was lifted")]
    NotLifted { addr: String, databases: String },
}

fn sql(addr: &HostPort, e: tokio_postgres::Error) -> FenceError {
    FenceError::Sql {
        addr: addr.to_string(),
        message: match e.as_db_error() {
            Some(db) => format!("{} ({})", db.message(), db.code().code()),
            None => e.to_string(),
        },
    }
}

/// `"name"` with embedded quotes doubled: an identifier whatever the server's string
/// settings.
pub(crate) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Logs in for the fence's own work, the error a [`FenceError`].
async fn login(
    admin: &AdminDb,
    addr: &HostPort,
    database: &str,
    timeout: Duration,
) -> Result<AdminSession, FenceError> {
    admin
        .open(addr, database, "handoff-fence", timeout)
        .await
        .map_err(|e| FenceError::Connect {
            addr: addr.to_string(),
            user: admin.user().to_string(),
            message: e.to_string(),
        })
}

/// A fence applied to one server, and what it changed.
#[derive(Debug)]
pub(crate) struct Fence {
    pub addr: HostPort,
    /// The databases the fence turned off, and only those: what lifting turns back on.
    pub databases: Vec<String>,
    /// The server's WAL flush position once no other session was left.
    pub lsn: Option<String>,
    /// Sessions terminated.
    pub terminated: u64,
    /// The backend pids of handoff's own sessions (not "other sessions").
    pub pids: Vec<i32>,
    /// handoff's own sessions on the fenced server: the main one, then (when the main
    /// one's database had to be fenced) a helper in another database.
    pub sessions: Vec<AdminSession>,
    /// Backends of the other proxies of a coordinated switchover, left alone: each keeps
    /// an admin session open so that it can lift the fence if this proxy dies.
    pub spared: Vec<i32>,
}

/// Sessions that could commit a write: every backend attached to a database except
/// autovacuum workers and handoff's own sessions (and their parallel workers). A backend
/// shows here only once it has passed the login checks, `datallowconn` included.
pub(crate) const SESSIONS_SQL: &str = "\
SELECT pid, backend_type || ' ' || coalesce(usename::text, '') || '@' || coalesce(datname::text, '') \
       || coalesce(' (' || nullif(application_name, '') || ')', '') \
FROM pg_stat_activity \
WHERE datid IS NOT NULL AND backend_type <> 'autovacuum worker' \
  AND pid <> ALL($1::int4[]) AND coalesce(leader_pid, 0) <> ALL($1::int4[]) \
ORDER BY pid";

/// Backends still logging in: they hold their virtual transaction lock from before they
/// read `datallowconn` until after they show in `pg_stat_activity`. One that started
/// reading after the fence's commit is refused; only those seen right after the commit
/// may have read the old value.
const STARTING_SQL: &str = "\
SELECT l.pid FROM pg_locks l \
WHERE l.locktype = 'virtualxid' AND l.pid IS NOT NULL AND l.pid <> ALL($1::int4[]) \
  AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = l.pid)";

/// Set on handoff's own sessions on the server: commits must not wait for a
/// synchronous standby that may be gone, and a server demoted by hand to a read-only
/// default must still take the fence.
const SESSION_SETUP: &str =
    "SET synchronous_commit = local; SET default_transaction_read_only = off";

/// Options of [`Fence::apply`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Apply {
    /// Terminate other sessions (`HANDOFF_SWITCHOVER_TERMINATE`); when false, wait for
    /// them to leave by themselves.
    pub terminate: bool,
    /// Longest the whole fence may take.
    pub timeout: Duration,
}

impl Fence {
    /// A fence on `addr` that has changed nothing yet, run through `main`.
    pub fn new(addr: HostPort, main: AdminSession) -> Self {
        Self {
            addr,
            databases: Vec::new(),
            lsn: None,
            terminated: 0,
            pids: Vec::new(),
            sessions: vec![main],
            spared: Vec::new(),
        }
    }

    /// The session the fence runs its SQL through.
    pub fn main(&self) -> Option<&Client> {
        self.sessions
            .iter()
            .find(|s| !s.is_closed())
            .map(|s| &s.client)
    }

    /// Fences the server. On error, what was changed so far is recorded in `self`, so
    /// [`Fence::lift`] undoes exactly that.
    pub async fn apply(&mut self, admin: &AdminDb, opts: Apply) -> Result<(), FenceError> {
        let deadline = Instant::now() + opts.timeout;
        self.sessions.retain(|s| !s.is_closed());
        if self.sessions.is_empty() {
            return Err(FenceError::Connect {
                addr: self.addr.to_string(),
                user: admin.user().to_string(),
                message: "handoff's sessions on the server were closed".into(),
            });
        }
        self.sessions[0]
            .client
            .batch_execute(SESSION_SETUP)
            .await
            .map_err(|e| sql(&self.addr, e))?;
        self.close_databases(admin, deadline).await?;
        self.end_sessions(opts, deadline).await?;
        self.read_lsn().await
    }

    /// Step 1, no new session: every database that accepts connections stops accepting
    /// them. The main session's own database is closed from a helper session.
    async fn close_databases(
        &mut self,
        admin: &AdminDb,
        deadline: Instant,
    ) -> Result<(), FenceError> {
        let addr = self.addr.clone();
        let main_db = self.sessions[0].database.clone();
        for _ in 0..3 {
            let open = open_databases(&self.sessions[0].client, &addr).await?;
            if open.is_empty() {
                break;
            }
            let others: Vec<&String> = open.iter().filter(|d| **d != main_db).collect();
            if !others.is_empty() {
                if !self.sessions.iter().any(|s| s.database != main_db) {
                    let left = deadline.saturating_duration_since(Instant::now());
                    let helper =
                        login(admin, &addr, others[0], left.max(Duration::from_secs(1))).await?;
                    helper
                        .client
                        .batch_execute(SESSION_SETUP)
                        .await
                        .map_err(|e| sql(&addr, e))?;
                    self.sessions.push(helper);
                }
                let mut batch = String::from("BEGIN;");
                for d in &others {
                    batch.push_str(&format!(
                        " ALTER DATABASE {} ALLOW_CONNECTIONS false;",
                        quote_ident(d)
                    ));
                }
                batch.push_str(" COMMIT");
                self.sessions[0]
                    .client
                    .batch_execute(&batch)
                    .await
                    .map_err(|e| sql(&addr, e))?;
                self.databases.extend(others.into_iter().cloned());
            }
            if open.contains(&main_db) {
                let Some(helper) = self.sessions.iter().find(|s| s.database != main_db) else {
                    return Err(FenceError::NoSecondDatabase {
                        addr: addr.to_string(),
                        own: main_db,
                    });
                };
                helper
                    .client
                    .batch_execute(&format!(
                        "ALTER DATABASE {} ALLOW_CONNECTIONS false",
                        quote_ident(&main_db)
                    ))
                    .await
                    .map_err(|e| sql(&addr, e))?;
                self.databases.push(main_db.clone());
            }
        }
        Ok(())
    }

    /// The sessions that could still commit a write: everything in `pg_stat_activity`
    /// but ours, and the backends of `starting_then` still logging in.
    async fn others(&self, starting_then: &[i32]) -> Result<Vec<(i32, String)>, FenceError> {
        let main = &self.sessions[0].client;
        let mut others: Vec<(i32, String)> = main
            .query(SESSIONS_SQL, &[&self.pids])
            .await
            .map_err(|e| sql(&self.addr, e))?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        if !starting_then.is_empty() {
            for r in main
                .query(STARTING_SQL, &[&self.pids])
                .await
                .map_err(|e| sql(&self.addr, e))?
            {
                let pid: i32 = r.get(0);
                if starting_then.contains(&pid) {
                    others.push((pid, "backend logging in".into()));
                }
            }
        }
        Ok(others)
    }

    /// Step 2, no other session: terminated (or, without terminating, left to leave)
    /// and waited for until two scans in a row find none. Backends still logging in
    /// count only if they were already there when step 1 committed.
    async fn end_sessions(&mut self, opts: Apply, deadline: Instant) -> Result<(), FenceError> {
        let addr = self.addr.clone();
        let mut ours = Vec::new();
        for s in &self.sessions {
            let pid: i32 = s
                .client
                .query_one("SELECT pg_backend_pid()", &[])
                .await
                .map_err(|e| sql(&addr, e))?
                .get(0);
            ours.push(pid);
        }
        ours.extend(&self.spared);
        self.pids = ours;
        let starting_then: Vec<i32> = self.sessions[0]
            .client
            .query(STARTING_SQL, &[&self.pids])
            .await
            .map_err(|e| sql(&addr, e))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let started = Instant::now();
        let mut clean_scans = 0;
        while clean_scans < 2 {
            let others = self.others(&starting_then).await?;
            if others.is_empty() {
                clean_scans += 1;
                if clean_scans < 2 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                continue;
            }
            clean_scans = 0;
            tracing::debug!(%addr, sessions = ?others, "fence: sessions left on the fenced server");
            let now = Instant::now();
            if now >= deadline {
                let list: Vec<String> = others
                    .iter()
                    .take(5)
                    .map(|(pid, what)| format!("pid {pid} {what}"))
                    .collect();
                return Err(FenceError::SessionsRemain {
                    addr: addr.to_string(),
                    count: others.len(),
                    waited: now - started,
                    sessions: list.join(", "),
                    hint: if opts.terminate {
                        ""
                    } else {
                        "; HANDOFF_SWITCHOVER_TERMINATE=false waits for them to leave by themselves"
                    },
                });
            }
            if opts.terminate {
                // Signal them all at once, then wait by scanning until they are gone:
                // pg_terminate_backend's own wait sleeps 100 ms between checks and takes
                // one backend at a time.
                let pids: Vec<i32> = others.iter().map(|(p, _)| *p).collect();
                let done = self.sessions[0]
                    .client
                    .query_one(
                        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) \
                         FROM unnest($1::int4[]) AS pid",
                        &[&pids],
                    )
                    .await
                    .map_err(|e| sql(&addr, e))?;
                self.terminated += done.get::<_, i64>(0) as u64;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }

    /// Step 3, the fence LSN, read only now: a transaction of our own flushes
    /// everything committed before it (asynchronous commits included).
    async fn read_lsn(&mut self) -> Result<(), FenceError> {
        let main = &self.sessions[0].client;
        main.batch_execute("BEGIN READ WRITE; SELECT pg_current_xact_id(); COMMIT")
            .await
            .map_err(|e| sql(&self.addr, e))?;
        let lsn: String = main
            .query_one("SELECT pg_current_wal_flush_lsn()::text", &[])
            .await
            .map_err(|e| sql(&self.addr, e))?
            .get(0);
        self.lsn = Some(lsn);
        Ok(())
    }
    /// Undoes the fence: the databases it turned off accept connections again. Runs
    /// through a session the fence kept (a new one cannot log in while the fence holds),
    /// then confirms from a new session.
    pub async fn lift(&self, admin: &AdminDb, timeout: Duration) -> Result<(), FenceError> {
        if self.databases.is_empty() {
            return Ok(());
        }
        let addr = &self.addr;
        let fresh;
        let client = match self.main() {
            Some(c) => c,
            None => {
                // Every kept session is gone: a new one only works if the admin
                // database was not fenced yet.
                fresh = login(admin, addr, admin.database(), timeout).await?;
                &fresh.client
            }
        };
        restore(client, addr, &self.databases).await?;
        // A new session must get in, and see every database open again.
        let deadline = Instant::now() + timeout;
        loop {
            let check = async {
                let s = login(admin, addr, admin.database(), timeout).await?;
                let closed: Vec<String> = s
                    .client
                    .query(
                        "SELECT datname::text FROM pg_database WHERE datname = ANY($1) AND NOT datallowconn",
                        &[&self.databases],
                    )
                    .await
                    .map_err(|e| sql(addr, e))?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                if closed.is_empty() {
                    Ok(())
                } else {
                    Err(FenceError::NotLifted {
                        addr: addr.to_string(),
                        databases: closed.join(", "),
                    })
                }
            };
            match check.await {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }
}

/// The databases of the server behind `client` that accept connections: what a fence
/// applied now would close.
pub(crate) async fn open_databases(
    client: &Client,
    addr: &HostPort,
) -> Result<Vec<String>, FenceError> {
    Ok(client
        .query(
            "SELECT datname::text FROM pg_database WHERE datallowconn ORDER BY datname",
            &[],
        )
        .await
        .map_err(|e| sql(addr, e))?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Turns connections back on for `databases` through `client` (one transaction).
/// Used to lift a fence, and on a promoted standby, which replayed the fence.
pub(crate) async fn restore(
    client: &Client,
    addr: &HostPort,
    databases: &[String],
) -> Result<(), FenceError> {
    if databases.is_empty() {
        return Ok(());
    }
    let mut batch = format!("{SESSION_SETUP}; BEGIN;");
    for d in databases {
        batch.push_str(&format!(
            " ALTER DATABASE {} ALLOW_CONNECTIONS true;",
            quote_ident(d)
        ));
    }
    batch.push_str(" COMMIT");
    client.batch_execute(&batch).await.map_err(|e| sql(addr, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_quoted_whatever_they_hold() {
        assert_eq!(quote_ident("app"), "\"app\"");
        assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
        assert_eq!(quote_ident("back\\slash"), "\"back\\slash\"");
    }
}
