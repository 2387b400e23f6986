//! What the proxies of one cluster keep in etcd, under `HANDOFF_ETCD_PREFIX` (`P`):
//!
//! | key | value | lease |
//! |---|---|---|
//! | `P/members/<proxy>` | a [`Member`]: the proxy's admin and client addresses | the proxy's |
//! | `P/shards/<shard>/primary` | a [`Primary`]: the established primary, its epoch and timeline | none |
//! | `P/shards/<shard>/lock` | the proxy running an operation on the shard | that proxy's |
//! | `P/shards/<shard>/op` | an [`Op`]: the last operation and how far it got | none |
//! | `P/shards/<shard>/acks/<op>/<proxy>` | an [`Ack`]: a proxy holds the shard for the operation | the proxy's |
//!
//! Values are JSON, so `etcdctl get --prefix P` is readable. A record that does not
//! parse is reported and ignored, never guessed at.

use serde_json::{json, Value};

use crate::config::HostPort;

/// Key names under one prefix.
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.trim_end_matches('/').to_string(),
        }
    }

    /// Everything the cluster keeps.
    pub fn all(&self) -> String {
        format!("{}/", self.prefix)
    }

    pub fn member(&self, id: &str) -> String {
        format!("{}/members/{id}", self.prefix)
    }

    fn shard(&self, shard: &str) -> String {
        format!("{}/shards/{shard}/", self.prefix)
    }

    pub fn primary(&self, shard: &str) -> String {
        format!("{}primary", self.shard(shard))
    }

    pub fn lock(&self, shard: &str) -> String {
        format!("{}lock", self.shard(shard))
    }

    pub fn op(&self, shard: &str) -> String {
        format!("{}op", self.shard(shard))
    }

    pub fn ack(&self, shard: &str, op: &str, proxy: &str) -> String {
        format!("{}acks/{op}/{proxy}", self.shard(shard))
    }

    /// Every acknowledgement of every operation of a shard.
    pub fn all_acks(&self, shard: &str) -> String {
        format!("{}acks/", self.shard(shard))
    }
}

/// Milliseconds since the Unix epoch (records carry wall-clock times for people; the
/// protocol itself never compares clocks of different machines).
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn parse(bytes: &[u8]) -> Option<serde_json::Map<String, Value>> {
    match serde_json::from_slice(bytes).ok()? {
        Value::Object(m) => Some(m),
        _ => None,
    }
}

fn text(m: &serde_json::Map<String, Value>, k: &str) -> Option<String> {
    m.get(k)?.as_str().map(str::to_string)
}

fn number(m: &serde_json::Map<String, Value>, k: &str) -> Option<u64> {
    m.get(k)?.as_u64()
}

fn addr(m: &serde_json::Map<String, Value>, k: &str) -> Option<HostPort> {
    HostPort::parse_any(m.get(k)?.as_str()?).ok()
}

/// A live proxy of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Member {
    pub id: String,
    /// Its admin API, as it listens (other proxies and `handoff status` show it).
    pub admin: String,
    pub listen: String,
    pub started_ms: u64,
}

impl Member {
    pub fn to_json(&self) -> Value {
        json!({"id": self.id, "admin": self.admin, "listen": self.listen, "started_ms": self.started_ms})
    }

    pub fn encode(&self) -> String {
        self.to_json().to_string()
    }

    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let m = parse(bytes)?;
        Some(Self {
            id: text(&m, "id")?,
            admin: text(&m, "admin").unwrap_or_default(),
            listen: text(&m, "listen").unwrap_or_default(),
            started_ms: number(&m, "started_ms").unwrap_or(0),
        })
    }
}

/// A shard's established primary, as the cluster agreed on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Primary {
    pub primary: HostPort,
    /// Leadership epoch: advanced by one for every new primary, compare-and-set.
    pub epoch: u64,
    /// The primary's timeline when it was recorded: a proxy taking the record checks
    /// that the host is writable on this timeline or a later one.
    pub timeline: u32,
    /// The proxy that wrote it, and why.
    pub by: String,
    pub reason: String,
    pub at_ms: u64,
}

impl Primary {
    pub fn to_json(&self) -> Value {
        json!({
            "primary": self.primary.to_string(),
            "epoch": self.epoch,
            "timeline": self.timeline,
            "by": self.by,
            "reason": self.reason,
            "at_ms": self.at_ms,
        })
    }

