//! Unplanned failover (docs/switchover.md, "An unplanned failover"): noticing that a shard's primary
//! is gone, finding the new one, and telling sessions whether a request that failed may
//! be sent again.
//!
//! - **Detection.** Sessions report what they see on server connections (connect
//!   failures, lost connections, `57P01`/`57P02`/`57P03` FATALs, `25006`/`57P03` answers)
//!   and each shard's monitor task checks its primary every
//!   `HANDOFF_HEALTH_CHECK_INTERVAL`. A report is never taken on trust: it triggers a
//!   probe of the primary (one at a time per shard, and one probe answers every report
//!   made before it started), and only a probe that finds the primary unreachable, in
//!   recovery or read-only revokes it, with the epoch it was made for.
//! - **Discovery.** After such a revocation (or at startup when no configured host is a
//!   primary) the monitor probes every configured host every `HANDOFF_DISCOVERY_INTERVAL`,
//!   never more than one probe per host at a time, and establishes the first host that is
//!   writable and on the highest timeline seen for the shard. It keeps going after the
//!   buffer gives up (Unavailable), so the shard recovers by itself. Revocations made
//!   through the admin API or by a switchover are left to their owner: discovery does not
//!   run for them, so an explicit establishment always wins; a hold (`shard::hold`) hands
//!   its revocation to discovery. The monitor task and the discovery loop live in
//!   `shard::monitor` (on a managed shard discovery follows the HA manager: `shard::managed`);
//!   this file has the probe, the check, and the establishment of what was found.

use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use tokio::task::JoinHandle;

use handoff_protocol::sqlstate;

use crate::backend::admin::{AdminConnectError, AdminDb};
use crate::config::{HealthSettings, HostPort};
use crate::shard::failure::{timeline_of, Checked, Report};
use crate::shard::{Ctx, Generation, Shard, StateKind};
use crate::shutdown::{Phase, Signal};

/// What a probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// Writable, on this timeline.
    Primary {
        timeline: u32,
    },
    /// Not in recovery, but `transaction_read_only` is on (demoted or fenced).
    ReadOnly {
        timeline: u32,
    },
    InRecovery,
    /// Its databases refuse connections: fenced (by a switchover or the watchdog).
    Fenced(String),
    /// No answer: refused, reset, timed out, or the server is starting or stopping.
    Unreachable(String),
    /// The server answered but refused the probe (authentication, too many
    /// connections, …): it is up, its role unknown.
    Refused(String),
}

impl Probe {
    pub(crate) fn label(&self) -> &'static str {
        match self {
            Probe::Primary { .. } => "primary",
            Probe::ReadOnly { .. } => "read_only",
            Probe::InRecovery => "in_recovery",
            Probe::Fenced(_) => "fenced",
            Probe::Unreachable(_) => "unreachable",
            Probe::Refused(_) => "refused",
        }
    }

    /// Why this host cannot serve as primary, if it cannot.
    fn failure(&self) -> Option<String> {
        match self {
            Probe::Primary { .. } | Probe::Refused(_) => None,
            Probe::ReadOnly { .. } => Some("the primary is read-only".into()),
            Probe::InRecovery => Some("the primary is in recovery".into()),
            Probe::Fenced(_) => {
                Some("the primary is fenced (its databases refuse connections)".into())
            }
            Probe::Unreachable(e) => Some(format!("the primary is unreachable: {e}")),
        }
    }
}

const PROBE_SQL: &str = "SELECT pg_is_in_recovery(), current_setting('transaction_read_only'), \
     CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_walfile_name(pg_current_wal_lsn()) END";

/// Connects to `addr` as the admin role and asks what it is, within `timeout`.
pub async fn probe(admin: &AdminDb, addr: &HostPort, timeout: Duration) -> Probe {
    let work = async {
        let session = admin
            .open(addr, admin.database(), "handoff-probe", timeout)
            .await
            .map_err(|e| match e {
                AdminConnectError::Fenced(m) => Probe::Fenced(m),
                AdminConnectError::Unreachable(m) => Probe::Unreachable(m),
                AdminConnectError::Refused(m) => Probe::Refused(m),
            })?;
        session
            .client
            .query_one(PROBE_SQL, &[])
            .await
            .map_err(|e| match e.as_db_error() {
                Some(db) if sqlstate::is_operator_intervention(db.code().code()) => {
                    Probe::Unreachable(format!("{addr}: {}", db.message()))
                }
                Some(db) => {
                    Probe::Refused(format!("{addr}: {} ({})", db.message(), db.code().code()))
                }
                None => Probe::Unreachable(format!("{addr}: {e}")),
            })
    };
    let row = match tokio::time::timeout(timeout, work).await {
        Err(_) => return Probe::Unreachable(format!("{addr}: no answer within {timeout:?}")),
        Ok(Err(p)) => return p,
        Ok(Ok(row)) => row,
    };
    answer(&row)
}

