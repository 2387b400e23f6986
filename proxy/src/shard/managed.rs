//! Shards whose primary an HA manager decides (`crate::manager`: Patroni,
//! pg_auto_failover; docs/ha-managers.md). The manager owns promotion: handoff never
//! promotes or fences such a shard's servers. It takes the leader from the manager's
//! view, confirms it with its own probe (`/primary` answers before the server takes
//! writes), and asks the manager for switchovers.
//!
//! - **Following.** [`follow`] reads the manager's view while the shard serves (every
//!   notification it sends, and at its follow interval); when the manager names another
//!   leader than the one handoff serves, it wakes the failure detector, which probes
//!   the primary at once; when the manager has told the primary handoff serves to stop
//!   taking writes (pg_auto_failover's goal states), it holds the shard.
//! - **Discovery.** After a revocation (a failure, a hold, a switchover handed over)
//!   [`discover`] reads the view at the manager's held interval and establishes its
//!   leader as soon as handoff's probe finds it writable on the highest timeline seen.
//!   Only the manager's leader qualifies, never another writable host.
//! - **Switchover.** `shard::managed_switch`: hold and lameduck (on every proxy, with
//!   coordination), ask the manager, establish the candidate the moment it is writable.
//!   A refusal rolls back.

use std::sync::Arc;
use std::time::Duration;

use crate::config::HostPort;
use crate::manager::{Fut, Manager, ManagerError, View};
use crate::shard::health::{self, Cycle, Probe};
use crate::shard::{Ctx, Shard, StateKind};
use crate::shutdown::{Phase, Signal};

/// Holds a shard on this proxy, or on every proxy with coordination (the layer above
/// provides it: a hold is an action like `POST /v1/shards/{s}/hold`).
pub(crate) type Holder = Arc<dyn Fn(Arc<Shard>, String) -> Fut<'static, ()> + Send + Sync>;

/// Reads the manager's view in the background while the shard serves: wakes the
/// failure detector when the manager's leader is not the primary handoff serves, and
/// holds the shard when the manager has told that primary to stop taking writes.
pub(crate) async fn follow(
    ctx: Arc<Ctx>,
    shard: Arc<Shard>,
    manager: Arc<dyn Manager>,
    hold: Holder,
    shutdown: Signal,
) {
    let title = manager.kind().title();
    let interval = manager.intervals().follow;
    let mut warned = false;
    // The (primary, epoch) a hold was started for: one hold per told stop.
    let mut held_for: Option<(HostPort, u64)> = None;
    loop {
        if shutdown.phase() >= Phase::Draining {
            return;
        }
        match manager.view().await {
            Ok(v) => {
                if warned {
                    tracing::info!(shard = %shard.name, manager = title, "the HA manager answers again");
                }
                warned = false;
                let snap = shard.snapshot(ctx.buffer_idle(&shard.name));
                let serving = snap.state == StateKind::Serving;
                if let (true, Some(stopping)) = (serving, &v.stopping) {
                    let this = (stopping.clone(), snap.epoch);
                    if *stopping == snap.primary && held_for.as_ref() != Some(&this) {
                        held_for = Some(this);
                        tracing::info!(shard = %shard.name, manager = title, primary = %snap.primary, "the HA manager told the primary to stop taking writes: holding");
                        metrics::counter!(crate::metrics::MANAGER_HOLDS, "shard" => shard.name.clone(), "manager" => manager.kind().as_str())
                            .increment(1);
                        hold(
                            Arc::clone(&shard),
                            format!("{title} told the primary to stop taking writes"),
                        )
                        .await;
                    }
                }
                if let (true, Some(leader)) = (serving, v.leader()) {
                    if leader.addr != snap.primary {
                        tracing::info!(shard = %shard.name, manager = title, leader = %leader.name, addr = %leader.addr, primary = %snap.primary, "the HA manager names another leader: checking the primary");
                        shard.health.wake.notify_one();
                    }
                }
            }
            Err(e) => {
                if !warned {
                    tracing::warn!(shard = %shard.name, manager = title, error = %e, "the HA manager did not answer: serving the primary handoff has");
                    warned = true;
                }
            }
        }
        tokio::select! {
            _ = manager.changed(interval) => {}
            _ = health::reach(shutdown.clone()) => return,
        }
    }
}

