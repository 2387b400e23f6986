//! `HANDOFF_PG_AUTO_FAILOVER*`: which shards pg_auto_failover manages (through its
//! monitor), and how closely handoff follows it.

use std::str::FromStr;
use std::time::Duration;

use super::variable::{Applies, Topic, Variable};
use super::{invalid, ConfigError, ShardConfig, Vars};

/// The pg_auto_failover variables.
pub(super) const VARIABLES: &[Variable] = &[
    Variable {
        name: "HANDOFF_PG_AUTO_FAILOVER",
        topic: Topic::PgAutoFailover,
        default: "(unset: no shard is managed by pg_auto_failover)",
        applies: Applies::Takeover,
        help: "`shard=postgres://user@host:port/pg_auto_failover[?formation=default&group=0][;shard=...]`: the pg_auto_failover monitor of a shard (a libpq URL; `formation` and `group` pick the shard's group, default `default` and 0); the monitor then names the primary (confirmed by handoff's probe) and runs promotions",
    },
    Variable {
        name: "HANDOFF_PG_AUTO_FAILOVER_INTERVAL",
        topic: Topic::PgAutoFailover,
        default: "1s",
        applies: Applies::Takeover,
        help: "how often handoff reads the monitor's nodes while a shard serves, besides every notification on its `state` channel",
    },
    Variable {
        name: "HANDOFF_PG_AUTO_FAILOVER_HELD_INTERVAL",
        topic: Topic::PgAutoFailover,
        default: "50ms",
        applies: Applies::Takeover,
        help: "how often handoff reads the monitor's nodes and probes its primary while a shard is held",
    },
    Variable {
        name: "HANDOFF_PG_AUTO_FAILOVER_TIMEOUT",
        topic: Topic::PgAutoFailover,
        default: "2s",
        applies: Applies::Takeover,
        help: "longest one connection to, or one query of, the monitor may take",
    },
];

/// The shards whose primary a pg_auto_failover monitor decides.
#[derive(Debug, Clone, Default)]
pub struct PgAutoFailoverSettings {
    pub shards: Vec<PgAutoFailoverShard>,
    /// Reads of the monitor while a shard serves (notifications come between).
    pub interval: Duration,
    /// Reads of the monitor while a shard is held.
    pub held_interval: Duration,
    /// Longest one connection or query may take.
    pub timeout: Duration,
}

/// One shard's monitor, formation and group.
#[derive(Debug, Clone)]
pub struct PgAutoFailoverShard {
    pub shard: String,
    /// Where the monitor is, as given but without `formation` and `group`.
    pub monitor: tokio_postgres::Config,
    /// The monitor's URL with its password hidden, for status and logs.
    pub shown: String,
    pub formation: String,
    pub group: i32,
}

const VAR: &str = "HANDOFF_PG_AUTO_FAILOVER";

/// Parses `HANDOFF_PG_AUTO_FAILOVER` against the configured shards.
pub(super) fn parse(
    vars: &Vars,
    shards: &[ShardConfig],
) -> Result<PgAutoFailoverSettings, ConfigError> {
    let mut out = PgAutoFailoverSettings {
        shards: Vec::new(),
        interval: vars.at_least_1ms("HANDOFF_PG_AUTO_FAILOVER_INTERVAL")?,
        held_interval: vars.at_least_1ms("HANDOFF_PG_AUTO_FAILOVER_HELD_INTERVAL")?,
        timeout: vars.at_least_1ms("HANDOFF_PG_AUTO_FAILOVER_TIMEOUT")?,
    };
    for (name, url) in super::shard_entries(
        VAR,
        vars.get(VAR).unwrap_or_default(),
        shards,
        "shard=postgres://user@host:port/database",
        hide_password,
    )? {
        out.shards.push(shard(name, url)?);
    }
    Ok(out)
}

/// One `shard=URL` entry.
fn shard(name: &str, url: &str) -> Result<PgAutoFailoverShard, ConfigError> {
    let shown = hide_password(url);
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(invalid(
            VAR,
            format!("shard '{name}': '{shown}' must be a postgres:// URL of the monitor"),
        ));
    }
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let (mut formation, mut group) = ("default".to_string(), 0i32);
    let mut rest = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("formation", f)) if !f.is_empty() => formation = f.to_string(),
            Some(("group", g)) => {
                group = g.parse().ok().filter(|g| *g >= 0).ok_or_else(|| {
                    invalid(
                        VAR,
                        format!("shard '{name}': group '{g}' is not a non-negative integer"),
                    )
                })?
            }
            Some(("formation", _)) => {
                return Err(invalid(VAR, format!("shard '{name}': formation is empty")))
            }
            _ => rest.push(pair),
        }
    }
    let conninfo = if rest.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", rest.join("&"))
    };
    let monitor = tokio_postgres::Config::from_str(&conninfo).map_err(|e| {
        invalid(
            VAR,
            format!("shard '{name}': '{shown}' is not a usable monitor URL: {e}"),
        )
    })?;
    if monitor.get_hosts().is_empty() {
        return Err(invalid(
            VAR,
            format!("shard '{name}': '{shown}' names no host"),
        ));
    }
    Ok(PgAutoFailoverShard {
        shard: name.to_string(),
        monitor,
        shown,
        formation,
        group,
    })
}

/// `postgres://user:secret@host/…` → `postgres://user:***@host/…` (also for
/// `SHOW CONFIG`).
pub(super) fn hide_password(s: &str) -> String {
    let Some(scheme) = s.find("://") else {
        return s.to_string();
    };
    let after = scheme + 3;
    let authority_end = s[after..]
        .find(['/', '?', ';'])
        .map_or(s.len(), |i| after + i);
    let Some(at) = s[after..authority_end].rfind('@').map(|i| after + i) else {
        return s.to_string();
    };
    match s[after..at].find(':') {
        Some(colon) => format!("{}:***{}", &s[..after + colon], &s[at..]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monitor_urls_take_formation_and_group_and_hide_passwords() {
        let s = shard(
            "s0",
            "postgres://autoctl_node:pw@127.0.0.1:5000/pg_auto_failover?formation=f1&group=2&connect_timeout=3",
        )
        .unwrap();
        assert_eq!((s.formation.as_str(), s.group), ("f1", 2));
        assert_eq!(s.monitor.get_dbname(), Some("pg_auto_failover"));
        assert_eq!(s.monitor.get_ports(), &[5000]);
        assert!(!s.shown.contains("pw"), "{}", s.shown);
        let d = shard("s0", "postgresql://h:1/pg_auto_failover").unwrap();
        assert_eq!((d.formation.as_str(), d.group), ("default", 0));
        for (bad, says) in [
            ("http://h:1/x", "must be a postgres:// URL"),
            ("postgres://h:1/x?group=-1", "group '-1'"),
            ("postgres://h:1/x?group=two", "group 'two'"),
            ("postgres://h:1/x?formation=", "formation is empty"),
            (
                "postgres://h:1/x?nonsense_option=1",
                "not a usable monitor URL",
            ),
        ] {
            let e = shard("s0", bad).unwrap_err().to_string();
            assert!(e.contains(says) && e.contains(VAR), "{bad}: {e}");
        }
        assert_eq!(
            hide_password("postgres://u:secret@h:1/d"),
            "postgres://u:***@h:1/d"
        );
        assert_eq!(hide_password("postgres://u@h:1/d"), "postgres://u@h:1/d");
    }
}
