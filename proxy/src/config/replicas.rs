//! Reads on standbys (`appdb@replica`, `appdb@any`): which standbys may serve them and
//! their pools.

use std::time::Duration;

use super::values::{parse_duration, parse_size, Vars};
use super::variable::{Applies, Topic, Variable};
use super::{invalid, ConfigError};

pub(super) const VARIABLES: &[Variable] = &[
    Variable {
        name: "HANDOFF_REPLICA_MAX_LAG",
        topic: Topic::Replicas,
        default: "16MB,10s",
        applies: Applies::Takeover,
        help: "how far a standby's replay may be behind the primary and still serve reads: a size (`16MB`), a time (`10s`), or both comma separated; one over it leaves the read rotation and returns at half of it",
    },
    Variable {
        name: "HANDOFF_REPLICA_CHECK_INTERVAL",
        topic: Topic::Replicas,
        default: "1s",
        applies: Applies::Takeover,
        help: "how often each standby's role, upstream and lag are checked",
    },
    Variable {
        name: "HANDOFF_REPLICA_POOL_SIZE",
        topic: Topic::Replicas,
        default: "(HANDOFF_POOL_SIZE)",
        applies: Applies::Takeover,
        help: "most server connections per read pool; a read pool is one (user, server database, standby)",
    },
];

/// How far behind a standby may be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaLag {
    pub bytes: Option<u64>,
    pub time: Option<Duration>,
}

impl ReplicaLag {
    /// True if a lag of `bytes` and `time` is within the limit divided by `divisor`
    /// (1 to stay in the rotation, 2 to join it). An unknown measure is within.
    pub fn within(&self, bytes: Option<u64>, time: Option<Duration>, divisor: u32) -> bool {
        let bytes_ok = match (self.bytes, bytes) {
            (Some(max), Some(b)) => b <= max / u64::from(divisor),
            _ => true,
        };
        let time_ok = match (self.time, time) {
            (Some(max), Some(t)) => t <= max / divisor,
            _ => true,
        };
        bytes_ok && time_ok
    }
}

/// The replica settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaSettings {
    pub max_lag: ReplicaLag,
    pub check_interval: Duration,
    pub pool_size: usize,
}

pub(super) fn parse(vars: &Vars, pool_size: usize) -> Result<ReplicaSettings, ConfigError> {
    const LAG: &str = "HANDOFF_REPLICA_MAX_LAG";
    let mut max_lag = ReplicaLag {
        bytes: None,
        time: None,
    };
    for part in vars.get(LAG).unwrap_or_default().split(',').map(str::trim) {
        if part.is_empty() {
            continue;
        }
        if let Ok(t) = parse_duration(part) {
            if max_lag.time.replace(t).is_some() {
                return Err(invalid(LAG, format!("'{part}': a second time limit")));
            }
        } else if let Ok(b) = parse_size(part) {
            if max_lag.bytes.replace(b as u64).is_some() {
                return Err(invalid(LAG, format!("'{part}': a second size limit")));
            }
        } else {
            return Err(invalid(
                LAG,
                format!("'{part}' is neither a size (16MB) nor a time (10s)"),
            ));
        }
    }
    if max_lag.bytes.is_none() && max_lag.time.is_none() {
        return Err(invalid(LAG, "give a size (16MB), a time (10s), or both"));
    }
    let pool_size = match vars.given("HANDOFF_REPLICA_POOL_SIZE") {
        Some(_) => vars.count("HANDOFF_REPLICA_POOL_SIZE", 1)?,
        None => pool_size,
    };
    Ok(ReplicaSettings {
        max_lag,
        check_interval: vars.at_least_1ms("HANDOFF_REPLICA_CHECK_INTERVAL")?,
        pool_size,
    })
}