/// The manager's leader, if handoff may serve it now for `cycle`: the manager names
/// it, it is not watched for split brain nor held back by a young hold, and handoff's
/// probe finds it writable on the highest timeline seen.
pub(crate) async fn leader(
    ctx: &Ctx,
    shard: &Shard,
    manager: &dyn Manager,
    cycle: u64,
) -> Option<(HostPort, u32)> {
    let eligible = |a: &HostPort| {
        !shard.watch.is_watched(a) && !shard.health.held_back(cycle, a, ctx.settings.hold_timeout)
    };
    // Every eligible member the manager listed last time is probed while it is asked
    // again: the new leader's probe does not wait for the answer.
    let known: Vec<HostPort> = manager
        .last()
        .map(|v| v.members.iter().map(|m| m.addr.clone()).collect())
        .unwrap_or_default();
    let mut probes = tokio::task::JoinSet::new();
    for addr in known.into_iter().filter(|a| eligible(a)) {
        let (admin, timeout) = (ctx.admin.clone(), ctx.settings.health.timeout);
        probes.spawn(async move {
            let p = health::probe(&admin, &addr, timeout).await;
            (addr, p)
        });
    }
    let (v, probed) = tokio::join!(manager.view(), probes.join_all());
    let v = v.ok()?;
    let addr = v.leader()?.addr.clone();
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

/// Discovery for a managed shard: the manager's leader, once writable. Returns when it
/// is established, when another event resolved the revocation, or at shutdown.
pub(crate) async fn discover(
    ctx: &Arc<Ctx>,
    shard: &Arc<Shard>,
    manager: &Arc<dyn Manager>,
    cycle: Cycle,
    shutdown: &Signal,
) {
    tracing::info!(shard = %shard.name, epoch = cycle.epoch, manager = manager.kind().title(), "following the HA manager for the new leader");
    let every = manager.intervals().held;
    loop {
        tokio::select! {
            _ = manager.changed(every) => {}
            _ = health::reach(shutdown.clone()) => return,
        }
        if !cycle.open(ctx, shard) {
            return;
        }
        if let Some((primary, timeline)) = leader(ctx, shard, manager.as_ref(), cycle.id).await {
            health::found(ctx, shard, cycle, primary, timeline).await;
            return;
        }
    }
}

/// Startup: the manager's leader if handoff's probe confirms it. `Ok(None)`: the
/// manager answered but its leader is not writable (yet); `Err`: it did not answer.
pub(crate) async fn initial(
    manager: &dyn Manager,
    admin: &crate::backend::admin::AdminDb,
    timeout: Duration,
) -> Result<(Arc<View>, Option<(HostPort, u32)>), ManagerError> {
    let v = manager.view().await?;
    let Some(leader) = v.leader() else {
        return Ok((v, None));
    };
    let found = match health::probe(admin, &leader.addr, timeout).await {
        Probe::Primary { timeline } => Some((leader.addr.clone(), timeline)),
        _ => None,
    };
    Ok((v, found))
}

/// A switchover target given as a member's name or `host:port`: its address, or an
/// HTTP status and message (400: not a member; 503: the manager did not answer).
pub(crate) async fn resolve(manager: &dyn Manager, to: &str) -> Result<HostPort, (u16, String)> {
    let title = manager.kind().title();
    let v = manager
        .view()
        .await
        .map_err(|e| (503, format!("{title} did not answer: {e}")))?;
    v.member(to).map(|m| m.addr.clone()).ok_or_else(|| {
        (
            400,
            format!(
                "\"to\": \"{to}\" is not a member of {title} cluster \"{}\" (members: {})",
                v.name,
                v.names()
            ),
        )
    })
}