    pub fn encode(&self) -> String {
        self.to_json().to_string()
    }

    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let m = parse(bytes)?;
        Some(Self {
            primary: addr(&m, "primary")?,
            epoch: number(&m, "epoch")?,
            timeline: number(&m, "timeline").unwrap_or(0) as u32,
            by: text(&m, "by").unwrap_or_default(),
            reason: text(&m, "reason").unwrap_or_default(),
            at_ms: number(&m, "at_ms").unwrap_or(0),
        })
    }
}

/// What an operation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpKind {
    /// A switchover run by a proxy of the cluster.
    Switchover,
    /// `POST /buffer` from an external orchestrator: it promotes, then calls
    /// `/primary` (or `/resume`) on any proxy.
    External,
}

impl OpKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OpKind::Switchover => "switchover",
            OpKind::External => "external",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "switchover" => Some(OpKind::Switchover),
            "external" => Some(OpKind::External),
            _ => None,
        }
    }
}

/// How far an operation got. Each phase is published before what it names is done, so
/// whoever finishes an abandoned operation knows the most that may have happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Phase {
    /// Every proxy holds new transactions and lameducks the old primary.
    Hold,
    /// The old primary is being fenced (`databases` lists what the fence closes).
    Fencing,
    /// The fence is on and the target has replayed up to it: the target is promoted
    /// next. An abandoned operation in this phase rolls forward.
    Promoting,
    /// Ended: the new primary is in the shard's `primary` record.
    Done,
    /// Ended: the old primary serves again.
    RolledBack,
    /// Ended without a primary: every proxy keeps holding until an operator calls
    /// `/primary` or `/resume`, or the buffer's time runs out.
    Failed,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Hold => "hold",
            Phase::Fencing => "fencing",
            Phase::Promoting => "promoting",
            Phase::Done => "done",
            Phase::RolledBack => "rolled_back",
            Phase::Failed => "failed",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "hold" => Phase::Hold,
            "fencing" => Phase::Fencing,
            "promoting" => Phase::Promoting,
            "done" => Phase::Done,
            "rolled_back" => Phase::RolledBack,
            "failed" => Phase::Failed,
            _ => return None,
        })
    }

    /// The operation is still running (or was abandoned while running).
    pub fn active(self) -> bool {
        matches!(self, Phase::Hold | Phase::Fencing | Phase::Promoting)
    }
}

/// An operation on a shard that every proxy takes part in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Op {
    /// Unique: the coordinator's id and a random suffix.
    pub id: String,
    pub kind: OpKind,
    pub coordinator: String,
    /// The epoch of the primary being replaced.
    pub epoch: u64,
    pub from: HostPort,
    pub to: Option<HostPort>,
    pub phase: Phase,
    /// Databases the fence closes on `from` (from `Fencing` on).
    pub databases: Vec<String>,
    pub fence_lsn: Option<String>,
    pub started_ms: u64,
    pub updated_ms: u64,
    pub error: Option<String>,
}

impl Op {
    /// A new operation in phase *hold*, replacing `from` at `epoch`.
    pub fn start(
        id: String,
        kind: OpKind,
        coordinator: &str,
        epoch: u64,
        from: HostPort,
        to: Option<HostPort>,
    ) -> Self {
        let now = now_ms();
        Self {
            id,
            kind,
            coordinator: coordinator.to_string(),
            epoch,
            from,
            to,
            phase: Phase::Hold,
            databases: Vec::new(),
            fence_lsn: None,
            started_ms: now,
            updated_ms: now,
            error: None,
        }
    }

    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "kind": self.kind.as_str(),
            "coordinator": self.coordinator,
            "epoch": self.epoch,
            "from": self.from.to_string(),
            "to": self.to.as_ref().map(|t| t.to_string()),
            "phase": self.phase.as_str(),
            "databases": self.databases,
            "fence_lsn": self.fence_lsn,
            "started_ms": self.started_ms,
            "updated_ms": self.updated_ms,
            "error": self.error,
        })
    }

    pub fn encode(&self) -> String {
        self.to_json().to_string()
    }

    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let m = parse(bytes)?;
        Some(Self {
            id: text(&m, "id")?,
            kind: OpKind::parse(&text(&m, "kind")?)?,
            coordinator: text(&m, "coordinator").unwrap_or_default(),
            epoch: number(&m, "epoch")?,
            from: addr(&m, "from")?,
            to: addr(&m, "to"),
            phase: Phase::parse(&text(&m, "phase")?)?,
            databases: m
                .get("databases")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|d| d.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default(),
            fence_lsn: text(&m, "fence_lsn"),
            started_ms: number(&m, "started_ms").unwrap_or(0),
            updated_ms: number(&m, "updated_ms").unwrap_or(0),
            error: text(&m, "error"),
        })
    }
}

