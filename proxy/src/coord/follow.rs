//! The follower: every proxy watches the cluster's prefix and brings its shards in line
//! with what it reads — it joins operations (holds, lameducks, acknowledges), resolves
//! them when they end, takes a newly recorded primary after checking the host itself,
//! publishes a primary its own discovery found, and finishes an operation whose
//! coordinator is gone ([`super::recover`]).
//!
//! The loop is level-triggered: on any change (or every half lease) it reads the whole
//! prefix — a few keys per shard — and acts on the difference between that and the
//! local state, so a missed event or a reconnection after an etcd outage needs no
//! special path.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::config::HostPort;
use crate::coord::records::{now_ms, Ack, Lock, Member, Op, Phase, Primary, Record};
use crate::coord::store::{Kv, WatchStream};
use crate::coord::{Coord, Joined, View};
use crate::shard::health::{self, Probe};
use crate::shard::{control, Shard, StateKind};
use crate::shutdown::{Phase as Shutdown, Signal};
use crate::sync::Locked;

/// One shard's records, with the revisions compare-and-set needs.
#[derive(Debug, Default, Clone)]
pub(super) struct ShardRecords {
    pub primary: Option<(Primary, i64)>,
    pub op: Option<(Op, i64)>,
    /// Who holds the shard's lock, if anyone.
    pub lock: Option<String>,
    /// Acknowledgements, by operation id.
    pub acks: HashMap<String, Vec<Ack>>,
}

/// Everything under the prefix.
#[derive(Debug, Default)]
pub(super) struct ClusterView {
    pub members: Vec<Member>,
    pub shards: HashMap<String, ShardRecords>,
}

impl ClusterView {
    pub fn parse(prefix: &str, kvs: &[Kv]) -> Self {
        let mut view = ClusterView::default();
        let root = prefix.trim_end_matches('/');
        for kv in kvs {
            let Some(rest) = kv.key.strip_prefix(root).and_then(|r| r.strip_prefix('/')) else {
                continue;
            };
            let parts: Vec<&str> = rest.split('/').collect();
            let parsed = match parts.as_slice() {
                ["members", _] => Member::decode(&kv.value).map(|m| view.members.push(m)),
                ["shards", shard, "primary"] => Primary::decode(&kv.value).map(|p| {
                    view.shard(shard).primary = Some((p, kv.mod_revision));
                }),
                ["shards", shard, "op"] => Op::decode(&kv.value).map(|op| {
                    view.shard(shard).op = Some((op, kv.mod_revision));
                }),
                ["shards", shard, "lock"] => Lock::decode(&kv.value).map(|l| {
                    view.shard(shard).lock = Some(l.proxy);
                }),
                ["shards", shard, "acks", op, _] => Ack::decode(&kv.value).map(|a| {
                    view.shard(shard)
                        .acks
                        .entry(op.to_string())
                        .or_default()
                        .push(a);
                }),
                _ => Ok(()),
            };
            if let Err(e) = parsed {
                tracing::warn!(key = %kv.key, error = %e, "a coordination record does not decode: ignored");
            }
        }
        view.members.sort_by(|a, b| a.id.cmp(&b.id));
        view
    }

    fn shard(&mut self, name: &str) -> &mut ShardRecords {
        self.shards.entry(name.to_string()).or_default()
    }
}

/// What ended the wait between two reads.
enum Woken {
    Changed,
    WatchLost,
    Stop,
}

