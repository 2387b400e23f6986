//! The split-brain watchdog: every server a shard stopped using — an old primary fenced
//! by a switchover, a failed primary, one replaced through the admin API, one found
//! fenced or stale at startup — is watched until it is seen back as a standby.
//!
//! Every `HANDOFF_WATCHDOG_INTERVAL` each watched host is looked at, through the admin
//! session the fence kept when there is one, otherwise with a new connection:
//!
//! - it refuses the login because its databases do not accept connections: fenced, fine;
//! - it does not answer: down, fine;
//! - it is in recovery: it rejoined as a standby; it is no longer watched;
//! - it accepts connections and is not in recovery (its fence was lifted, it restarted
//!   without one, a fenced database accepts connections again, or a session other than
//!   handoff's runs on it): **split brain**. handoff logs an error naming the host,
//!   raises `handoff_split_brain{shard,host}`, shows it in `GET /v1/shards`, and fences
//!   the host (the same fence as a switchover's) if it is a member of the same cluster
//!   (same `system_identifier`) and not the shard's primary. The alarm stays raised until
//!   the host rejoins as a standby: writes it took in between are not on the primary.
//!
//! A watched host is never routed to: discovery skips it, and an explicit
//! establishment through the admin API is refused.

use std::sync::Arc;
use std::time::Duration;

use crate::backend::admin::{AdminConnectError, AdminDb, AdminSession};
use crate::shard::failure::timeline_of;
use crate::shard::fence::{self, Fence};
use crate::shard::watch::{Entry, Seen};
use crate::shard::{Ctx, Shard};
use crate::shutdown::{Phase, Signal};

/// What one look at a watched host found.
enum Look {
    /// Through the fence's session: databases accepting connections, other sessions,
    /// WAL past the fence.
    Kept {
        in_recovery: bool,
        open: Vec<String>,
        others: Vec<String>,
        wal_past: Option<f64>,
    },
    Fenced(String),
    Down(String),
    Refused(String),
    /// A new session got in.
    Open {
        session: AdminSession,
        in_recovery: bool,
        timeline: u32,
        system: String,
    },
}

async fn look(admin: &AdminDb, e: &mut Entry, timeout: Duration) -> Look {
    if let Some(f) = e.fence.as_mut() {
        f.sessions.retain(|s| !s.is_closed());
        if let Some(c) = f.main() {
            let q = async {
                let row = c
                    .query_one(
                        "SELECT pg_is_in_recovery(), \
                         (SELECT coalesce(array_agg(datname::text ORDER BY datname), '{}') FROM pg_database WHERE datallowconn), \
                         CASE WHEN pg_is_in_recovery() OR $1::text IS NULL THEN NULL \
                              ELSE pg_wal_lsn_diff(pg_current_wal_lsn(), $1::text::pg_lsn)::float8 END",
                        &[&f.lsn],
                    )
                    .await?;
                let others = c
                    .query(fence::SESSIONS_SQL, &[&f.pids])
                    .await?
                    .iter()
                    .map(|r| format!("pid {} {}", r.get::<_, i32>(0), r.get::<_, String>(1)))
                    .collect::<Vec<_>>();
                Ok::<_, tokio_postgres::Error>((row.get(0), row.get(1), others, row.get(2)))
            };
            if let Ok(Ok((in_recovery, open, others, wal_past))) =
                tokio::time::timeout(timeout, q).await
            {
                return Look::Kept {
                    in_recovery,
                    open,
                    others,
                    wal_past,
                };
            }
        }
    }
    // A new session: the admin database first, then every database the fence closed
    // (an operator may have opened only some of them again).
    let mut databases = vec![admin.database().to_string()];
    if let Some(f) = &e.fence {
        databases.extend(
            f.databases
                .iter()
                .filter(|d| d.as_str() != admin.database())
                .cloned(),
        );
    }
    let mut fenced = None;
    for db in databases {
        match admin
            .open(&e.view.host, &db, "handoff-watchdog", timeout)
            .await
        {
            Ok(session) => {
                let row = session
                    .client
                    .query_one(
                        "SELECT pg_is_in_recovery(), \
                         CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_walfile_name(pg_current_wal_lsn()) END, \
                         (SELECT system_identifier FROM pg_control_system())::text",
                        &[],
                    )
                    .await;
                return match row {
                    Ok(row) => {
                        let wal: Option<String> = row.get(1);
                        Look::Open {
                            in_recovery: row.get(0),
                            timeline: timeline_of(wal.as_deref()),
                            system: row.get(2),
                            session,
                        }
                    }
                    Err(err) => Look::Refused(format!("{}: {err}", e.view.host)),
                };
            }
            Err(AdminConnectError::Fenced(m)) => fenced = Some(m),
            Err(AdminConnectError::Unreachable(m)) => return Look::Down(m),
            Err(AdminConnectError::Refused(m)) => return Look::Refused(m),
        }
    }
    Look::Fenced(fenced.unwrap_or_default())
}

/// The system identifier of the shard's serving primary (to make sure a host about to
/// be fenced belongs to the same cluster).
async fn cluster_system(ctx: &Ctx, shard: &Shard) -> Option<String> {
    if let Some(s) = shard.watch.system() {
        return Some(s);
    }
    let gen = shard.serving()?;
    let s = ctx
        .admin
        .open(
            &gen.primary,
            ctx.admin.database(),
            "handoff-watchdog",
            ctx.settings.health.timeout,
        )
        .await
        .ok()?;
    let id: String = s
        .client
        .query_one(
            "SELECT (SELECT system_identifier FROM pg_control_system())::text",
            &[],
        )
        .await
        .ok()?
        .get(0);
    shard.watch.set_system(&id);
    Some(id)
}

