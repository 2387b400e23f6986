//! handoff's boundaries as types, defined once: the admin API's answers (this module),
//! the switchover report ([`report`]) and the records the proxies keep in etcd
//! ([`records`]). The HTTP API, the console and the coordination code write them; the
//! `handoff` CLI, other proxies and the tests read them back with [`decode`], whose
//! errors name the key that did not decode — a value is never guessed at or truncated.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub mod records;
pub mod report;
pub mod takeover;

/// JSON that does not decode into the type asked for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct DecodeError {
    /// Where in the document (`epoch`, `members[2].id`; `.` for the whole of it).
    pub path: String,
    pub message: String,
}

/// Decodes `bytes` as JSON into `T`.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(&mut de).map_err(DecodeError::at)
}

/// Decodes a JSON value already parsed.
pub fn from_value<T: DeserializeOwned>(v: serde_json::Value) -> Result<T, DecodeError> {
    serde_path_to_error::deserialize(v).map_err(DecodeError::at)
}

impl DecodeError {
    fn at(e: serde_path_to_error::Error<serde_json::Error>) -> Self {
        Self {
            path: e.path().to_string(),
            message: e.inner().to_string(),
        }
    }
}

/// The JSON of a value of one of these types (they always serialize).
pub fn to_value<T: Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).expect("the API's types serialize to JSON")
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// Every error answer of the admin API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorAnswer {
    pub error: String,
}

/// `GET /healthz`, `GET /readyz`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Health {
    pub status: String,
}

/// `GET /v1/shards`: every shard, and coordination with the other proxies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Shards {
    pub shards: Vec<ShardState>,
    pub coordination: Coordination,
}

/// One shard as this proxy sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardState {
    pub name: String,
    /// `serving`, `buffering`, `draining`, `unavailable`.
    pub state: String,
    pub epoch: u64,
    pub primary: String,
    pub hosts: Vec<String>,
    /// What names the primary: `patroni`, `pg_auto_failover`, `repmgr`, `etcd` or `probe`.
    pub source: String,
    /// Patroni's last answer, on a Patroni shard (also in `manager`).
    pub patroni: Option<PatroniView>,
    /// The HA manager's last view, on a managed shard.
    #[serde(default)]
    pub manager: Option<ManagerView>,
    /// Transactions running on the primary now.
    pub in_flight: usize,
    pub buffer: BufferState,
    /// Since the last change of state.
    pub since_ms: u64,
    pub reason: String,
    /// Replaced primaries found accepting writes.
    pub split_brain: Vec<String>,
    pub watched: Vec<Watched>,
    /// Its hosts as readers (`@replica`, `@any`): the read rotation and why each host
    /// is in it or not.
    #[serde(default)]
    pub standbys: Vec<Standby>,
    /// The shard's records in etcd, with coordination.
    pub coordination: Option<ShardRecords>,
}

/// One host of a shard as a reader, as the replica check last saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Standby {
    pub host: String,
    pub in_rotation: bool,
    /// `in_rotation`, `lagging`, `not_streaming`, `not_standby`, `down`,
    /// `not_checked_yet`.
    pub state: String,
    pub lag_bytes: Option<u64>,
    pub lag_seconds: Option<f64>,
    /// Where it streams from (`host:port`), as it reports.
    pub upstream: Option<String>,
    /// Read transactions running on it now.
    pub transactions: usize,
    /// Read transactions given to it in all.
    pub chosen: u64,
    pub detail: String,
}

/// A shard's failover buffer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BufferState {
    /// `idle`, `buffering`, `draining`.
    pub state: String,
    /// Requests held now.
    pub depth: usize,
}

/// Patroni's last answer for a shard.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PatroniView {
    pub endpoints: Vec<String>,
    pub scope: Option<String>,
    pub paused: Option<bool>,
    pub leader: Option<String>,
    /// `None` until Patroni has answered.
    pub members: Option<Vec<PatroniMember>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PatroniMember {
    pub name: String,
    pub addr: String,
    pub role: String,
    pub state: String,
    pub timeline: Option<u32>,
}

