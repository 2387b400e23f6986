//! Shards managed by Patroni (`HANDOFF_PATRONI`, docs/patroni.md). Patroni owns
//! promotion: handoff never promotes or fences such a shard's servers. It takes the
//! leader from Patroni's `GET /cluster`, confirms it with its own probe (`/primary`
//! answers before the server takes writes), and asks Patroni for switchovers.
//!
//! - **Following.** [`follow`] reads `GET /cluster` every `HANDOFF_PATRONI_INTERVAL`
//!   while the shard serves; when Patroni names another leader than the one handoff
//!   serves, it wakes the failure detector, which probes the primary at once.
//! - **Discovery.** After a revocation (a failure, a hold, a switchover handed over)
//!   [`discover`] reads `GET /cluster` every `HANDOFF_PATRONI_HELD_INTERVAL` and
//!   establishes Patroni's leader as soon as handoff's probe finds it writable on the
//!   highest timeline seen. Only Patroni's leader qualifies, never another writable host.
//! - **Switchover.** `shard::patroni_switch`: hold and lameduck (on every proxy, with
//!   coordination), `POST /switchover` to the leader, establish the candidate the moment
//!   it is Patroni's leader and writable. A refusal rolls back.

use std::sync::Arc;
use std::time::Duration;

use crate::config::HostPort;
use crate::patroni::{Cluster, PatroniError, Source};
use crate::shard::health::{self, Cycle, Probe};
use crate::shard::{Ctx, Shard};
use crate::shutdown::{Phase, Signal};

/// Reads Patroni's view of the shard in the background while it serves, and wakes the
/// failure detector when Patroni's leader is not the primary handoff serves.
pub(crate) async fn follow(
    ctx: Arc<Ctx>,
    shard: Arc<Shard>,
    source: Arc<Source>,
    shutdown: Signal,
) {
    let interval = ctx.settings.patroni.interval;
    let mut warned = false;
    loop {
        if shutdown.phase() >= Phase::Draining {
            return;
        }
        match source.cluster().await {
            Ok(c) => {
                warned = false;
                let serving = shard.serving();
                if let (Some(gen), Some(leader)) = (serving, c.leader()) {
                    if leader.addr != gen.primary {
                        tracing::info!(shard = %shard.name, leader = %leader.name, addr = %leader.addr, primary = %gen.primary, "Patroni names another leader: checking the primary");
                        shard.health.wake.notify_one();
                    }
                }
            }
            Err(e) => {
                if !warned {
                    tracing::warn!(shard = %shard.name, error = %e, "Patroni's REST API did not answer GET /cluster");
                    warned = true;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = health::reach(shutdown.clone()) => return,
        }
    }
}

/// Patroni's leader, if handoff may serve it now for `cycle`: it holds the leader lock,
/// is not watched for split brain nor held back by a young hold, and handoff's probe
/// finds it writable on the highest timeline seen.
pub(crate) async fn leader(
    ctx: &Ctx,
    shard: &Shard,
    source: &Source,
    cycle: u64,
) -> Option<(HostPort, u32)> {
    let eligible = |a: &HostPort| {
        !shard.watch.is_watched(a) && !shard.health.held_back(cycle, a, ctx.settings.hold_timeout)
    };
    // Every eligible member Patroni listed last time is probed while Patroni is asked
    // again: the new leader's probe does not wait for the answer.
    let known: Vec<HostPort> = source
        .view
        .borrow()
        .as_ref()
        .map(|c| c.members.iter().map(|m| m.addr.clone()).collect())
        .unwrap_or_default();
    let mut probes = tokio::task::JoinSet::new();
    for addr in known.into_iter().filter(|a| eligible(a)) {
        let (admin, timeout) = (ctx.admin.clone(), ctx.settings.health.timeout);
        probes.spawn(async move {
            let p = health::probe(&admin, &addr, timeout).await;
            (addr, p)
        });
    }
    let (c, probed) = tokio::join!(source.cluster(), probes.join_all());
    let c = c.ok()?;
    let addr = c.leader()?.addr.clone();
    if !eligible(&addr) {
        return None;
    }
    let probe = match probed.into_iter().find(|(a, _)| *a == addr) {
        Some((_, p)) => p,
        None => health::probe(&ctx.admin, &addr, ctx.settings.health.timeout).await,
    };
    metrics::counter!(crate::metrics::DISCOVERY_PROBES, "shard" => shard.name.clone(), "result" => probe.label())
        .increment(1);
    match probe {
        Probe::Primary { timeline } => {
            shard.health.saw_timeline(timeline);
            let min = shard
                .health
                .max_timeline
                .load(std::sync::atomic::Ordering::SeqCst);
            (timeline >= min).then_some((addr, timeline))
        }
        _ => None,
    }
}

/// Discovery for a Patroni shard: Patroni's leader, once writable. Returns when it is
/// established, when another event resolved the revocation, or at shutdown.
pub(crate) async fn discover(
    ctx: &Arc<Ctx>,
    shard: &Arc<Shard>,
    source: &Arc<Source>,
    cycle: Cycle,
    shutdown: &Signal,
) {
    tracing::info!(shard = %shard.name, epoch = cycle.epoch, "following Patroni for the new leader");
    let mut tick = tokio::time::interval(ctx.settings.patroni.held_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = health::reach(shutdown.clone()) => return,
        }
        if !cycle.open(ctx, shard) {
            return;
        }
        if let Some((primary, timeline)) = leader(ctx, shard, source, cycle.id).await {
            health::found(ctx, shard, cycle, primary, timeline).await;
            return;
        }
    }
}

/// Startup: Patroni's leader if handoff's probe confirms it. `Ok(None)`: Patroni
/// answered but its leader is not writable (yet); `Err`: Patroni did not answer.
pub(crate) async fn initial(
    source: &Source,
    admin: &crate::backend::admin::AdminDb,
    timeout: Duration,
) -> Result<(Arc<Cluster>, Option<(HostPort, u32)>), PatroniError> {
    let c = source.cluster().await?;
    let Some(leader) = c.leader() else {
        return Ok((c, None));
    };
    let found = match health::probe(admin, &leader.addr, timeout).await {
        Probe::Primary { timeline } => Some((leader.addr.clone(), timeline)),
        _ => None,
    };
    Ok((c, found))
}

/// A switchover target given as a Patroni member's name or `host:port`: its address,
/// or an HTTP status and message (400: not a member; 503: Patroni did not answer).
pub(crate) async fn resolve(source: &Source, to: &str) -> Result<HostPort, (u16, String)> {
    let c = source
        .cluster()
        .await
        .map_err(|e| (503, format!("Patroni did not answer GET /cluster: {e}")))?;
    c.member(to).map(|m| m.addr.clone()).ok_or_else(|| {
        (
            400,
            format!(
                "\"to\": \"{to}\" is not a member of Patroni cluster \"{}\" (members: {})",
                c.scope,
                names(&c)
            ),
        )
    })
}

pub(crate) fn names(c: &Cluster) -> String {
    c.members
        .iter()
        .map(|m| format!("{} ({}, {})", m.name, m.addr, m.role))
        .collect::<Vec<_>>()
        .join(", ")
}
