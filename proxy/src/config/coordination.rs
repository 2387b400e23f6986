//! Coordination with the other proxies over etcd.

use std::net::SocketAddr;
use std::time::Duration;

use super::shards::HostPort;
use super::values::{parse_duration, Vars};
use super::variable::{Applies, Topic, Variable};
use super::{invalid, ConfigError};

/// Coordination over etcd.
pub(super) const VARIABLES: &[Variable] = &[
    Variable {
        name: "HANDOFF_ETCD_ENDPOINTS",
        topic: Topic::Coordination,
        default: "(unset: this proxy works alone)",
        applies: Applies::Takeover,
        help: "`http(s)://host:port` of etcd, comma separated: coordinate every switchover and each shard's primary with the other proxies of `HANDOFF_ETCD_PREFIX`",
    },
    Variable {
        name: "HANDOFF_ETCD_PREFIX",
        topic: Topic::Coordination,
        default: "/handoff",
        applies: Applies::Takeover,
        help: "etcd key prefix: one cluster of proxies per prefix",
    },
    Variable {
        name: "HANDOFF_PROXY_ID",
        topic: Topic::Coordination,
        default: "(host name:HANDOFF_LISTEN port)",
        applies: Applies::Takeover,
        help: "this proxy's name in its cluster (letters, digits, `.` `_` `:` `-`); must be unique",
    },
    Variable {
        name: "HANDOFF_ETCD_LEASE_TTL",
        topic: Topic::Coordination,
        default: "5s",
        applies: Applies::Takeover,
        help: "membership lease, whole seconds, at least `2s`: a proxy that stops renewing it (dead, or cut off from etcd) leaves the cluster, and loses any lock it held, this long after",
    },
    Variable {
        name: "HANDOFF_ETCD_TIMEOUT",
        topic: Topic::Coordination,
        default: "2s",
        applies: Applies::Takeover,
        help: "longest one etcd request may take; a failed request marks coordination down until one succeeds",
    },
    Variable {
        name: "HANDOFF_ETCD_CA_FILE",
        topic: Topic::Coordination,
        default: "(unset)",
        applies: Applies::Takeover,
        help: "PEM CA certificate(s) to verify `https` etcd endpoints (required with `https`)",
    },
    Variable {
        name: "HANDOFF_FAILPOINT",
        topic: Topic::Coordination,
        default: "(unset)",
        applies: Applies::Takeover,
        help: "**testing only**: `point:duration` pauses a coordinated switchover this proxy coordinates after `point` (`holding`, `held`, `fencing`, `fenced`, `promoting`, `promoted`), so tests can kill it there",
    },
];

/// Coordination over etcd.
#[derive(Debug, Clone)]
pub struct EtcdSettings {
    pub endpoints: Vec<String>,
    /// Without a trailing `/`.
    pub prefix: String,
    pub proxy_id: String,
    pub lease_ttl: Duration,
    pub timeout: Duration,
    pub ca_file: Option<std::path::PathBuf>,
    /// A pause injected into coordinated switchovers (tests).
    pub failpoint: Option<Failpoint>,
}

/// `HANDOFF_FAILPOINT`: where a coordinated switchover pauses, and for how long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failpoint {
    pub point: String,
    pub pause: Duration,
}

/// The points `HANDOFF_FAILPOINT` accepts.
pub const FAILPOINTS: &[&str] = &[
    "holding",
    "held",
    "fencing",
    "fenced",
    "promoting",
    "promoted",
];

/// Coordination over etcd, when `HANDOFF_ETCD_ENDPOINTS` is set.
pub(super) fn parse_etcd(
    vars: &Vars,
    listen: SocketAddr,
) -> Result<Option<EtcdSettings>, ConfigError> {
    let failpoint = match vars.get("HANDOFF_FAILPOINT") {
        None => None,
        Some(s) => Some(parse_failpoint(s).map_err(|r| invalid("HANDOFF_FAILPOINT", r))?),
    };
    let Some(list) = vars.get("HANDOFF_ETCD_ENDPOINTS") else {
        if failpoint.is_some() {
            return Err(invalid(
                "HANDOFF_FAILPOINT",
                "only applies with HANDOFF_ETCD_ENDPOINTS",
            ));
        }
        return Ok(None);
    };
    const VAR: &str = "HANDOFF_ETCD_ENDPOINTS";
    let mut endpoints = Vec::new();
    for e in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let rest = e
            .strip_prefix("http://")
            .or_else(|| e.strip_prefix("https://"))
            .ok_or_else(|| invalid(VAR, format!("'{e}' must start with http:// or https://")))?;
        HostPort::parse(VAR, rest.trim_end_matches('/'))?;
        endpoints.push(e.trim_end_matches('/').to_string());
    }
    if endpoints.is_empty() {
        return Err(invalid(VAR, "no endpoint given"));
    }
    let ca_file = vars
        .get("HANDOFF_ETCD_CA_FILE")
        .map(std::path::PathBuf::from);
    if ca_file.is_none() && endpoints.iter().any(|e| e.starts_with("https://")) {
        return Err(invalid(
            "HANDOFF_ETCD_CA_FILE",
            "must be set to verify the https endpoints of HANDOFF_ETCD_ENDPOINTS",
        ));
    }
    let prefix = vars.get("HANDOFF_ETCD_PREFIX").unwrap_or_default();
    let prefix = prefix.trim_end_matches('/');
    if !prefix.starts_with('/') || prefix.len() < 2 {
        return Err(invalid(
            "HANDOFF_ETCD_PREFIX",
            format!("'{prefix}' must start with '/' and name something"),
        ));
    }
    let proxy_id = match vars.get("HANDOFF_PROXY_ID") {
        Some(id) => id.to_string(),
        None => format!("{}:{}", host_name(), listen.port()),
    };
    if !proxy_id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-'))
    {
        return Err(invalid(
            "HANDOFF_PROXY_ID",
            format!("'{proxy_id}' may hold only letters, digits, '.', '_', ':' and '-'"),
        ));
    }
    let lease_ttl = vars.duration("HANDOFF_ETCD_LEASE_TTL")?;
    if lease_ttl < Duration::from_secs(2) || lease_ttl.subsec_nanos() != 0 {
        return Err(invalid(
            "HANDOFF_ETCD_LEASE_TTL",
            "must be a whole number of seconds, at least 2s",
        ));
    }
    Ok(Some(EtcdSettings {
        endpoints,
        prefix: prefix.to_string(),
        proxy_id,
        lease_ttl,
        timeout: vars.positive_duration("HANDOFF_ETCD_TIMEOUT")?,
        ca_file,
        failpoint,
    }))
}

/// `point:duration`, the point one of [`FAILPOINTS`].
fn parse_failpoint(s: &str) -> Result<Failpoint, String> {
    let (point, pause) = s
        .split_once(':')
        .ok_or_else(|| format!("'{s}' is not point:duration"))?;
    if !FAILPOINTS.contains(&point) {
        return Err(format!("'{point}' is not one of {}", FAILPOINTS.join(", ")));
    }
    let pause = parse_duration(pause).map_err(|e| e.0)?;
    Ok(Failpoint {
        point: point.to_string(),
        pause,
    })
}

/// This machine's host name (for the default proxy id).
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "handoff".to_string())
}
