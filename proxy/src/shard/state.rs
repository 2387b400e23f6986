//! The per-shard state machine (docs/architecture.md, "The shard state machine"): which server is a
//! shard's primary, whether new transactions may go to it, and the one place where
//! revocation and establishment events from every source are applied.
//!
//! States: `Serving { primary, epoch }` → `Buffering { old, epoch }` →
//! `Draining { new, epoch + 1 }` → `Serving { new, epoch + 1 }`; `Buffering` can also go
//! back to `Serving { old, epoch }` (abort), and reads as `Unavailable` once the buffer's
//! cycle ended with no primary.
//!
//! Sessions see a shard through its *generations*: one per period during which one
//! primary may receive new transactions. The gate is a single atomic holding the serving
//! generation's id (or "none"). A session registers a transaction on its generation
//! *before* it checks the gate, and a revocation closes the gate *before* it counts the
//! registered transactions, so (both sequentially consistent) either the session sees the
//! gate closed or the revocation sees the session: no transaction slips past a
//! revocation unseen.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::{watch, Notify};

use crate::config::HostPort;
use crate::sync::Locked;

/// What the state machine says about a shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateKind {
    Serving,
    Buffering,
    Draining,
    Unavailable,
}

impl StateKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StateKind::Serving => "serving",
            StateKind::Buffering => "buffering",
            StateKind::Draining => "draining",
            StateKind::Unavailable => "unavailable",
        }
    }

    fn gauge(self) -> f64 {
        match self {
            StateKind::Serving => 0.0,
            StateKind::Buffering => 1.0,
            StateKind::Draining => 2.0,
            StateKind::Unavailable => 3.0,
        }
    }
}

/// A period during which one primary may receive new transactions.
#[derive(Debug)]
pub struct Generation {
    /// Unique per shard, increasing; the gate holds the serving one's.
    pub id: u64,
    /// The leadership epoch of `primary`.
    pub epoch: u64,
    pub primary: HostPort,
    inflight: AtomicUsize,
    idle: Notify,
    /// Set when lameduck gives up on the transactions still running.
    kill: watch::Sender<bool>,
    /// Set when the generation is revoked (session-mode sessions then move).
    revoked: watch::Sender<bool>,
    /// Why the primary was given up as failed (unplanned revocations only).
    lost: Mutex<Option<String>>,
    /// Another primary was established while transactions still ran on this lost one.
    superseded: AtomicBool,
}

impl Generation {
    fn new(id: u64, epoch: u64, primary: HostPort) -> Arc<Self> {
        Arc::new(Self {
            id,
            epoch,
            primary,
            inflight: AtomicUsize::new(0),
            idle: Notify::new(),
            kill: watch::channel(false).0,
            revoked: watch::channel(false).0,
            lost: Mutex::new(None),
            superseded: AtomicBool::new(false),
        })
    }

    /// Records that this generation's primary was revoked because it failed.
    pub fn mark_lost(&self, reason: &str) {
        *self.lost.locked() = Some(reason.to_string());
    }

    /// Why this generation's primary was given up as failed, if it was.
    pub fn lost(&self) -> Option<String> {
        self.lost.locked().clone()
    }

    /// Another primary now serves the shard. If this generation's primary was lost,
    /// the transactions still waiting on it are cancelled at once rather than after
    /// `HANDOFF_DRAIN_TIMEOUT`: a lost primary that still holds them is one that stopped
    /// answering (a crashed one reset their connections already), and nothing it might
    /// still do for them can be acknowledged usefully now — under synchronous
    /// replication it cannot even commit. A live primary replaced in a switchover keeps
    /// its lameduck. True if it cancelled anything.
    pub fn supersede(&self) -> bool {
        if self.lost.locked().is_none() || self.inflight() == 0 {
            return false;
        }
        self.superseded.store(true, SeqCst);
        self.kill();
        true
    }

    /// Whether [`Generation::supersede`] cancelled this generation's transactions.
    pub fn superseded(&self) -> bool {
        self.superseded.load(SeqCst)
    }

    /// A transaction on this generation ended (or never started): only through
    /// [`Entered`]'s drop.
    fn leave(&self) {
        if self.inflight.fetch_sub(1, SeqCst) == 1 {
            self.idle.notify_waiters();
        }
    }

    /// Transactions running on this generation now.
    pub fn inflight(&self) -> usize {
        self.inflight.load(SeqCst)
    }

    /// Resolves once lameduck cancels this generation's remaining transactions.
    pub fn killed(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.kill.subscribe();
        async move {
            let _ = rx.wait_for(|k| *k).await;
        }
    }

    /// Resolves once this generation is revoked.
    pub fn revoked(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.revoked.subscribe();
        async move {
            let _ = rx.wait_for(|k| *k).await;
        }
    }