/// The probe's question asked on an open session (e.g. one kept on a standby to see
/// its promotion); `None` when the session failed.
pub(crate) async fn probe_on(client: &tokio_postgres::Client) -> Option<Probe> {
    client
        .query_one(PROBE_SQL, &[])
        .await
        .ok()
        .map(|r| answer(&r))
}

/// What the probe's row says.
fn answer(row: &tokio_postgres::Row) -> Probe {
    let in_recovery: bool = row.get(0);
    let read_only: String = row.get(1);
    let wal: Option<String> = row.get(2);
    if in_recovery {
        return Probe::InRecovery;
    }
    let timeline = timeline_of(wal.as_deref());
    if read_only == "on" {
        Probe::ReadOnly { timeline }
    } else {
        Probe::Primary { timeline }
    }
}

/// A session's report about `gen`'s primary: counts it and wakes the monitor, which
/// checks the primary at once. For sessions that do not need the verdict.
pub fn report(shard: &Shard, what: Report) {
    count_signal(shard, what);
    shard.health.wake.notify_one();
}

fn count_signal(shard: &Shard, what: Report) {
    metrics::counter!(crate::metrics::FAILURE_SIGNALS, "shard" => shard.name.clone(), "signal" => what.as_str())
        .increment(1);
}

/// A session's report about `gen`'s primary when it must know the verdict: probes the
/// primary (or reuses a probe that started after the report) and revokes it if it is
/// gone. True when `gen` no longer takes new transactions — what was refused may then go
/// to the next primary.
///
/// Boxed: the probe's state is several KiB and only needed when something failed, while
/// every session's relay future would otherwise keep room for it (an idle client's
/// memory is mostly that future).
pub fn suspect<'a>(
    ctx: &'a Ctx,
    shard: &'a Shard,
    gen: &'a Generation,
    what: Report,
) -> futures_core::future::BoxFuture<'a, bool> {
    Box::pin(async move {
        count_signal(shard, what);
        check(ctx, shard, gen, Instant::now(), what.as_str()).await
    })
}

/// Probes `gen`'s primary unless a probe started at or after `since` already answered;
/// revokes it when it fails. True when `gen` no longer serves.
pub(crate) async fn check(
    ctx: &Ctx,
    shard: &Shard,
    gen: &Generation,
    since: Instant,
    source: &'static str,
) -> bool {
    if !shard.is_serving(gen) {
        return true;
    }
    let mut last = shard.health.last.lock().await;
    if !shard.is_serving(gen) {
        return true;
    }
    if let Some(c) = *last {
        if c.gen == gen.id && c.started >= since {
            return !c.ok || !shard.is_serving(gen);
        }
    }
    let started = Instant::now();
    let result = probe(&ctx.admin, &gen.primary, ctx.settings.health.timeout).await;
    metrics::counter!(crate::metrics::HEALTH_CHECKS, "shard" => shard.name.clone(), "result" => result.label())
        .increment(1);
    if let Probe::Primary { timeline } | Probe::ReadOnly { timeline } = result {
        shard.health.saw_timeline(timeline);
    }
    let refused = matches!(result, Probe::Refused(_));
    if let Probe::Refused(e) = &result {
        // Once per run of refusals, not every interval.
        if !shard.health.refused.swap(true, SeqCst) {
            tracing::warn!(shard = %shard.name, error = %e, "health check refused by the primary (it is up; check HANDOFF_ADMIN_DB_USER)");
        }
    }
    if !refused {
        shard.health.refused.store(false, SeqCst);
    }
    let failure = result.failure();
    *last = Some(Checked {
        gen: gen.id,
        started,
        ok: failure.is_none(),
    });
    drop(last);
    match failure {
        None => !shard.is_serving(gen),
        // Only the generation that was probed is revoked: a switchover may have
        // replaced it (even at the same epoch, after a rollback) while the probe ran.
        Some(_) if !shard.is_serving(gen) => true,
        Some(why) => {
            let reason = format!("{why} ({source})");
            revoke(ctx, shard, gen.epoch, &reason);
            true
        }
    }
}

