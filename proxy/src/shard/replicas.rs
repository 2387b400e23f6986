//! Standbys that serve reads (`appdb@replica`, `appdb@any`): which of a shard's hosts
//! are in its read rotation now, and the choice of one for a transaction or a session.
//!
//! A host is in the rotation while it is in recovery, streaming from the shard's
//! current primary, and its replay lag is within `HANDOFF_REPLICA_MAX_LAG`; handoff
//! measures that itself every `HANDOFF_REPLICA_CHECK_INTERVAL` (the check task lives in
//! `shard::replica_check`). A standby over the limit leaves the rotation, and comes back
//! once its lag is at most half the limit, so one hovering at the limit does not flap.
//! A session that cannot reach a standby takes it out at once; the next check brings it
//! back. Transactions go to the standby with the fewest running on it now.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;

use crate::config::{HostPort, ReplicaLag};
use crate::sync::{Locked, ReadWrite};

/// Why a host is in the read rotation or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    NotCheckedYet,
    /// In recovery, streaming from the primary, lag within the limit.
    InRotation,
    /// Its lag is over the limit (or not yet back to half of it).
    Lagging,
    /// In recovery but not streaming from the shard's current primary (another
    /// upstream, reconnecting, or a timeline of its own).
    NotStreaming,
    /// Not in recovery: the primary, or a host that left recovery.
    NotStandby,
    /// No answer, or a session could not use it.
    Down,
    /// The target of a switchover in progress: out before it is promoted.
    Withheld,
}

impl Standing {
    pub fn as_str(self) -> &'static str {
        match self {
            Standing::NotCheckedYet => "not_checked_yet",
            Standing::InRotation => "in_rotation",
            Standing::Lagging => "lagging",
            Standing::NotStreaming => "not_streaming",
            Standing::NotStandby => "not_standby",
            Standing::Down => "down",
            Standing::Withheld => "withheld",
        }
    }
}

/// What the last check found on one host.
#[derive(Debug, Clone)]
pub struct Seen {
    pub standing: Standing,
    /// Replay lag behind the primary, in bytes of WAL.
    pub lag_bytes: Option<u64>,
    /// Replay lag in time: how long ago the last replayed transaction committed on the
    /// primary, while WAL is still to be replayed (zero when caught up).
    pub lag: Option<Duration>,
    /// Where it streams from (`host:port`), as it reports.
    pub upstream: Option<String>,
    pub detail: String,
    pub checked: Option<SystemTime>,
}

impl Default for Seen {
    fn default() -> Self {
        Self {
            standing: Standing::NotCheckedYet,
            lag_bytes: None,
            lag: None,
            upstream: None,
            detail: String::new(),
            checked: None,
        }
    }
}

/// One host as a possible reader.
#[derive(Debug)]
pub struct Standby {
    pub host: HostPort,
    in_rotation: AtomicBool,
    /// Transactions (or sessions) using it now.
    outstanding: AtomicUsize,
    /// Transactions (or sessions) it served, in all.
    chosen: AtomicU64,
    /// Switchovers to it in progress: out of the rotation meanwhile.
    withheld: AtomicUsize,
    /// A switchover is pointing it at its target: its WAL receiver reconnecting does not
    /// take it out (its lag still does).
    repointing: AtomicUsize,
    seen: Mutex<Seen>,
    /// Bumped when the host stops being a standby reads may stay on: a switchover
    /// withholds it (it is about to be promoted) or a check finds it out of recovery.
    leaving: tokio::sync::watch::Sender<u64>,
}

impl Standby {
    fn new(host: HostPort) -> Arc<Self> {
        Arc::new(Self {
            host,
            in_rotation: AtomicBool::new(false),
            outstanding: AtomicUsize::new(0),
            chosen: AtomicU64::new(0),
            withheld: AtomicUsize::new(0),
            repointing: AtomicUsize::new(0),
            seen: Mutex::new(Seen::default()),
            leaving: tokio::sync::watch::channel(0).0,
        })
    }

    /// Resolves once, after this call, the host is withheld for a switchover or found
    /// out of recovery: a session-mode reader on it then moves to another standby at its
    /// next transaction boundary.
    pub fn leaving(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.leaving.subscribe();
        async move {
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    fn leave(&self) {
        self.leaving.send_modify(|n| *n += 1);
    }

    pub fn in_rotation(&self) -> bool {
        self.in_rotation.load(Ordering::Acquire)
    }

    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Relaxed)
    }