/// What a shard's HA manager last said, beside what handoff serves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManagerView {
    /// `patroni`, `pg_auto_failover`, `repmgr`.
    pub kind: String,
    /// Where handoff reaches it (passwords hidden).
    pub endpoints: Vec<String>,
    /// The cluster's name (Patroni's scope; pg_auto_failover's `formation/group`).
    pub cluster: Option<String>,
    /// Why it would not switch over now (Patroni's maintenance mode).
    pub paused: Option<String>,
    /// Its writable primary, by name.
    pub leader: Option<String>,
    /// The server it has told to stop taking writes, if one still does.
    pub stopping: Option<String>,
    /// True when the manager's leader is the primary handoff serves; `None` until it
    /// has answered.
    pub agrees: Option<bool>,
    /// `None` until the manager has answered.
    pub members: Option<Vec<ManagerMember>>,
    /// Why the last read of the manager failed (`None` when it answered): handoff
    /// keeps serving the primary it has meanwhile.
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManagerMember {
    pub name: String,
    pub addr: String,
    pub leader: bool,
    /// Role and state in the manager's own words.
    pub role: String,
    pub state: String,
    pub timeline: Option<u32>,
    /// Why the manager would not promote it now.
    pub not_candidate: Option<String>,
}

/// A replaced primary the split-brain watchdog looks at.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Watched {
    pub host: String,
    /// Why it is watched: `switchover`, `failover`, `replaced`, `lower_timeline`, …
    pub why: String,
    pub replaced_at_epoch: u64,
    pub since_unix: f64,
    /// What the watchdog saw last: `fenced`, `down`, `standby`, `accepting`, …
    pub state: String,
    pub fenced_by_handoff: bool,
    pub fence_lsn: Option<String>,
    pub wal_bytes_past_fence: Option<f64>,
    /// Why it counts as split brain, while it does.
    pub split_brain: Option<String>,
    pub detail: String,
}

/// Coordination with the other proxies: `{"enabled": false}` without etcd.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Coordination {
    pub enabled: bool,
    /// This proxy's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<Vec<String>>,
    /// etcd answers this proxy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub up: Option<bool>,
    /// Why it does not, while it does not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub members: Option<Vec<ClusterMember>>,
}

/// A live proxy of the cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterMember {
    #[serde(flatten)]
    pub member: records::Member,
    /// It is the proxy that answered.
    #[serde(rename = "self")]
    pub this_proxy: bool,
}

/// A shard's records as this proxy last read them.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ShardRecords {
    pub recorded: Option<records::Primary>,
    pub operation: Option<Operation>,
}

/// The shard's last operation, who acknowledged it, and this proxy's part in it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Operation {
    #[serde(flatten)]
    pub op: records::Op,
    pub acks: Vec<records::Ack>,
    pub locked_by: Option<String>,
    /// `coordinating`, `taking part`, `not taking part`.
    pub this_proxy: String,
}

/// What a hold, `/buffer`, `/primary` or `/resume` did to a shard.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ShardChange {
    pub shard: String,
    /// For a hold: whether this call held the shard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held: Option<bool>,
    /// For a hold: the shard was held already.
    #[serde(default, skip_serializing_if = "is_false")]
    pub already: bool,
    /// For a hold: the server about to stop is not the shard's primary (nothing held).
    #[serde(default, skip_serializing_if = "is_false")]
    pub not_primary: bool,
    /// For a hold: a switchover through handoff was waiting for it.
    #[serde(default, skip_serializing_if = "is_false")]
    pub switchover: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old_primary: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lameduck_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lameduck_cancelled: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prewarmed_connections: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prewarm_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coordination: Option<report::Coordinated>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_decode_error_names_the_key() {
        let e = decode::<records::Primary>(br#"{"primary":"h:1","epoch":"x"}"#).unwrap_err();
        assert_eq!(e.path, "epoch", "{e}");
        let e = decode::<records::Primary>(br#"{"primary":"h:1","epoch":1,"timeline":5000000000}"#)
            .unwrap_err();
        assert_eq!(e.path, "timeline", "{e}");
        let e = decode::<Shards>(br#"{"shards":[{"name":1}],"coordination":{"enabled":false}}"#)
            .unwrap_err();
        assert_eq!(e.path, "shards[0].name", "{e}");
    }

    #[test]
    fn coordination_off_is_one_key() {
        let off = Coordination::default();
        assert_eq!(to_value(&off), serde_json::json!({"enabled": false}));
        assert_eq!(
            decode::<Coordination>(br#"{"enabled":false}"#).unwrap(),
            off
        );
    }
}
