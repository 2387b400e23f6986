//! A switchover this proxy coordinates for the whole cluster: the same steps as a
//! switchover of one proxy, with the others told to hold and waited for, and each point
//! passed published before it is acted on. The lock and the checks every operation
//! starts with are here too; the external two-step API is in [`super::external`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::api::report::{Coordinated, ProxyAck, SwitchoverReport};
use tokio::time::Instant;

use crate::config::HostPort;
use crate::coord::follow::ClusterView;
use crate::coord::records::{now_ms, Ack, Lock, Op, OpKind, Phase, Primary, Record};
use crate::coord::{Coord, Refusal};
use crate::shard::health::{self, Probe};
use crate::shard::switchover::{self, Hooks, Outcome};
use crate::shard::{control, Shard, StateKind};
use crate::sync::Locked;

/// A new operation id: the proxy's id and random hex.
pub(super) fn op_id(me: &str) -> String {
    let mut b = [0u8; 6];
    let _ = getrandom::getrandom(&mut b);
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{me}-{hex}")
}

/// How long the coordinator waits for the others to acknowledge: their lameduck, the
/// time cancelled sessions get to let go, and a margin.
fn ack_deadline(drain: Duration) -> Duration {
    drain + Duration::from_secs(3)
}

impl Coord {
    /// Takes the shard's lock under `lease` for operation `id`, then checks, under it,
    /// that no operation is running and that this proxy's view of the shard is the
    /// cluster's record (writing the record first if there is none yet).
    pub(super) async fn acquire(&self, shard: &Shard, lease: i64, id: &str) -> Result<(), Refusal> {
        self.take_lock(shard, lease, id).await?;
        let checked = self.check_under_lock(shard).await;
        if checked.is_err() {
            self.release(&shard.name, lease).await;
        }
        checked
    }

    /// Takes the shard's lock under `lease` for operation `id` (`409` when another
    /// operation holds it).
    pub(super) async fn take_lock(
        &self,
        shard: &Shard,
        lease: i64,
        id: &str,
    ) -> Result<(), Refusal> {
        let lock_key = self.keys.lock(&shard.name);
        let holder = Lock {
            proxy: self.me.id.clone(),
            op: id.to_string(),
            recovering: false,
        }
        .encode();
        match self.store.create(&lock_key, holder, Some(lease)).await {
            Ok(true) => Ok(()),
            Ok(false) => {
                let who = self
                    .store
                    .get(&lock_key)
                    .await
                    .ok()
                    .flatten()
                    .map(|kv| String::from_utf8_lossy(&kv.value).into_owned())
                    .unwrap_or_default();
                Err(Refusal::conflict(format!(
                    "shard \"{}\": another operation holds its lock in etcd ({who})",
                    shard.name
                )))
            }
            Err(e) => {
                self.failed(&e);
                Err(Refusal::unavailable(e.to_string()))
            }
        }
    }

    async fn check_under_lock(&self, shard: &Shard) -> Result<(), Refusal> {
        let unavailable = |e: super::StoreError| Refusal::unavailable(e.to_string());
        if let Some(kv) = self
            .store
            .get(&self.keys.op(&shard.name))
            .await
            .map_err(unavailable)?
        {
            if let Some(op) = Op::decode(&kv.value).ok().filter(|op| op.phase.active()) {
                return Err(Refusal::conflict(format!(
                    "shard \"{}\": operation {} ({}, phase {}, coordinated by {}) is in progress",
                    shard.name,
                    op.id,
                    op.kind.as_str(),
                    op.phase.as_str(),
                    op.coordinator
                )));
            }
        }
        let snap = shard.snapshot(self.ctx.buffer_idle(&shard.name));
        let key = self.keys.primary(&shard.name);
        match self.store.get(&key).await.map_err(unavailable)? {
            Some(kv) => match Primary::decode(&kv.value) {
                Ok(rec) if rec.epoch == snap.epoch && rec.primary == snap.primary => Ok(()),
                Ok(rec) => Err(Refusal::conflict(format!(
                    "shard \"{}\": this proxy's view (primary {}, epoch {}) is not the cluster's record (primary {}, epoch {}) yet: it is catching up; try again shortly",
                    shard.name, snap.primary, snap.epoch, rec.primary, rec.epoch
                ))),
                Err(e) => Err(Refusal::conflict(format!(
                    "shard \"{}\": its primary record in etcd does not decode: {e}",
                    shard.name
                ))),
            },
            None if snap.state == StateKind::Serving => {
                let rec = Primary {
                    primary: snap.primary.clone(),
                    epoch: snap.epoch,
                    timeline: shard
                        .health
                        .max_timeline
                        .load(std::sync::atomic::Ordering::SeqCst),
                    by: self.me.id.clone(),
                    reason: "first record".into(),
                    at_ms: now_ms(),
                };
                self.store
                    .create(&key, rec.encode(), None)
                    .await
                    .map_err(unavailable)?;
                Ok(())
            }
            None => Err(Refusal::conflict(format!(
                "shard \"{}\" is {}, and the cluster has no record of its primary yet",
                shard.name,
                snap.state.as_str()
            ))),
        }
    }

