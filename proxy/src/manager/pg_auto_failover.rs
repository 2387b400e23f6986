//! pg_auto_failover (`HANDOFF_PG_AUTO_FAILOVER`), through its monitor: a PostgreSQL
//! database whose `pgautofailover.node` table holds, for every node of a formation's
//! group, the state its keeper last reported and the goal state the monitor assigned.
//! Keepers act on their goal state; the monitor notifies every assignment on the
//! `state` channel.
//!
//! - **Who leads.** The node that reports, and is assigned, a read-write state
//!   (`single`, `wait_primary`, `primary`, `join_primary`, `apply_settings`). A new
//!   primary leads once it reports `wait_primary` or `primary`, not when it is merely
//!   assigned it.
//! - **A stop coming.** A node that still reports a read-write state but has been
//!   assigned another (`draining` in a switchover, `demoted`/`demote_timeout` when the
//!   monitor lost it, `prepare_maintenance`/`maintenance`): its keeper is about to stop
//!   PostgreSQL. That is [`View::stopping`], and handoff holds the shard when it is the
//!   primary it serves — before the keeper acts, which it does on its next loop.
//! - **Switchover.** `pgautofailover.perform_promotion(formation, node)` on the monitor
//!   (pg_auto_failover 2.0 has no `perform_switchover` function: `pg_autoctl perform
//!   switchover` calls `perform_failover(formation, group)`, which is what
//!   `perform_promotion` does once the named node is preferred). The monitor answers at
//!   once; the keepers then drain, stop and promote.
//!
//! handoff keeps two sessions on the monitor: one for reads and requests, one that only
//! `LISTEN`s to `state` (re-opened when lost, no more than once a second). A
//! notification only wakes the readers: the view is always read from the table.

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_postgres::{AsyncMessage, NoTls};

use super::{Fut, Intervals, Kind, Manager, ManagerError, Member, View};
use crate::config::{HostPort, PgAutoFailoverSettings, PgAutoFailoverShard};
use crate::sync::Locked;

/// The states in which a node takes writes.
const READ_WRITE: &[&str] = &[
    "single",
    "wait_primary",
    "primary",
    "join_primary",
    "apply_settings",
];

const NODES: &str = "SELECT nodename, nodehost, nodeport, reportedstate::text, goalstate::text, \
     reportedtli, health, candidatepriority, reportedpgisrunning \
     FROM pgautofailover.node WHERE formationid = $1 AND groupid = $2 ORDER BY nodeid";

/// The monitor of one shard's group.
pub struct Monitor {
    shard: String,
    config: tokio_postgres::Config,
    shown: String,
    formation: String,
    group: i32,
    timeout: Duration,
    intervals: Intervals,
    view: Mutex<Option<Arc<View>>>,
    /// Why the last read failed, if it did.
    error: Mutex<Option<String>>,
    /// The session for reads and requests.
    session: tokio::sync::Mutex<Option<tokio_postgres::Client>>,
    /// Notifications received (`seq`) and a wake-up for those waiting on one.
    events: Arc<Events>,
    /// The `seq` when the last view was read.
    read_at: AtomicU64,
    listener: Mutex<Listener>,
}

#[derive(Default)]
struct Events {
    seq: AtomicU64,
    wake: Notify,
}

#[derive(Default)]
struct Listener {
    task: Option<tokio::task::JoinHandle<()>>,
    /// Not re-opened before this, after one was lost.
    retry_at: Option<Instant>,
}

impl std::fmt::Debug for Monitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("pg_auto_failover::Monitor")
            .field("shard", &self.shard)
            .field("monitor", &self.shown)
            .field("formation", &self.formation)
            .field("group", &self.group)
            .finish()
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        if let Some(t) = self.listener.locked().task.take() {
            t.abort();
        }
    }
}

impl Monitor {
    pub fn new(shard: &PgAutoFailoverShard, settings: &PgAutoFailoverSettings) -> Self {
        let config = super::session_config(&shard.monitor, settings.timeout);
        Self {
            shard: shard.shard.clone(),
            config,
            shown: shard.shown.clone(),
            formation: shard.formation.clone(),
            group: shard.group,
            timeout: settings.timeout,
            intervals: Intervals {
                follow: settings.interval,
                held: settings.held_interval,
            },
            view: Mutex::new(None),
            error: Mutex::new(None),
            session: tokio::sync::Mutex::new(None),
            events: Arc::default(),
            read_at: AtomicU64::new(0),
            listener: Mutex::default(),
        }
    }

