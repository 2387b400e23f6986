//! What the proxies of one cluster keep in etcd, under `HANDOFF_ETCD_PREFIX` (`P`):
//!
//! | key | value | lease |
//! |---|---|---|
//! | `P/members/<proxy>` | a [`Member`]: the proxy's admin and client addresses | the proxy's |
//! | `P/shards/<shard>/primary` | a [`Primary`]: the established primary, its epoch and timeline | none |
//! | `P/shards/<shard>/lock` | a [`Lock`]: the proxy running an operation on the shard | that proxy's |
//! | `P/shards/<shard>/op` | an [`Op`]: the last operation and how far it got | none |
//! | `P/shards/<shard>/acks/<op>/<proxy>` | an [`Ack`]: a proxy holds the shard for the operation | the proxy's |
//!
//! Values are JSON, so `etcdctl get --prefix P` is readable. A record that does not
//! decode is reported with the key that failed and ignored, never guessed at.

use serde::{Deserialize, Serialize};

use super::{decode, DecodeError};
use crate::config::HostPort;

/// What every record can do: be written as JSON and read back.
pub trait Record: Serialize + serde::de::DeserializeOwned {
    fn encode(&self) -> String {
        serde_json::to_string(self).expect("records serialize to JSON")
    }

    fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        decode(bytes)
    }
}

/// A live proxy of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub id: String,
    /// Its admin API, as it listens (other proxies and `handoff status` show it).
    #[serde(default)]
    pub admin: String,
    #[serde(default)]
    pub listen: String,
    #[serde(default)]
    pub started_ms: u64,
}

impl Record for Member {}

/// A shard's established primary, as the cluster agreed on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Primary {
    pub primary: HostPort,
    /// Leadership epoch: advanced by one for every new primary, compare-and-set.
    pub epoch: u64,
    /// The primary's timeline when it was recorded: a proxy taking the record checks
    /// that the host is writable on this timeline or a later one.
    #[serde(default)]
    pub timeline: u32,
    /// The proxy that wrote it, and why.
    #[serde(default)]
    pub by: String,
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub at_ms: u64,
}

impl Record for Primary {}

/// Who holds a shard's lock, for which operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lock {
    pub proxy: String,
    pub op: String,
    /// Taken to finish an abandoned operation.
    #[serde(default, skip_serializing_if = "super::is_false")]
    pub recovering: bool,
}

impl Record for Lock {}

/// What an operation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
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
}

/// How far an operation got. Each phase is published before what it names is done, so
/// whoever finishes an abandoned operation knows the most that may have happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
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

    /// The operation is still running (or was abandoned while running).
    pub fn active(self) -> bool {
        matches!(self, Phase::Hold | Phase::Fencing | Phase::Promoting)
    }
}

/// An operation on a shard that every proxy takes part in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Op {
    /// Unique: the coordinator's id and a random suffix.
    pub id: String,
    pub kind: OpKind,
    #[serde(default)]
    pub coordinator: String,
    /// The epoch of the primary being replaced.
    pub epoch: u64,
    pub from: HostPort,
    #[serde(default)]
    pub to: Option<HostPort>,
    pub phase: Phase,
    /// Databases the fence closes on `from` (from `Fencing` on).
    #[serde(default)]
    pub databases: Vec<String>,
    #[serde(default)]
    pub fence_lsn: Option<String>,
    #[serde(default)]
    pub started_ms: u64,
    #[serde(default)]
    pub updated_ms: u64,
    #[serde(default)]
    pub error: Option<String>,
}

impl Record for Op {}

/// A proxy holds a shard for an operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    pub proxy: String,
    /// How long the proxy's lameduck took, and how many transactions it cancelled.
    #[serde(default)]
    pub lameduck_ms: u64,
    #[serde(default)]
    pub cancelled: u64,
    /// Backend pids of its admin sessions on the old primary: the fence spares them.
    #[serde(default)]
    pub pids: Vec<i32>,
    #[serde(default)]
    pub at_ms: u64,
}

impl Record for Ack {}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testing::hp;

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
        assert_eq!(Op::decode(op.encode().as_bytes()), Ok(op));
        let p = Primary {
            primary: hp(2),
            epoch: 4,
            timeline: 2,
            by: "b".into(),
            reason: "switchover".into(),
            at_ms: 7,
        };
        assert_eq!(Primary::decode(p.encode().as_bytes()), Ok(p));
        let a = Ack {
            proxy: "c".into(),
            lameduck_ms: 12,
            cancelled: 1,
            pids: vec![100, 200],
            at_ms: 9,
        };
        assert_eq!(Ack::decode(a.encode().as_bytes()), Ok(a));
        let m = Member {
            id: "d".into(),
            admin: "127.0.0.1:1".into(),
            listen: "127.0.0.1:2".into(),
            started_ms: 1,
        };
        assert_eq!(Member::decode(m.encode().as_bytes()), Ok(m));
        let l = Lock {
            proxy: "a".into(),
            op: "a-1".into(),
            recovering: false,
        };
        assert_eq!(l.encode(), r#"{"proxy":"a","op":"a-1"}"#);
        assert_eq!(Lock::decode(l.encode().as_bytes()), Ok(l));
    }

    #[test]
    fn records_that_do_not_decode_name_the_key() {
        assert!(Op::decode(b"not json").is_err());
        let e = Op::decode(
            br#"{"id":"x","kind":"switchover","epoch":1,"from":"h:1","phase":"sideways"}"#,
        )
        .unwrap_err();
        assert_eq!(e.path, "phase", "{e}");
        let e = Primary::decode(br#"{"primary":"nohost","epoch":1}"#).unwrap_err();
        assert_eq!(e.path, "primary", "{e}");
        let e = Primary::decode(br#"{"primary":"h:5432"}"#).unwrap_err();
        assert!(e.message.contains("epoch"), "{e}");
        // A timeline beyond u32 is an error, not a silent truncation.
        let e = Primary::decode(br#"{"primary":"h:5432","epoch":1,"timeline":4294967296}"#)
            .unwrap_err();
        assert_eq!(e.path, "timeline", "{e}");
        let e = Ack::decode(br#"{"proxy":"a","pids":[1, 3000000000]}"#).unwrap_err();
        assert_eq!(e.path, "pids[1]", "{e}");
    }
}