    pub fn chosen(&self) -> u64 {
        self.chosen.load(Ordering::Relaxed)
    }

    pub fn seen(&self) -> Seen {
        self.seen.locked().clone()
    }
}

/// A standby chosen for a transaction or a session: counted as outstanding on it until
/// dropped.
#[derive(Debug)]
pub struct Reading {
    standby: Arc<Standby>,
}

impl Reading {
    pub fn host(&self) -> &HostPort {
        &self.standby.host
    }

    pub fn standby(&self) -> &Arc<Standby> {
        &self.standby
    }

    /// A connection to it was had: counted as a read it served (`chosen`).
    pub fn served(&self) {
        self.standby.chosen.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for Reading {
    fn drop(&mut self) {
        self.standby.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Keeps a switchover's target out of the read rotation until dropped.
#[derive(Debug)]
pub struct Withheld<'a> {
    standby: Option<Arc<Standby>>,
    replicas: &'a Replicas,
}

impl Drop for Withheld<'_> {
    fn drop(&mut self) {
        if let Some(s) = &self.standby {
            s.withheld.fetch_sub(1, Ordering::AcqRel);
            // Promoted or not, what it is now is for a check to say, at once.
            self.replicas.wake.notify_one();
        }
    }
}

/// Keeps a standby being repointed in the rotation while its WAL receiver reconnects,
/// until dropped.
#[derive(Debug)]
pub struct Repointing(Option<Arc<Standby>>);

impl Drop for Repointing {
    fn drop(&mut self) {
        if let Some(s) = &self.0 {
            s.repointing.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// A shard's possible readers.
#[derive(Debug, Default)]
pub struct Replicas {
    list: RwLock<Vec<Arc<Standby>>>,
    /// A standby joined the rotation.
    joined: Notify,
    /// Spreads ties between equally loaded standbys (scrambled, see `pick`).
    turn: AtomicUsize,
    /// Asks the check task for a check now (a session found a standby failing).
    pub wake: Notify,
}

impl Replicas {
    /// The hosts to check: `hosts` (the shard's), in that order; ones no longer listed
    /// are forgotten.
    pub fn set_hosts(&self, hosts: &[HostPort]) {
        let mut list = self.list.writing();
        if list.len() == hosts.len() && list.iter().zip(hosts).all(|(s, h)| &s.host == h) {
            return;
        }
        let old = std::mem::take(&mut *list);
        *list = hosts
            .iter()
            .map(|h| {
                old.iter()
                    .find(|s| &s.host == h)
                    .cloned()
                    .unwrap_or_else(|| Standby::new(h.clone()))
            })
            .collect();
    }

    /// Every host, in the configured order.
    pub fn all(&self) -> Vec<Arc<Standby>> {
        self.list.reading().clone()
    }

    /// True if some standby is in the rotation now.
    pub fn any_in_rotation(&self) -> bool {
        self.list.reading().iter().any(|s| s.in_rotation())
    }

    /// The standby in the rotation with the fewest transactions running on it (ties
    /// spread evenly), counted as running one more; `None` if the rotation is empty.
    /// `except`: a host the caller just failed on.
    pub fn pick(&self, except: Option<&HostPort>) -> Option<Reading> {
        let list = self.list.reading();
        let n = list.len();
        if n == 0 {
            return None;
        }
        // The scan starts at a scrambled place: a plain counter modulo the hosts would
        // alias with a client that picks a fixed number of times per request (prepare,
        // then execute) and send its every execution to the same standby.
        let turn = self.turn.fetch_add(1, Ordering::Relaxed) as u64;
        let start = (turn.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize % n;
        let mut best: Option<&Arc<Standby>> = None;
        for i in 0..n {
            let s = &list[(start + i) % n];
            if !s.in_rotation() || except == Some(&s.host) {
                continue;
            }
            if best.is_none_or(|b| s.outstanding() < b.outstanding()) {
                best = Some(s);
            }
        }
        let standby = Arc::clone(best?);
        standby.outstanding.fetch_add(1, Ordering::Relaxed);
        Some(Reading { standby })
    }

    /// [`Replicas::pick`], waiting up to `limit` for a standby to join the rotation.
    pub async fn pick_within(&self, limit: Duration) -> Option<Reading> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let joined = self.joined.notified();
            tokio::pin!(joined);
            joined.as_mut().enable();
            if let Some(r) = self.pick(None) {
                return Some(r);
            }
            if tokio::time::timeout_at(deadline, joined).await.is_err() {
                return self.pick(None);
            }
        }
    }

    /// The standby `host`, if it is one of the shard's hosts.
    /// The standby at `addr` (a configured host written as an IP address).
    pub fn find_addr(&self, addr: &std::net::SocketAddr) -> Option<Arc<Standby>> {
        self.list
            .reading()
            .iter()
            .find(|s| {
                s.host.port == addr.port()
                    && s.host.host.parse::<std::net::IpAddr>().ok() == Some(addr.ip())
            })
            .cloned()
    }

    fn find(&self, host: &HostPort) -> Option<Arc<Standby>> {
        self.list
            .reading()
            .iter()
            .find(|s| &s.host == host)
            .cloned()
    }

    /// A session could not use `host` (no connection, or it refused as a standby
    /// shutting down or promoted): out of the rotation until the next check finds it
    /// good again.
    pub fn set_down(&self, host: &HostPort, why: &str) {
        if let Some(s) = self.find(host) {
            if s.in_rotation.swap(false, Ordering::AcqRel) {
                tracing::warn!(standby = %host, reason = why, "standby leaves the read rotation");
            }
            let mut seen = s.seen.locked();
            seen.standing = Standing::Down;
            seen.detail = why.to_string();
        }
        self.wake.notify_one();
    }

    /// Takes `host` out of the rotation before a switchover promotes it (new reads go
    /// elsewhere; reads running on it finish there), until the guard is dropped. Once
    /// promoted it is no standby: the checks keep it out.
    pub fn withhold(&self, host: &HostPort) -> Withheld<'_> {
        let found = self.find(host);
        if let Some(s) = &found {
            s.withheld.fetch_add(1, Ordering::AcqRel);
            if s.in_rotation.swap(false, Ordering::AcqRel) {
                tracing::info!(standby = %host, "switchover target leaves the read rotation");
            }
            s.seen.locked().standing = Standing::Withheld;
            s.leave();
        }
        Withheld {
            standby: found,
            replicas: self,
        }
    }

    /// A switchover is about to point `host` at its target: while the guard lives, a
    /// check that finds its WAL receiver not streaming (reconnecting to the target)
    /// leaves it where it was; its lag is judged as always.
    pub fn repointing(&self, host: &HostPort) -> Repointing {
        let found = self.find(host);
        if let Some(s) = &found {
            s.repointing.fetch_add(1, Ordering::AcqRel);
        }
        Repointing(found)
    }

    /// The targets of switchovers in progress.
    pub fn withheld(&self) -> Vec<HostPort> {
        self.list
            .reading()
            .iter()
            .filter(|s| s.withheld.load(Ordering::Acquire) > 0)
            .map(|s| s.host.clone())
            .collect()
    }

    /// Records a check of `host`: whether it now belongs in the rotation follows from
    /// `seen` and `limit`, with hysteresis (it leaves over the limit and returns at half
    /// of it). Returns true if it is in the rotation afterwards.
    pub fn record(&self, host: &HostPort, mut seen: Seen, limit: &ReplicaLag) -> bool {
        let Some(s) = self.find(host) else {
            return false;
        };
        let was = s.in_rotation();
        if s.withheld.load(Ordering::Acquire) > 0 && seen.standing == Standing::InRotation {
            seen.standing = Standing::Withheld;
        }
        if was
            && seen.standing == Standing::NotStreaming
            && s.repointing.load(Ordering::Acquire) > 0
        {
            seen.standing = Standing::InRotation;
            seen.detail = "being pointed at a switchover's target".into();
        }
        let now = if seen.standing == Standing::InRotation {
            let ok = if was {
                limit.within(seen.lag_bytes, seen.lag, 1)
            } else {
                limit.within(seen.lag_bytes, seen.lag, 2)
            };
            if !ok {
                seen.standing = Standing::Lagging;
            }
            ok
        } else {
            false
        };
        let promoted = seen.standing == Standing::NotStandby;
        let before = std::mem::replace(&mut *s.seen.locked(), seen).standing;
        if promoted && before != Standing::NotStandby {
            s.leave();
        }
        s.in_rotation.store(now, Ordering::Release);
        if now && !was {
            tracing::info!(shard_host = %host, "standby joins the read rotation");
            self.joined.notify_waiters();
        } else if was && !now {
            let seen = s.seen();
            tracing::warn!(standby = %host, standing = seen.standing.as_str(), detail = %seen.detail, "standby leaves the read rotation");
        }
        now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(p: u16) -> HostPort {
        HostPort {
            host: "127.0.0.1".into(),
            port: p,
        }
    }

    fn good(lag_bytes: u64) -> Seen {
        Seen {
            standing: Standing::InRotation,
            lag_bytes: Some(lag_bytes),
            lag: Some(Duration::ZERO),
            ..Seen::default()
        }
    }

    #[test]
    fn the_least_busy_standby_is_chosen_and_ties_are_spread() {
        let r = Replicas::default();
        r.set_hosts(&[host(1), host(2), host(3)]);
        let limit = ReplicaLag {
            bytes: Some(1000),
            time: None,
        };
        assert!(r.pick(None).is_none(), "nothing checked yet");
        assert!(r.record(&host(1), good(0), &limit));
        assert!(r.record(&host(2), good(0), &limit));
        let seen = Seen {
            standing: Standing::NotStandby,
            ..Seen::default()
        };
        assert!(!r.record(&host(3), seen, &limit));
        let a = r.pick(None).unwrap();
        let b = r.pick(None).unwrap();
        assert_ne!(a.host(), b.host(), "the second goes to the idle one");
        let c = r.pick(Some(a.host())).unwrap();
        assert_eq!(c.host(), b.host(), "except the host just failed on");
        drop((a, b, c));
        // Equal load: both are picked, even by a caller picking three times a round
        // (the counter's period and the host count must not alias).
        let picked: std::collections::HashSet<_> = (0..30)
            .map(|_| {
                let _skip = (r.pick(None), r.pick(None));
                r.pick(None).unwrap().host().clone()
            })
            .collect();
        assert_eq!(picked.len(), 2);
        r.set_down(&host(1), "test");
        for _ in 0..4 {
            assert_eq!(r.pick(None).unwrap().host(), &host(2));
        }
        // Repointed by a switchover: a WAL receiver reconnecting keeps it in.
        let not_streaming = || Seen {
            standing: Standing::NotStreaming,
            lag_bytes: Some(0),
            lag: Some(Duration::ZERO),
            ..Seen::default()
        };
        let repointing = r.repointing(&host(2));
        assert!(r.record(&host(2), not_streaming(), &limit));
        drop(repointing);
        assert!(!r.record(&host(2), not_streaming(), &limit));
        assert!(r.record(&host(2), good(0), &limit));
        let withheld = r.withhold(&host(2));
        assert!(r.pick(None).is_none(), "the switchover's target is out");
        assert!(!r.record(&host(2), good(0), &limit), "and stays out");
        assert_eq!(r.all()[1].seen().standing, Standing::Withheld);
        drop(withheld);
        assert!(r.record(&host(2), good(0), &limit), "back once released");
    }

    #[test]
    fn a_lagging_standby_leaves_over_the_limit_and_returns_at_half_of_it() {
        let r = Replicas::default();
        r.set_hosts(&[host(1)]);
        let limit = ReplicaLag {
            bytes: Some(1000),
            time: Some(Duration::from_secs(10)),
        };
        assert!(
            !r.record(&host(1), good(900), &limit),
            "joins at half the limit"
        );
        assert!(r.record(&host(1), good(500), &limit));
        assert!(
            r.record(&host(1), good(1000), &limit),
            "stays up to the limit"
        );
        assert!(!r.record(&host(1), good(1001), &limit), "over the limit");
        assert_eq!(r.all()[0].seen().standing, Standing::Lagging);
        assert!(
            !r.record(&host(1), good(600), &limit),
            "not yet back to half"
        );
        assert!(r.record(&host(1), good(500), &limit), "back at half");
        let mut slow = good(0);
        slow.lag = Some(Duration::from_secs(11));
        assert!(
            !r.record(&host(1), slow, &limit),
            "the time limit counts too"
        );
    }

    #[tokio::test]
    async fn a_reader_waits_for_a_standby_to_join_within_its_limit() {
        let r = Arc::new(Replicas::default());
        r.set_hosts(&[host(1)]);
        let limit = ReplicaLag {
            bytes: Some(1000),
            time: None,
        };
        assert!(r.pick_within(Duration::from_millis(50)).await.is_none());
        let waiting = {
            let r = Arc::clone(&r);
            tokio::spawn(async move { r.pick_within(Duration::from_secs(10)).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        r.record(&host(1), good(0), &limit);
        let got = waiting.await.unwrap().expect("picked once it joined");
        assert_eq!(got.host(), &host(1));
    }
}