    /// Runs `work` on the session (opened if need be) within the timeout; a failed
    /// session is dropped, to be opened again next time.
    async fn on_session<T>(
        &self,
        timeout: Duration,
        work: impl for<'c> FnOnce(
            &'c tokio_postgres::Client,
        ) -> Fut<'c, Result<T, tokio_postgres::Error>>,
    ) -> Result<T, ManagerError> {
        let go = async {
            let mut session = self.session.lock().await;
            if session.as_ref().is_none_or(|c| c.is_closed()) {
                *session = Some(connect(&self.config).await.map_err(|e| self.error(e))?);
            }
            let client = session.as_ref().expect("opened above");
            let r = work(client).await;
            if r.is_err() {
                *session = None;
            }
            r.map_err(|e| self.error(e))
        };
        match tokio::time::timeout(timeout, go).await {
            Ok(r) => r,
            Err(_) => Err(ManagerError::Unreachable(format!(
                "the monitor {} did not answer within {timeout:?}",
                self.shown
            ))),
        }
    }

    fn error(&self, e: tokio_postgres::Error) -> ManagerError {
        match e.as_db_error() {
            Some(db) => ManagerError::Refused {
                code: db.code().code().to_string(),
                message: db.message().to_string(),
            },
            None => ManagerError::Unreachable(format!("the monitor {}: {e}", self.shown)),
        }
    }

    /// Starts the `LISTEN state` session unless it runs, or was lost less than a second
    /// ago.
    fn listen(&self) {
        let mut l = self.listener.locked();
        if l.task.as_ref().is_some_and(|t| !t.is_finished()) {
            return;
        }
        if l.task.take().is_some() && l.retry_at.is_none() {
            l.retry_at = Some(Instant::now() + Duration::from_secs(1));
        }
        if l.retry_at.is_some_and(|at| Instant::now() < at) {
            return;
        }
        l.retry_at = None;
        let (config, events, shard, shown) = (
            self.config.clone(),
            Arc::clone(&self.events),
            self.shard.clone(),
            self.shown.clone(),
        );
        l.task = Some(tokio::spawn(async move {
            match listen(&config, &events).await {
                Ok(()) => {
                    tracing::info!(%shard, monitor = %shown, "the pg_auto_failover monitor's LISTEN session ended")
                }
                Err(e) => {
                    tracing::debug!(%shard, monitor = %shown, error = %e, "no LISTEN session on the pg_auto_failover monitor")
                }
            }
        }));
    }
}

/// One row of `pgautofailover.node`.
#[derive(Debug, Clone)]
struct Node {
    name: String,
    addr: HostPort,
    reported: String,
    goal: String,
    timeline: i32,
    health: i32,
    priority: i32,
    running: Option<bool>,
}

impl Node {
    fn from_row(r: &tokio_postgres::Row) -> Result<Self, ManagerError> {
        let bad = |e: tokio_postgres::Error| ManagerError::Malformed(e.to_string());
        let name: String = r.try_get(0).map_err(bad)?;
        let port: i32 = r.try_get(2).map_err(bad)?;
        let port = u16::try_from(port)
            .map_err(|_| ManagerError::Malformed(format!("node {name}: port {port}")))?;
        Ok(Self {
            addr: HostPort {
                host: r.try_get(1).map_err(bad)?,
                port,
            },
            name,
            reported: r.try_get(3).map_err(bad)?,
            goal: r.try_get(4).map_err(bad)?,
            timeline: r.try_get(5).map_err(bad)?,
            health: r.try_get(6).map_err(bad)?,
            priority: r.try_get(7).map_err(bad)?,
            running: r.try_get(8).map_err(bad)?,
        })
    }