/// Revokes the shard's primary at `epoch` because it failed, and hands the shard to
/// discovery. Transactions still running on it get `HANDOFF_DRAIN_TIMEOUT` to finish.
pub(crate) fn revoke(ctx: &Ctx, shard: &Shard, epoch: u64, reason: &str) {
    match crate::shard::control::revoke(ctx, shard, Some(epoch), reason) {
        Ok(r) => {
            r.gen.mark_lost(reason);
            shard.health.discover_cycle.store(r.cycle, SeqCst);
            shard.health.wake.notify_one();
            let gen = Arc::clone(&r.gen);
            let timeout = ctx.settings.drain_timeout;
            tokio::spawn(async move {
                let l = crate::shard::control::lameduck(&gen, timeout).await;
                if l.cancelled > 0 {
                    tracing::warn!(
                        cancelled = l.cancelled,
                        "transactions on the failed primary cancelled after HANDOFF_DRAIN_TIMEOUT"
                    );
                }
            });
        }
        // Someone else revoked first (a duplicate report): nothing to do.
        Err(e) => tracing::debug!(shard = %shard.name, error = %e, "failure report ignored"),
    }
}

/// What startup discovery found for a shard.
#[derive(Debug, Clone)]
pub struct Initial {
    pub primary: HostPort,
    pub timeline: u32,
    /// Other hosts the split-brain watchdog must watch: fenced ones, and writable ones
    /// on a lower timeline than the primary's.
    pub watch: Vec<(HostPort, crate::shard::watch::Why)>,
}

/// Startup: the configured hosts are probed and the writable one on the highest timeline
/// becomes the initial primary (the first host listed is only a hint, used when a host
/// is up but refuses the probe and none qualifies). `Err(reason)`: no primary now.
pub async fn initial_primary(
    admin: &AdminDb,
    health: &HealthSettings,
    hosts: &[HostPort],
) -> Result<Initial, NoPrimary> {
    let handles: Vec<JoinHandle<Probe>> = hosts
        .iter()
        .map(|h| {
            let (admin, h, t) = (admin.clone(), h.clone(), health.timeout);
            tokio::spawn(async move { probe(&admin, &h, t).await })
        })
        .collect();
    let mut results = Vec::with_capacity(hosts.len());
    for h in handles {
        results.push(
            h.await
                .unwrap_or_else(|e| Probe::Unreachable(format!("probe failed: {e}"))),
        );
    }
    let all = vec![true; hosts.len()];
    if let Some((primary, timeline)) = choose(hosts, &results, 0, &all) {
        use crate::shard::watch::Why;
        let watch = hosts
            .iter()
            .zip(&results)
            .filter(|(h, _)| **h != primary)
            .filter_map(|(h, r)| match r {
                Probe::Fenced(_) => Some((h.clone(), Why::FoundFenced)),
                Probe::Primary { timeline: t } if *t < timeline => {
                    Some((h.clone(), Why::LowerTimeline))
                }
                _ => None,
            })
            .collect();
        return Ok(Initial {
            primary,
            timeline,
            watch,
        });
    }
    if results.iter().any(|r| matches!(r, Probe::Refused(_))) {
        return Ok(Initial {
            primary: hosts[0].clone(),
            timeline: 0,
            watch: Vec::new(),
        });
    }
    Err(NoPrimary(
        results
            .iter()
            .zip(hosts)
            .map(|(r, h)| match r {
                Probe::Unreachable(e) => e.clone(),
                other => format!("{h}: {}", other.label().replace('_', " ")),
            })
            .collect(),
    ))
}

/// No configured host qualified as the primary: what each host answered.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}", .0.join("; "))]
pub struct NoPrimary(pub Vec<String>);

/// The writable host on the highest timeline, at least `min_timeline`, among the
/// `eligible` ones; ties go to the earlier host in configuration order.
pub(crate) fn choose(
    hosts: &[HostPort],
    results: &[Probe],
    min_timeline: u32,
    eligible: &[bool],
) -> Option<(HostPort, u32)> {
    let mut best: Option<(usize, u32)> = None;
    for (i, r) in results.iter().enumerate() {
        if !eligible[i] {
            continue;
        }
        if let Probe::Primary { timeline } = r {
            if *timeline >= min_timeline && best.is_none_or(|(_, t)| *timeline > t) {
                best = Some((i, *timeline));
            }
        }
    }
    best.map(|(i, t)| (hosts[i].clone(), t))
}

