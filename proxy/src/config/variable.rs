//! What the table of variables records about each one.

/// Which part of handoff a variable configures: the sections of the configuration
/// reference (`docs/configuration.md`), in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topic {
    Listen,
    Shards,
    Auth,
    Clients,
    Pools,
    Buffer,
    Replicas,
    Failover,
    Coordination,
    Patroni,
    PgAutoFailover,
    Repmgr,
}

impl Topic {
    pub const ALL: [Topic; 12] = [
        Topic::Listen,
        Topic::Shards,
        Topic::Auth,
        Topic::Clients,
        Topic::Pools,
        Topic::Buffer,
        Topic::Replicas,
        Topic::Failover,
        Topic::Coordination,
        Topic::Patroni,
        Topic::PgAutoFailover,
        Topic::Repmgr,
    ];

    pub fn title(self) -> &'static str {
        match self {
            Topic::Listen => "Listening, TLS, the admin API and logs",
            Topic::Shards => "Shards and routing",
            Topic::Auth => "Users and authentication",
            Topic::Clients => "Client limits and timeouts",
            Topic::Pools => "Pools and server connections",
            Topic::Buffer => "The failover buffer",
            Topic::Replicas => "Reads on standbys",
            Topic::Failover => "Switchovers, failure detection and the fence",
            Topic::Coordination => "Coordination over etcd",
            Topic::Patroni => "Patroni",
            Topic::PgAutoFailover => "pg_auto_failover",
            Topic::Repmgr => "repmgr",
        }
    }
}

/// When a running proxy takes a new value of a variable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applies {
    /// Read at startup: a takeover (`handoff --takeover`) changes it with no client
    /// disconnected.
    Takeover,
    /// Read at startup and kept by a takeover (the listening sockets move as they are):
    /// a restart changes it.
    Restart,
    /// Read again on SIGHUP.
    OnSighup,
}

/// One documented variable: its name, topic, default (as written in the environment),
/// when a change applies, and its meaning (Markdown: `code` in backquotes).
#[derive(Debug, Clone, Copy)]
pub struct Variable {
    pub name: &'static str,
    pub topic: Topic,
    pub default: &'static str,
    pub applies: Applies,
    pub help: &'static str,
}