    /// Releases the shard's lock if this proxy still holds it under `lease`.
    pub(super) async fn release(&self, shard: &str, lease: i64) {
        if let Err(e) = self
            .store
            .delete_holding(&self.keys.lock(shard), lease)
            .await
        {
            self.failed(&e);
        }
    }

    /// Writes `rec` as the shard's record, compare-and-set on what is there; a record
    /// at `rec`'s epoch or later means someone finished first (done too).
    pub(super) async fn record_newer(&self, shard: &str, rec: &Primary) -> Result<(), String> {
        let key = self.keys.primary(shard);
        let current = self.store.get(&key).await.map_err(|e| {
            self.failed(&e);
            e.to_string()
        })?;
        let rev = match &current {
            Some(kv) if Primary::decode(&kv.value).is_ok_and(|r| r.epoch >= rec.epoch) => {
                return Ok(())
            }
            Some(kv) => kv.mod_revision,
            None => 0,
        };
        match self.store.swap(&key, rec.encode(), rev).await {
            Ok(true) => {
                tracing::info!(shard, primary = %rec.primary, epoch = rec.epoch, "recorded the new primary");
                Ok(())
            }
            Ok(false) => Err("the shard's record changed meanwhile".into()),
            Err(e) => {
                self.failed(&e);
                Err(e.to_string())
            }
        }
    }

    /// A switchover for every proxy of the cluster, coordinated by this one. The
    /// report is the switchover's, with each proxy's acknowledgement added.
    pub async fn switchover(
        self: &Arc<Self>,
        shard: Arc<Shard>,
        to: HostPort,
    ) -> Result<(Outcome, SwitchoverReport), Refusal> {
        let lease = self.ready()?;
        let id = op_id(&self.me.id);
        self.acquire(&shard, lease, &id).await?;
        let snap = shard.snapshot(self.ctx.buffer_idle(&shard.name));
        let op = Op::start(
            id.clone(),
            OpKind::Switchover,
            &self.me.id,
            snap.epoch,
            snap.primary.clone(),
            Some(to.clone()),
        );
        self.running.locked().insert(id.clone());
        let mut lead = Lead::new(Arc::clone(self), &shard.name, op, lease);
        let report =
            switchover::run_with(Arc::clone(&self.ctx), Arc::clone(&shard), to, &mut lead).await;
        if report.outcome == Outcome::Refused {
            // Refused before anything was published.
            self.release(&shard.name, lease).await;
        }
        self.running.locked().remove(&id);
        let mut body = report.to_report();
        body.coordination = Some(lead.report(report.outcome));
        Ok((report.outcome, body))
    }
}

/// The coordinator's side of one operation: it publishes each phase under the
/// shard's lock, waits for the others' acknowledgements, writes the new primary's
/// record.
pub(super) struct Lead {
    coord: Arc<Coord>,
    shard: String,
    pub(super) op: Op,
    lease: i64,
    published: Instant,
    /// Each proxy's acknowledgement and when the coordinator saw it.
    acks: Vec<(Ack, Duration)>,
    missing: Vec<String>,
    /// This proxy's own lameduck: how long, how many cancelled.
    pub(super) own_lameduck: Option<(Duration, usize)>,
    /// The lock was lost (the lease expired): another proxy finishes the operation.
    lost: bool,
    /// The new primary's record, once promoted, and whether it is written.
    record: Option<Primary>,
    record_written: bool,
}

impl Lead {
    pub(super) fn new(coord: Arc<Coord>, shard: &str, op: Op, lease: i64) -> Self {
        Self {
            coord,
            shard: shard.to_string(),
            op,
            lease,
            published: Instant::now(),
            acks: Vec::new(),
            missing: Vec::new(),
            own_lameduck: None,
            lost: false,
            record: None,
            record_written: false,
        }
    }

