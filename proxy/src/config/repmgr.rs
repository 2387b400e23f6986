//! `HANDOFF_REPMGR*`: which shards repmgr manages, how handoff reads its metadata, and
//! how it asks for a switchover.

use std::str::FromStr;
use std::time::Duration;

use super::variable::{Applies, Topic, Variable};
use super::{invalid, ConfigError, HostPort, ShardConfig, Vars};

/// The repmgr variables.
pub(super) const VARIABLES: &[Variable] = &[
    Variable {
        name: "HANDOFF_REPMGR",
        topic: Topic::Repmgr,
        default: "(unset: no shard is managed by repmgr)",
        applies: Applies::Takeover,
        help: "`shard=postgres://user@host:port[,host:port...]/database[;shard=...]`: nodes of a shard's repmgr cluster and how to log in to read `repmgr.nodes` (the database repmgr's extension is in); the other nodes come from the table. repmgr then names the primary (confirmed by handoff's probe)",
    },
    Variable {
        name: "HANDOFF_REPMGR_SWITCHOVER_COMMAND",
        topic: Topic::Repmgr,
        default: "(unset: switchovers through handoff are refused on repmgr shards)",
        applies: Applies::Takeover,
        help: "a shell command that runs `repmgr standby switchover` on the node to promote (`%n` its name, `%i` its node id, `%h` its host, `%p` its port), e.g. `ssh postgres@%h repmgr -f /etc/repmgr.conf standby switchover --siblings-follow`; exit status 0 is success",
    },
    Variable {
        name: "HANDOFF_REPMGR_HOOK",
        topic: Topic::Repmgr,
        default: "false",
        applies: Applies::Takeover,
        help: "`true` when every node's `service_stop_command` is handoff's pg_ctl holding through this proxy: a switchover through handoff then holds when repmgr stops the primary instead of before running the switchover command (repmgr's own checks then pass unheld); ignored with `HANDOFF_ETCD_ENDPOINTS`",
    },
    Variable {
        name: "HANDOFF_REPMGR_INTERVAL",
        topic: Topic::Repmgr,
        default: "1s",
        applies: Applies::Takeover,
        help: "how often handoff reads `repmgr.nodes` while a shard serves (at once after `handoff recheck`)",
    },
    Variable {
        name: "HANDOFF_REPMGR_HELD_INTERVAL",
        topic: Topic::Repmgr,
        default: "50ms",
        applies: Applies::Takeover,
        help: "how often handoff reads `repmgr.nodes` and probes its primary while a shard is held",
    },
    Variable {
        name: "HANDOFF_REPMGR_TIMEOUT",
        topic: Topic::Repmgr,
        default: "2s",
        applies: Applies::Takeover,
        help: "longest one connection to, or one read of, a repmgr node may take",
    },
];

/// The shards whose primary repmgr decides.
#[derive(Debug, Clone, Default)]
pub struct RepmgrSettings {
    pub shards: Vec<RepmgrShard>,
    pub switchover_command: Option<String>,
    /// Every node's `service_stop_command` holds through this proxy.
    pub hook: bool,
    pub interval: Duration,
    pub held_interval: Duration,
    pub timeout: Duration,
}

/// One shard's repmgr nodes and login.
#[derive(Debug, Clone)]
pub struct RepmgrShard {
    pub shard: String,
    /// User, database, password and options (its hosts are ignored: see `nodes`).
    pub login: tokio_postgres::Config,
    /// The nodes given, asked first.
    pub nodes: Vec<HostPort>,
}

const VAR: &str = "HANDOFF_REPMGR";

/// Parses `HANDOFF_REPMGR*` against the configured shards.
pub(super) fn parse(vars: &Vars, shards: &[ShardConfig]) -> Result<RepmgrSettings, ConfigError> {
    let mut out = RepmgrSettings {
        shards: Vec::new(),
        switchover_command: vars
            .given("HANDOFF_REPMGR_SWITCHOVER_COMMAND")
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .map(str::to_string),
        hook: vars.flag("HANDOFF_REPMGR_HOOK")?,
        interval: vars.at_least_1ms("HANDOFF_REPMGR_INTERVAL")?,
        held_interval: vars.at_least_1ms("HANDOFF_REPMGR_HELD_INTERVAL")?,
        timeout: vars.at_least_1ms("HANDOFF_REPMGR_TIMEOUT")?,
    };
    for (name, url) in super::shard_entries(
        VAR,
        vars.get(VAR).unwrap_or_default(),
        shards,
        "shard=postgres://user@host:port[,host:port]/database",
        super::pg_auto_failover::hide_password,
    )? {
        out.shards.push(shard(name, url)?);
    }
    Ok(out)
}

fn shard(name: &str, url: &str) -> Result<RepmgrShard, ConfigError> {
    let shown = super::pg_auto_failover::hide_password(url);
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(invalid(
            VAR,
            format!("shard '{name}': '{shown}' must be a postgres:// URL of its nodes"),
        ));
    }
    let login = tokio_postgres::Config::from_str(url).map_err(|e| {
        invalid(
            VAR,
            format!("shard '{name}': '{shown}' is not a usable URL: {e}"),
        )
    })?;
    let ports = login.get_ports();
    let nodes: Vec<HostPort> = login
        .get_hosts()
        .iter()
        .enumerate()
        .filter_map(|(i, h)| match h {
            tokio_postgres::config::Host::Tcp(host) => Some(HostPort {
                host: host.clone(),
                port: ports.get(i).or(ports.first()).copied().unwrap_or(5432),
            }),
            #[cfg(unix)]
            tokio_postgres::config::Host::Unix(_) => None,
        })
        .collect();
    if nodes.is_empty() {
        return Err(invalid(
            VAR,
            format!("shard '{name}': '{shown}' names no TCP host"),
        ));
    }
    Ok(RepmgrShard {
        shard: name.to_string(),
        login,
        nodes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_lists_take_every_host_and_its_port() {
        let s = shard(
            "s0",
            "postgres://repmgr:pw@10.0.0.1:5432,10.0.0.2:5433/repmgr",
        )
        .unwrap();
        let nodes: Vec<String> = s.nodes.iter().map(|n| n.to_string()).collect();
        assert_eq!(nodes, ["10.0.0.1:5432", "10.0.0.2:5433"]);
        assert_eq!(s.login.get_dbname(), Some("repmgr"));
        for (bad, says) in [
            ("http://h:1/x", "must be a postgres:// URL"),
            ("postgres://h:1/x?nonsense=1", "not a usable URL"),
        ] {
            let e = shard("s0", bad).unwrap_err().to_string();
            assert!(e.contains(says) && e.contains(VAR), "{bad}: {e}");
        }
    }
}
