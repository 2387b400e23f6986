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

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;

use crate::config::{HostPort, SwitchoverSettings};
use crate::shard::fence::{self, ConnectError, Fence, Session};
use crate::shard::Shard;
use crate::shutdown::{Phase, Signal};
use crate::Shared;

/// Metric names of the watchdog.
pub mod metric {
    /// 1 while a watched host was found accepting connections outside recovery (gauge,
    /// per `shard` and `host`).
    pub const SPLIT_BRAIN: &str = "handoff_split_brain";
    /// Hosts being watched (gauge, per shard).
    pub const WATCHED: &str = "handoff_watched_hosts";
    /// Fences applied, by `source` (`switchover`, `watchdog`) and `result` (counter).
    pub const FENCES: &str = "handoff_fences_total";
}

/// Why a host is watched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// The old primary of a switchover handoff ran; fenced by it.
    Switchover,
    /// A primary given up as failed, replaced by discovery or the admin API.
    Failed,
    /// A primary replaced through the admin API (an external orchestrator).
    Replaced,
    /// Found refusing connections (fenced) by a probe.
    FoundFenced,
    /// Found writable on a lower timeline than the shard's primary at startup.
    LowerTimeline,
}

impl Why {
    pub fn as_str(self) -> &'static str {
        match self {
            Why::Switchover => "switchover",
            Why::Failed => "failed",
            Why::Replaced => "replaced",
            Why::FoundFenced => "found_fenced",
            Why::LowerTimeline => "lower_timeline",
        }
    }
}

/// What the last look found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    NotYet,
    /// Its databases refuse connections (handoff's session, if any, still works).
    Fenced,
    /// No answer.
    Down,
    /// It answered and refused the admin role for another reason.
    Refused,
    /// Accepting connections outside recovery: split brain.
    Open,
}

impl Seen {
    pub fn as_str(self) -> &'static str {
        match self {
            Seen::NotYet => "not_checked_yet",
            Seen::Fenced => "fenced",
            Seen::Down => "down",
            Seen::Refused => "refused",
            Seen::Open => "accepting_connections",
        }
    }
}

/// One watched host, as the admin API shows it.
#[derive(Debug, Clone)]
pub struct View {
    pub host: HostPort,
    pub why: Why,
    /// The shard's epoch when the host was replaced.
    pub epoch: u64,
    pub since: SystemTime,
    pub seen: Seen,
    pub detail: String,
    /// Set once it was found accepting connections outside recovery; stays until it
    /// rejoins as a standby.
    pub split_brain: Option<String>,
    pub fence_lsn: Option<String>,
    /// Bytes of WAL the server wrote after the fence LSN (its own checkpoints and
    /// autovacuum write some; see docs/fence.md).
    pub wal_past_fence: Option<f64>,
    pub fenced_by_handoff: bool,
}

#[derive(Debug)]
struct Entry {
    view: View,
    fence: Option<Fence>,
}

/// The entries not being looked at right now, and what happened to the others meanwhile.
#[derive(Debug, Default)]
struct Inner {
    entries: Vec<Entry>,
    /// Hosts removed while a round had their entries out: dropped when the round ends.
    removed: Vec<HostPort>,
}

