//! repmgr (`HANDOFF_REPMGR`), through its metadata: every node of a repmgr cluster
//! holds the `repmgr.nodes` table (node id, name, `type` primary/standby/witness,
//! `active`, `conninfo`, `priority`), written on the primary and replicated.
//!
//! - **Who leads.** handoff asks every node it knows (the configured ones and every
//!   `conninfo` the table lists) whether it is in recovery and what its table says; the
//!   table of a node out of recovery wins (a standby's may lag behind a promotion). The
//!   leader is the active node of type `primary` in it.
//! - **A stop coming.** repmgr stops the primary with its `service_stop_command`; set
//!   to handoff's `pg_ctl` (`deploy/pg_ctl`), it runs `handoff hold` first. Nothing in
//!   the table says so beforehand.
//! - **Switchover.** `repmgr standby switchover` must run on the node to promote (it
//!   drives the old primary over SSH): handoff runs `HANDOFF_REPMGR_SWITCHOVER_COMMAND`
//!   with the candidate's placeholders filled in, and takes exit status 0 as done.
//! - **News.** repmgr's `event_notification_command` may run `handoff recheck`, which
//!   makes handoff read the nodes at once instead of at its next interval.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_postgres::NoTls;

use super::{Fut, Intervals, Kind, Manager, ManagerError, Member, View};
use crate::config::{HostPort, RepmgrSettings, RepmgrShard};
use crate::sync::Locked;

const NODES: &str = "SELECT node_id, node_name, type, active, conninfo, priority \
     FROM repmgr.nodes ORDER BY node_id";

/// One repmgr cluster.
pub struct Repmgr {
    shard: String,
    /// How to log in (user, database, password); the host and port vary.
    login: tokio_postgres::Config,
    /// The nodes configured, asked first.
    seeds: Vec<HostPort>,
    switchover_command: Option<String>,
    hook: bool,
    timeout: Duration,
    intervals: Intervals,
    view: Mutex<Option<Arc<View>>>,
    error: Mutex<Option<String>>,
    /// `handoff recheck` calls received, and a wake-up for those waiting.
    pokes: AtomicU64,
    read_at: AtomicU64,
    wake: Notify,
}

impl std::fmt::Debug for Repmgr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("repmgr::Repmgr")
            .field("shard", &self.shard)
            .field("seeds", &self.seeds)
            .finish()
    }
}

/// One row of `repmgr.nodes`.
#[derive(Debug, Clone)]
struct Node {
    id: i32,
    name: String,
    kind: String,
    active: bool,
    addr: Option<HostPort>,
    priority: i32,
}

impl Repmgr {
    pub fn new(shard: &RepmgrShard, settings: &RepmgrSettings) -> Self {
        let login = super::session_config(&shard.login, settings.timeout);
        Self {
            shard: shard.shard.clone(),
            login,
            seeds: shard.nodes.clone(),
            switchover_command: settings.switchover_command.clone(),
            hook: settings.hook,
            timeout: settings.timeout,
            intervals: Intervals {
                follow: settings.interval,
                held: settings.held_interval,
            },
            view: Mutex::new(None),
            error: Mutex::new(None),
            pokes: AtomicU64::new(0),
            read_at: AtomicU64::new(0),
            wake: Notify::new(),
        }
    }

    /// Every node to ask: the configured ones, then those the last view listed.
    fn candidates(&self) -> Vec<HostPort> {
        let mut all = self.seeds.clone();
        if let Some(v) = self.view.locked().as_ref() {
            for m in &v.members {
                if !all.contains(&m.addr) {
                    all.push(m.addr.clone());
                }
            }
        }
        all
    }

