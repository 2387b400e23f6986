//! `HANDOFF_PATRONI*`: which shards Patroni manages, and how closely handoff follows it.

use std::time::Duration;

use super::variable::{Applies, Topic, Variable};
use super::{invalid, ConfigError, HostPort, ShardConfig, Vars};

/// The Patroni variables.
pub(super) const VARIABLES: &[Variable] = &[
    Variable {
        name: "HANDOFF_PATRONI",
        topic: Topic::Patroni,
        default: "(unset: no shard is managed by Patroni)",
        applies: Applies::Takeover,
        help: "`shard=http://host:port[,http://host:port...][;shard=...]`: the Patroni REST API of a shard's members; Patroni then names the primary (confirmed by handoff's probe) and runs promotions",
    },
    Variable {
        name: "HANDOFF_PATRONI_INTERVAL",
        topic: Topic::Patroni,
        default: "1s",
        applies: Applies::Takeover,
        help: "how often handoff reads Patroni's `GET /cluster` while a shard serves",
    },
    Variable {
        name: "HANDOFF_PATRONI_HELD_INTERVAL",
        topic: Topic::Patroni,
        default: "50ms",
        applies: Applies::Takeover,
        help: "how often handoff reads `GET /cluster` and probes Patroni's leader while a shard is held",
    },
    Variable {
        name: "HANDOFF_PATRONI_TIMEOUT",
        topic: Topic::Patroni,
        default: "2s",
        applies: Applies::Takeover,
        help: "longest one read of Patroni's REST API may take",
    },
    Variable {
        name: "HANDOFF_PATRONI_HOOK",
        topic: Topic::Patroni,
        default: "false",
        applies: Applies::Takeover,
        help: "`true` when every Patroni member's `before_stop` runs `handoff hold` against this proxy: a switchover through handoff then holds when Patroni calls the hook (right before it stops the leader) instead of before asking Patroni; ignored with `HANDOFF_ETCD_ENDPOINTS`",
    },
];

/// The shards whose primary Patroni decides.
#[derive(Debug, Clone, Default)]
pub struct PatroniSettings {
    pub shards: Vec<PatroniShard>,
    /// `GET /cluster` period while a shard serves.
    pub interval: Duration,
    /// `GET /cluster` period (and leader check) while a shard is held.
    pub held_interval: Duration,
    /// Longest one REST read may take.
    pub timeout: Duration,
    /// Every member's `before_stop` runs `handoff hold` against this proxy: a
    /// switchover through handoff holds when the hook calls, not before asking Patroni.
    pub hook: bool,
}

/// One shard's Patroni REST endpoints (plain HTTP, `host:port`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatroniShard {
    pub shard: String,
    pub endpoints: Vec<HostPort>,
}

impl PatroniSettings {
    /// The endpoints of `shard`, if Patroni manages it.
    pub fn shard(&self, name: &str) -> Option<&PatroniShard> {
        self.shards.iter().find(|s| s.shard == name)
    }
}

const VAR: &str = "HANDOFF_PATRONI";

/// Parses `HANDOFF_PATRONI` against the configured shards: every named shard exists.
pub(super) fn parse(vars: &Vars, shards: &[ShardConfig]) -> Result<PatroniSettings, ConfigError> {
    let mut out = PatroniSettings {
        shards: Vec::new(),
        interval: vars.at_least_1ms("HANDOFF_PATRONI_INTERVAL")?,
        held_interval: vars.at_least_1ms("HANDOFF_PATRONI_HELD_INTERVAL")?,
        timeout: vars.at_least_1ms("HANDOFF_PATRONI_TIMEOUT")?,
        hook: vars.flag("HANDOFF_PATRONI_HOOK")?,
    };
    for (name, list) in super::shard_entries(
        VAR,
        vars.get(VAR).unwrap_or_default(),
        shards,
        "shard=http://host:port[,http://host:port]",
        str::to_string,
    )? {
        let mut endpoints = Vec::new();
        for url in list.split(',').map(str::trim).filter(|u| !u.is_empty()) {
            if url.starts_with("https://") {
                return Err(invalid(
                    VAR,
                    format!("'{url}': only http:// Patroni endpoints are supported"),
                ));
            }
            let rest = url
                .strip_prefix("http://")
                .ok_or_else(|| invalid(VAR, format!("'{url}' must start with http://")))?;
            let rest = rest.trim_end_matches('/');
            if rest.contains('/') {
                return Err(invalid(
                    VAR,
                    format!("'{url}' must be http://host:port, without a path"),
                ));
            }
            endpoints.push(HostPort::parse(VAR, rest)?);
        }
        if endpoints.is_empty() {
            return Err(invalid(VAR, format!("shard '{name}' has no endpoint")));
        }
        out.shards.push(PatroniShard {
            shard: name.to_string(),
            endpoints,
        });
    }
    Ok(out)
}