    fn member(&self) -> Member {
        let reports_rw = READ_WRITE.contains(&self.reported.as_str());
        let assigned_rw = READ_WRITE.contains(&self.goal.as_str());
        let role = if self.reported == self.goal {
            self.reported.clone()
        } else {
            format!("{} -> {}", self.reported, self.goal)
        };
        let leader = reports_rw && assigned_rw;
        let not_candidate = if leader {
            Some("is already the primary".to_string())
        } else if self.reported != "secondary" || self.goal != "secondary" {
            Some(format!("is {role}, not a secondary"))
        } else if self.priority == 0 {
            Some("has candidate priority 0: the monitor never promotes it".to_string())
        } else if self.health == 0 {
            Some("fails the monitor's health checks".to_string())
        } else {
            None
        };
        let state = match (self.running, self.health) {
            (Some(false), _) => "postgres stopped",
            (_, 1) => "healthy",
            (_, 0) => "unhealthy",
            _ => "health unknown",
        };
        Member {
            name: self.name.clone(),
            addr: self.addr.clone(),
            leader,
            role,
            state: state.to_string(),
            timeline: u32::try_from(self.timeline).ok(),
            not_candidate,
        }
    }

    /// It still takes writes, but its keeper was told to stop them.
    fn stopping(&self) -> bool {
        READ_WRITE.contains(&self.reported.as_str()) && !READ_WRITE.contains(&self.goal.as_str())
    }
}

/// A group's nodes as a [`View`].
fn view_of(formation: &str, group: i32, nodes: &[Node]) -> View {
    View {
        name: format!("{formation}/{group}"),
        members: nodes.iter().map(Node::member).collect(),
        paused: None,
        stopping: nodes.iter().find(|n| n.stopping()).map(|n| n.addr.clone()),
    }
}

impl Manager for Monitor {
    fn kind(&self) -> Kind {
        Kind::PgAutoFailover
    }

    fn endpoints(&self) -> Vec<String> {
        vec![format!(
            "{} (formation {}, group {})",
            self.shown, self.formation, self.group
        )]
    }

    fn intervals(&self) -> Intervals {
        self.intervals
    }

    fn view(&self) -> Fut<'_, Result<Arc<View>, ManagerError>> {
        Box::pin(async move {
            let at = self.events.seq.load(SeqCst);
            let (formation, group) = (self.formation.clone(), self.group);
            let rows = self
                .on_session(self.timeout, move |c| {
                    Box::pin(async move { c.query(NODES, &[&formation, &group]).await })
                })
                .await;
            let label = match &rows {
                Ok(_) => "ok",
                Err(ManagerError::Unreachable(_)) => "unreachable",
                Err(_) => "error",
            };
            super::count(Kind::PgAutoFailover, &self.shard, "view", label);
            let nodes = rows.and_then(|rows| {
                rows.iter()
                    .map(Node::from_row)
                    .collect::<Result<Vec<_>, _>>()
            });
            *self.error.locked() = nodes.as_ref().err().map(|e| e.to_string());
            let nodes = nodes?;
            let v = Arc::new(view_of(&self.formation, self.group, &nodes));
            *self.view.locked() = Some(Arc::clone(&v));
            self.read_at.fetch_max(at, SeqCst);
            Ok(v)
        })
    }

    fn last(&self) -> Option<Arc<View>> {
        self.view.locked().clone()
    }

    fn last_error(&self) -> Option<String> {
        self.error.locked().clone()
    }

    fn changed(&self, idle: Duration) -> Fut<'_, ()> {
        self.listen();
        Box::pin(async move {
            let woken = self.events.wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            // A notification since the last read: read again now.
            if self.events.seq.load(SeqCst) > self.read_at.load(SeqCst) {
                return;
            }
            tokio::select! {
                _ = woken => {}
                _ = tokio::time::sleep(idle) => {}
            }
        })
    }

    fn switchover<'a>(
        &'a self,
        _leader: &'a Member,
        candidate: &'a Member,
        timeout: Duration,
    ) -> Fut<'a, Result<String, ManagerError>> {
        Box::pin(async move {
            let (formation, node) = (self.formation.clone(), candidate.name.clone());
            let r = self
                .on_session(timeout, move |c| {
                    Box::pin(async move {
                        c.query_one(
                            "SELECT pgautofailover.perform_promotion($1, $2)",
                            &[&formation, &node],
                        )
                        .await
                        .and_then(|row| row.try_get::<_, bool>(0))
                    })
                })
                .await;
            let label = match &r {
                Ok(true) => "ok",
                Ok(false) | Err(ManagerError::Refused { .. }) => "refused",
                Err(ManagerError::Unreachable(_)) => "unreachable",
                Err(_) => "error",
            };
            super::count(Kind::PgAutoFailover, &self.shard, "switchover", label);
            match r? {
                true => Ok(format!(
                    "the monitor started the promotion of {}",
                    candidate.name
                )),
                false => Err(ManagerError::Refused {
                    code: "55000".into(),
                    message: format!("{} is already a primary", candidate.name),
                }),
            }
        })
    }
}