    /// Writes the operation at `phase`, only while this proxy holds the lock.
    pub(super) async fn publish(&mut self, phase: Phase) -> Result<(), String> {
        self.op.phase = phase;
        self.op.updated_ms = now_ms();
        let c = &self.coord;
        let lock_key = c.keys.lock(&self.shard);
        let op_key = c.keys.op(&self.shard);
        match c
            .store
            .put_holding(&lock_key, self.lease, &op_key, self.op.encode())
            .await
        {
            Ok(true) => {
                if phase == Phase::Hold {
                    self.published = Instant::now();
                }
                tracing::info!(shard = %self.shard, op = %self.op.id, phase = phase.as_str(), "published");
                Ok(())
            }
            Ok(false) => {
                self.lost = true;
                Err("this proxy lost the shard's lock in etcd (its lease expired): the operation is left to the others".into())
            }
            Err(e) => {
                c.failed(&e);
                Err(format!("cannot publish phase {}: {e}", phase.as_str()))
            }
        }
    }

    /// Waits until every live proxy has acknowledged, or the deadline. Err when etcd
    /// did not answer at all.
    pub(super) async fn wait_for_acks(&mut self) -> Result<(), String> {
        let c = Arc::clone(&self.coord);
        let deadline = self.published + ack_deadline(c.ctx.settings.drain_timeout);
        let mut seen: HashMap<String, (Ack, Duration)> = HashMap::new();
        let mut answered = false;
        loop {
            match c.store.list(&c.keys.all()).await {
                Ok((kvs, _)) => {
                    answered = true;
                    let view = ClusterView::parse(&c.keys.all(), &kvs);
                    let recs = view.shards.get(&self.shard);
                    for ack in recs
                        .and_then(|r| r.acks.get(&self.op.id))
                        .into_iter()
                        .flatten()
                    {
                        seen.entry(ack.proxy.clone()).or_insert_with(|| {
                            let after = self.published.elapsed();
                            metrics::histogram!(crate::metrics::COORD_ACK_SECONDS, "shard" => self.shard.clone())
                                .record(after.as_secs_f64());
                            (ack.clone(), after)
                        });
                    }
                    self.missing = view
                        .members
                        .iter()
                        .filter(|m| m.id != c.me.id && !seen.contains_key(&m.id))
                        .map(|m| m.id.clone())
                        .collect();
                    if self.missing.is_empty() {
                        break;
                    }
                }
                Err(e) => c.failed(&e),
            }
            if Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut acks: Vec<(Ack, Duration)> = seen.into_values().collect();
        acks.sort_by_key(|a| a.1);
        self.acks = acks;
        if !self.missing.is_empty() {
            metrics::counter!(crate::metrics::COORD_ACK_MISSING, "shard" => self.shard.clone())
                .increment(self.missing.len() as u64);
            tracing::warn!(shard = %self.shard, op = %self.op.id, missing = ?self.missing, "proxies did not acknowledge before the lameduck deadline: the fence ends their sessions on the old primary");
        }
        if answered {
            Ok(())
        } else {
            Err("etcd did not answer while waiting for the other proxies".into())
        }
    }

    /// Writes the new primary's record, once.
    async fn write_record(&mut self) -> Result<(), String> {
        if let (Some(rec), false) = (&self.record, self.record_written) {
            self.coord.record_newer(&self.shard, rec).await?;
            self.record_written = true;
        }
        Ok(())
    }

    /// The operation as its coordinator reports it.
    pub(super) fn report(&self, outcome: Outcome) -> Coordinated {
        let mut proxies = vec![ProxyAck {
            proxy: self.coord.me.id.clone(),
            coordinator: true,
            ack_ms: 0.0,
            lameduck_ms: self.own_lameduck.map(|(d, _)| d.as_millis() as u64),
            cancelled: self.own_lameduck.map(|(_, n)| n as u64),
        }];
        for (ack, after) in &self.acks {
            proxies.push(ProxyAck {
                proxy: ack.proxy.clone(),
                coordinator: false,
                ack_ms: (after.as_secs_f64() * 1e6).round() / 1e3,
                lameduck_ms: Some(ack.lameduck_ms),
                cancelled: Some(ack.cancelled),
            });
        }
        Coordinated {
            op: Some(self.op.id.clone()),
            coordinator: Some(self.coord.me.id.clone()),
            phase: Some(self.op.phase),
            outcome: Some(outcome),
            proxies,
            missing: Some(self.missing.clone()),
            lost_lock: Some(self.lost),
            recorded: self.record.clone(),
            operation: None,
        }
    }
}

/// What publishing an operation's end needs (moved into a retry task if etcd is down).
struct EndState {
    coord: Arc<Coord>,
    shard: String,
    op: Op,
    lease: i64,
    record: Option<Primary>,
    record_written: bool,
}

impl EndState {
    /// Publishes the end, retrying while etcd does not answer (the others keep holding
    /// until they read it).
    async fn retry(mut self) {
        for attempt in 0u32.. {
            if self.try_end().await {
                return;
            }
            if attempt == 0 {
                tracing::warn!(shard = %self.shard, "could not publish the end of the operation: retrying until etcd answers");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// True when done (or no longer ours to do).
    async fn try_end(&mut self) -> bool {
        let c = &self.coord;
        if let (Some(rec), false) = (&self.record, self.record_written) {
            if c.record_newer(&self.shard, rec).await.is_err() {
                return false;
            }
            self.record_written = true;
        }
        let lock_key = c.keys.lock(&self.shard);
        match c
            .store
            .put_holding(
                &lock_key,
                self.lease,
                &c.keys.op(&self.shard),
                self.op.encode(),
            )
            .await
        {
            Ok(true) => {
                c.release(&self.shard, self.lease).await;
                true
            }
            // The lock went with the lease: whoever took it finishes.
            Ok(false) => true,
            Err(e) => {
                c.failed(&e);
                false
            }
        }
    }
}

impl Hooks for Lead {
    fn coordinated(&self) -> bool {
        true
    }

    async fn holding(&mut self) -> Result<(), String> {
        let c = Arc::clone(&self.coord);
        if let Err(e) = c.store.delete_prefix(&c.keys.all_acks(&self.shard)).await {
            c.failed(&e);
        }
        self.publish(Phase::Hold).await?;
        c.failpoint("holding").await;
        Ok(())
    }

    async fn held(&mut self, lameduck: control::Lameduck) -> Result<Vec<i32>, String> {
        self.own_lameduck = Some((lameduck.waited, lameduck.cancelled));
        self.wait_for_acks().await?;
        self.coord.failpoint("held").await;
        Ok(self
            .acks
            .iter()
            .flat_map(|(a, _)| a.pids.iter().copied())
            .collect())
    }

    async fn fencing(&mut self, databases: &[String]) -> Result<(), String> {
        self.op.databases = databases.to_vec();
        self.publish(Phase::Fencing).await?;
        self.coord.failpoint("fencing").await;
        Ok(())
    }

    async fn promoting(&mut self, lsn: &str, databases: &[String]) -> Result<(), String> {
        // The fence is on and the target caught up, but nothing says so yet.
        self.coord.failpoint("fenced").await;
        self.op.databases = databases.to_vec();
        self.op.fence_lsn = Some(lsn.to_string());
        self.publish(Phase::Promoting).await?;
        self.coord.failpoint("promoting").await;
        Ok(())
    }

    async fn promoted(&mut self, to: &HostPort, epoch: u64) {
        let c = Arc::clone(&self.coord);
        let timeline = match health::probe(&c.ctx.admin, to, c.ctx.settings.health.timeout).await {
            Probe::Primary { timeline } => timeline,
            _ => 0,
        };
        self.record = Some(Primary {
            primary: to.clone(),
            epoch,
            timeline,
            by: c.me.id.clone(),
            reason: format!("switchover {}", self.op.id),
            at_ms: now_ms(),
        });
        // The others take the new primary from this record, in parallel with this
        // proxy's own flush. If etcd does not answer it is written at the end.
        if let Err(e) = self.write_record().await {
            tracing::warn!(shard = %self.shard, error = %e, "could not record the new primary yet");
        }
        c.failpoint("promoted").await;
    }

    async fn finished(&mut self, outcome: Outcome, error: Option<&str>) {
        let c = Arc::clone(&self.coord);
        let phase = match outcome {
            Outcome::Completed => Phase::Done,
            Outcome::Failed => Phase::Failed,
            Outcome::RolledBack | Outcome::Refused => Phase::RolledBack,
        };
        metrics::counter!(crate::metrics::COORD_OPS, "shard" => self.shard.clone(), "kind" => self.op.kind.as_str(), "outcome" => outcome.as_str()).increment(1);
        self.op.phase = phase;
        self.op.error = error.map(str::to_string);
        self.op.updated_ms = now_ms();
        if self.lost {
            return;
        }
        let mut state = EndState {
            coord: c,
            shard: self.shard.clone(),
            op: self.op.clone(),
            lease: self.lease,
            record: self.record.clone(),
            record_written: self.record_written,
        };
        if !state.try_end().await {
            tokio::spawn(state.retry());
        }
    }
}
