//! Planned switchovers, lameduck, failure detection and the split-brain watchdog.

use std::time::Duration;

use super::values::Vars;
use super::variable::{Applies, Topic, Variable};
use super::ConfigError;

/// Switchovers, failure detection and the fence.
pub(super) const VARIABLES: &[Variable] = &[
    Variable {
        name: "HANDOFF_DRAIN_TIMEOUT",
        topic: Topic::Failover,
        default: "5s",
        applies: Applies::Takeover,
        help: "lameduck: how long transactions on a revoked primary may run before they are cancelled (`57P01`; `08006` when the primary failed)",
    },
    Variable {
        name: "HANDOFF_HEALTH_CHECK_INTERVAL",
        topic: Topic::Failover,
        default: "1s",
        applies: Applies::Takeover,
        help: "how often each shard's primary is probed (connect, not in recovery, writable)",
    },
    Variable {
        name: "HANDOFF_HEALTH_CHECK_TIMEOUT",
        topic: Topic::Failover,
        default: "2s",
        applies: Applies::Takeover,
        help: "longest a health check or discovery probe may take before the host counts as unreachable",
    },
    Variable {
        name: "HANDOFF_DISCOVERY_INTERVAL",
        topic: Topic::Failover,
        default: "100ms",
        applies: Applies::Takeover,
        help: "while a failed primary is being replaced, how often every host of the shard is probed",
    },
    Variable {
        name: "HANDOFF_SWITCHOVER_MAX_LAG",
        topic: Topic::Failover,
        default: "16MB",
        applies: Applies::Takeover,
        help: "a switchover is refused when the target replays further behind than this",
    },
    Variable {
        name: "HANDOFF_SWITCHOVER_TIMEOUT",
        topic: Topic::Failover,
        default: "10s",
        applies: Applies::Takeover,
        help: "longest the target may take to replay up to the fence LSN, and then to promote",
    },
    Variable {
        name: "HANDOFF_SWITCHOVER_SYNC_TARGET",
        topic: Topic::Failover,
        default: "true",
        applies: Applies::Takeover,
        help: "before revoking, make the target the old primary's synchronous standby with `synchronous_commit = remote_apply` (`ALTER SYSTEM`, put back when the switchover ends), so the pause does not grow with replication lag",
    },
    Variable {
        name: "HANDOFF_SWITCHOVER_TERMINATE",
        topic: Topic::Failover,
        default: "true",
        applies: Applies::Takeover,
        help: "the fence terminates the old primary's remaining sessions; `false`: it waits up to `HANDOFF_SWITCHOVER_TIMEOUT` for them to leave, else the switchover rolls back",
    },
    Variable {
        name: "HANDOFF_SWITCHOVER_DEMOTE_COMMAND",
        topic: Topic::Failover,
        default: "(unset)",
        applies: Applies::Takeover,
        help: "shell command run after a completed switchover to stop or rejoin the old primary; its environment names the shard and both servers",
    },
    Variable {
        name: "HANDOFF_SWITCHOVER_DEMOTE_TIMEOUT",
        topic: Topic::Failover,
        default: "60s",
        applies: Applies::Takeover,
        help: "longest the demote command may run; then it is killed with everything it started",
    },
    Variable {
        name: "HANDOFF_WATCHDOG_INTERVAL",
        topic: Topic::Failover,
        default: "250ms",
        applies: Applies::Takeover,
        help: "how often every replaced primary is checked for split brain (fenced, down, back as a standby, or accepting logins)",
    },
    Variable {
        name: "HANDOFF_HOLD_TIMEOUT",
        topic: Topic::Failover,
        default: "5s",
        applies: Applies::Takeover,
        help: "after a hold (`handoff hold`, e.g. from Patroni's `before_stop`): how long only a new primary may end it; after that the old primary is taken back if it is writable (and still Patroni's leader)",
    },
];

/// How handoff runs a switchover itself.
#[derive(Debug, Clone)]
pub struct SwitchoverSettings {
    pub max_lag: u64,
    pub timeout: Duration,
    /// Make the target synchronous before revoking (`HANDOFF_SWITCHOVER_SYNC_TARGET`).
    pub sync_target: bool,
    pub terminate: bool,
    /// Run after a completed switchover (`HANDOFF_SWITCHOVER_DEMOTE_COMMAND`).
    pub demote_command: Option<String>,
    pub demote_timeout: Duration,
}

/// The failure detector's settings.
#[derive(Debug, Clone)]
pub struct HealthSettings {
    pub interval: Duration,
    pub timeout: Duration,
    pub discovery_interval: Duration,
}

/// Planned switchovers, and lameduck's drain timeout.
pub(super) fn parse_switchover(vars: &Vars) -> Result<(SwitchoverSettings, Duration), ConfigError> {
    let settings = SwitchoverSettings {
        max_lag: vars.size("HANDOFF_SWITCHOVER_MAX_LAG")? as u64,
        timeout: vars.positive_duration("HANDOFF_SWITCHOVER_TIMEOUT")?,
        sync_target: vars.flag("HANDOFF_SWITCHOVER_SYNC_TARGET")?,
        terminate: vars.flag("HANDOFF_SWITCHOVER_TERMINATE")?,
        demote_command: vars
            .get("HANDOFF_SWITCHOVER_DEMOTE_COMMAND")
            .map(str::to_string),
        demote_timeout: vars.positive_duration("HANDOFF_SWITCHOVER_DEMOTE_TIMEOUT")?,
    };
    Ok((settings, vars.duration("HANDOFF_DRAIN_TIMEOUT")?))
}

/// The failure detector's settings, and the watchdog's interval.
pub(super) fn parse_health(vars: &Vars) -> Result<(HealthSettings, Duration), ConfigError> {
    let health = HealthSettings {
        interval: vars.at_least_1ms("HANDOFF_HEALTH_CHECK_INTERVAL")?,
        timeout: vars.at_least_1ms("HANDOFF_HEALTH_CHECK_TIMEOUT")?,
        discovery_interval: vars.at_least_1ms("HANDOFF_DISCOVERY_INTERVAL")?,
    };
    Ok((health, vars.at_least_1ms("HANDOFF_WATCHDOG_INTERVAL")?))
}
