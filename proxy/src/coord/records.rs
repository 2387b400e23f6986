//! Where the proxies of one cluster keep their records in etcd (the keys), and the
//! records themselves, whose types are defined once in [`crate::api::records`].

pub(crate) use crate::api::records::{Ack, Lock, Member, Op, OpKind, Phase, Primary, Record};
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
