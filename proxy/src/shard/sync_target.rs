//! The target of a planned switchover made a synchronous standby before the revocation
//! (`HANDOFF_SWITCHOVER_SYNC_TARGET`), so the pause clients see does not grow with the
//! replication lag.
//!
//! With asynchronous replication under write load the target replays behind the
//! primary; a switchover that revokes first and then waits for the target to replay up
//! to the fence makes clients wait for that lag too. Instead, while traffic still flows,
//! the old primary is told to wait for the target to *apply* every commit
//! (`synchronous_standby_names` naming the target, `synchronous_commit = remote_apply`,
//! through `ALTER SYSTEM` and a reload), and the switchover goes on once the target is
//! the synchronous standby and has replayed everything committed before. When it is
//! revoked, the target is at most a few commits behind. Commits are slower for those
//! moments (each waits for the target's replay), never refused.
//!
//! What the old primary's `postgresql.auto.conf` held for the two settings is recorded
//! first and put back when the switchover ends, however it ends (the session doing it is
//! spared by the fence). If handoff dies in between, the settings stay: docs/switchover.md
//! says how to put them back.

use std::time::Duration;

use handoff_protocol::sql::quote_literal;
use tokio::time::Instant;
use tokio_postgres::Client;

use crate::backend::admin::{AdminDb, AdminSession};
use crate::config::HostPort;
use crate::shard::fence::quote_ident;
use crate::shard::replay;

/// The two settings changed.
const SETTINGS: [&str; 2] = ["synchronous_standby_names", "synchronous_commit"];

/// A target made synchronous: the session on the old primary that did it, and what to
/// put back.
pub(crate) struct Synced {
    old: HostPort,
    session: AdminSession,
    /// Backend pid of `session`: the fence leaves it alone.
    pub pid: i32,
    /// What `postgresql.auto.conf` held for each setting (`None`: nothing, put back
    /// with `ALTER SYSTEM RESET`).
    saved: Vec<(&'static str, Option<String>)>,
    /// The name the target streams under.
    pub name: String,
}

/// Why the target could not be made synchronous. Whatever was changed is put back; the
/// switchover goes on without it (as with the setting off), except after a
/// [`SyncError::Timeout`], when it is refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SyncError {
    #[error("{0}")]
    Sql(String),
    #[error("{0} is not streaming (no row in pg_stat_wal_receiver)")]
    NotStreaming(HostPort),
    #[error("{old} has {count} standbys streaming as '{name}': the target cannot be told apart")]
    NotUnique {
        old: HostPort,
        name: String,
        count: i64,
    },
    #[error(
        "{to} did not become the synchronous standby and replay up to {lsn} within HANDOFF_SWITCHOVER_TIMEOUT ({timeout:?})"
    )]
    Timeout {
        to: HostPort,
        lsn: String,
        timeout: Duration,
    },
}

fn sql(addr: &HostPort, e: tokio_postgres::Error) -> SyncError {
    SyncError::Sql(match e.as_db_error() {
        Some(db) => format!("{addr}: {} ({})", db.message(), db.code().code()),
        None => format!("{addr}: {e}"),
    })
}

/// The application name the target's WAL receiver uses: `application_name` of its
/// `primary_conninfo`, else its `cluster_name`, else PostgreSQL's default.
async fn stream_name(target: &Client, to: &HostPort) -> Result<String, SyncError> {
    let row = target
        .query_opt(
            "SELECT coalesce(substring(conninfo from 'application_name=([^ ]+)'), \
                    nullif(current_setting('cluster_name'), ''), 'walreceiver') \
             FROM pg_stat_wal_receiver",
            &[],
        )
        .await
        .map_err(|e| sql(to, e))?;
    row.map(|r| r.get(0))
        .ok_or_else(|| SyncError::NotStreaming(to.clone()))
}