/// A proxy holds a shard for an operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Ack {
    pub proxy: String,
    /// How long the proxy's lameduck took, and how many transactions it cancelled.
    pub lameduck_ms: u64,
    pub cancelled: u64,
    /// Backend pids of its admin sessions on the old primary: the fence spares them.
    pub pids: Vec<i32>,
    pub at_ms: u64,
}

impl Ack {
    pub fn to_json(&self) -> Value {
        json!({
            "proxy": self.proxy,
            "lameduck_ms": self.lameduck_ms,
            "cancelled": self.cancelled,
            "pids": self.pids,
            "at_ms": self.at_ms,
        })
    }

    pub fn encode(&self) -> String {
        self.to_json().to_string()
    }

    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let m = parse(bytes)?;
        Some(Self {
            proxy: text(&m, "proxy")?,
            lameduck_ms: number(&m, "lameduck_ms").unwrap_or(0),
            cancelled: number(&m, "cancelled").unwrap_or(0),
            pids: m
                .get("pids")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|p| p.as_i64().and_then(|p| i32::try_from(p).ok()))
                        .collect()
                })
                .unwrap_or_default(),
            at_ms: number(&m, "at_ms").unwrap_or(0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hp(port: u16) -> HostPort {
        HostPort {
            host: "127.0.0.1".into(),
            port,
        }
    }

    #[test]
    fn records_read_back_what_was_written() {
        let op = Op {
            id: "a:1-x".into(),
            kind: OpKind::Switchover,
            coordinator: "a:1".into(),
            epoch: 3,
            from: hp(1),
            to: Some(hp(2)),
            phase: Phase::Promoting,
            databases: vec!["postgres".into(), "app".into()],
            fence_lsn: Some("0/3000060".into()),
            started_ms: 5,
            updated_ms: 6,
            error: None,
        };
        assert_eq!(Op::decode(op.encode().as_bytes()), Some(op));
        let p = Primary {
            primary: hp(2),
            epoch: 4,
            timeline: 2,
            by: "b".into(),
            reason: "switchover".into(),
            at_ms: 7,
        };
        assert_eq!(Primary::decode(p.encode().as_bytes()), Some(p));
        let a = Ack {
            proxy: "c".into(),
            lameduck_ms: 12,
            cancelled: 1,
            pids: vec![100, 200],
            at_ms: 9,
        };
        assert_eq!(Ack::decode(a.encode().as_bytes()), Some(a));
        let m = Member {
            id: "d".into(),
            admin: "127.0.0.1:1".into(),
            listen: "127.0.0.1:2".into(),
            started_ms: 1,
        };
        assert_eq!(Member::decode(m.encode().as_bytes()), Some(m));
    }

    #[test]
    fn records_that_do_not_parse_are_refused_not_guessed() {
        assert!(Op::decode(b"not json").is_none());
        assert!(Op::decode(
            br#"{"id":"x","kind":"switchover","epoch":1,"from":"h:1","phase":"sideways"}"#
        )
        .is_none());
        assert!(Primary::decode(br#"{"primary":"nohost","epoch":1}"#).is_none());
        assert!(Primary::decode(br#"{"primary":"h:5432"}"#).is_none());
    }

    #[test]
    fn keys_stay_under_the_prefix() {
        let k = Keys::new("/handoff/");
        assert_eq!(k.member("a"), "/handoff/members/a");
        assert_eq!(k.primary("main"), "/handoff/shards/main/primary");
        assert_eq!(k.ack("main", "op1", "a"), "/handoff/shards/main/acks/op1/a");
        assert!(k.ack("main", "op1", "a").starts_with(&k.all_acks("main")));
        assert!(k.lock("main").starts_with(&k.all()));
    }
}
