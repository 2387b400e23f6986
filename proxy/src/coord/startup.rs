//! A shard's state at startup: the cluster's record when there is one and its host
//! checks out, else this proxy's own discovery (published to the cluster afterwards).

use crate::backend::admin::AdminDb;
use crate::config::{HealthSettings, HostPort, ShardConfig};
use crate::coord::Connected;
use crate::shard::failure::Discovered;
use crate::shard::health::{self, NoPrimary, Probe};
use crate::shard::watch::Why;
use crate::shard::Shard;

/// A shard as startup found it.
#[derive(Debug)]
pub(crate) struct Start {
    pub shard: Shard,
    /// Other hosts for the split-brain watchdog.
    pub watch: Vec<(HostPort, Why)>,
    /// No primary now: why (the shard starts buffering, discovery goes on).
    pub missing: Option<NoPrimary>,
}

/// The shard's initial primary: the cluster's record (with coordination) if its host is
/// writable on the recorded timeline or later, else the writable configured host on
/// the highest timeline.
pub(crate) async fn initial_shard(
    connected: Option<&Connected>,
    admin: &AdminDb,
    health_settings: &HealthSettings,
    manager: Option<&dyn crate::manager::Manager>,
    cfg: &ShardConfig,
) -> Start {
    let recorded = match connected {
        Some(c) => match c.recorded(&cfg.name).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(shard = %cfg.name, error = %e, "etcd did not answer at startup: starting from this proxy's own discovery; the cluster's record is taken when etcd answers");
                None
            }
        },
        None => None,
    };
    if let Some(rec) = &recorded {
        match health::probe(admin, &rec.primary, health_settings.timeout).await {
            Probe::Primary { timeline } if timeline >= rec.timeline => {
                tracing::info!(shard = %cfg.name, primary = %rec.primary, epoch = rec.epoch, timeline, "initial primary from the cluster's record");
                let shard = Shard::with_primary_at(
                    &cfg.name,
                    cfg.hosts.clone(),
                    rec.primary.clone(),
                    rec.epoch,
                );
                shard.health.saw_timeline(timeline);
                return Start {
                    shard,
                    watch: Vec::new(),
                    missing: None,
                };
            }
            other => {
                tracing::warn!(shard = %cfg.name, primary = %rec.primary, epoch = rec.epoch, found = ?other, "the cluster's recorded primary does not check out: discovering");
            }
        }
    }
    let base = recorded.as_ref().map_or(0, |r| r.epoch);
    let mut cfg = cfg.clone();
    if let Some(manager) = manager {
        let title = manager.kind().title();
        match from_manager(manager, admin, health_settings, &mut cfg, base).await {
            Ok(start) => return start,
            Err(e) if cfg.hosts.is_empty() => {
                tracing::warn!(shard = %cfg.name, manager = title, error = %e, "the HA manager did not answer at startup and HANDOFF_SHARDS lists no hosts: buffering until it names a writable leader");
                return Start {
                    shard: Shard::with_primary_at(&cfg.name, Vec::new(), unknown(), base.max(1)),
                    watch: Vec::new(),
                    missing: Some(NoPrimary(vec![format!("{title}: {e}")])),
                };
            }
            Err(e) => {
                tracing::warn!(shard = %cfg.name, manager = title, error = %e, "the HA manager did not answer at startup: probing the hosts of HANDOFF_SHARDS; the manager is followed once it answers");
            }
        }
    }
    let cfg = &cfg;
    match health::initial_primary(admin, health_settings, &cfg.hosts).await {
        Ok(found) => {
            tracing::info!(shard = %cfg.name, primary = %found.primary, timeline = found.timeline, "initial primary");
            let epoch = base + 1;
            let shard =
                Shard::with_primary_at(&cfg.name, cfg.hosts.clone(), found.primary.clone(), epoch);
            shard.health.saw_timeline(found.timeline);
            if connected.is_some() {
                // Published by the follower once etcd answers (compare-and-set).
                shard.health.discovered.send_replace(Some(Discovered {
                    primary: found.primary,
                    epoch,
                    timeline: found.timeline,
                }));
            }
            Start {
                shard,
                watch: found.watch,
                missing: None,
            }
        }
        Err(why) => Start {
            shard: Shard::with_primary_at(
                &cfg.name,
                cfg.hosts.clone(),
                cfg.hosts[0].clone(),
                base.max(1),
            ),
            watch: Vec::new(),
            missing: Some(why),
        },
    }
}

/// The address a managed shard serves before its manager named any member: never
/// connected to (the shard starts held).
fn unknown() -> HostPort {
    HostPort {
        host: "unknown".into(),
        port: 1,
    }
}

/// A managed shard at startup: its hosts are the configured ones and the manager's
/// members; its primary is the manager's leader once handoff's probe confirms it.
/// `Err`: the manager did not answer (`cfg` is left as configured).
async fn from_manager(
    manager: &dyn crate::manager::Manager,
    admin: &AdminDb,
    health_settings: &HealthSettings,
    cfg: &mut ShardConfig,
    base: u64,
) -> Result<Start, String> {
    let title = manager.kind().title();
    let (cluster, found) = crate::shard::managed::initial(manager, admin, health_settings.timeout)
        .await
        .map_err(|e| e.to_string())?;
    for m in &cluster.members {
        if !cfg.hosts.contains(&m.addr) {
            cfg.hosts.push(m.addr.clone());
        }
    }
    let epoch = base + 1;
    let Some((primary, timeline)) = found else {
        let leader = cluster.leader().map(|l| l.addr.clone());
        let placeholder = leader
            .clone()
            .or_else(|| cfg.hosts.first().cloned())
            .unwrap_or_else(unknown);
        let why = match leader {
            Some(l) => format!("{title}'s leader {l} is not writable yet"),
            None => format!("{title} cluster \"{}\" has no leader", cluster.name),
        };
        return Ok(Start {
            shard: Shard::with_primary_at(&cfg.name, cfg.hosts.clone(), placeholder, base.max(1)),
            watch: Vec::new(),
            missing: Some(NoPrimary(vec![why])),
        });
    };
    tracing::info!(shard = %cfg.name, %primary, timeline, members = cluster.members.len(), "initial primary: the HA manager's leader, confirmed writable");
    let shard = Shard::with_primary_at(&cfg.name, cfg.hosts.clone(), primary, epoch);
    shard.health.saw_timeline(timeline);
    Ok(Start {
        shard,
        watch: Vec::new(),
        missing: None,
    })
}
