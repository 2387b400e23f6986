//! The hosts a shard watches for split brain (replaced primaries), as a data structure:
//! what the admin API shows and discovery consults. The watchdog task that looks at
//! them lives in `watchdog`.

use std::sync::Mutex;
use std::time::SystemTime;

use tokio::sync::Notify;

use crate::config::HostPort;
use crate::shard::fence::Fence;
use crate::sync::Locked;

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
pub(crate) struct Entry {
    pub(crate) view: View,
    pub(crate) fence: Option<Fence>,
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
    pub(crate) wake: Notify,
    /// The cluster's `system_identifier`, once known.
    system: Mutex<Option<String>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.locked()
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

    pub(crate) fn system(&self) -> Option<String> {
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
        metrics::gauge!(crate::metrics::SPLIT_BRAIN, "shard" => shard.to_string(), "host" => host.to_string())
            .set(0.0);
        publish_gauges(shard, &view);
    }

    /// Takes the entries out for a round.
    pub(crate) fn take(&self) -> Vec<Entry> {
        let mut inner = lock(&self.inner);
        inner.removed.clear();
        std::mem::take(&mut inner.entries)
    }

    /// Puts back what a round looked at (`gone`: hosts no longer watched), unless the
    /// host was removed or added again meanwhile.
    pub(crate) fn put_back(&self, shard: &str, looked: Vec<Entry>, gone: Vec<HostPort>) {
        let mut inner = lock(&self.inner);
        let mut view = lock(&self.view);
        for host in gone {
            if !inner.entries.iter().any(|e| e.view.host == host) {
                view.retain(|v| v.host != host);
                lock(&self.fenced).retain(|h| *h != host);
                metrics::gauge!(crate::metrics::SPLIT_BRAIN, "shard" => shard.to_string(), "host" => host.to_string())
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

    pub(crate) fn is_empty(&self) -> bool {
        lock(&self.inner).entries.is_empty()
    }
}

fn publish_gauges(shard: &str, views: &[View]) {
    metrics::gauge!(crate::metrics::WATCHED_HOSTS, "shard" => shard.to_string())
        .set(views.len() as f64);
    for v in views {
        metrics::gauge!(crate::metrics::SPLIT_BRAIN, "shard" => shard.to_string(), "host" => v.host.to_string())
            .set(if v.split_brain.is_some() { 1.0 } else { 0.0 });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testing::hp;

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
