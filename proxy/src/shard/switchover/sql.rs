//! The switchover's SQL on the servers: the pre-check on both, the target's catch-up
//! to the fence LSN, and its promotion; and why any of it fails.

use std::time::Duration;

use tokio::time::Instant;
use tokio_postgres::Client;

use crate::backend::admin::{AdminConnectError, AdminDb, AdminSession};
use crate::config::{HostPort, SwitchoverSettings};
use crate::shard::fence;
use crate::shard::replay;
use crate::shard::StateKind;

/// Why a step of a switchover failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StepError {
    #[error("cannot connect to {addr} as {user}: {source}")]
    Connect {
        addr: HostPort,
        user: String,
        source: AdminConnectError,
    },
    #[error("{addr}: {message}")]
    Sql { addr: HostPort, message: String },
    #[error("the shard is {0}, not serving")]
    NotServing(&'static str),
    #[error("{0} is already the primary")]
    AlreadyPrimary(HostPort),
    #[error("{0} is not a standby (pg_is_in_recovery() is false)")]
    NotStandby(HostPort),
    #[error("{0} has not replayed any WAL yet")]
    NoReplay(HostPort),
    #[error("{to} is not a standby of {old} (system identifiers {target_system} and {old_system} differ)")]
    OtherSystem {
        to: HostPort,
        old: HostPort,
        target_system: String,
        old_system: String,
    },
    #[error("{to} replays {lag:.0} bytes behind {old}, more than HANDOFF_SWITCHOVER_MAX_LAG ({max} bytes)")]
    Lag {
        to: HostPort,
        old: HostPort,
        lag: f64,
        max: u64,
    },
    #[error(transparent)]
    Fence(#[from] fence::FenceError),
    #[error("{addr} did not replay up to the fence LSN {lsn} within HANDOFF_SWITCHOVER_TIMEOUT ({timeout:?})")]
    CatchUp {
        addr: HostPort,
        lsn: String,
        timeout: Duration,
    },
    #[error("{0}: pg_promote() could not signal the promotion")]
    PromoteNotSignalled(HostPort),
    #[error("{addr}: still in recovery {timeout:?} after pg_promote()")]
    StillInRecovery { addr: HostPort, timeout: Duration },
    #[error("{addr}: after promotion pg_is_in_recovery() = {in_recovery}, transaction_read_only = {read_only}")]
    NotWritable {
        addr: HostPort,
        in_recovery: bool,
        read_only: String,
    },
}

pub(super) async fn connect(
    admin: &AdminDb,
    addr: &HostPort,
    timeout: Duration,
) -> Result<AdminSession, StepError> {
    admin
        .open(addr, admin.database(), "handoff-switchover", timeout)
        .await
        .map_err(|source| StepError::Connect {
            addr: addr.clone(),
            user: admin.user().to_string(),
            source,
        })
}

pub(super) fn sql_error(addr: &HostPort, e: tokio_postgres::Error) -> StepError {
    StepError::Sql {
        addr: addr.clone(),
        message: match e.as_db_error() {
            Some(db) => format!("{} ({})", db.message(), db.code().code()),
            None => e.to_string(),
        },
    }
}

/// Checks that the shard serves from `old` and that `to` is a standby of it, caught
/// up within `HANDOFF_SWITCHOVER_MAX_LAG`.
pub(super) async fn precheck(
    admin: &AdminDb,
    cfg: &SwitchoverSettings,
    state: &StateKind,
    old: &HostPort,
    to: &HostPort,
    timeout: Duration,
) -> Result<(AdminSession, AdminSession, String), StepError> {
    if *state != StateKind::Serving {
        return Err(StepError::NotServing(state.as_str()));
    }
    if old == to {
        return Err(StepError::AlreadyPrimary(to.clone()));
    }
    let target = connect(admin, to, timeout).await?;
    let row = target
        .client
        .query_one(
            "SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()::text, \
             (SELECT system_identifier FROM pg_control_system())::text",
            &[],
        )
        .await
        .map_err(|e| sql_error(to, e))?;
    let (in_recovery, replay, target_system): (bool, Option<String>, String) =
        (row.get(0), row.get(1), row.get(2));
    if !in_recovery {
        return Err(StepError::NotStandby(to.clone()));
    }
    let Some(replay) = replay else {
        return Err(StepError::NoReplay(to.clone()));
    };
    let old_db = connect(admin, old, timeout).await?;
    let row = old_db
        .client
        .query_one(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::text::pg_lsn)::float8, \
             (SELECT system_identifier FROM pg_control_system())::text",
            &[&replay],
        )
        .await
        .map_err(|e| sql_error(old, e))?;
    let (lag, old_system): (f64, String) = (row.get(0), row.get(1));
    if old_system != target_system {
        return Err(StepError::OtherSystem {
            to: to.clone(),
            old: old.clone(),
            target_system,
            old_system,
        });
    }
    if lag > cfg.max_lag as f64 {
        return Err(StepError::Lag {
            to: to.clone(),
            old: old.clone(),
            lag,
            max: cfg.max_lag,
        });
    }
    Ok((old_db, target, old_system))
}