    /// Waits until no transaction runs on this generation, up to `timeout`. True if none.
    pub async fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.inflight() == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.inflight() == 0;
            }
        }
    }

    /// Tells every session still in a transaction here to cancel it.
    pub fn kill(&self) {
        self.kill.send_replace(true);
    }
}

/// A transaction (or a session-mode session with a server connection) registered on a
/// generation: lameduck waits until every one is dropped.
#[derive(Debug)]
pub struct Entered {
    gen: Arc<Generation>,
}

impl Entered {
    /// The generation it is registered on.
    pub fn generation(&self) -> &Arc<Generation> {
        &self.gen
    }
}

impl Drop for Entered {
    fn drop(&mut self) {
        self.gen.leave();
    }
}

/// Why an event was not applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error("shard \"{shard}\" is {state}, not {expected}")]
    WrongState {
        shard: String,
        state: &'static str,
        expected: &'static str,
    },
    #[error("stale epoch {given} for shard \"{shard}\" (its epoch is {current})")]
    StaleEpoch {
        shard: String,
        given: u64,
        current: u64,
    },
}

#[derive(Debug)]
struct Inner {
    kind: StateKind,
    /// Serving/Draining: the serving generation. Buffering: the revoked one.
    gen: Arc<Generation>,
    /// Buffering cycles started so far: the buffer's epoch for the current one.
    cycle: u64,
    next_gen: u64,
    since: Instant,
    reason: String,
}

/// One shard's state machine.
#[derive(Debug)]
pub struct Shard {
    pub name: String,
    /// Configured hosts; the first is the initial primary.
    pub hosts: Vec<HostPort>,
    /// `gen.id << 1 | 1` while a generation serves, `0` while none does.
    gate: AtomicU64,
    inner: Mutex<Inner>,
    /// One switchover (or external revocation) at a time.
    pub op: tokio::sync::Mutex<()>,
    /// Failure detection and discovery ([`crate::shard::health`]).
    pub health: crate::shard::failure::Health,
    /// Replaced primaries watched for split brain ([`crate::shard::watchdog`]).
    pub watch: crate::shard::watch::Watch,
    /// Its hosts as readers: the read rotation ([`crate::shard::replicas`]).
    pub replicas: crate::shard::replicas::Replicas,
}

/// A snapshot for the admin API.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub state: StateKind,
    pub epoch: u64,
    pub primary: HostPort,
    pub since: Instant,
    pub reason: String,
    pub inflight: usize,
    pub cycle: u64,
}

/// What a revocation started.
#[derive(Debug, Clone)]
pub struct Revoked {
    /// The generation that may no longer take new transactions.
    pub gen: Arc<Generation>,
    /// The buffer epoch of this cycle.
    pub cycle: u64,
}

fn open(id: u64) -> u64 {
    (id << 1) | 1
}

impl Shard {
    pub fn new(name: &str, hosts: Vec<HostPort>) -> Self {
        let first = hosts[0].clone();
        Self::with_primary(name, hosts, first)
    }

    /// A shard serving `primary` (one of `hosts`, found by startup discovery) at epoch 1.
    pub fn with_primary(name: &str, hosts: Vec<HostPort>, primary: HostPort) -> Self {
        Self::with_primary_at(name, hosts, primary, 1)
    }

    /// A shard serving `primary` at `epoch` (the epoch recorded for the shard by the
    /// proxies' coordination, when there is one).
    pub fn with_primary_at(
        name: &str,
        hosts: Vec<HostPort>,
        primary: HostPort,
        epoch: u64,
    ) -> Self {
        let gen = Generation::new(1, epoch, primary);
        let s = Self {
            name: name.to_string(),
            hosts,
            gate: AtomicU64::new(open(1)),
            inner: Mutex::new(Inner {
                kind: StateKind::Serving,
                gen,
                cycle: 0,
                next_gen: 2,
                since: Instant::now(),
                reason: "startup".into(),
            }),
            op: tokio::sync::Mutex::new(()),
            health: Default::default(),
            watch: Default::default(),
            replicas: Default::default(),
        };
        s.replicas.set_hosts(&s.hosts);
        s.publish(StateKind::Serving, epoch);
        s
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.locked()
    }

    fn publish(&self, kind: StateKind, epoch: u64) {
        metrics::gauge!(crate::metrics::SHARD_STATE, "shard" => self.name.clone())
            .set(kind.gauge());
        metrics::gauge!(crate::metrics::SHARD_EPOCH, "shard" => self.name.clone())
            .set(epoch as f64);
    }

    fn event(&self, event: &'static str, result: &'static str) {
        metrics::counter!(crate::metrics::SHARD_EVENTS, "shard" => self.name.clone(), "event" => event, "result" => result)
            .increment(1);
    }