    /// Whether `addr` is in recovery, and its `repmgr.nodes`.
    async fn ask(&self, addr: &HostPort) -> Result<(bool, Vec<Node>), String> {
        let mut config = self.login.clone();
        config.host(&addr.host).port(addr.port);
        let work = async {
            let (client, conn) = config.connect(NoTls).await.map_err(|e| e.to_string())?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            let recovery: bool = client
                .query_one("SELECT pg_is_in_recovery()", &[])
                .await
                .and_then(|r| r.try_get(0))
                .map_err(|e| e.to_string())?;
            let rows = client.query(NODES, &[]).await.map_err(|e| e.to_string())?;
            let nodes = rows
                .iter()
                .map(|r| -> Result<Node, tokio_postgres::Error> {
                    let conninfo: String = r.try_get(4)?;
                    Ok(Node {
                        id: r.try_get(0)?,
                        name: r.try_get(1)?,
                        kind: r.try_get(2)?,
                        active: r.try_get(3)?,
                        addr: addr_of(&conninfo),
                        priority: r.try_get(5)?,
                    })
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| e.to_string())?;
            Ok((recovery, nodes))
        };
        match tokio::time::timeout(self.timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {:?}", self.timeout)),
        }
    }
}

/// `host=… port=…` (a repmgr `conninfo`) → its first `host:port`.
fn addr_of(conninfo: &str) -> Option<HostPort> {
    let c: tokio_postgres::Config = conninfo.parse().ok()?;
    let host = match c.get_hosts().first()? {
        tokio_postgres::config::Host::Tcp(h) => h.clone(),
        #[cfg(unix)]
        tokio_postgres::config::Host::Unix(_) => return None,
    };
    let port = c.get_ports().first().copied().unwrap_or(5432);
    Some(HostPort { host, port })
}

/// A table's nodes as a [`View`]; `from_primary`: read on a node out of recovery.
fn view_of(shard: &str, nodes: &[Node], from_primary: bool) -> View {
    let members = nodes
        .iter()
        .filter_map(|n| {
            let addr = n.addr.clone()?;
            let leader = n.kind == "primary" && n.active;
            let not_candidate = if leader {
                Some("is already the primary".to_string())
            } else if n.kind != "standby" {
                Some(format!("is a {}, not a standby", n.kind))
            } else if !n.active {
                Some("is inactive in repmgr.nodes".to_string())
            } else if n.priority == 0 {
                Some("has priority 0: repmgr never promotes it".to_string())
            } else {
                None
            };
            Some(Member {
                name: n.name.clone(),
                addr,
                leader,
                role: n.kind.clone(),
                state: format!("node {}{}", n.id, if n.active { "" } else { ", inactive" }),
                timeline: None,
                not_candidate,
            })
        })
        .collect();
    View {
        name: if from_primary {
            shard.to_string()
        } else {
            format!("{shard} (read on a standby)")
        },
        members,
        paused: None,
        stopping: None,
    }
}

/// `addr`, the one node found out of recovery, leads even where repmgr's table still
/// names another primary, when that one is not out of recovery: repmgr promoted `addr`
/// and writes its record later (`repmgr standby switchover` does once the old primary
/// has rejoined, about a second after the promotion). handoff serves it only once its
/// own probe finds it writable on the highest timeline seen.
fn promoted(v: &mut View, addr: &HostPort) {
    let Some(i) = v.members.iter().position(|m| &m.addr == addr) else {
        return;
    };
    if v.members[i].leader || v.members[i].role != "standby" {
        return;
    }
    for m in &mut v.members {
        if m.leader {
            m.leader = false;
            m.not_candidate = Some("is no longer out of recovery".into());
        }
    }
    let m = &mut v.members[i];
    m.leader = true;
    m.role = "standby (promoted; repmgr.nodes not updated yet)".into();
    m.not_candidate = Some("is already the primary".into());
}

impl Manager for Repmgr {
    fn kind(&self) -> Kind {
        Kind::Repmgr
    }

    fn endpoints(&self) -> Vec<String> {
        self.candidates().iter().map(|a| a.to_string()).collect()
    }

    fn intervals(&self) -> Intervals {
        self.intervals
    }

