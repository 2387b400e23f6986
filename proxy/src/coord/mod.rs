//! Coordination: several handoff proxies in front of the same shards agree, through
//! etcd, on each shard's primary and take part together in every switchover
//! (docs/coordination.md). Enabled by `HANDOFF_ETCD_ENDPOINTS`; without it nothing here
//! runs.
//!
//! - **Membership** ([`member`]): each proxy registers under the prefix with a lease it
//!   keeps alive; a proxy that dies or is cut off from etcd drops out when the lease
//!   expires.
//! - **Shared state** ([`follow`]): each shard's established primary, epoch and timeline
//!   are one record, written compare-and-set. Every proxy watches the prefix and brings
//!   its own state machine to the record — after checking the host itself.
//! - **Operations** ([`lead`]): a switchover started on any proxy, or the external
//!   two-step API called on any proxy, is published as an operation that every live
//!   proxy takes part in: each holds new transactions, lameducks the old primary and
//!   acknowledges before the coordinator fences and promotes.
//! - **Abandoned operations** ([`recover`]): when a coordinator's lease expires in the
//!   middle, another proxy finishes: forward if the promotion was published, back if
//!   not.
//!
//! When etcd does not answer a proxy keeps serving on what it last knew, says so
//! (`/v1/shards`, `handoff_coordination_up`), refuses to start operations, and catches up
//! when etcd answers again.

/// etcd's gRPC client, generated from `proxy/proto/etcd.proto` (see [`store`]); kept
/// exactly as generated (a test compares it), so rustfmt leaves it alone.
#[rustfmt::skip]
#[allow(
    clippy::all,
    clippy::pedantic,
    missing_docs,
    unreachable_pub,
    rustdoc::invalid_html_tags
)]
#[path = "../../generated/etcdserverpb.rs"]
mod etcdserverpb;
mod external;
mod follow;
mod lead;
mod member;
pub(crate) mod records;
mod recover;
mod startup;
mod store;

pub(crate) use startup::initial_shard;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::backend::admin::AdminSession;
use crate::config::EtcdSettings;
use crate::shard::{Ctx, Shard};
use crate::shutdown::Signal;
use crate::sync::Locked;
use records::{Ack, Keys, Member, Op, Primary, Record};
pub use store::SetupError;
use store::{Store, StoreError};

/// Why an operation was not started or applied: an HTTP status and a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    /// 409 (conflict with the shard's or the cluster's state) or 503 (etcd unreachable).
    pub status: u16,
    pub message: String,
}

impl Refusal {
    fn conflict(message: impl Into<String>) -> Self {
        Self {
            status: 409,
            message: message.into(),
        }
    }

    fn unavailable(message: impl Into<String>) -> Self {
        Self {
            status: 503,
            message: message.into(),
        }
    }
}

/// Whether etcd answers, and who is in the cluster.
#[derive(Debug, Default)]
struct Status {
    up: bool,
    error: Option<String>,
    /// Wall-clock milliseconds of the last change of `up`.
    since_ms: u64,
    members: Vec<Member>,
}

/// This proxy's part in an operation another proxy coordinates.
#[derive(Debug)]
struct Joined {
    op: String,
    /// Admin sessions kept on the old primary and on the target while the operation
    /// runs: the fence spares the first, and either lets this proxy finish the
    /// operation if the coordinator dies (a fenced server accepts no new login).
    old: Option<AdminSession>,
    target: Option<AdminSession>,
    resolved: bool,
}

/// What this proxy last read of a shard's records (for `/v1/shards`).
#[derive(Debug, Clone, Default)]
struct View {
    primary: Option<Primary>,
    op: Option<Op>,
    lock: Option<String>,
    acks: Vec<Ack>,
}

/// A proxy's coordination with the others of its cluster.
#[derive(Debug)]
pub(crate) struct Coord {
    pub settings: EtcdSettings,
    pub keys: Keys,
    store: Store,
    ctx: Arc<Ctx>,
    shards: Vec<Arc<Shard>>,
    me: Member,
    /// This proxy's membership lease (0: none now).
    lease: AtomicI64,
    status: Mutex<Status>,
    /// Per shard: the operation this proxy takes part in.
    joined: Mutex<HashMap<String, Joined>>,
    /// Operations this process coordinates or finishes.
    running: Mutex<HashSet<String>>,
    views: Mutex<HashMap<String, View>>,
    /// Wakes the follower (a primary found here to publish).
    wake: Notify,
}

/// The etcd client and key layout, before the shards exist (startup reads the
/// recorded primaries through it).
#[derive(Debug, Clone)]
pub(crate) struct Connected {
    store: Store,
    keys: Keys,
}

impl Connected {
    pub async fn connect(settings: &EtcdSettings) -> Result<Self, SetupError> {
        Ok(Self {
            store: Store::connect(settings).await?,
            keys: Keys::new(&settings.prefix),
        })
    }

