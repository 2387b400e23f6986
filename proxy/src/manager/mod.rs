//! HA managers: the programs that decide which server of a shard is the primary and run
//! its promotions (Patroni, pg_auto_failover, repmgr). Each is reached through one small
//! interface, [`Manager`], and the shard layer (`shard::managed`,
//! `shard::managed_switch`) knows nothing of any particular one. A manager answers four
//! questions:
//!
//! - *who leads and who are the members* — [`Manager::view`], a [`View`];
//! - *is the leader about to stop* — either the manager calls `handoff hold` itself
//!   before it stops the leader ([`Manager::hold_hook`]: Patroni's `before_stop` hook),
//!   or handoff sees it in the view ([`View::stopping`]: pg_auto_failover's goal states);
//! - *switch over, please* — [`Manager::switchover`];
//! - *will it refuse* — [`View::paused`], and each member's [`Member::not_candidate`].
//!
//! handoff never takes a manager's word for writability: the leader it names is served
//! only once handoff's own probe finds it writable on the highest timeline seen.
//!
//! Adding a manager is one module here implementing [`Manager`], its configuration
//! variable, and a line in [`Managers::new`].

pub mod patroni;
pub mod pg_auto_failover;
pub mod repmgr;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::config::HostPort;

/// A future a manager returns (boxed, so [`Manager`] can be used as a trait object).
pub type Fut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Which manager it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Patroni,
    PgAutoFailover,
    Repmgr,
}

impl Kind {
    /// The label in metrics, the API and `handoff status`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Patroni => "patroni",
            Kind::PgAutoFailover => "pg_auto_failover",
            Kind::Repmgr => "repmgr",
        }
    }

    /// The name in messages.
    pub fn title(self) -> &'static str {
        match self {
            Kind::Patroni => "Patroni",
            Kind::PgAutoFailover => "pg_auto_failover",
            Kind::Repmgr => "repmgr",
        }
    }
}

/// One server as the manager sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The manager's name for it.
    pub name: String,
    /// Where its PostgreSQL listens.
    pub addr: HostPort,
    /// The manager's writable primary (Patroni's leader lock; pg_auto_failover's node
    /// that reports and is assigned a read-write state).
    pub leader: bool,
    /// Its role in the manager's own words (`leader`, `replica`, `primary`, …).
    pub role: String,
    /// Its state in the manager's own words (`streaming`, `secondary`, …).
    pub state: String,
    /// Its timeline, as the manager last heard it (may lag behind a promotion).
    pub timeline: Option<u32>,
    /// Why the manager would not promote it now; `None` when it could be.
    pub not_candidate: Option<String>,
}

/// What a manager last said of a shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    /// The cluster's name (Patroni's scope; pg_auto_failover's formation and group).
    pub name: String,
    pub members: Vec<Member>,
    /// Why the manager does not switch over now (Patroni's maintenance mode).
    pub paused: Option<String>,
    /// A server the manager has told to stop taking writes while it still does:
    /// handoff holds the shard when it is the primary it serves.
    pub stopping: Option<HostPort>,
}

impl View {
    /// The manager's writable primary.
    pub fn leader(&self) -> Option<&Member> {
        self.members.iter().find(|m| m.leader)
    }

    /// The member named `name`, or listening on `name` (`host:port`).
    pub fn member(&self, name: &str) -> Option<&Member> {
        self.members
            .iter()
            .find(|m| m.name == name)
            .or_else(|| self.members.iter().find(|m| m.addr.to_string() == name))
    }

    /// The member listening on `addr`.
    pub fn at(&self, addr: &HostPort) -> Option<&Member> {
        self.members.iter().find(|m| &m.addr == addr)
    }

