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