    /// The shard's recorded primary, if etcd answers and has one.
    pub async fn recorded(&self, shard: &str) -> Result<Option<Primary>, String> {
        match self.store.get(&self.keys.primary(shard)).await {
            Ok(Some(kv)) => Primary::decode(&kv.value)
                .map(Some)
                .map_err(|e| format!("the primary record of shard {shard} does not decode: {e}")),
            Ok(None) => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }
}

impl Coord {
    /// Starts coordination: membership, and the follower that keeps this proxy's
    /// shards in line with the cluster's records. Both stop at shutdown.
    pub fn start(
        connected: Connected,
        settings: EtcdSettings,
        ctx: Arc<Ctx>,
        shards: Vec<Arc<Shard>>,
        admin: std::net::SocketAddr,
        listen: std::net::SocketAddr,
        shutdown: Signal,
    ) -> Arc<Self> {
        let me = Member {
            id: settings.proxy_id.clone(),
            admin: admin.to_string(),
            listen: listen.to_string(),
            started_ms: records::now_ms(),
        };
        let coord = Arc::new(Self {
            keys: connected.keys,
            store: connected.store,
            settings,
            ctx,
            shards,
            me,
            lease: AtomicI64::new(0),
            status: Mutex::new(Status::default()),
            joined: Mutex::new(HashMap::new()),
            running: Mutex::new(HashSet::new()),
            views: Mutex::new(HashMap::new()),
            wake: Notify::new(),
        });
        metrics::gauge!(crate::metrics::COORD_UP).set(0.0);
        tokio::spawn(Arc::clone(&coord).membership(shutdown.clone()));
        tokio::spawn(Arc::clone(&coord).follow(shutdown.clone()));
        for shard in &coord.shards {
            // A primary found by this proxy's own discovery is published at once.
            let mut found = shard.health.discovered.subscribe();
            let c = Arc::clone(&coord);
            let stop = shutdown.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        r = found.changed() => if r.is_err() { return },
                        _ = stop.reached(crate::shutdown::Phase::Draining) => return,
                    }
                    c.wake.notify_one();
                }
            });
        }
        coord
    }

    fn lease(&self) -> i64 {
        self.lease.load(SeqCst)
    }

    /// etcd answered.
    fn ok(&self) {
        let mut s = self.status.locked();
        if !s.up {
            s.up = true;
            s.since_ms = records::now_ms();
            tracing::info!(proxy = %self.me.id, "coordination up: etcd answers");
            metrics::gauge!(crate::metrics::COORD_UP).set(1.0);
        }
        s.error = None;
    }

    /// etcd did not answer.
    fn failed(&self, e: &StoreError) {
        metrics::counter!(crate::metrics::COORD_ERRORS).increment(1);
        let mut s = self.status.locked();
        if s.up || s.since_ms == 0 {
            s.since_ms = records::now_ms();
            tracing::warn!(proxy = %self.me.id, error = %e, "coordination down: serving on the last known state; no coordinated operation can start until etcd answers");
            metrics::gauge!(crate::metrics::COORD_UP).set(0.0);
        }
        s.up = false;
        s.error = Some(e.to_string());
    }

    /// Refuses an operation while coordination is down.
    fn ready(&self) -> Result<i64, Refusal> {
        let s = self.status.locked();
        let lease = self.lease();
        if !s.up || lease == 0 {
            return Err(Refusal::unavailable(format!(
                "coordination is down ({}): an operation for every proxy of {} cannot start until etcd answers this proxy",
                s.error.clone().unwrap_or_else(|| "not registered in etcd yet".into()),
                self.keys.all().trim_end_matches('/'),
            )));
        }
        Ok(lease)
    }

    fn set_members(&self, members: Vec<Member>) {
        metrics::gauge!(crate::metrics::COORD_MEMBERS).set(members.len() as f64);
        self.status.locked().members = members;
    }

    /// The whole cluster as this proxy sees it (`GET /v1/shards`, `coordination`).
    pub fn status(&self) -> crate::api::Coordination {
        let s = self.status.locked();
        crate::api::Coordination {
            enabled: true,
            proxy: Some(self.me.id.clone()),
            prefix: Some(self.settings.prefix.clone()),
            endpoints: Some(self.settings.endpoints.clone()),
            up: Some(s.up && self.lease() != 0),
            error: s.error.clone(),
            since_ms: Some(s.since_ms),
            members: Some(
                s.members
                    .iter()
                    .map(|m| crate::api::ClusterMember {
                        member: m.clone(),
                        this_proxy: m.id == self.me.id,
                    })
                    .collect(),
            ),
        }
    }

    /// A shard's records as this proxy last read them.
    pub fn shard_records(&self, shard: &str) -> Option<crate::api::ShardRecords> {
        let views = self.views.locked();
        let v = views.get(shard)?;
        let joined = self.joined.locked();
        Some(crate::api::ShardRecords {
            recorded: v.primary.clone(),
            operation: v.op.as_ref().map(|op| crate::api::Operation {
                op: op.clone(),
                acks: v.acks.clone(),
                locked_by: v.lock.clone(),
                this_proxy: if self.running.locked().contains(&op.id) {
                    "coordinating"
                } else if joined.get(shard).is_some_and(|j| j.op == op.id) {
                    "taking part"
                } else {
                    "not taking part"
                }
                .to_string(),
            }),
        })
    }

    /// Sleeps at a failpoint (`HANDOFF_FAILPOINT`, tests only).
    async fn failpoint(&self, point: &str) {
        if let Some(fp) = &self.settings.failpoint {
            if fp.point == point {
                tracing::warn!(point, pause = ?fp.pause, "failpoint: pausing the coordinated switchover");
                tokio::time::sleep(fp.pause).await;
            }
        }
    }
}