    /// `name (addr, role), …` for messages.
    pub fn names(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{} ({}, {})", m.name, m.addr, m.role))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Why a manager could not be asked, or what it refused.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ManagerError {
    #[error("{0}")]
    Unreachable(String),
    /// The manager answered with a refusal (an HTTP status, a SQLSTATE) and message.
    #[error("{code}: {message}")]
    Refused { code: String, message: String },
    #[error("malformed answer: {0}")]
    Malformed(String),
}

/// How often the shard layer reads a manager.
#[derive(Debug, Clone, Copy)]
pub struct Intervals {
    /// While the shard serves (a safety net where the manager also notifies).
    pub follow: Duration,
    /// While the shard is held, waiting for the manager's next leader.
    pub held: Duration,
}

/// An HA manager of one shard.
pub trait Manager: Send + Sync + std::fmt::Debug {
    fn kind(&self) -> Kind;

    /// Where handoff reaches it (shown in status; no secrets).
    fn endpoints(&self) -> Vec<String>;

    fn intervals(&self) -> Intervals;

    /// Reads the manager's view now; remembered for [`Manager::last`].
    fn view(&self) -> Fut<'_, Result<Arc<View>, ManagerError>>;

    /// The last view read, if any.
    fn last(&self) -> Option<Arc<View>>;

    /// Why the last read failed; `None` when it succeeded (or none was made).
    fn last_error(&self) -> Option<String>;

    /// Returns when the manager may have something new to say (a notification where it
    /// sends them), or after `idle`.
    fn changed(&self, idle: Duration) -> Fut<'_, ()>;

    /// Asks the manager to switch `leader` over to `candidate`. Some managers answer
    /// once it is over (Patroni), others once they have started it (pg_auto_failover):
    /// the shard layer watches the candidate either way.
    fn switchover<'a>(
        &'a self,
        leader: &'a Member,
        candidate: &'a Member,
        timeout: Duration,
    ) -> Fut<'a, Result<String, ManagerError>>;

    /// True when the manager calls `handoff hold` against this proxy right before it
    /// stops the leader (Patroni's `before_stop` with `HANDOFF_PATRONI_HOOK`, repmgr's
    /// `service_stop_command` with `HANDOFF_REPMGR_HOOK`): a switchover through handoff
    /// then holds on that call instead of before asking.
    fn hold_hook(&self) -> bool {
        false
    }

    /// The manager said something changed (`handoff recheck`, from repmgr's
    /// `event_notification_command`): the next [`Manager::changed`] returns at once.
    fn poke(&self) {}
}

/// The manager of each shard that has one.
#[derive(Debug, Default)]
pub struct Managers(HashMap<String, Arc<dyn Manager>>);

impl Managers {
    pub fn new(config: &crate::config::Config) -> Self {
        let mut all: HashMap<String, Arc<dyn Manager>> = HashMap::new();
        for p in &config.patroni.shards {
            let m = patroni::Source::new(&p.shard, p.endpoints.clone(), &config.patroni);
            all.insert(p.shard.clone(), Arc::new(m));
        }
        for a in &config.pg_auto_failover.shards {
            let m = pg_auto_failover::Monitor::new(a, &config.pg_auto_failover);
            all.insert(a.shard.clone(), Arc::new(m));
        }
        for r in &config.repmgr.shards {
            let m = repmgr::Repmgr::new(r, &config.repmgr);
            all.insert(r.shard.clone(), Arc::new(m));
        }
        Self(all)
    }

    /// The manager of `shard`, if it has one.
    pub fn get(&self, shard: &str) -> Option<&Arc<dyn Manager>> {
        self.0.get(shard)
    }
}

/// A manager's PostgreSQL login as given, with `timeout` to connect and handoff's
/// `application_name` unless one was given (pg_auto_failover's monitor, repmgr's nodes).
pub(crate) fn session_config(
    given: &tokio_postgres::Config,
    timeout: Duration,
) -> tokio_postgres::Config {
    let mut config = given.clone();
    config.connect_timeout(timeout);
    if config.get_application_name().is_none() {
        config.application_name("handoff");
    }
    config
}

/// Counts one request to a manager.
pub(crate) fn count(kind: Kind, shard: &str, request: &'static str, result: &'static str) {
    metrics::counter!(crate::metrics::MANAGER_REQUESTS, "shard" => shard.to_string(), "manager" => kind.as_str(), "request" => request, "result" => result)
        .increment(1);
}
