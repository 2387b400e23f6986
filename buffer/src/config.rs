//! The buffer's settings (`HANDOFF_BUFFER_*`) and their validation.

use std::time::Duration;

/// Settings, with the defaults docs/buffer.md lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BufferConfig {
    pub enabled: bool,
    pub dry_run: bool,
    /// Capacity per shard, in requests.
    pub size: usize,
    /// Capacity across all shards, in request bytes.
    pub max_bytes: usize,
    pub window: Duration,
    pub max_failover_duration: Duration,
    pub min_time_between_failovers: Duration,
    pub drain_concurrency: usize,
    /// Buffer only these shards (`None`: all).
    pub shards: Option<Vec<String>>,
}

impl Default for BufferConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            dry_run: false,
            size: 1000,
            max_bytes: 64 * 1024 * 1024,
            window: Duration::from_secs(10),
            max_failover_duration: Duration::from_secs(20),
            min_time_between_failovers: Duration::ZERO,
            drain_concurrency: 20,
            shards: None,
        }
    }
}

/// An invalid setting; the message names the variable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{var}: {reason}")]
pub struct ConfigError {
    pub var: &'static str,
    pub reason: String,
}

fn bad(var: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        var,
        reason: reason.into(),
    }
}

impl BufferConfig {
    /// Checks the settings against the configured shard names.
    pub fn validate(&self, shards: &[&str]) -> Result<(), ConfigError> {
        if self.window < Duration::from_millis(1) {
            return Err(bad("HANDOFF_BUFFER_WINDOW", "must be at least 1ms"));
        }
        if self.window > self.max_failover_duration {
            return Err(bad(
                "HANDOFF_BUFFER_WINDOW",
                format!(
                    "{:?} is longer than HANDOFF_BUFFER_MAX_FAILOVER_DURATION ({:?})",
                    self.window, self.max_failover_duration
                ),
            ));
        }
        if self.size < 1 {
            return Err(bad("HANDOFF_BUFFER_SIZE", "must be at least 1"));
        }
        if self.drain_concurrency < 1 {
            return Err(bad(
                "HANDOFF_BUFFER_DRAIN_CONCURRENCY",
                "must be at least 1",
            ));
        }
        if let Some(list) = &self.shards {
            if let Some(unknown) = list.iter().find(|s| !shards.contains(&s.as_str())) {
                return Err(bad(
                    "HANDOFF_BUFFER_SHARDS",
                    format!("'{unknown}' is not a shard in HANDOFF_SHARDS"),
                ));
            }
        }
        Ok(())
    }
}