/// Waits until the standby behind `db` has replayed up to `fence`.
pub(crate) async fn catch_up(
    db: &Client,
    addr: &HostPort,
    fence: &str,
    timeout: Duration,
) -> Result<(), StepError> {
    let deadline = Instant::now() + timeout;
    match replay::wait_replayed(db, fence, deadline).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(StepError::CatchUp {
            addr: addr.clone(),
            lsn: fence.to_string(),
            timeout,
        }),
        Err(e) => Err(sql_error(addr, e)),
    }
}

pub(crate) enum Promotion {
    /// The target is still a standby: safe to roll back.
    NotPromoted(StepError),
    /// The target may be a primary now.
    Unconfirmed(StepError),
}

/// Promotes the standby behind `db` (unless it already left recovery: whoever finishes
/// a coordinated switchover may find it promoted), opens the databases the fence closed,
/// and confirms that a new session can write.
pub(crate) async fn promote(
    admin: &AdminDb,
    db: &Client,
    addr: &HostPort,
    timeout: Duration,
    fenced: &[String],
) -> Result<(), Promotion> {
    let in_recovery: bool = match db.query_one("SELECT pg_is_in_recovery()", &[]).await {
        Ok(row) => row.get(0),
        Err(e) => return Err(Promotion::NotPromoted(sql_error(addr, e))),
    };
    // pg_promote(wait => true) polls every 100 ms; asking without waiting and polling
    // here ends the promotion step sooner.
    let promoted: bool = if !in_recovery {
        true
    } else {
        match db.query_one("SELECT pg_promote(false)", &[]).await {
            Ok(row) => row.get(0),
            Err(e) => return Err(Promotion::NotPromoted(sql_error(addr, e))),
        }
    };
    if !promoted {
        return Err(Promotion::NotPromoted(StepError::PromoteNotSignalled(
            addr.clone(),
        )));
    }
    let deadline = Instant::now() + timeout;
    loop {
        match db.query_one("SELECT pg_is_in_recovery()", &[]).await {
            Ok(row) if !row.get::<_, bool>(0) => break,
            Ok(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(5)).await
            }
            Ok(_) => {
                return Err(Promotion::Unconfirmed(StepError::StillInRecovery {
                    addr: addr.clone(),
                    timeout,
                }))
            }
            Err(e) => return Err(Promotion::Unconfirmed(sql_error(addr, e))),
        }
    }
    // The target replayed the fence: its databases accept connections again.
    fence::restore(db, addr, fenced)
        .await
        .map_err(|e| Promotion::Unconfirmed(e.into()))?;
    // A new session gets in and can write.
    let deadline = Instant::now() + timeout;
    loop {
        let check = async {
            let c = connect(admin, addr, timeout).await?;
            let row = c
                .client
                .query_one(
                    "SELECT pg_is_in_recovery(), current_setting('transaction_read_only')",
                    &[],
                )
                .await
                .map_err(|e| sql_error(addr, e))?;
            Ok::<_, StepError>((row.get::<_, bool>(0), row.get::<_, String>(1)))
        };
        match check.await {
            Ok((false, ro)) if ro == "off" => return Ok(()),
            Ok((in_recovery, read_only)) if Instant::now() >= deadline => {
                return Err(Promotion::Unconfirmed(StepError::NotWritable {
                    addr: addr.clone(),
                    in_recovery,
                    read_only,
                }))
            }
            Err(e) if Instant::now() >= deadline => return Err(Promotion::Unconfirmed(e)),
            _ => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}
