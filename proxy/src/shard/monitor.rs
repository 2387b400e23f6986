//! Each shard's monitor task: health checks while the shard serves, discovery while a
//! failure (or a hold) leaves it without a primary — by probing its hosts, or on a
//! managed shard by following the HA manager's leader (`shard::managed`).

use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;

use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::shard::health::{check, choose, found, probe, reach, Cycle, Probe};
use crate::shard::{Ctx, Shard, StateKind};
use crate::shutdown::{Phase, Signal};

/// The shard's monitor: health checks while it serves, discovery while a failure
/// revocation is unresolved. Ends at shutdown.
pub(crate) async fn run(ctx: Arc<Ctx>, shard: Arc<Shard>, shutdown: Signal) {
    let settings = ctx.settings.health.clone();
    let mut was_unavailable = false;
    loop {
        if shutdown.phase() >= Phase::Draining {
            return;
        }
        let snap = shard.snapshot(ctx.buffer_idle(&shard.name));
        let discovering = matches!(snap.state, StateKind::Buffering | StateKind::Unavailable)
            && shard.health.discover_cycle.load(SeqCst) == snap.cycle;
        if snap.state == StateKind::Unavailable && !was_unavailable {
            tracing::warn!(shard = %shard.name, reason = %snap.reason, "shard unavailable: no primary within HANDOFF_BUFFER_MAX_FAILOVER_DURATION; requests get 57P03 while discovery goes on");
        }
        was_unavailable = snap.state == StateKind::Unavailable;
        if discovering {
            let cycle = Cycle {
                epoch: snap.epoch,
                id: snap.cycle,
                since: snap.since,
            };
            match ctx.manager(&shard.name) {
                Some(manager) => {
                    crate::shard::managed::discover(&ctx, &shard, manager, cycle, &shutdown).await
                }
                None => discover(&ctx, &shard, cycle, &shutdown).await,
            }
            continue;
        }
        let wait = if matches!(snap.state, StateKind::Serving | StateKind::Draining) {
            settings.interval
        } else {
            settings.discovery_interval
        };
        let since = Instant::now();
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shard.health.wake.notified() => {}
            _ = reach(shutdown.clone()) => return,
        }
        if let Some(gen) = shard.serving() {
            // A report wakes us: a probe that starts now answers it.
            check(&ctx, &shard, &gen, since, "health_check").await;
        }
    }
}

/// Probes every host of the shard until one qualifies, then establishes it. Returns
/// when it did, when someone else ended the revocation, or at shutdown.
async fn discover(ctx: &Arc<Ctx>, shard: &Arc<Shard>, cycle: Cycle, shutdown: &Signal) {
    let settings = ctx.settings.health.clone();
    let hosts = shard.hosts.clone();
    let mut running: Vec<Option<JoinHandle<Probe>>> = (0..hosts.len()).map(|_| None).collect();
    let mut last: Vec<Option<Probe>> = vec![None; hosts.len()];
    let mut tick = tokio::time::interval(settings.discovery_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tracing::info!(shard = %shard.name, epoch = cycle.epoch, "discovering the new primary");
    let abort_all = |running: &mut Vec<Option<JoinHandle<Probe>>>| {
        for h in running.iter_mut().flatten() {
            h.abort();
        }
    };
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = reach(shutdown.clone()) => { abort_all(&mut running); return; }
        }
        if !cycle.open(ctx, shard) {
            abort_all(&mut running);
            return;
        }
        // Collect finished probes, start new ones for idle hosts.
        let mut fresh = false;
        for (i, slot) in running.iter_mut().enumerate() {
            if slot.as_ref().is_some_and(|h| h.is_finished()) {
                let h = slot.take().expect("checked");
                if let Ok(p) = h.await {
                    metrics::counter!(crate::metrics::DISCOVERY_PROBES, "shard" => shard.name.clone(), "result" => p.label())
                        .increment(1);
                    if let Probe::Primary { timeline } = p {
                        shard.health.saw_timeline(timeline);
                    }
                    last[i] = Some(p);
                    fresh = true;
                }
            }
            if slot.is_none() {
                let admin = ctx.admin.clone();
                let addr = hosts[i].clone();
                let timeout = settings.timeout;
                *slot = Some(tokio::spawn(
                    async move { probe(&admin, &addr, timeout).await },
                ));
            }
        }
        if !fresh {
            continue;
        }
        let results: Vec<Probe> = last
            .iter()
            .map(|p| {
                p.clone()
                    .unwrap_or(Probe::Unreachable("not probed yet".into()))
            })
            .collect();
        let min = shard.health.max_timeline.load(SeqCst);
        // A host the watchdog watches (a replaced primary) is never chosen, nor the
        // primary a young hold revoked.
        let eligible: Vec<bool> = hosts
            .iter()
            .map(|h| {
                !shard.watch.is_watched(h)
                    && !shard
                        .health
                        .held_back(cycle.id, h, ctx.settings.hold_timeout)
            })
            .collect();
        let Some((primary, timeline)) = choose(&hosts, &results, min, &eligible) else {
            continue;
        };
        abort_all(&mut running);
        found(ctx, shard, cycle, primary, timeline).await;
        return;
    }
}
