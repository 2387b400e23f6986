//! A fault campaign: one long history of requests through three handoff proxies while
//! a seeded schedule of faults hits the topology one at a time, then checkers over the
//! whole history ([`check`]).
//!
//! The topology: a primary and two standbys, each in a network namespace of its own
//! ([`crate::netns`]) with synchronous replication (whichever server is primary waits
//! for a standby's flush, so a crash loses nothing acknowledged); etcd; three proxies
//! coordinated through it — p1 and p2 in transaction mode, p3 in session mode; p1 on a
//! test host of its own, the others in the test's namespace. The
//! harness plays the HA manager for unplanned faults: it promotes the synchronous
//! standby a moment after the primary dies or is cut off, points the other standby at
//! it, and rewinds the old primary into a standby.
//!
//! The faults ([`FaultKind`]): planned switchovers through a random proxy's API; `kill
//! -9` of the primary; a silent partition of the primary (its link down: no reset, its
//! connections hang); a silent partition of p1 from everything (clients, servers,
//! etcd) for 5 s; `kill -9` of a proxy and its restart; a takeover of a proxy by a new
//! process; etcd stopped and started. The schedule is shuffled by the seed, so a
//! seed names one campaign.

pub mod check;
pub mod workload;

use std::fmt::Write as _;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

use crate::admin::server;
use crate::etcd::Etcd;
use crate::netns::Net;
use crate::proxies::ProxyProcess;
use crate::Cluster;

pub use check::Report;
use workload::{Mix, Op, Workload};

/// What to run.
#[derive(Debug, Clone)]
pub struct Plan {
    pub seed: u64,
    pub switchovers: usize,
    pub crashes: usize,
    pub partitions: usize,
    /// p1 (on a test host of its own) cut off from everything for a while.
    pub proxy_partitions: usize,
    pub proxy_kills: usize,
    pub takeovers: usize,
    pub etcd_restarts: usize,
    pub mix: Mix,
    /// Load before the first fault (the resource baseline is taken after it).
    pub warmup: Duration,
    /// Quiet time after each fault has been dealt with.
    pub settle: Duration,
    /// How long the harness, as HA manager, takes to promote after a crash or a cut.
    pub promote_after: Duration,
}

impl Plan {
    /// The campaign in CI: a few minutes, every kind of fault.
    pub fn short(seed: u64) -> Self {
        Self {
            seed,
            switchovers: 6,
            crashes: 2,
            partitions: 2,
            proxy_partitions: 1,
            proxy_kills: 2,
            takeovers: 2,
            etcd_restarts: 2,
            mix: Mix {
                writers: 3,
                readers: 1,
                replica_readers: 1,
                think: Duration::from_millis(10),
                give_up: Duration::from_secs(30),
            },
            warmup: Duration::from_secs(3),
            settle: Duration::from_secs(1),
            promote_after: Duration::from_secs(2),
        }
    }

    /// The goal: 100 switchovers, 20 crashes, 10 partitions, 10 proxy kills,
    /// 10 etcd restarts (and 10 takeovers).
    pub fn long(seed: u64) -> Self {
        Self {
            switchovers: 100,
            crashes: 20,
            partitions: 10,
            proxy_partitions: 5,
            proxy_kills: 10,
            takeovers: 10,
            etcd_restarts: 10,
            warmup: Duration::from_secs(10),
            ..Self::short(seed)
        }
    }

    fn schedule(&self) -> Vec<FaultKind> {
        let mut all = Vec::new();
        for (kind, n) in [
            (FaultKind::Switchover, self.switchovers),
            (FaultKind::Crash, self.crashes),
            (FaultKind::Partition, self.partitions),
            (FaultKind::ProxyPartition, self.proxy_partitions),
            (FaultKind::ProxyKill, self.proxy_kills),
            (FaultKind::Takeover, self.takeovers),
            (FaultKind::EtcdRestart, self.etcd_restarts),
        ] {
            all.extend(std::iter::repeat_n(kind, n));
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(self.seed);
        all.shuffle(&mut rng);
        all
    }
}

/// A kind of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FaultKind {
    Switchover,
    Crash,
    Partition,
    ProxyPartition,
    ProxyKill,
    Takeover,
    EtcdRestart,
}