/// Makes `to` (behind `target`) the old primary's synchronous standby with
/// `remote_apply`, then waits until it is and has replayed what was committed before.
/// `Err((None, e))`: nothing was changed; `Err((Some(s), e))`: changed, to be put back.
pub(crate) async fn sync(
    admin: &AdminDb,
    old: &HostPort,
    to: &HostPort,
    target: &Client,
    timeout: Duration,
) -> Result<Synced, (Option<Synced>, SyncError)> {
    let fail = |e| (None, e);
    let name = stream_name(target, to).await.map_err(fail)?;
    let session = admin
        .open(old, admin.database(), "handoff-switchover-sync", timeout)
        .await
        .map_err(|e| fail(SyncError::Sql(format!("{old}: {e}"))))?;
    let c = &session.client;
    // Its own commits never wait for a standby; a fence or a read-only default does
    // not stop it putting the settings back.
    c.batch_execute("SET synchronous_commit = local; SET default_transaction_read_only = off")
        .await
        .map_err(|e| fail(sql(old, e)))?;
    let count: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_stat_replication WHERE application_name = $1",
            &[&name],
        )
        .await
        .map_err(|e| fail(sql(old, e)))?
        .get(0);
    if count != 1 {
        return Err(fail(SyncError::NotUnique {
            old: old.clone(),
            name,
            count,
        }));
    }
    let pid: i32 = c
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .map_err(|e| fail(sql(old, e)))?
        .get(0);
    let mut saved = Vec::new();
    for setting in SETTINGS {
        // The last line for it in postgresql.auto.conf, if any.
        let row = c
            .query_opt(
                "SELECT setting FROM pg_file_settings \
                 WHERE name = $1 AND sourcefile LIKE '%postgresql.auto.conf' \
                 ORDER BY seqno DESC LIMIT 1",
                &[&setting],
            )
            .await
            .map_err(|e| fail(sql(old, e)))?;
        saved.push((setting, row.map(|r| r.get::<_, String>(0))));
    }
    let synced = Synced {
        old: old.clone(),
        session,
        pid,
        saved,
        name,
    };
    match apply(&synced, target, to, timeout).await {
        Ok(()) => Ok(synced),
        Err(e) => Err((Some(synced), e)),
    }
}

async fn apply(
    synced: &Synced,
    target: &Client,
    to: &HostPort,
    timeout: Duration,
) -> Result<(), SyncError> {
    let (c, old) = (&synced.session.client, &synced.old);
    let deadline = Instant::now() + timeout;
    // `"name"`: an identifier inside the setting's own syntax.
    let standby = quote_ident(&synced.name);
    // ALTER SYSTEM cannot run in a transaction block: one statement per query.
    for stmt in [
        format!(
            "ALTER SYSTEM SET synchronous_standby_names = {}",
            quote_literal(&standby)
        ),
        "ALTER SYSTEM SET synchronous_commit = 'remote_apply'".to_string(),
        "SELECT pg_reload_conf()".to_string(),
    ] {
        c.batch_execute(&stmt).await.map_err(|e| sql(old, e))?;
    }
    // Once the walsender reports the target as synchronous, commits wait for it; what
    // was committed before that is behind this LSN.
    loop {
        let row = c
            .query_one(
                "SELECT coalesce(bool_or(sync_state = 'sync'), false), pg_current_wal_lsn()::text \
                 FROM pg_stat_replication WHERE application_name = $1",
                &[&synced.name],
            )
            .await
            .map_err(|e| sql(old, e))?;
        if row.get::<_, bool>(0) {
            let lsn: String = row.get(1);
            return match replay::wait_replayed(target, &lsn, deadline).await {
                Ok(true) => Ok(()),
                Ok(false) => Err(SyncError::Timeout {
                    to: to.clone(),
                    lsn,
                    timeout,
                }),
                Err(e) => Err(sql(to, e)),
            };
        }
        if Instant::now() >= deadline {
            return Err(SyncError::Timeout {
                to: to.clone(),
                lsn: "its first synchronous commit".into(),
                timeout,
            });
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

impl Synced {
    /// Puts the two settings back as `postgresql.auto.conf` had them, and reloads.
    pub async fn restore(self) -> Result<(), SyncError> {
        let c = &self.session.client;
        for (setting, value) in &self.saved {
            let stmt = match value {
                Some(v) => format!("ALTER SYSTEM SET {setting} = {}", quote_literal(v)),
                None => format!("ALTER SYSTEM RESET {setting}"),
            };
            c.batch_execute(&stmt)
                .await
                .map_err(|e| sql(&self.old, e))?;
        }
        c.batch_execute("SELECT pg_reload_conf()")
            .await
            .map_err(|e| sql(&self.old, e))?;
        Ok(())
    }
}