/// A shard's watched hosts. A round of the watchdog takes the entries out and puts them
/// back when done, so adding or removing a host never waits for a slow look; the view
/// (what the admin API shows, and what [`Watch::is_watched`] reads) always lists every
/// watched host.
#[derive(Debug, Default)]
pub struct Watch {
    inner: Mutex<Inner>,
    view: Mutex<Vec<View>>,
    /// Hosts whose entry holds a fence (the admin sessions a switchover kept).
    fenced: Mutex<Vec<HostPort>>,
    wake: Notify,
    /// The cluster's `system_identifier`, once known.
    system: Mutex<Option<String>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Watch {
    /// What the admin API shows.
    pub fn view(&self) -> Vec<View> {
        lock(&self.view).clone()
    }

    /// True while `host` is watched: it must not be routed to.
    pub fn is_watched(&self, host: &HostPort) -> bool {
        lock(&self.view).iter().any(|v| &v.host == host)
    }

    /// Records the cluster's `system_identifier` (from a switchover's pre-check).
    pub fn set_system(&self, id: &str) {
        *lock(&self.system) = Some(id.to_string());
    }

    fn system(&self) -> Option<String> {
        lock(&self.system).clone()
    }

    /// Starts watching `host` (replacing an older entry for it), with the fence a
    /// switchover left on it, if any. An entry that holds a fence is not replaced by
    /// one that holds none (an establishment right after the switchover that fenced it).
    pub(crate) fn add(
        &self,
        shard: &str,
        host: HostPort,
        why: Why,
        epoch: u64,
        fence: Option<Fence>,
    ) {
        let mut inner = lock(&self.inner);
        let mut fenced = lock(&self.fenced);
        if fence.is_none() && fenced.contains(&host) {
            return;
        }
        fenced.retain(|h| *h != host);
        if fence.is_some() {
            fenced.push(host.clone());
        }
        drop(fenced);
        let mut view = lock(&self.view);
        let old_alarm = view
            .iter()
            .find(|v| v.host == host)
            .and_then(|v| v.split_brain.clone());
        tracing::info!(shard, %host, why = why.as_str(), epoch, fenced = fence.is_some(), "watching the replaced primary for split brain");
        let entry = Entry {
            view: View {
                host: host.clone(),
                why,
                epoch,
                since: SystemTime::now(),
                seen: if fence.is_some() {
                    Seen::Fenced
                } else {
                    Seen::NotYet
                },
                detail: String::new(),
                split_brain: old_alarm,
                fence_lsn: fence.as_ref().and_then(|f| f.lsn.clone()),
                wal_past_fence: None,
                fenced_by_handoff: fence.is_some(),
            },
            fence,
        };
        // A round that has the old entry out drops it when it ends: the new one wins.
        inner.entries.retain(|e| e.view.host != host);
        inner.removed.retain(|h| *h != host);
        view.retain(|v| v.host != host);
        view.push(entry.view.clone());
        inner.entries.push(entry);
        publish_gauges(shard, &view);
        drop(view);
        drop(inner);
        self.wake.notify_one();
    }

    /// Stops watching `host` (it rejoined as a standby, or a switchover made it a
    /// target after checking it is one). Clears its alarm.
    pub(crate) fn remove(&self, shard: &str, host: &HostPort, why: &str) {
        let mut inner = lock(&self.inner);
        let mut view = lock(&self.view);
        if !view.iter().any(|v| &v.host == host) {
            return;
        }
        tracing::info!(shard, %host, why, "no longer watching the host");
        inner.entries.retain(|e| &e.view.host != host);
        inner.removed.push(host.clone());
        lock(&self.fenced).retain(|h| h != host);
        view.retain(|v| &v.host != host);
        metrics::gauge!(metric::SPLIT_BRAIN, "shard" => shard.to_string(), "host" => host.to_string())
            .set(0.0);
        publish_gauges(shard, &view);
    }

    /// Takes the entries out for a round.
    fn take(&self) -> Vec<Entry> {
        let mut inner = lock(&self.inner);
        inner.removed.clear();
        std::mem::take(&mut inner.entries)
    }

    /// Puts back what a round looked at (`gone`: hosts no longer watched), unless the
    /// host was removed or added again meanwhile.
    fn put_back(&self, shard: &str, looked: Vec<Entry>, gone: Vec<HostPort>) {
        let mut inner = lock(&self.inner);
        let mut view = lock(&self.view);
        for host in gone {
            if !inner.entries.iter().any(|e| e.view.host == host) {
                view.retain(|v| v.host != host);
                lock(&self.fenced).retain(|h| *h != host);
                metrics::gauge!(metric::SPLIT_BRAIN, "shard" => shard.to_string(), "host" => host.to_string())
                    .set(0.0);
            }
        }
        for e in looked {
            let host = e.view.host.clone();
            if inner.removed.contains(&host) || inner.entries.iter().any(|x| x.view.host == host) {
                continue;
            }
            match view.iter_mut().find(|v| v.host == host) {
                Some(v) => *v = e.view.clone(),
                None => view.push(e.view.clone()),
            }
            inner.entries.push(e);
        }
        inner.removed.clear();
        publish_gauges(shard, &view);
    }

    fn is_empty(&self) -> bool {
        lock(&self.inner).entries.is_empty()
    }
}

fn publish_gauges(shard: &str, views: &[View]) {
    metrics::gauge!(metric::WATCHED, "shard" => shard.to_string()).set(views.len() as f64);
    for v in views {
        metrics::gauge!(metric::SPLIT_BRAIN, "shard" => shard.to_string(), "host" => v.host.to_string())
            .set(if v.split_brain.is_some() { 1.0 } else { 0.0 });
    }
}

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
        session: Session,
        in_recovery: bool,
        timeline: u32,
        system: String,
    },
}

async fn look(cfg: &SwitchoverSettings, e: &mut Entry, timeout: Duration) -> Look {
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
    let mut databases = vec![cfg.database.clone()];
    if let Some(f) = &e.fence {
        databases.extend(f.databases.iter().filter(|d| **d != cfg.database).cloned());
    }
    let mut fenced = None;
    for db in databases {
        match Session::open(cfg, &e.view.host, &db, "handoff-watchdog", timeout).await {
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
                            timeline: crate::shard::health::timeline_of(wal.as_deref()),
                            system: row.get(2),
                            session,
                        }
                    }
                    Err(err) => Look::Refused(format!("{}: {err}", e.view.host)),
                };
            }
            Err(ConnectError::Fenced(m)) => fenced = Some(m),
            Err(ConnectError::Unreachable(m)) => return Look::Down(m),
            Err(ConnectError::Refused(m)) => return Look::Refused(m),
        }
    }
    Look::Fenced(fenced.unwrap_or_default())
}

