//! Each shard's replica check: every `HANDOFF_REPLICA_CHECK_INTERVAL` it asks every
//! host of the shard but the primary whether it is a standby, where it streams from and
//! how far its replay is behind the primary, and puts it in or out of the read rotation
//! (`shard::replicas`). One admin session per standby is kept open between checks, and
//! the hosts are asked at once, so one that hangs delays no other. No session is kept
//! on a primary (a fence waits for every session there to leave): its position is
//! asked on a session opened for the round.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::task::JoinSet;

use crate::backend::admin::{AdminDb, AdminSession};
use crate::config::HostPort;
use crate::shard::replicas::{Seen, Standing};
use crate::shard::{Ctx, Shard};
use crate::shutdown::{Phase, Signal};

/// The standby's side of a check: recovery, replay lag in bytes (against the primary's
/// position `$1` when known, else against what it has received), seconds since the
/// last replayed commit, and its upstream while it streams.
const STANDBY_SQL: &str = "SELECT pg_is_in_recovery(), \
     pg_wal_lsn_diff(COALESCE($1::text::pg_lsn, pg_last_wal_receive_lsn()), pg_last_wal_replay_lsn())::float8, \
     EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp())::float8, \
     (SELECT sender_host || ':' || sender_port FROM pg_stat_wal_receiver WHERE status = 'streaming')";

/// Runs until shutdown.
pub(crate) async fn run(ctx: Arc<Ctx>, shard: Arc<Shard>, shutdown: Signal) {
    let interval = ctx.settings.replicas.check_interval;
    let mut sessions: HashMap<HostPort, AdminSession> = HashMap::new();
    let mut caught_up: HashMap<HostPort, tokio::time::Instant> = HashMap::new();
    shard.replicas.set_hosts(&shard.hosts);
    loop {
        if shutdown.phase() >= Phase::Draining {
            return;
        }
        round(&ctx, &shard, &mut sessions, &mut caught_up).await;
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shard.replicas.wake.notified() => {}
            _ = crate::shard::health::reach(shutdown.clone()) => return,
        }
    }
}

/// One check of every host.
/// `caught_up`: when each standby was last seen with nothing left to replay.
async fn round(
    ctx: &Ctx,
    shard: &Shard,
    sessions: &mut HashMap<HostPort, AdminSession>,
    caught_up: &mut HashMap<HostPort, tokio::time::Instant>,
) {
    let timeout = ctx.settings.health.timeout;
    // On a managed shard its members are the hosts (the configured ones, if any, too).
    if let Some(manager) = ctx.manager(&shard.name) {
        if let Some(cluster) = manager.last() {
            let mut hosts = shard.hosts.clone();
            for m in &cluster.members {
                if !hosts.contains(&m.addr) {
                    hosts.push(m.addr.clone());
                }
            }
            shard.replicas.set_hosts(&hosts);
        }
    }
    let primary = shard.current().primary.clone();
    sessions.remove(&primary);
    let primary_lsn = primary_position(&ctx.admin, &primary, timeout).await;
    // Where a standby may stream from: the primary; during a switchover its target
    // (the shard's other standbys cascade from it until it is promoted: they have what
    // it has); and a primary a switchover replaced and fenced (its WAL ends at the
    // fence, a prefix of the new primary's history), until the standby follows the new
    // one.
    let mut primary_addrs = resolve(&primary).await;
    for host in shard.replicas.withheld() {
        primary_addrs.extend(resolve(&host).await);
    }
    for v in shard.watch.view() {
        if v.why == crate::shard::watch::Why::Switchover {
            primary_addrs.extend(resolve(&v.host).await);
        }
    }
    let mut checks = JoinSet::new();
    for s in shard.replicas.all() {
        crate::metrics::replica_transactions(&shard.name, &s.host, s.chosen());
        let host = s.host.clone();
        if host == primary {
            let seen = Seen {
                standing: Standing::NotStandby,
                detail: "the shard's primary".into(),
                checked: Some(SystemTime::now()),
                ..Seen::default()
            };
            shard
                .replicas
                .record(&host, seen, &ctx.settings.replicas.max_lag);
            // A standby promoted keeps no stale "in rotation" series.
            crate::metrics::replica_in_rotation(&shard.name, &host, false);
            continue;
        }
        let session = sessions.remove(&host).filter(|s| !s.is_closed());
        let admin = ctx.admin.clone();
        let lsn = primary_lsn.clone();
        let addrs = primary_addrs.clone();
        checks.spawn(async move {
            let (session, seen) = check(&admin, &host, session, lsn, &addrs, timeout).await;
            (host, session, seen)
        });
    }
    while let Some(done) = checks.join_next().await {
        let Ok((host, session, mut seen)) = done else {
            continue;
        };
        let now = tokio::time::Instant::now();
        match seen.lag_bytes {
            Some(0) => {
                caught_up.insert(host.clone(), now);
            }
            Some(_) => {
                let ago = caught_up.get(&host).map(|at| now - *at);
                seen.lag = seen.lag.map(|t| time_lag(t, ago));
            }
            None => {}
        }
        if let Some(s) = session.filter(|_| seen.standing != Standing::NotStandby) {
            sessions.insert(host.clone(), s);
        }
        crate::metrics::replica_lag(&shard.name, &host, seen.lag_bytes, seen.lag);
        let now = shard
            .replicas
            .record(&host, seen, &ctx.settings.replicas.max_lag);
        crate::metrics::replica_in_rotation(&shard.name, &host, now);
    }
}

