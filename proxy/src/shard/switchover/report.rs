//! The switchover's record, step by step, as the admin API, the console and the logs
//! report it.

use std::time::Duration;

use tokio::time::Instant;

use super::{Outcome, Run};

/// One step's record.
#[derive(Debug, Clone)]
pub(super) struct Step {
    pub(super) name: &'static str,
    pub(super) duration: Duration,
    pub(super) error: Option<String>,
}

/// What the switchover did, step by step.
#[derive(Debug, Clone)]
pub(crate) struct Report {
    pub(super) shard: String,
    pub(super) from: String,
    pub(super) to: String,
    pub outcome: Outcome,
    pub(super) steps: Vec<Step>,
    pub(super) fence_lsn: Option<String>,
    /// Databases the fence closed on the old primary.
    pub(super) fenced_databases: Vec<String>,
    /// Sessions the fence terminated on the old primary.
    pub(super) fence_terminated: u64,
    pub(crate) epoch: u64,
    pub(crate) lameduck_cancelled: usize,
    pub(crate) prewarmed: usize,
    pub(super) demote: Option<crate::shard::demote::Outcome>,
    /// The name the target was made synchronous under, before the revocation.
    pub(super) sync_target: Option<String>,
    /// How far the target's replay was behind the fence LSN when the fence took it.
    pub(super) lag_at_revoke: Option<f64>,
    /// The other standbys now streaming from the new primary.
    pub(super) repointed: Vec<String>,
    pub error: Option<String>,
}

impl Report {
    /// The report as the admin API answers it.
    pub fn to_report(&self) -> crate::api::report::SwitchoverReport {
        use crate::api::report as r;
        let ms = |d: Duration| (d.as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0;
        r::SwitchoverReport {
            shard: self.shard.clone(),
            from: self.from.clone(),
            to: self.to.clone(),
            outcome: self.outcome,
            epoch: self.epoch,
            fence_lsn: self.fence_lsn.clone(),
            fence: r::Fence {
                lsn: self.fence_lsn.clone(),
                databases: self.fenced_databases.clone(),
                terminated_sessions: self.fence_terminated,
            },
            lameduck_cancelled: self.lameduck_cancelled,
            prewarmed_connections: self.prewarmed,
            total_ms: ms(self.steps.iter().map(|s| s.duration).sum()),
            steps: self
                .steps
                .iter()
                .map(|s| r::Step {
                    step: s.name.to_string(),
                    ms: ms(s.duration),
                    ok: s.error.is_none(),
                    error: s.error.clone(),
                })
                .collect(),
            demote: self.demote.as_ref().map(|d| d.to_report()),
            sync_target: self.sync_target.clone(),
            lag_at_revoke_bytes: self.lag_at_revoke,
            repointed_standbys: self.repointed.clone(),
            error: self.error.clone(),
            coordination: None,
        }
    }
}

impl Run<'_> {
    pub(crate) fn step(&mut self, name: &'static str, started: Instant, error: Option<String>) {
        let duration = started.elapsed();
        metrics::histogram!(crate::metrics::SWITCHOVER_STEP, "shard" => self.shard.name.clone(), "step" => name)
            .record(duration);
        match &error {
            None => {
                tracing::info!(shard = %self.shard.name, step = name, ms = duration.as_millis() as u64, "switchover step done")
            }
            Some(e) => {
                tracing::warn!(shard = %self.shard.name, step = name, ms = duration.as_millis() as u64, error = %e, "switchover step failed")
            }
        }
        self.report.steps.push(Step {
            name,
            duration,
            error,
        });
    }

    pub(super) fn finish(mut self, outcome: Outcome, error: Option<String>) -> Report {
        self.report.outcome = outcome;
        self.report.error = error;
        metrics::counter!(crate::metrics::SWITCHOVERS, "shard" => self.shard.name.clone(), "outcome" => outcome.as_str())
            .increment(1);
        tracing::info!(shard = %self.shard.name, outcome = outcome.as_str(), from = %self.report.from, to = %self.report.to, "switchover finished");
        self.report
    }
}