/// The revocation discovery resolves: its epoch, buffer cycle and start.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Cycle {
    pub(crate) epoch: u64,
    pub(crate) id: u64,
    pub(crate) since: Instant,
}

impl Cycle {
    /// False once another event resolved the revocation (or a new one began).
    pub(crate) fn open(&self, ctx: &Ctx, shard: &Shard) -> bool {
        let snap = shard.snapshot(ctx.buffer_idle(&shard.name));
        let open = snap.cycle == self.id
            && matches!(snap.state, StateKind::Buffering | StateKind::Unavailable);
        if !open {
            tracing::info!(shard = %shard.name, state = snap.state.as_str(), "discovery stopped: the revocation was resolved by another event");
        }
        open
    }
}

pub(crate) async fn reach(s: Signal) {
    s.reached(Phase::Draining).await
}

/// Establishes the primary discovery found for `cycle`'s revocation.
pub(crate) async fn found(
    ctx: &Arc<Ctx>,
    shard: &Arc<Shard>,
    cycle: Cycle,
    primary: HostPort,
    timeline: u32,
) {
    // Forget this cycle before establishing, so the monitor does not start again.
    shard.health.discover_cycle.store(0, SeqCst);
    match crate::shard::control::establish(ctx, shard, Some(cycle.epoch), primary.clone()).await {
        Ok(e) => {
            let took = cycle.since.elapsed();
            metrics::histogram!(crate::metrics::FAILOVER_SECONDS, "shard" => shard.name.clone())
                .record(took.as_secs_f64());
            metrics::counter!(crate::metrics::FAILOVERS, "shard" => shard.name.clone(), "result" => "established")
                .increment(1);
            tracing::info!(shard = %shard.name, %primary, timeline, epoch = e.epoch, failover_ms = took.as_millis() as u64, prewarmed = e.prewarmed, "discovery established the new primary");
            shard
                .health
                .discovered
                .send_replace(Some(crate::shard::failure::Discovered {
                    primary,
                    epoch: e.epoch,
                    timeline,
                }));
        }
        Err(e) => {
            tracing::info!(shard = %shard.name, error = %e, "discovery's establishment was refused (another event won)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testing::hp;

    #[test]
    fn choose_takes_the_highest_writable_timeline_never_a_lower_one() {
        let hosts = [hp(1), hp(2), hp(3)];
        let r = [
            Probe::Primary { timeline: 1 },
            Probe::Primary { timeline: 2 },
            Probe::InRecovery,
        ];
        let all = [true; 3];
        assert_eq!(choose(&hosts, &r, 0, &all), Some((hp(2), 2)));
        // A watched host is skipped even when it would win.
        assert_eq!(
            choose(&hosts, &r, 0, &[true, false, true]),
            Some((hp(1), 1))
        );
        // A returning old primary on timeline 1 never wins once timeline 2 was seen.
        let r = [
            Probe::Primary { timeline: 1 },
            Probe::Unreachable("x".into()),
            Probe::InRecovery,
        ];
        assert_eq!(choose(&hosts, &r, 2, &all), None);
        // Read-only and refused hosts never qualify; ties go to configuration order.
        let r = [
            Probe::ReadOnly { timeline: 3 },
            Probe::Refused("auth".into()),
            Probe::Primary { timeline: 2 },
        ];
        assert_eq!(choose(&hosts, &r, 2, &all), Some((hp(3), 2)));
        let r = [
            Probe::Primary { timeline: 2 },
            Probe::Primary { timeline: 2 },
            Probe::InRecovery,
        ];
        assert_eq!(choose(&hosts, &r, 0, &all), Some((hp(1), 2)));
        // A fenced host never qualifies.
        let r = [
            Probe::Fenced("x".into()),
            Probe::InRecovery,
            Probe::Primary { timeline: 1 },
        ];
        assert_eq!(choose(&hosts, &r, 0, &all), Some((hp(3), 1)));
    }

    #[test]
    fn only_reachable_writable_hosts_pass_a_health_check() {
        assert_eq!(Probe::Primary { timeline: 1 }.failure(), None);
        assert_eq!(Probe::Refused("53300".into()).failure(), None);
        assert!(Probe::ReadOnly { timeline: 1 }
            .failure()
            .unwrap()
            .contains("read-only"));
        assert!(Probe::InRecovery.failure().unwrap().contains("recovery"));
        assert!(Probe::Fenced("x".into())
            .failure()
            .unwrap()
            .contains("fenced"));
        assert!(Probe::Unreachable("refused".into())
            .failure()
            .unwrap()
            .contains("unreachable"));
    }
}
