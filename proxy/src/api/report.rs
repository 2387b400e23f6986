//! The report of a switchover (`POST /v1/shards/{s}/switchover`, `handoff switchover`,
//! the console's `SWITCHOVER`): how it ended and what each step took; with
//! coordination, who took part.

use serde::{Deserialize, Serialize};

use super::records;

/// How a switchover ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The target is the primary.
    Completed,
    /// Refused before anything changed.
    Refused,
    /// Something failed before the promotion: the old primary serves again.
    RolledBack,
    /// The target was promoted but could not be confirmed; the shard stays buffering
    /// until an operator establishes a primary (or the buffer's time runs out).
    Failed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Refused => "refused",
            Outcome::RolledBack => "rolled_back",
            Outcome::Failed => "failed",
        }
    }
}

/// What a switchover did, step by step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SwitchoverReport {
    pub shard: String,
    pub from: String,
    pub to: String,
    pub outcome: Outcome,
    pub epoch: u64,
    pub fence_lsn: Option<String>,
    pub fence: Fence,
    /// Transactions cancelled because they outlived `HANDOFF_DRAIN_TIMEOUT`.
    pub lameduck_cancelled: usize,
    pub prewarmed_connections: usize,
    pub total_ms: f64,
    pub steps: Vec<Step>,
    /// `HANDOFF_SWITCHOVER_DEMOTE_COMMAND`'s run, when there was one.
    pub demote: Option<Demote>,
    /// The name the target was made synchronous under, before the revocation.
    pub sync_target: Option<String>,
    /// How far the target's replay was behind the fence LSN when the fence took it.
    pub lag_at_revoke_bytes: Option<f64>,
    /// The shard's other standbys pointed at the new primary by handoff.
    #[serde(default)]
    pub repointed_standbys: Vec<String>,
    pub error: Option<String>,
    /// With coordination: the operation and who took part.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coordination: Option<Coordinated>,
}

/// One step of a switchover.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub step: String,
    pub ms: f64,
    pub ok: bool,
    pub error: Option<String>,
}

/// What the fence did on the old primary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fence {
    pub lsn: Option<String>,
    pub databases: Vec<String>,
    pub terminated_sessions: u64,
}

/// The demote command's run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Demote {
    pub command: String,
    pub ok: bool,
    pub exit_code: Option<i32>,
    pub timed_out: bool,
    pub ms: f64,
    pub output: String,
    pub error: Option<String>,
}

/// A coordinated operation as its coordinator reports it, or the record an action
/// wrote: every field is there only when it applies.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Coordinated {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub op: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coordinator: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<records::Phase>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Outcome>,
    /// Every proxy that acknowledged, the coordinator first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub proxies: Vec<ProxyAck>,
    /// Live proxies that did not acknowledge before the deadline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub missing: Option<Vec<String>>,
    /// The coordinator lost its lock (its lease expired) on the way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost_lock: Option<bool>,
    /// The shard's primary record as written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recorded: Option<records::Primary>,
    /// The operation record as it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<records::Op>,
}

/// One proxy's part in a coordinated operation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProxyAck {
    pub proxy: String,
    #[serde(default, skip_serializing_if = "super::is_false")]
    pub coordinator: bool,
    /// From the publication to its acknowledgement.
    pub ack_ms: f64,
    pub lameduck_ms: Option<u64>,
    pub cancelled: Option<u64>,
}