/// Opens a session on the monitor; its connection runs in its own task.
async fn connect(
    config: &tokio_postgres::Config,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// `LISTEN state` until the session is lost: every notification counts in `events`
/// and wakes its waiters. One wake-up once listening, for what changed before.
async fn listen(config: &tokio_postgres::Config, events: &Events) -> Result<(), String> {
    let (client, mut connection) = config.connect(NoTls).await.map_err(|e| e.to_string())?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let driver = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(_))) => {
                    if tx.send(()).is_err() {
                        return;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return,
            }
        }
    });
    let notice = |events: &Events| {
        events.seq.fetch_add(1, SeqCst);
        events.wake.notify_waiters();
    };
    if let Err(e) = client.batch_execute("LISTEN state").await {
        driver.abort();
        return Err(e.to_string());
    }
    notice(events);
    while rx.recv().await.is_some() {
        notice(events);
    }
    drop(client);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, port: u16, reported: &str, goal: &str) -> Node {
        Node {
            name: name.into(),
            addr: HostPort {
                host: "127.0.0.1".into(),
                port,
            },
            reported: reported.into(),
            goal: goal.into(),
            timeline: 1,
            health: 1,
            priority: 50,
            running: Some(true),
        }
    }

    #[test]
    fn the_leader_reports_and_is_assigned_a_read_write_state_and_a_stop_is_seen_first() {
        let steady = view_of(
            "default",
            0,
            &[
                node("a", 1, "primary", "primary"),
                node("b", 2, "secondary", "secondary"),
            ],
        );
        assert_eq!(steady.name, "default/0");
        assert_eq!(steady.leader().unwrap().name, "a");
        assert_eq!(steady.stopping, None);
        assert_eq!(steady.member("b").unwrap().not_candidate, None);
        // A switchover: the primary is told to drain, the standby to get ready. Nobody
        // leads; the primary's stop is what handoff holds for.
        let draining = view_of(
            "default",
            0,
            &[
                node("a", 1, "primary", "draining"),
                node("b", 2, "secondary", "prepare_promotion"),
            ],
        );
        assert!(draining.leader().is_none());
        assert_eq!(draining.stopping.as_ref().unwrap().port, 1);
        assert_eq!(draining.members[0].role, "primary -> draining");
        // Assigned wait_primary is not enough: it leads once it reports it.
        let promoting = view_of(
            "default",
            0,
            &[
                node("a", 1, "demoted", "demoted"),
                node("b", 2, "stop_replication", "wait_primary"),
            ],
        );
        assert!(promoting.leader().is_none());
        assert_eq!(
            promoting.stopping, None,
            "a stopped primary is no longer stopping"
        );
        let promoted = view_of(
            "default",
            0,
            &[
                node("a", 1, "demoted", "catchingup"),
                node("b", 2, "wait_primary", "wait_primary"),
            ],
        );
        assert_eq!(promoted.leader().unwrap().name, "b");
        for goal in [
            "demoted",
            "demote_timeout",
            "prepare_maintenance",
            "maintenance",
        ] {
            let v = view_of("f", 1, &[node("a", 1, "primary", goal)]);
            assert_eq!(v.stopping.as_ref().map(|a| a.port), Some(1), "{goal}");
        }
        let mut low = node("c", 3, "secondary", "secondary");
        low.priority = 0;
        assert!(low.member().not_candidate.unwrap().contains("priority 0"));
        let catching = node("d", 4, "catchingup", "secondary").member();
        assert_eq!(
            catching.not_candidate.as_deref(),
            Some("is catchingup -> secondary, not a secondary")
        );
    }
}