impl Coord {
    /// The follower's loop; ends at shutdown.
    pub(super) async fn follow(self: Arc<Self>, shutdown: Signal) {
        let mut watch: Option<WatchStream> = None;
        let resync = (self.settings.lease_ttl / 2).max(Duration::from_millis(500));
        loop {
            if shutdown.phase() >= Shutdown::Draining {
                return;
            }
            let (kvs, revision) = match self.store.list(&self.keys.all()).await {
                Ok(listed) => {
                    self.ok();
                    listed
                }
                Err(e) => {
                    self.failed(&e);
                    watch = None;
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                        _ = shutdown.reached(Shutdown::Draining) => return,
                    }
                    continue;
                }
            };
            let view = ClusterView::parse(&self.keys.all(), &kvs);
            self.set_members(view.members.clone());
            for shard in self.shards.clone() {
                let recs = view.shards.get(&shard.name).cloned().unwrap_or_default();
                self.reconcile(&shard, &recs).await;
            }
            if watch.is_none() {
                watch = self.store.watch(&self.keys.all(), revision + 1).await.ok();
            }
            let woken = tokio::select! {
                m = async {
                    match watch.as_mut() {
                        Some(w) => w.message().await,
                        None => std::future::pending().await,
                    }
                } => match m {
                    Ok(Some(_)) => Woken::Changed,
                    _ => Woken::WatchLost,
                },
                _ = self.wake.notified() => Woken::Changed,
                _ = tokio::time::sleep(resync) => Woken::Changed,
                _ = shutdown.reached(Shutdown::Draining) => Woken::Stop,
            };
            match woken {
                Woken::Changed => {}
                Woken::WatchLost => watch = None,
                Woken::Stop => return,
            }
        }
    }

    /// Brings one shard in line with its records.
    async fn reconcile(self: &Arc<Self>, shard: &Arc<Shard>, recs: &ShardRecords) {
        let op = recs.op.as_ref().map(|(op, _)| op);
        self.views.locked().insert(
            shard.name.clone(),
            View {
                primary: recs.primary.as_ref().map(|(p, _)| p.clone()),
                op: op.cloned(),
                lock: recs.lock.clone(),
                acks: op
                    .and_then(|op| recs.acks.get(&op.id))
                    .cloned()
                    .unwrap_or_default(),
            },
        );
        if let Some(op) = op {
            self.take_part(shard, op, recs).await;
        }
        self.publish_discovered(shard, recs).await;
        if let Some((rec, _)) = &recs.primary {
            if !op.is_some_and(|op| op.phase.active()) {
                self.follow_primary(shard, rec).await;
            }
        }
    }

    /// Joins, resolves or recovers the shard's operation.
    async fn take_part(self: &Arc<Self>, shard: &Arc<Shard>, op: &Op, recs: &ShardRecords) {
        let running_here = self.running.locked().contains(&op.id);
        if running_here {
            return;
        }
        if op.phase.active() {
            let joined = self
                .joined
                .locked()
                .get(&shard.name)
                .is_some_and(|j| j.op == op.id);
            if !joined {
                self.join(shard, op);
            }
            if op.kind == super::records::OpKind::Switchover && recs.lock.is_none() {
                self.try_recover(shard, op).await;
            }
        } else {
            self.resolve(shard, op);
        }
    }

    /// Takes part in an operation: holds new transactions at once, then (in a task)
    /// lameducks, opens the admin sessions that let it finish the operation if need
    /// be, and acknowledges.
    fn join(self: &Arc<Self>, shard: &Arc<Shard>, op: &Op) {
        self.joined.locked().insert(
            shard.name.clone(),
            Joined {
                op: op.id.clone(),
                old: None,
                target: None,
                resolved: false,
            },
        );
        let reason = format!(
            "coordinated {} by proxy {}",
            op.kind.as_str(),
            op.coordinator
        );
        // Synchronously, before the next read can see the operation end.
        let revoked = control::revoke(&self.ctx, shard, None, &reason).ok();
        metrics::counter!(crate::metrics::COORD_FOLLOWED, "shard" => shard.name.clone(), "what" => "hold")
            .increment(1);
        tracing::info!(shard = %shard.name, op = %op.id, coordinator = %op.coordinator, kind = op.kind.as_str(), "holding the shard for a coordinated operation");
        let (coord, shard, op) = (Arc::clone(self), Arc::clone(shard), op.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            let drain = coord.ctx.settings.drain_timeout;
            let lameduck = async {
                match &revoked {
                    Some(r) => Some(control::lameduck(&r.gen, drain).await),
                    None => None,
                }
            };
            let (ld, (old, target, pids)) = tokio::join!(lameduck, coord.keep_sessions(&op));
            {
                let mut joined = coord.joined.locked();
                if let Some(j) = joined.get_mut(&shard.name) {
                    if j.op == op.id && !j.resolved {
                        j.old = old;
                        j.target = target;
                    }
                }
            }
            let ack = Ack {
                proxy: coord.me.id.clone(),
                lameduck_ms: ld.map(|l| l.waited.as_millis() as u64).unwrap_or(0),
                cancelled: ld.map(|l| l.cancelled as u64).unwrap_or(0),
                pids,
                at_ms: now_ms(),
            };
            let key = coord.keys.ack(&shard.name, &op.id, &coord.me.id);
            // Acknowledged under the membership lease: it goes if this proxy does.
            for _ in 0..20 {
                let lease = coord.lease();
                let lease = (lease != 0).then_some(lease);
                match coord.store.put(&key, ack.encode(), lease).await {
                    Ok(()) => {
                        tracing::info!(shard = %shard.name, op = %op.id, ms = started.elapsed().as_millis() as u64, "acknowledged the coordinated operation");
                        return;
                    }
                    Err(e) => {
                        coord.failed(&e);
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        });
    }

    /// Admin sessions on the old primary (its pid goes in the acknowledgement, so the
    /// fence spares it) and on the target.
    async fn keep_sessions(
        &self,
        op: &Op,
    ) -> (
        Option<crate::backend::admin::AdminSession>,
        Option<crate::backend::admin::AdminSession>,
        Vec<i32>,
    ) {
        let admin = &self.ctx.admin;
        let timeout = self.ctx.settings.health.timeout;
        let open = |addr: HostPort| async move {
            admin
                .open(&addr, admin.database(), "handoff-coordination", timeout)
                .await
                .ok()
        };
        let (old, target) = tokio::join!(open(op.from.clone()), async {
            match &op.to {
                Some(to) => open(to.clone()).await,
                None => None,
            }
        });
        let mut pids = Vec::new();
        if let Some(s) = &old {
            if let Ok(row) = s.client.query_one("SELECT pg_backend_pid()", &[]).await {
                pids.push(row.get(0));
            }
        }
        (old, target, pids)
    }

    /// An operation this proxy took part in ended: after a rollback the old primary
    /// serves again here too; after completion the new primary record is followed.
    fn resolve(&self, shard: &Arc<Shard>, op: &Op) {
        {
            let mut joined = self.joined.locked();
            match joined.get_mut(&shard.name) {
                Some(j) if j.op == op.id && !j.resolved => {
                    j.resolved = true;
                    j.old = None;
                    j.target = None;
                }
                _ => return,
            }
        }
        match op.phase {
            Phase::RolledBack => {
                let snap = shard.snapshot(self.ctx.buffer_idle(&shard.name));
                if matches!(snap.state, StateKind::Buffering | StateKind::Unavailable)
                    && snap.primary == op.from
                {
                    match control::abort(&self.ctx, shard, None) {
                        Ok(epoch) => {
                            metrics::counter!(crate::metrics::COORD_FOLLOWED, "shard" => shard.name.clone(), "what" => "rollback").increment(1);
                            tracing::info!(shard = %shard.name, op = %op.id, epoch, "the coordinated operation was rolled back: the old primary serves again");
                        }
                        Err(e) => {
                            tracing::info!(shard = %shard.name, error = %e, "rollback not applied here")
                        }
                    }
                }
            }
            Phase::Failed => {
                tracing::warn!(shard = %shard.name, op = %op.id, error = ?op.error, "the coordinated operation failed: the shard stays held until POST /primary or /resume on any proxy (or the buffer's time runs out)");
            }
            _ => {}
        }
    }

    /// Takes the recorded primary if it is newer than this proxy's (or the same epoch
    /// on another host), once the host checks out as writable on the recorded timeline
    /// or a later one.
    async fn follow_primary(&self, shard: &Arc<Shard>, rec: &Primary) {
        if !self.behind(shard, rec) {
            return;
        }
        // Not while this proxy runs an operation of its own on the shard.
        let Ok(_op) = shard.op.try_lock() else {
            return;
        };
        if shard.watch.is_watched(&rec.primary) {
            tracing::warn!(shard = %shard.name, primary = %rec.primary, "the recorded primary is a replaced primary this proxy watches for split brain: not following it");
            return;
        }
        match health::probe(
            &self.ctx.admin,
            &rec.primary,
            self.ctx.settings.health.timeout,
        )
        .await
        {
            Probe::Primary { timeline } if timeline >= rec.timeline => {
                shard.health.saw_timeline(timeline)
            }
            other => {
                tracing::warn!(shard = %shard.name, primary = %rec.primary, epoch = rec.epoch, found = ?other, "the recorded primary does not check out (not writable on its timeline): not following it yet");
                return;
            }
        }
        // This proxy's own discovery may have established the same primary at the
        // same epoch while the probe ran: then there is nothing to follow (revoking it
        // to establish it again would put what runs there through lameduck for
        // nothing).
        if !self.behind(shard, rec) {
            return;
        }
        match self.apply_primary(shard, rec).await {
            Ok(e) => {
                metrics::counter!(crate::metrics::COORD_FOLLOWED, "shard" => shard.name.clone(), "what" => "primary").increment(1);
                tracing::info!(shard = %shard.name, primary = %rec.primary, epoch = e.epoch, by = %rec.by, "following the cluster's primary");
            }
            Err(e) => {
                tracing::info!(shard = %shard.name, error = %e, "the cluster's primary was not established here")
            }
        }
    }

    /// Whether the cluster's record is ahead of what this proxy serves: a newer epoch,
    /// or another host at the same one.
    fn behind(&self, shard: &Shard, rec: &Primary) -> bool {
        let snap = shard.snapshot(self.ctx.buffer_idle(&shard.name));
        rec.epoch > snap.epoch || (rec.epoch == snap.epoch && rec.primary != snap.primary)
    }

    /// Makes `rec` this proxy's primary for the shard: the current one (if serving) is
    /// revoked and lameducked in the background, then `rec`'s host is established at
    /// `rec`'s epoch.
    pub(super) async fn apply_primary(
        &self,
        shard: &Arc<Shard>,
        rec: &Primary,
    ) -> Result<control::Established, String> {
        let snap = shard.snapshot(self.ctx.buffer_idle(&shard.name));
        if matches!(snap.state, StateKind::Serving | StateKind::Draining) {
            let reason = format!(
                "the cluster recorded {} as primary (epoch {}, by {})",
                rec.primary, rec.epoch, rec.by
            );
            let r = control::revoke(&self.ctx, shard, Some(snap.epoch), &reason)
                .map_err(|e| e.to_string())?;
            // Replaced by another host without being held first: not a switchover this
            // proxy took part in, so another proxy found the primary failed (or the
            // cluster moved on while this one was cut off). Requests still waiting on
            // it end at the establishment below, as after this proxy's own detection.
            // The same host at the cluster's epoch (this proxy found it too) is alive:
            // what runs there finishes.
            if snap.primary != rec.primary {
                r.gen.mark_lost(&reason);
            }
            let drain = self.ctx.settings.drain_timeout;
            tokio::spawn(async move {
                control::lameduck(&r.gen, drain).await;
            });
        }
        control::establish_at(&self.ctx, shard, None, rec.primary.clone(), Some(rec.epoch))
            .await
            .map_err(|e| e.to_string())
    }

    /// Publishes a primary this proxy's discovery found, if the record is older.
    async fn publish_discovered(&self, shard: &Arc<Shard>, recs: &ShardRecords) {
        let Some(found) = shard.health.discovered.borrow().clone() else {
            return;
        };
        let current = shard.current();
        if current.epoch != found.epoch || current.primary != found.primary {
            return; // stale: this proxy moved on since
        }
        let record = Primary {
            primary: found.primary.clone(),
            epoch: found.epoch,
            timeline: found.timeline,
            by: self.me.id.clone(),
            reason: "found by the proxy's discovery".into(),
            at_ms: now_ms(),
        };
        let key = self.keys.primary(&shard.name);
        let written = match &recs.primary {
            Some((rec, _)) if rec.epoch >= found.epoch => return,
            Some((_, rev)) => self.store.swap(&key, record.encode(), *rev).await,
            None => self.store.create(&key, record.encode(), None).await,
        };
        match written {
            Ok(true) => {
                metrics::counter!(crate::metrics::COORD_PUBLISHED, "shard" => shard.name.clone())
                    .increment(1);
                tracing::info!(shard = %shard.name, primary = %found.primary, epoch = found.epoch, "published the primary this proxy found");
            }
            Ok(false) => {
                tracing::info!(shard = %shard.name, "another proxy recorded a primary first: following the record")
            }
            Err(e) => self.failed(&e),
        }
    }
}
