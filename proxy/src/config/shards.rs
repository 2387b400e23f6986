//! Shards (the hosts that may be each one's primary) and how client databases route to them.

use std::collections::HashMap;

use super::values::{valid_name, InvalidValue};
use super::variable::{Applies, Topic, Variable};
use super::{invalid, ConfigError};

/// The shard and routing variables.
pub(super) const VARIABLES: &[Variable] = &[
    Variable {
        name: "HANDOFF_SHARDS",
        topic: Topic::Shards,
        default: "main=127.0.0.1:5432",
        applies: Applies::Takeover,
        help: "`name=host:port[,host:port...][;name=...]`: every host that may be the shard's primary; at startup the writable one on the highest timeline is chosen (the first listed wins ties). A shard in `HANDOFF_PATRONI` may be a bare `name`: Patroni's members are its hosts",
    },
    Variable {
        name: "HANDOFF_DATABASES",
        topic: Topic::Shards,
        default: "(every database to the only shard)",
        applies: Applies::Takeover,
        help: "`clientdb=shard[/serverdb][;...]`; `*=shard` routes any other database; required with more than one shard",
    },
];

/// A server address as configured (host names are resolved when connecting).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostPort {
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for HostPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// As `host:port` text (etcd records, the admin API's answers).
impl serde::Serialize for HostPort {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for HostPort {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        HostPort::parse_any(&text).map_err(serde::de::Error::custom)
    }
}

impl HostPort {
    /// Parses `host:port` (`[v6]:port`), outside of the configuration.
    pub fn parse_any(s: &str) -> Result<Self, InvalidValue> {
        Self::parse("address", s).map_err(|e| match e {
            ConfigError::Invalid { reason, .. } => InvalidValue(reason),
            other => InvalidValue(other.to_string()),
        })
    }

    pub(super) fn parse(var: &'static str, s: &str) -> Result<Self, ConfigError> {
        let s = s.trim();
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| invalid(var, format!("'{s}' is not host:port")))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(invalid(var, format!("'{s}' has an empty host")));
        }
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| invalid(var, format!("'{s}' has an invalid port")))?;
        Ok(Self {
            host: host.to_string(),
            port,
        })
    }
}

/// One shard: its name and the hosts that may be its primary (at startup the writable
/// one on the highest timeline is chosen; the first listed wins ties).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardConfig {
    pub name: String,
    pub hosts: Vec<HostPort>,
}

/// Where one client database goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatabaseRoute {
    /// Index into [`Config::shards`].
    pub shard: usize,
    /// The database name on the server; `None` keeps the client's name.
    pub server_db: Option<String>,
}

/// Which of a shard's servers a client's transactions go to, chosen by a suffix of the
/// database name it logs in to, as vtgate's `keyspace@replica` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// `appdb` or `appdb@primary`: the primary, through the failover buffer.
    Primary,
    /// `appdb@replica`: a standby in the read rotation; none: wait, then an error.
    Replica,
    /// `appdb@any`: a standby in the read rotation, else the primary.
    Any,
}

impl Target {
    pub fn as_str(self) -> &'static str {
        match self {
            Target::Primary => "primary",
            Target::Replica => "replica",
            Target::Any => "any",
        }
    }

    /// Splits `appdb@replica` into the database and its target. `Err` names a suffix
    /// that is not a target; a name without `@` is the primary's.
    pub fn split(database: &str) -> Result<(&str, Target), &str> {
        let Some((name, suffix)) = database.rsplit_once('@') else {
            return Ok((database, Target::Primary));
        };
        let target = match suffix {
            "primary" => Target::Primary,
            "replica" => Target::Replica,
            "any" => Target::Any,
            other => return Err(other),
        };
        Ok((name, target))
    }
}

pub(super) fn parse_shards(s: &str) -> Result<Vec<ShardConfig>, ConfigError> {
    const VAR: &str = "HANDOFF_SHARDS";
    let mut shards: Vec<ShardConfig> = Vec::new();
    for entry in s.split(';').map(str::trim).filter(|e| !e.is_empty()) {
        // A bare name: the shard's hosts come from Patroni (checked with HANDOFF_PATRONI).
        let (name, hosts) = entry.split_once('=').unwrap_or((entry, ""));
        let name = name.trim();
        if !valid_name(name) {
            return Err(invalid(VAR, format!("'{name}' is not a valid shard name")));
        }
        if shards.iter().any(|s| s.name == name) {
            return Err(invalid(VAR, format!("shard '{name}' is listed twice")));
        }
        let hosts = hosts
            .split(',')
            .filter(|h| !h.trim().is_empty())
            .map(|h| HostPort::parse(VAR, h))
            .collect::<Result<Vec<_>, _>>()?;
        shards.push(ShardConfig {
            name: name.to_string(),
            hosts,
        });
    }
    if shards.is_empty() {
        return Err(invalid(VAR, "no shard is configured"));
    }
    Ok(shards)
}

pub(super) type Routes = (HashMap<String, DatabaseRoute>, Option<DatabaseRoute>);

pub(super) fn parse_databases(
    s: Option<&str>,
    shards: &[ShardConfig],
) -> Result<Routes, ConfigError> {
    const VAR: &str = "HANDOFF_DATABASES";
    let Some(s) = s else {
        if shards.len() > 1 {
            return Err(invalid(
                VAR,
                "must be set when HANDOFF_SHARDS lists more than one shard",
            ));
        }
        let only = DatabaseRoute {
            shard: 0,
            server_db: None,
        };
        return Ok((HashMap::new(), Some(only)));
    };
    let mut routes = HashMap::new();
    let mut default = None;
    for entry in s.split(';').map(str::trim).filter(|e| !e.is_empty()) {
        let (db, target) = entry
            .split_once('=')
            .ok_or_else(|| invalid(VAR, format!("'{entry}' is not clientdb=shard[/serverdb]")))?;
        let (shard, server_db) = match target.split_once('/') {
            Some((sh, sdb)) if !sdb.trim().is_empty() => (sh.trim(), Some(sdb.trim().to_string())),
            Some(_) => {
                return Err(invalid(
                    VAR,
                    format!("'{entry}' has an empty server database"),
                ))
            }
            None => (target.trim(), None),
        };
        let shard = shards
            .iter()
            .position(|s| s.name == shard)
            .ok_or_else(|| invalid(VAR, format!("'{entry}' names unknown shard '{shard}'")))?;
        let route = DatabaseRoute { shard, server_db };
        let db = db.trim();
        if db == "*" {
            default = Some(route);
        } else if db.is_empty() || routes.insert(db.to_string(), route).is_some() {
            return Err(invalid(
                VAR,
                format!("database '{db}' is empty or listed twice"),
            ));
        }
    }
    Ok((routes, default))
}