    fn view(&self) -> Fut<'_, Result<Arc<View>, ManagerError>> {
        Box::pin(async move {
            let at = self.pokes.load(SeqCst);
            let nodes = self.candidates();
            let answers =
                futures_join(nodes.iter().map(|a| async move { (a, self.ask(a).await) })).await;
            let mut errors = Vec::new();
            let mut best: Option<(bool, Vec<Node>)> = None;
            let mut out_of_recovery = Vec::new();
            for (addr, answer) in answers {
                match answer {
                    Ok((recovery, table)) => {
                        if !recovery {
                            out_of_recovery.push(addr.clone());
                        }
                        let better = match &best {
                            None => true,
                            Some((best_recovery, _)) => *best_recovery && !recovery,
                        };
                        if better {
                            best = Some((recovery, table));
                        }
                    }
                    Err(e) => errors.push(format!("{addr}: {e}")),
                }
            }
            let result = match best {
                Some((recovery, table)) => {
                    let mut v = view_of(&self.shard, &table, !recovery);
                    if let [only] = out_of_recovery.as_slice() {
                        promoted(&mut v, only);
                    }
                    Ok(Arc::new(v))
                }
                None => Err(ManagerError::Unreachable(format!(
                    "no repmgr node answered ({})",
                    errors.join("; ")
                ))),
            };
            let label = if result.is_ok() { "ok" } else { "unreachable" };
            super::count(Kind::Repmgr, &self.shard, "view", label);
            match &result {
                Ok(v) => {
                    *self.view.locked() = Some(Arc::clone(v));
                    *self.error.locked() = None;
                    self.read_at.fetch_max(at, SeqCst);
                }
                Err(e) => *self.error.locked() = Some(e.to_string()),
            }
            result
        })
    }

    fn last(&self) -> Option<Arc<View>> {
        self.view.locked().clone()
    }

    fn last_error(&self) -> Option<String> {
        self.error.locked().clone()
    }

    fn changed(&self, idle: Duration) -> Fut<'_, ()> {
        Box::pin(async move {
            let woken = self.wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            if self.pokes.load(SeqCst) > self.read_at.load(SeqCst) {
                return;
            }
            tokio::select! {
                _ = woken => {}
                _ = tokio::time::sleep(idle) => {}
            }
        })
    }

    fn hold_hook(&self) -> bool {
        self.hook
    }

    fn poke(&self) {
        self.pokes.fetch_add(1, SeqCst);
        self.wake.notify_waiters();
    }

    fn switchover<'a>(
        &'a self,
        _leader: &'a Member,
        candidate: &'a Member,
        timeout: Duration,
    ) -> Fut<'a, Result<String, ManagerError>> {
        Box::pin(async move {
            let Some(template) = &self.switchover_command else {
                super::count(Kind::Repmgr, &self.shard, "switchover", "refused");
                return Err(ManagerError::Refused {
                    code: "not configured".into(),
                    message: "HANDOFF_REPMGR_SWITCHOVER_COMMAND is not set: handoff cannot run `repmgr standby switchover` on the candidate".into(),
                });
            };
            let id = candidate
                .state
                .strip_prefix("node ")
                .and_then(|s| s.split(',').next())
                .unwrap_or("");
            let command = template
                .replace("%n", &candidate.name)
                .replace("%i", id)
                .replace("%h", &candidate.addr.host)
                .replace("%p", &candidate.addr.port.to_string());
            let run = tokio::process::Command::new("sh")
                .arg("-c")
                .arg(&command)
                .stdin(std::process::Stdio::null())
                .kill_on_drop(true)
                .output();
            let r = match tokio::time::timeout(timeout, run).await {
                Err(_) => Err(ManagerError::Unreachable(format!(
                    "`{command}` did not end within {timeout:?}"
                ))),
                Ok(Err(e)) => Err(ManagerError::Unreachable(format!("`{command}`: {e}"))),
                Ok(Ok(out)) if out.status.success() => Ok(tail(&out.stdout)),
                Ok(Ok(out)) => Err(ManagerError::Refused {
                    code: out
                        .status
                        .code()
                        .map_or("signal".to_string(), |c| format!("exit {c}")),
                    message: format!("{} {}", tail(&out.stdout), tail(&out.stderr)),
                }),
            };
            let label = match &r {
                Ok(_) => "ok",
                Err(ManagerError::Refused { .. }) => "refused",
                Err(_) => "unreachable",
            };
            super::count(Kind::Repmgr, &self.shard, "switchover", label);
            r
        })
    }
}