/// A standby's lag in time while it has WAL to replay: how long ago its last replayed
/// transaction committed on the primary, but no more than how long ago it was last
/// seen caught up. (After the primary was quiet for an hour, its next commit makes
/// every standby an hour old until they replay it, a few milliseconds later: a check
/// landing then must not take them all out.)
fn time_lag(since_commit: Duration, caught_up_ago: Option<Duration>) -> Duration {
    caught_up_ago.map_or(since_commit, |ago| since_commit.min(ago))
}

/// The primary's current WAL position; `None` if it does not answer (its standbys
/// are then judged by what they received).
async fn primary_position(
    admin: &AdminDb,
    primary: &HostPort,
    timeout: Duration,
) -> Option<String> {
    let ask = async {
        let s = admin
            .open(primary, admin.database(), "handoff-replica-check", timeout)
            .await
            .ok()?;
        let row = s
            .client
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .ok()?;
        row.get(0)
    };
    tokio::time::timeout(timeout, ask).await.ok().flatten()
}

/// Checks one host on its kept session (opened if there is none); returns the session
/// to keep and what was seen.
async fn check(
    admin: &AdminDb,
    host: &HostPort,
    session: Option<AdminSession>,
    primary_lsn: Option<String>,
    primary_addrs: &[SocketAddr],
    timeout: Duration,
) -> (Option<AdminSession>, Seen) {
    let down = |detail: String| Seen {
        standing: Standing::Down,
        detail,
        checked: Some(SystemTime::now()),
        ..Seen::default()
    };
    let session = match session {
        Some(s) => s,
        None => match admin
            .open(host, admin.database(), "handoff-replica-check", timeout)
            .await
        {
            Ok(s) => s,
            Err(e) => return (None, down(e.to_string())),
        },
    };
    let lsn = primary_lsn.as_deref();
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&lsn];
    let q = session.client.query_one(STANDBY_SQL, &params);
    let row = match tokio::time::timeout(timeout, q).await {
        Ok(Ok(row)) => row,
        Ok(Err(e)) => return (None, down(format!("{host}: {e}"))),
        Err(_) => return (None, down(format!("{host}: no answer within {timeout:?}"))),
    };
    let in_recovery: bool = row.get(0);
    let lag_bytes: Option<f64> = row.get(1);
    let since_commit: Option<f64> = row.get(2);
    let upstream: Option<String> = row.get(3);
    let mut seen = Seen {
        standing: Standing::InRotation,
        lag_bytes: lag_bytes.map(|b| b.max(0.0) as u64),
        lag: None,
        upstream: upstream.clone(),
        detail: String::new(),
        checked: Some(SystemTime::now()),
    };
    if !in_recovery {
        seen.standing = Standing::NotStandby;
        seen.detail = "not in recovery".into();
        return (Some(session), seen);
    }
    // Caught up: no lag in time, however long ago the primary last committed.
    seen.lag = Some(match seen.lag_bytes {
        Some(0) => Duration::ZERO,
        _ => Duration::from_secs_f64(since_commit.unwrap_or(0.0).max(0.0)),
    });
    if primary_lsn.is_none() {
        seen.detail =
            "the primary does not answer: lag is what it received and has not replayed".into();
        return (Some(session), seen);
    }
    match upstream {
        Some(up) if streams_from(&up, primary_addrs).await => {}
        Some(up) => {
            seen.standing = Standing::NotStreaming;
            seen.detail = format!("streams from {up}, not from the shard's primary");
        }
        None => {
            seen.standing = Standing::NotStreaming;
            seen.detail = "its WAL receiver is not streaming".into();
        }
    }
    (Some(session), seen)
}

/// The addresses `host` stands for.
async fn resolve(host: &HostPort) -> Vec<SocketAddr> {
    tokio::net::lookup_host((host.host.as_str(), host.port))
        .await
        .map(|a| a.collect())
        .unwrap_or_default()
}

/// True if `upstream` (`host:port` as the standby reports it) is the primary.
async fn streams_from(upstream: &str, primary: &[SocketAddr]) -> bool {
    let Some((host, port)) = upstream.rsplit_once(':') else {
        return false;
    };
    let Ok(port) = port.parse::<u16>() else {
        return false;
    };
    let up = HostPort {
        host: host.to_string(),
        port,
    };
    resolve(&up).await.iter().any(|a| primary.contains(a))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_standby_caught_up_a_moment_ago_is_not_as_old_as_the_primarys_last_commit() {
        let hour = Duration::from_secs(3600);
        let second = Duration::from_secs(1);
        assert_eq!(time_lag(hour, Some(second)), second);
        assert_eq!(
            time_lag(second, Some(hour)),
            second,
            "behind for an hour, 1 s old"
        );
        assert_eq!(time_lag(hour, None), hour, "never seen caught up");
    }
}