fn raise(shard: &Shard, e: &mut Entry, why: String) {
    if e.view.split_brain.as_ref() != Some(&why) {
        tracing::error!(shard = %shard.name, host = %e.view.host, reason = %why, "SPLIT BRAIN: a replaced primary accepts connections outside recovery; writes it takes are not on the shard's primary");
        e.view.split_brain = Some(why);
    }
}

/// Fences the host of `e` (again), under the shard's operation lock so no switchover or
/// establishment runs meanwhile. `session` is a new admin session, when the fence kept
/// none.
async fn refence(ctx: &Ctx, shard: &Shard, e: &mut Entry, session: Option<AdminSession>) {
    let Ok(_op) = shard.op.try_lock() else {
        e.view.detail = "fence postponed: a switchover of the shard is running".into();
        return;
    };
    if shard.current().primary == e.view.host || !shard.watch.is_watched(&e.view.host) {
        return;
    }
    let cfg = &ctx.settings.switchover;
    let mut f = match (e.fence.take(), session) {
        (Some(mut f), Some(s)) => {
            f.sessions.insert(0, s);
            f
        }
        (Some(f), None) => f,
        (None, Some(s)) => Fence::new(e.view.host.clone(), s),
        (None, None) => return,
    };
    let opts = fence::Apply {
        terminate: true,
        timeout: cfg.timeout,
    };
    let result = f.apply(&ctx.admin, opts).await;
    let label = if result.is_ok() { "ok" } else { "error" };
    metrics::counter!(crate::metrics::FENCES, "shard" => shard.name.clone(), "source" => "watchdog", "result" => label)
        .increment(1);
    match result {
        Ok(()) => {
            tracing::warn!(shard = %shard.name, host = %e.view.host, terminated = f.terminated, lsn = ?f.lsn, "fenced a replaced primary that accepted connections");
            e.view.seen = Seen::Fenced;
            e.view.fenced_by_handoff = true;
            e.view.fence_lsn = f.lsn.clone();
            e.view.detail = format!(
                "fenced by the watchdog ({} sessions terminated)",
                f.terminated
            );
        }
        Err(err) => {
            let detail = format!("fence failed: {err}");
            if e.view.detail != detail {
                tracing::error!(shard = %shard.name, host = %e.view.host, error = %err, "could not fence a replaced primary that accepts connections (retried every HANDOFF_WATCHDOG_INTERVAL)");
            }
            e.view.detail = detail;
        }
    }
    e.fence = Some(f);
}

/// One look at `e` and what follows from it. False when the host is no longer watched.
async fn check(ctx: &Ctx, shard: &Shard, e: &mut Entry) -> bool {
    match look(&ctx.admin, e, ctx.settings.health.timeout).await {
        Look::Kept {
            in_recovery: true, ..
        }
        | Look::Open {
            in_recovery: true, ..
        } => {
            tracing::info!(shard = %shard.name, host = %e.view.host, "the replaced primary is a standby now");
            return false;
        }
        Look::Kept {
            open,
            others,
            wal_past,
            ..
        } => {
            e.view.wal_past_fence = wal_past;
            if open.is_empty() && others.is_empty() {
                e.view.seen = Seen::Fenced;
                e.view.detail = "fenced; handoff's session is open".into();
            } else {
                e.view.seen = Seen::Open;
                let mut what = Vec::new();
                if !open.is_empty() {
                    what.push(format!(
                        "databases accept connections again: {}",
                        open.join(", ")
                    ));
                }
                if !others.is_empty() {
                    what.push(format!(
                        "sessions other than handoff's: {}",
                        others.join(", ")
                    ));
                }
                raise(shard, e, what.join("; "));
                refence(ctx, shard, e, None).await;
            }
        }
        Look::Fenced(m) => {
            e.view.seen = Seen::Fenced;
            e.view.detail = m;
        }
        Look::Down(m) => {
            e.view.seen = Seen::Down;
            e.view.detail = m;
        }
        Look::Refused(m) => {
            e.view.seen = Seen::Refused;
            e.view.detail = m;
        }
        Look::Open {
            session,
            timeline,
            system,
            ..
        } => {
            e.view.seen = Seen::Open;
            match cluster_system(ctx, shard).await {
                Some(ours) if ours != system => {
                    tracing::warn!(shard = %shard.name, host = %e.view.host, "the replaced primary now belongs to another cluster (system identifier differs): no longer watched");
                    return false;
                }
                _ => {}
            }
            raise(
                shard,
                e,
                format!("accepts connections and is not in recovery (timeline {timeline})"),
            );
            refence(ctx, shard, e, Some(session)).await;
        }
    }
    true
}

/// A shard's watchdog: looks at every watched host each interval. Ends at shutdown.
pub(crate) async fn run(ctx: Arc<Ctx>, shard: Arc<Shard>, shutdown: Signal) {
    let interval = ctx.settings.watchdog_interval;
    loop {
        let idle = shard.watch.is_empty();
        let wait = async {
            if idle {
                shard.watch.wake.notified().await
            } else {
                tokio::time::sleep(interval).await
            }
        };
        let s = shutdown.clone();
        tokio::select! {
            _ = wait => {}
            _ = s.reached(Phase::Draining) => return,
        }
        let batch = shard.watch.take();
        let mut keep = Vec::with_capacity(batch.len());
        let mut gone = Vec::new();
        for mut e in batch {
            if check(&ctx, &shard, &mut e).await {
                keep.push(e);
            } else {
                gone.push(e.view.host.clone());
            }
        }
        shard.watch.put_back(&shard.name, keep, gone);
    }
}