    /// The hot path, at the start of every transaction: registers a transaction on
    /// `gen` if `gen` still serves. On `None` nothing stays registered.
    pub fn enter(&self, gen: &Arc<Generation>) -> Option<Entered> {
        gen.inflight.fetch_add(1, SeqCst);
        if self.gate.load(SeqCst) == open(gen.id) {
            return Some(Entered {
                gen: Arc::clone(gen),
            });
        }
        gen.leave();
        None
    }

    /// True while `gen` takes new transactions (one atomic load).
    pub fn is_serving(&self, gen: &Generation) -> bool {
        self.gate.load(SeqCst) == open(gen.id)
    }

    /// The generation new transactions go to, if any.
    pub fn serving(&self) -> Option<Arc<Generation>> {
        let g = self.lock();
        matches!(g.kind, StateKind::Serving | StateKind::Draining).then(|| Arc::clone(&g.gen))
    }

    /// The serving generation, or the revoked one while buffering.
    pub fn current(&self) -> Arc<Generation> {
        Arc::clone(&self.lock().gen)
    }

    /// The state; `buffer_idle` says whether the shard's buffer cycle has ended (a
    /// Draining shard whose buffer is idle is Serving; a Buffering one is Unavailable).
    pub fn snapshot(&self, buffer_idle: bool) -> Snapshot {
        let mut g = self.lock();
        if g.kind == StateKind::Draining && buffer_idle {
            g.kind = StateKind::Serving;
            self.publish(g.kind, g.gen.epoch);
        }
        let state = match g.kind {
            StateKind::Buffering if buffer_idle => StateKind::Unavailable,
            k => k,
        };
        Snapshot {
            state,
            epoch: g.gen.epoch,
            primary: g.gen.primary.clone(),
            since: g.since,
            reason: g.reason.clone(),
            inflight: g.gen.inflight(),
            cycle: g.cycle,
        }
    }

    fn check_epoch(&self, g: &Inner, epoch: Option<u64>) -> Result<(), EventError> {
        match epoch {
            Some(e) if e != g.gen.epoch => Err(EventError::StaleEpoch {
                shard: self.name.clone(),
                given: e,
                current: g.gen.epoch,
            }),
            _ => Ok(()),
        }
    }

    /// Revocation: no new transaction may go to the current primary. `epoch` (when
    /// given) must be the current one; a duplicate while buffering is refused.
    ///
    /// `then` runs under the state machine's lock once the gate is closed (the buffer is
    /// started there): whoever sees the shard not serving through [`Shard::serving`]
    /// also sees what `then` did.
    pub fn revoke(
        &self,
        epoch: Option<u64>,
        reason: &str,
        then: impl FnOnce(&Revoked),
    ) -> Result<Revoked, EventError> {
        let mut g = self.lock();
        if let Err(e) = self.check_epoch(&g, epoch) {
            self.event("revoke", "stale");
            return Err(e);
        }
        if !matches!(g.kind, StateKind::Serving | StateKind::Draining) {
            self.event("revoke", "ignored");
            return Err(EventError::WrongState {
                shard: self.name.clone(),
                state: g.kind.as_str(),
                expected: "serving",
            });
        }
        // Close the gate first, then (the caller) counts what is in flight.
        self.gate.store(0, SeqCst);
        g.gen.revoked.send_replace(true);
        g.kind = StateKind::Buffering;
        g.cycle += 1;
        g.since = Instant::now();
        g.reason = reason.to_string();
        self.publish(g.kind, g.gen.epoch);
        self.event("revoke", "applied");
        tracing::info!(shard = %self.name, epoch = g.gen.epoch, primary = %g.gen.primary, reason, "shard revoked: buffering new transactions");
        let r = Revoked {
            gen: Arc::clone(&g.gen),
            cycle: g.cycle,
        };
        then(&r);
        Ok(r)
    }

    /// Establishment: `primary` serves from the next epoch. Returns the new generation
    /// and the buffer cycle to stop.
    pub fn establish(
        &self,
        epoch: Option<u64>,
        primary: HostPort,
    ) -> Result<(Arc<Generation>, u64), EventError> {
        self.serve_again(epoch, "establish", Some((primary, None)))
    }

    /// Establishment at a given epoch instead of the next one: the proxies'
    /// coordination numbers epochs for all of them, and a proxy following it takes the
    /// recorded one.
    pub fn establish_at(
        &self,
        epoch: Option<u64>,
        primary: HostPort,
        new_epoch: u64,
    ) -> Result<(Arc<Generation>, u64), EventError> {
        self.serve_again(epoch, "establish", Some((primary, Some(new_epoch))))
    }

    /// Abort: the revoked primary serves again, at the same epoch.
    pub fn abort(&self, epoch: Option<u64>) -> Result<(Arc<Generation>, u64), EventError> {
        self.serve_again(epoch, "abort", None)
    }