/// The last lines of a command's output, for a message.
fn tail(out: &[u8]) -> String {
    let s = String::from_utf8_lossy(out);
    let lines: Vec<&str> = s.lines().rev().take(3).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join(" / ")
}

/// Runs the futures together and gives their outputs in order.
async fn futures_join<F: std::future::Future>(fs: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut pinned: Vec<Pin<Box<F>>> = fs.map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = pinned.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in pinned.iter_mut().enumerate() {
            if out[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => out[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter()
        .map(|o| o.expect("every future ended"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn without_a_switchover_command_a_switchover_is_refused_naming_the_variable() {
        let config = crate::config::Config::from_vars([
            ("HANDOFF_SHARDS", "main"),
            (
                "HANDOFF_REPMGR",
                "main=postgres://postgres@127.0.0.1:1/postgres",
            ),
        ])
        .unwrap();
        let r = Repmgr::new(&config.repmgr.shards[0], &config.repmgr);
        let m = Member {
            name: "node2".into(),
            addr: HostPort {
                host: "127.0.0.1".into(),
                port: 2,
            },
            leader: false,
            role: "standby".into(),
            state: "node 2".into(),
            timeline: None,
            not_candidate: None,
        };
        let e = r
            .switchover(&m, &m, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains("HANDOFF_REPMGR_SWITCHOVER_COMMAND"),
            "{e}"
        );
    }

    #[test]
    fn the_active_primary_leads_and_standbys_say_why_they_could_not_be_promoted() {
        let node = |id: i32, kind: &str, active: bool, priority: i32| Node {
            id,
            name: format!("node{id}"),
            kind: kind.into(),
            active,
            addr: addr_of(&format!("host=127.0.0.1 port={} user=postgres", 5000 + id)),
            priority,
        };
        let v = view_of(
            "main",
            &[
                node(1, "primary", true, 100),
                node(2, "standby", true, 100),
                node(3, "standby", true, 0),
                node(4, "witness", true, 100),
                node(5, "standby", false, 100),
            ],
            true,
        );
        assert_eq!(v.leader().unwrap().name, "node1");
        assert_eq!(v.leader().unwrap().addr.port, 5001);
        assert_eq!(v.member("node2").unwrap().not_candidate, None);
        assert!(v
            .member("node3")
            .unwrap()
            .not_candidate
            .as_deref()
            .unwrap()
            .contains("priority 0"));
        assert!(v
            .member("node4")
            .unwrap()
            .not_candidate
            .as_deref()
            .unwrap()
            .contains("witness"));
        assert!(v
            .member("node5")
            .unwrap()
            .not_candidate
            .as_deref()
            .unwrap()
            .contains("inactive"));
        // node2 promoted, repmgr's table not updated yet: node2 leads.
        let mut moving = view_of(
            "main",
            &[node(1, "primary", true, 100), node(2, "standby", true, 100)],
            true,
        );
        promoted(
            &mut moving,
            &HostPort {
                host: "127.0.0.1".into(),
                port: 5002,
            },
        );
        assert_eq!(moving.leader().unwrap().name, "node2");
        assert_eq!(moving.members.iter().filter(|m| m.leader).count(), 1);
        // The table's primary is the one out of recovery: nothing changes.
        let mut steady = view_of(
            "main",
            &[node(1, "primary", true, 100), node(2, "standby", true, 100)],
            true,
        );
        promoted(
            &mut steady,
            &HostPort {
                host: "127.0.0.1".into(),
                port: 5001,
            },
        );
        assert_eq!(steady.leader().unwrap().name, "node1");
        let old = view_of("main", &[node(1, "primary", false, 100)], false);
        assert!(old.leader().is_none(), "an inactive primary does not lead");
        assert!(old.name.contains("standby"));
        assert_eq!(
            addr_of("port=6000 host=db1 dbname=x").unwrap().to_string(),
            "db1:6000"
        );
        assert!(addr_of("not a conninfo '").is_none());
    }
}