impl FaultKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FaultKind::Switchover => "switchover",
            FaultKind::Crash => "primary crash",
            FaultKind::Partition => "primary partition",
            FaultKind::ProxyPartition => "proxy partition",
            FaultKind::ProxyKill => "proxy kill",
            FaultKind::Takeover => "proxy takeover",
            FaultKind::EtcdRestart => "etcd restart",
        }
    }

    /// Planned: no client may see an error.
    pub fn planned(self) -> bool {
        matches!(
            self,
            FaultKind::Switchover | FaultKind::Takeover | FaultKind::EtcdRestart
        )
    }
}

/// One fault as it happened.
#[derive(Debug, Clone)]
pub struct Fault {
    pub n: usize,
    pub kind: FaultKind,
    pub detail: String,
    /// When it struck, since the campaign started.
    pub start: Duration,
    /// When the harness had finished dealing with it (promotion, rejoin, restart).
    pub end: Duration,
    /// The proxy it hit (kills and takeovers) or went through (switchovers).
    pub proxy: Option<usize>,
    /// The timeline a promotion started and when the promotion had finished.
    pub promoted: Option<(i32, Duration)>,
    /// When every proxy served the new primary again (primary faults).
    pub served: Option<Duration>,
    /// When the harness began restarting a standby that could not follow the new
    /// primary (it is rewound): the sessions on it end, as they do when an HA manager
    /// does the same.
    pub standby_restarted: Option<Duration>,
    /// Each proxy's RSS (kB) once it had been dealt with.
    pub rss_kb: Vec<u64>,
}

/// A proxy's resource use at one moment.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    pub rss_kb: u64,
    pub fds: u64,
    pub server_connections: f64,
    /// The most server connections the proxy's configuration lets it hold for this
    /// load: in transaction mode its primary pool (`HANDOFF_POOL_SIZE`, which a new
    /// primary's pre-warm fills) and one per standby for the one replica reader; in
    /// session mode one per client.
    pub server_ceiling: f64,
    pub tasks: f64,
    /// Connection pools (one per user, database and server: a host that became
    /// primary or standby gets one, with a maintenance task, kept for the process's
    /// life).
    pub pools: f64,
}

/// Everything a campaign runs on; dropped in field order (proxies first, the cluster
/// and its network last).
struct Topology {
    proxies: Vec<ProxyProcess>,
    /// p1's test host.
    p1_host: crate::netns::Host,
    mix: Mix,
    targets: workload::Targets,
    vars: Vec<Vec<(String, String)>>,
    etcd: Etcd,
    cluster: Cluster,
    logs: tempfile::TempDir,
}

/// The proxy in session mode (p3).
pub const SESSION_PROXY: usize = 2;

/// Every proxy's `HANDOFF_ADMIN_TOKEN`.
const ADMIN_TOKEN: &str = "chaos-admin";

/// Each proxy's `HANDOFF_POOL_SIZE`.
const POOL_SIZE: usize = 8;