    /// Ends a revocation: a fresh generation serves — on `primary` at the next epoch (or
    /// the one given with it), or (`None`) on the revoked primary at the same epoch, since
    /// the revoked generation may have been told to cancel its transactions.
    fn serve_again(
        &self,
        epoch: Option<u64>,
        event: &'static str,
        primary: Option<(HostPort, Option<u64>)>,
    ) -> Result<(Arc<Generation>, u64), EventError> {
        let mut g = self.lock();
        if let Err(e) = self.check_epoch(&g, epoch) {
            self.event(event, "stale");
            return Err(e);
        }
        if g.kind != StateKind::Buffering {
            self.event(event, "ignored");
            return Err(EventError::WrongState {
                shard: self.name.clone(),
                state: g.kind.as_str(),
                expected: "buffering",
            });
        }
        let id = g.next_gen;
        g.next_gen += 1;
        let (new_epoch, primary, reason) = match primary {
            Some((p, at)) => (at.unwrap_or(g.gen.epoch + 1), p, "new primary established"),
            None => (g.gen.epoch, g.gen.primary.clone(), "switchover aborted"),
        };
        let gen = Generation::new(id, new_epoch, primary);
        g.gen = Arc::clone(&gen);
        g.kind = StateKind::Draining;
        g.since = Instant::now();
        g.reason = reason.into();
        self.gate.store(open(id), SeqCst);
        self.publish(g.kind, gen.epoch);
        self.event(event, "applied");
        tracing::info!(shard = %self.name, epoch = gen.epoch, primary = %gen.primary, reason, "releasing held transactions");
        Ok((gen, g.cycle))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testing::hp;

    #[test]
    fn a_transaction_never_slips_past_a_revocation() {
        let s = Shard::new("main", vec![hp(1), hp(2)]);
        let g1 = s.current();
        let t = s.enter(&g1).expect("serving");
        assert_eq!(g1.inflight(), 1);
        let r = s.revoke(Some(1), "test", |_| {}).unwrap();
        assert_eq!(r.cycle, 1);
        // The gate is closed: a new transaction is refused and leaves nothing behind.
        assert!(s.enter(&g1).is_none());
        assert_eq!(g1.inflight(), 1);
        drop(t);
        assert_eq!(g1.inflight(), 0);
        assert!(s.serving().is_none());
        assert_eq!(s.snapshot(false).state, StateKind::Buffering);
        assert_eq!(s.snapshot(true).state, StateKind::Unavailable);
    }

    #[test]
    fn events_carry_epochs_and_stale_ones_are_refused() {
        let s = Shard::new("main", vec![hp(1), hp(2)]);
        assert!(matches!(
            s.revoke(Some(7), "x", |_| {}),
            Err(EventError::StaleEpoch { .. })
        ));
        s.revoke(None, "x", |_| {}).unwrap();
        // A duplicate revocation is ignored.
        assert!(matches!(
            s.revoke(None, "x", |_| {}),
            Err(EventError::WrongState { .. })
        ));
        let (g2, cycle) = s.establish(Some(1), hp(2)).unwrap();
        assert_eq!((g2.epoch, cycle), (2, 1));
        drop(s.enter(&g2).expect("serving"));
        assert_eq!(g2.inflight(), 0);
        // An establishment for the old epoch after the fact is stale.
        assert!(matches!(
            s.establish(Some(1), hp(1)),
            Err(EventError::StaleEpoch { .. })
        ));
        assert_eq!(s.snapshot(false).state, StateKind::Draining);
        assert_eq!(s.snapshot(true).state, StateKind::Serving);
        // The next cycle gets the next buffer epoch.
        let r = s.revoke(Some(2), "again", |_| {}).unwrap();
        assert_eq!(r.cycle, 2);
        let (g3, _) = s.abort(Some(2)).unwrap();
        assert_eq!((g3.epoch, g3.primary.port), (2, 2));
        assert_ne!(g3.id, g2.id);
        assert!(
            s.enter(&g2).is_none(),
            "the revoked generation stays closed"
        );
        assert!(s.enter(&g3).is_some());
    }

    #[tokio::test]
    async fn lameduck_waits_for_the_last_transaction() {
        let s = Arc::new(Shard::new("main", vec![hp(1)]));
        let g = s.current();
        let t = s.enter(&g).expect("serving");
        let r = s.revoke(None, "t", |_| {}).unwrap();
        assert!(!r.gen.wait_idle(Duration::from_millis(20)).await);
        let g2 = Arc::clone(&g);
        let waiter = tokio::spawn(async move { g2.wait_idle(Duration::from_secs(5)).await });
        tokio::task::yield_now().await;
        drop(t);
        assert!(waiter.await.unwrap());
        let killed = g.killed();
        g.kill();
        tokio::time::timeout(Duration::from_secs(1), killed)
            .await
            .expect("kill is seen");
    }
}