/// The system identifier of the shard's serving primary (to make sure a host about to
/// be fenced belongs to the same cluster).
async fn cluster_system(shared: &Shared, shard: &Shard) -> Option<String> {
    if let Some(s) = shard.watch.system() {
        return Some(s);
    }
    let gen = shard.serving()?;
    let cfg = &shared.config.switchover;
    let s = Session::open(
        cfg,
        &gen.primary,
        &cfg.database,
        "handoff-watchdog",
        shared.config.health.timeout,
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
async fn refence(shared: &Shared, shard: &Shard, e: &mut Entry, session: Option<Session>) {
    let Ok(_op) = shard.op.try_lock() else {
        e.view.detail = "fence postponed: a switchover of the shard is running".into();
        return;
    };
    if shard.current().primary == e.view.host || !shard.watch.is_watched(&e.view.host) {
        return;
    }
    let cfg = &shared.config.switchover;
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
    let result = f.apply(cfg, opts).await;
    let label = if result.is_ok() { "ok" } else { "error" };
    metrics::counter!(metric::FENCES, "shard" => shard.name.clone(), "source" => "watchdog", "result" => label)
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
async fn check(shared: &Shared, shard: &Shard, e: &mut Entry) -> bool {
    let cfg = &shared.config.switchover;
    let timeout = shared.config.health.timeout;
    match look(cfg, e, timeout).await {
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
                refence(shared, shard, e, None).await;
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
            match cluster_system(shared, shard).await {
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
            refence(shared, shard, e, Some(session)).await;
        }
    }
    true
}

/// A shard's watchdog: looks at every watched host each interval. Ends at shutdown.
pub(crate) async fn run(shared: Arc<Shared>, shard: Arc<Shard>, shutdown: Signal) {
    let interval = shared.config.watchdog_interval;
    loop {
        let idle = shard.watch.is_empty();
        let wait = async {
            if idle {
                shard.watch.wake.notified().await
            } else {
                tokio::time::sleep(interval).await
            }
        };
        let mut s = shutdown.clone();
        tokio::select! {
            _ = wait => {}
            _ = s.reached(Phase::Draining) => return,
        }
        let batch = shard.watch.take();
        let mut keep = Vec::with_capacity(batch.len());
        let mut gone = Vec::new();
        for mut e in batch {
            if check(&shared, &shard, &mut e).await {
                keep.push(e);
            } else {
                gone.push(e.view.host.clone());
            }
        }
        shard.watch.put_back(&shard.name, keep, gone);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hp(port: u16) -> HostPort {
        HostPort {
            host: "127.0.0.1".into(),
            port,
        }
    }

    #[test]
    fn hosts_stay_watched_while_a_round_has_them_out() {
        let w = Watch::default();
        w.add("main", hp(1), Why::Failed, 1, None);
        w.add("main", hp(2), Why::Replaced, 2, None);
        let batch = w.take();
        assert_eq!(batch.len(), 2);
        // Out for a round, still watched: discovery must keep skipping them.
        assert!(w.is_watched(&hp(1)) && w.is_watched(&hp(2)));
        // Meanwhile host 1 rejoins (a switchover's pre-check saw it as a standby) and
        // host 3 is added.
        w.remove("main", &hp(1), "test");
        w.add("main", hp(3), Why::Failed, 3, None);
        assert!(!w.is_watched(&hp(1)));
        w.put_back("main", batch, Vec::new());
        assert!(
            !w.is_watched(&hp(1)),
            "a removed host came back with the round"
        );
        assert!(w.is_watched(&hp(2)) && w.is_watched(&hp(3)));
        // A host the round found gone (a standby now) is dropped.
        let batch = w.take();
        let (gone, keep): (Vec<Entry>, Vec<Entry>) =
            batch.into_iter().partition(|e| e.view.host == hp(2));
        w.put_back(
            "main",
            keep,
            gone.into_iter().map(|e| e.view.host).collect(),
        );
        assert!(!w.is_watched(&hp(2)));
        assert_eq!(
            w.view().iter().map(|v| v.host.port).collect::<Vec<_>>(),
            [3]
        );
    }

    #[test]
    fn a_host_added_again_during_a_round_keeps_the_new_entry() {
        let w = Watch::default();
        w.add("main", hp(1), Why::Failed, 1, None);
        let batch = w.take();
        w.add("main", hp(1), Why::Replaced, 5, None);
        w.put_back("main", batch, Vec::new());
        let v = w.view();
        assert_eq!(v.len(), 1);
        assert_eq!((v[0].why, v[0].epoch), (Why::Replaced, 5));
    }
}