fn proxy_vars(etcd: &Etcd, logs: &std::path::Path, i: usize) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = [
        ("HANDOFF_ETCD_ENDPOINTS", etcd.endpoint()),
        ("HANDOFF_ETCD_PREFIX", "/handoff-chaos".into()),
        ("HANDOFF_ETCD_LEASE_TTL", "2s".into()),
        ("HANDOFF_ETCD_TIMEOUT", "1s".into()),
        ("HANDOFF_POOL_SIZE", POOL_SIZE.to_string()),
        ("HANDOFF_LOG", "info,handoff=debug".into()),
        // p1 listens on its test host's address, not loopback: clients log in with a
        // password and the admin API wants a token (the same for all three).
        ("HANDOFF_USERS", format!("postgres={}", workload::PASSWORD)),
        ("HANDOFF_ADMIN_TOKEN", ADMIN_TOKEN.into()),
        (
            "HANDOFF_TAKEOVER_SOCKET",
            logs.join(format!("p{}.takeover", i + 1))
                .display()
                .to_string(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    if i == SESSION_PROXY {
        v.push(("HANDOFF_POOL_MODE".into(), "session".into()));
    }
    v
}

impl Topology {
    fn start(rt: &tokio::runtime::Runtime, mix: Mix) -> Result<Self> {
        let net = Net::new()?;
        let mut cluster = Cluster::start_in(2, net)?;
        rt.block_on(workload::prepare(&server(&cluster.primary)))?;
        let net = cluster.net.as_mut().context("no network")?;
        let p1_host = net.host("proxy1")?;
        // On the bridge's address too: p1 reaches it from its own namespace.
        let etcd = Etcd::start_at(net.gateway().into())?;
        let logs = crate::proxies::log_dir()?;
        let mut proxies = Vec::new();
        let mut vars = Vec::new();
        for i in 0..3 {
            let v = proxy_vars(&etcd, logs.path(), i);
            let host = (i == 0).then_some(&p1_host);
            let p = rt.block_on(start_proxy(&cluster, i, &v, logs.path(), host))?;
            proxies.push(p);
            vars.push(v);
        }
        let targets = Arc::new(RwLock::new(proxies.iter().map(|p| p.listen).collect()));
        let t = Self {
            proxies,
            p1_host,
            mix,
            targets,
            vars,
            etcd,
            cluster,
            logs,
        };
        rt.block_on(t.wait_members(3))?;
        Ok(t)
    }

    async fn wait_members(&self, n: usize) -> Result<()> {
        for p in &self.proxies {
            crate::eventually(
                Duration::from_secs(30),
                "the proxy to see its cluster",
                || async {
                    let (_, c) = p.shard().await?;
                    Ok(c["up"] == true && c["members"].as_array().map(Vec::len) == Some(n))
                },
            )
            .await
            .with_context(|| format!("{}:\n{}", p.id, p.log_tail()))?;
        }
        Ok(())
    }

    /// Waits until every proxy serves the cluster's primary; returns when.
    async fn wait_served(&self, epoch: Instant, within: Duration) -> Result<Duration> {
        let primary = self.cluster.primary.addr();
        for p in &self.proxies {
            crate::eventually(within, "the proxy to serve the new primary", || async {
                let (s, _) = p.shard().await?;
                Ok(s["primary"] == primary.as_str() && s["state"] == "serving")
            })
            .await
            .with_context(|| format!("{} (primary {primary}):\n{}", p.id, p.log_tail()))?;
        }
        Ok(epoch.elapsed())
    }

    fn sample(&self, rt: &tokio::runtime::Runtime, i: usize) -> Result<Sample> {
        let p = &self.proxies[i];
        let pid = p.pid().ok_or_else(|| anyhow!("{} is not running", p.id))?;
        let rss_kb = rss_kb(pid);
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count() as u64;
        let server_connections = rt.block_on(p.metric("handoff_server_connections", &[]))?;
        let tasks = rt.block_on(p.metric("handoff_tasks", &[]))?;
        let (_, metrics) = rt.block_on(crate::raw::http(p.admin, "GET", "/metrics", p.token()))?;
        let pools = metrics
            .lines()
            .filter(|l| l.starts_with("handoff_pool_idle_connections{"))
            .count() as f64;
        let session = self.vars[i]
            .iter()
            .any(|(k, v)| k == "HANDOFF_POOL_MODE" && v == "session");
        let clients = self.mix.writers + self.mix.readers + self.mix.replica_readers;
        let server_ceiling = if session {
            clients as f64
        } else {
            (POOL_SIZE + 3 * self.mix.replica_readers) as f64
        };
        Ok(Sample {
            rss_kb,
            fds,
            server_connections,
            server_ceiling,
            tasks,
            pools,
        })
    }
}

async fn start_proxy(
    cluster: &Cluster,
    i: usize,
    vars: &[(String, String)],
    logs: &std::path::Path,
    host: Option<&crate::netns::Host>,
) -> Result<ProxyProcess> {
    let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let id = format!("p{}", i + 1);
    match host {
        Some(h) => ProxyProcess::start_in(cluster, &id, &vars, logs, h).await,
        None => ProxyProcess::start(cluster, &id, &vars, logs).await,
    }
}

/// Runs the campaign `plan` describes and checks its history. `Err`: the harness itself
/// could not go on (a server that would not start, say); a check that failed is in the
/// report (`Report::violations`).
pub fn run(plan: &Plan) -> Result<Report> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut top = Topology::start(&rt, plan.mix)?;
    let epoch = Instant::now();
    let workload = {
        let _in = rt.enter();
        Workload::start(&top.targets, plan.mix, epoch)
    };
    let mut faults = Vec::new();
    let mut baseline: Vec<Option<Sample>> = vec![None; 3];
    let mut end: Vec<Sample> = Vec::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(plan.seed ^ 0x5eed);
    let started = std::time::Instant::now();
    let result = (|| -> Result<()> {
        // Warm-up: load, then one switchover (checked like any other) so that every
        // pool the run will use exists and a new primary's pool has been pre-warmed
        // to its size; the baseline is taken after it.
        std::thread::sleep(plan.warmup / 2);
        let mut first = strike(
            &rt,
            &mut top,
            plan,
            &mut rng,
            0,
            FaultKind::Switchover,
            epoch,
        )
        .with_context(|| format!("the warm-up switchover, seed {}", plan.seed))?;
        first.detail = format!("warm-up: {}", first.detail);
        faults.push(first);
        std::thread::sleep(plan.warmup / 2);
        for (i, b) in baseline.iter_mut().enumerate() {
            *b = Some(top.sample(&rt, i)?);
        }
        for (n, kind) in (1..).zip(plan.schedule()) {
            let fault = strike(&rt, &mut top, plan, &mut rng, n, kind, epoch)
                .with_context(|| format!("fault {n} ({}), seed {}", kind.as_str(), plan.seed))?;
            eprintln!(
                "chaos {n:>3} {:>9.3}s {:<17} {} ({:.1}s)",
                fault.start.as_secs_f64(),
                kind.as_str(),
                fault.detail,
                (fault.end - fault.start).as_secs_f64()
            );
            // A new process (restarted, or a takeover's successor) gets a baseline of
            // its own.
            let restarted = fault
                .proxy
                .filter(|_| matches!(kind, FaultKind::ProxyKill | FaultKind::Takeover));
            faults.push(fault);
            std::thread::sleep(plan.settle);
            // Taken once it has run a while.
            if let Some(p) = restarted {
                std::thread::sleep(plan.settle);
                baseline[p] = Some(top.sample(&rt, p)?);
            }
        }
        // Measured under the same load as the baseline, after as long a quiet time
        // as the warm-up.
        std::thread::sleep(plan.warmup);
        end = (0..3).map(|i| top.sample(&rt, i)).collect::<Result<_>>()?;
        Ok(())
    })();
    let history: Vec<Op> = rt.block_on(workload.stop());
    let took = started.elapsed();
    // The servers' logs say why a server did not do what the harness waited for.
    result.map_err(|e| {
        anyhow!(
            "{e:#}\n--- last requests ---\n{}\n{}",
            history
                .iter()
                .rev()
                .take(10)
                .map(Op::describe)
                .collect::<Vec<_>>()
                .join("\n"),
            top.cluster.log_tails(20)
        )
    })?;
    let final_rows = rt.block_on(check::final_rows(&server(&top.cluster.primary)))?;
    let report = check::Report::new(
        plan,
        took,
        faults,
        history,
        final_rows,
        baseline
            .into_iter()
            .map(Option::unwrap_or_default)
            .collect(),
        end,
    );
    if !report.violations.is_empty() {
        let kept = top.logs.path().to_path_buf();
        // Each proxy's metrics at the end, beside its log.
        for p in &top.proxies {
            if let Ok((_, text)) =
                rt.block_on(crate::raw::http(p.admin, "GET", "/metrics", p.token()))
            {
                let _ = std::fs::write(kept.join(format!("{}.metrics", p.id)), text);
            }
        }
        // Keep the proxies' logs for whoever reads the failure.
        let logs = std::mem::replace(&mut top.logs, tempfile::tempdir()?);
        let _ = logs.keep();
        eprintln!("chaos: proxy logs kept in {}", kept.display());
    }
    for p in &mut top.proxies {
        rt.block_on(p.stop());
    }
    Ok(report)
}

/// Strikes one fault and deals with it.
fn strike(
    rt: &tokio::runtime::Runtime,
    top: &mut Topology,
    plan: &Plan,
    rng: &mut rand::rngs::StdRng,
    n: usize,
    kind: FaultKind,
    epoch: Instant,
) -> Result<Fault> {
    let mut f = Fault {
        n,
        kind,
        detail: String::new(),
        start: epoch.elapsed(),
        end: Duration::ZERO,
        proxy: None,
        promoted: None,
        served: None,
        standby_restarted: None,
        rss_kb: Vec::new(),
    };
    match kind {
        FaultKind::Switchover => {
            let p = rng.random_range(0..3);
            let target = rng.random_range(0..2);
            let to = top.cluster.standbys[target].addr();
            f.proxy = Some(p);
            f.detail = format!(
                "p{} moves {} to {}",
                p + 1,
                top.cluster.primary.name,
                top.cluster.standbys[target].name
            );
            // As an HA manager does, only to a standby that follows the primary and
            // has caught up (one rewound after a crash may still be on its way).
            top.cluster
                .wait_following(target, Duration::from_secs(30))
                .context("the switchover's target")?;
            f.start = epoch.elapsed();
            let (status, report) = rt.block_on(top.proxies[p].switchover(&to))?;
            if status != 200 || report["outcome"] != "completed" {
                bail!("the switchover was not completed ({status}): {report:#}");
            }
            let _ = write!(
                f.detail,
                " (handoff: {:.0} ms)",
                report["total_ms"].as_f64().unwrap_or_default()
            );
            top.cluster.swap(target);
            f.promoted = Some((top.cluster.primary.timeline()?, epoch.elapsed()));
            f.served = Some(rt.block_on(top.wait_served(epoch, Duration::from_secs(30)))?);
            top.cluster.rejoin(target)?;
        }
        FaultKind::Crash | FaultKind::Partition => {
            let sync = top.cluster.sync_standby()?;
            let other = 1 - sync;
            let old = top.cluster.primary.name.clone();
            let host = top.cluster.primary.net_host.clone();
            f.start = epoch.elapsed();
            if kind == FaultKind::Crash {
                top.cluster.primary.crash()?;
            } else {
                let net = top.cluster.net.as_ref().context("no network")?;
                net.cut(host.as_ref().context("no host")?)?;
            }
            std::thread::sleep(plan.promote_after);
            top.cluster.promote(sync)?;
            top.cluster.swap(sync);
            f.promoted = Some((top.cluster.primary.timeline()?, epoch.elapsed()));
            f.detail = format!("{old} lost, {} promoted", top.cluster.primary.name);
            // The synchronous primary waits for a standby: point the other one at it
            // first, then bring the old primary back as a standby.
            if let Some(at) = top.cluster.follow(other)? {
                f.standby_restarted = Some(at.duration_since(epoch.into_std()));
                let _ = write!(f.detail, ", {} rewound", top.cluster.standbys[other].name);
            }
            f.served = Some(rt.block_on(top.wait_served(epoch, Duration::from_secs(30)))?);
            if kind == FaultKind::Partition {
                let net = top.cluster.net.as_ref().context("no network")?;
                net.heal(host.as_ref().context("no host")?)?;
                // Reachable again, still writable on its old timeline: nothing may be
                // sent there now. Then it goes, as an HA manager would take it down.
                std::thread::sleep(Duration::from_millis(500));
                top.cluster.standbys[sync].crash()?;
            }
            top.cluster.rejoin(sync)?;
        }
        FaultKind::ProxyKill => {
            let p = rng.random_range(0..3);
            f.proxy = Some(p);
            f.detail = format!("p{} killed and restarted", p + 1);
            f.start = epoch.elapsed();
            top.proxies[p].kill();
            std::thread::sleep(Duration::from_secs(1));
            let host = (p == 0).then_some(&top.p1_host);
            let new = rt.block_on(start_proxy(
                &top.cluster,
                p,
                &top.vars[p],
                top.logs.path(),
                host,
            ))?;
            top.targets.write().expect("targets")[p] = new.listen;
            top.proxies[p] = new;
            rt.block_on(top.wait_members(3))?;
        }
        FaultKind::ProxyPartition => {
            f.proxy = Some(0);
            f.detail = "p1 cut off from clients, servers and etcd for 5 s".into();
            let net = top.cluster.net.as_ref().context("no network")?;
            f.start = epoch.elapsed();
            net.cut(&top.p1_host)?;
            std::thread::sleep(Duration::from_secs(5));
            net.heal(&top.p1_host)?;
            rt.block_on(top.wait_members(3))?;
            f.served = Some(rt.block_on(top.wait_served(epoch, Duration::from_secs(30)))?);
        }
        FaultKind::Takeover => {
            let p = rng.random_range(0..3);
            f.proxy = Some(p);
            f.start = epoch.elapsed();
            let took = rt.block_on(top.proxies[p].take_over())?;
            f.detail = format!("p{} replaced by a new process in {took:?}", p + 1);
        }
        FaultKind::EtcdRestart => {
            f.detail = "etcd down 2s".into();
            f.start = epoch.elapsed();
            top.etcd.stop();
            std::thread::sleep(Duration::from_secs(2));
            top.etcd.restart()?;
            rt.block_on(top.wait_members(3))?;
        }
    }
    f.end = epoch.elapsed();
    f.rss_kb = top
        .proxies
        .iter()
        .map(|p| p.pid().map_or(0, rss_kb))
        .collect();
    Ok(f)
}

/// A process's resident memory (kB), 0 if it cannot be read.
fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}
