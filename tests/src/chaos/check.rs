//! The checkers: invariants over a campaign's whole history, each violation with the
//! seed and the requests around it.
//!
//! 1. **Nothing acknowledged is lost**: every write whose `COMMIT` answered is on the
//!    final primary, exactly once, on the timeline it was acknowledged on; the balances
//!    add up to the rows (each transaction did both or neither).
//! 2. **No write was acknowledged by a replaced host**: a write acknowledged on
//!    timeline *t* ended before the promotion that started a later timeline had
//!    finished.
//! 3. **Errors are only the allowed kinds**: none for planned faults (switchovers,
//!    takeovers, etcd restarts) or outside any fault; for a crash of the primary, only
//!    requests already running when it died or sent to its backends before they had
//!    noticed (half a second; and a session-mode client's next request:
//!    its session was its backend); for a partition, only requests sent
//!    before handoff could have revoked the primary (health-check interval + timeout)
//!    and none later than the new primary's establishment; for a proxy kill, only the
//!    killed proxy's clients (what they had in flight, and logins while it was down);
//!    for a proxy cut off from everything, only that proxy's clients;
//!    a session-mode reader's next request after the harness restarted its standby
//!    (one that could not follow the new primary is rewound);
//!    at most one error per client per fault, logins aside. A request that spans two
//!    faults is judged by the one it ended in, or else by the one it started in.
//! 4. **No request waited longer than the buffer's window** (`HANDOFF_BUFFER_WINDOW`).
//! 5. **The system serves again within a bound** after every fault.
//! 6. **Resource use is flat**: each proxy's RSS, file descriptors and tasks at the end
//!    within 10 % of its own after warm-up (or after its restart or takeover), under the
//!    same load, and its server connections within 10 % or within what its pools may
//!    hold (a new primary's pre-warm fills the pool). File descriptors may grow by the
//!    server connections that did (a socket each), tasks by the pools that appeared (a
//!    maintenance task each; a host gets a pool the first time it is primary or
//!    standby) and by two per server host (admin sessions made when a host is first
//!    seen in a role).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::time::Duration;

use anyhow::Result;
use tokio_postgres::NoTls;

use super::workload::{Kind, Op};
use super::{Fault, FaultKind, Plan, Sample};

/// `HANDOFF_BUFFER_WINDOW`'s default: no request may wait longer.
const BUFFER_WINDOW: Duration = Duration::from_secs(10);
/// How long a proxy may take to revoke a silent primary: the health check's interval
/// and timeout (defaults 1 s and 2 s), with half a second for the check's own jitter.
const SILENT_DETECTION: Duration = Duration::from_millis(3500);
/// Started at most this long after the fault's recorded start and still "in flight"
/// (the harness records the time just before it strikes).
const STRIKE_SLACK: Duration = Duration::from_millis(100);
/// A crash of the primary: how long after it a request may still fail as one in
/// flight. Its backends outlive the `kill -9`'d postmaster: each exits when it next
/// waits and notices, and on two loaded cores a request can reach one that has not yet
/// (found by seed 3: a `BEGIN` sent 105 ms after the crash was answered with `57P01
/// … unexpected postmaster exit`). Nothing can tell the proxy sooner than that answer.
const CRASH_SLACK: Duration = Duration::from_millis(500);
/// Tasks a proxy may add per server host over a run besides its pools' (an admin
/// session's connection task for its health check and one for its standby checks,
/// made when the host is first seen in that role): bounded by the hosts, unlike a leak,
/// which grows with the faults.
const TASKS_PER_HOST: f64 = 2.0;
/// The campaign's PostgreSQL servers.
const HOSTS: f64 = 3.0;
/// A planned fault or an etcd restart: serving again within this.
const PLANNED_BOUND: Duration = Duration::from_secs(5);
/// A crash, a partition or a proxy kill: serving again within this after the strike.
const UNPLANNED_BOUND: Duration = Duration::from_secs(15);
/// Resource growth allowed, end against baseline.
const GROWTH: f64 = 0.10;

/// The final primary's rows: `(id, timeline)` of every write, and the balances' sum.
pub struct FinalRows {
    pub rows: Vec<(i64, i32)>,
    pub balance: i64,
}

pub async fn final_rows(server: &str) -> Result<FinalRows> {
    let (c, conn) = tokio_postgres::connect(server, NoTls).await?;
    tokio::spawn(conn);
    let rows = c
        .query("SELECT id, timeline FROM chaos_writes", &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let balance: i64 = c
        .query_one(
            "SELECT coalesce(sum(balance), 0)::bigint FROM chaos_accounts",
            &[],
        )
        .await?
        .get(0);
    Ok(FinalRows { rows, balance })
}

/// What one kind of fault cost.
#[derive(Debug, Default, Clone)]
pub struct PerKind {
    pub count: usize,
    /// Failed requests, logins aside.
    pub errors: usize,
    /// Failed logins (reconnections to a killed proxy).
    pub login_errors: usize,
    /// Time from the strike until every proxy's writers had a write through again.
    pub recovered: Vec<Duration>,
}

/// A campaign's outcome.
#[derive(Debug)]
pub struct Report {
    pub seed: u64,
    pub took: Duration,
    pub faults: Vec<Fault>,
    pub requests: usize,
    pub acked_writes: usize,
    pub lost: usize,
    pub duplicated: usize,
    pub per_kind: BTreeMap<FaultKind, PerKind>,
    /// Longest successful request.
    pub longest: Duration,
    /// Per proxy: after warm-up, at the end.
    pub resources: Vec<(Sample, Sample)>,
    pub violations: Vec<String>,
}

impl Report {
    pub(super) fn new(
        plan: &Plan,
        took: Duration,
        faults: Vec<Fault>,
        history: Vec<Op>,
        rows: FinalRows,
        baseline: Vec<Sample>,
        end: Vec<Sample>,
    ) -> Self {
        let mut r = Report {
            seed: plan.seed,
            took,
            requests: history.iter().filter(|o| o.kind != Kind::Connect).count(),
            acked_writes: 0,
            lost: 0,
            duplicated: 0,
            per_kind: BTreeMap::new(),
            longest: Duration::ZERO,
            resources: baseline.into_iter().zip(end).collect(),
            violations: Vec::new(),
            faults,
        };
        r.check_writes(&history, &rows);
        r.check_timelines(&history);
        r.check_errors(&history, plan.settle);
        r.check_waits(&history);
        r.check_recovery(&history);
        r.check_resources();
        r
    }

    /// Records a violation at `at` with the requests and faults around it.
    fn violation(&mut self, history: &[Op], at: Duration, what: String) {
        let mut text = format!("seed {}: {what}\n", self.seed);
        let from = at.saturating_sub(Duration::from_secs(1));
        let to = at + Duration::from_secs(1);
        for f in self
            .faults
            .iter()
            .filter(|f| f.start <= to && f.end >= from)
        {
            let _ = writeln!(
                text,
                "  fault {} {} at {:.3}s..{:.3}s: {}",
                f.n,
                f.kind.as_str(),
                f.start.as_secs_f64(),
                f.end.as_secs_f64(),
                f.detail
            );
        }
        let around: Vec<&Op> = history
            .iter()
            .filter(|o| o.end >= from && o.start <= to && !o.ok())
            .take(15)
            .collect();
        for o in around {
            let _ = writeln!(text, "  {}", o.describe());
        }
        self.violations.push(text);
    }

    fn check_writes(&mut self, history: &[Op], rows: &FinalRows) {
        let mut on_primary: HashMap<i64, (usize, i32)> = HashMap::new();
        for (id, tl) in &rows.rows {
            on_primary.entry(*id).or_insert((0, *tl)).0 += 1;
        }
        let mut problems = Vec::new();
        for o in history.iter().filter(|o| o.kind == Kind::Write && o.ok()) {
            let Some(id) = o.id else { continue };
            self.acked_writes += 1;
            match on_primary.get(&id) {
                None => {
                    self.lost += 1;
                    problems.push((
                        o.end,
                        format!("acknowledged write #{id:x} is not on the final primary"),
                    ));
                }
                Some((n, tl)) => {
                    if *n > 1 {
                        self.duplicated += 1;
                        problems.push((
                            o.end,
                            format!("write #{id:x} is on the final primary {n} times"),
                        ));
                    }
                    if Some(*tl) != o.timeline {
                        problems.push((o.end, format!(
                            "write #{id:x} was acknowledged on timeline {:?} but is on timeline {tl}",
                            o.timeline
                        )));
                    }
                }
            }
        }
        if rows.balance != rows.rows.len() as i64 {
            problems.push((
                Duration::ZERO,
                format!(
                    "{} writes but the balances add up to {}: a transaction was applied in part",
                    rows.rows.len(),
                    rows.balance
                ),
            ));
        }
        for (at, what) in problems.into_iter().take(20) {
            self.violation(history, at, what);
        }
    }

    fn check_timelines(&mut self, history: &[Op]) {
        let promotions: Vec<(i32, Duration)> =
            self.faults.iter().filter_map(|f| f.promoted).collect();
        let mut problems = Vec::new();
        for o in history.iter().filter(|o| o.kind == Kind::Write && o.ok()) {
            let Some(tl) = o.timeline else { continue };
            if let Some((later, at)) = promotions.iter().find(|(t, _)| *t > tl) {
                if o.end > *at {
                    problems.push((o.end, format!(
                        "write #{:x} was acknowledged on timeline {tl} at {:.3}s, after timeline {later} was promoted ({:.3}s)",
                        o.id.unwrap_or_default(),
                        o.end.as_secs_f64(),
                        at.as_secs_f64()
                    )));
                }
            }
        }
        for (at, what) in problems.into_iter().take(10) {
            self.violation(history, at, what);
        }
    }

    fn check_errors(&mut self, history: &[Op], settle: Duration) {
        for f in &self.faults {
            self.per_kind.entry(f.kind).or_default().count += 1;
        }
        let mut per_client: HashMap<(usize, u32), usize> = HashMap::new();
        let mut problems = Vec::new();
        for o in history.iter().filter(|o| !o.ok()) {
            let Some((i, allowed)) = judge(&self.faults, o, settle) else {
                problems.push((
                    o.start,
                    format!("an error outside any fault: {}", o.describe()),
                ));
                continue;
            };
            let f = &self.faults[i];
            let stats = self.per_kind.entry(f.kind).or_default();
            if o.kind == Kind::Connect {
                stats.login_errors += 1;
            } else {
                stats.errors += 1;
            }
            match allowed {
                Err(why) => problems.push((
                    o.end,
                    format!(
                        "an error during fault {} ({}, {}): {why}: {}",
                        f.n,
                        f.kind.as_str(),
                        f.detail,
                        o.describe()
                    ),
                )),
                Ok(()) if o.kind != Kind::Connect => {
                    let n = per_client.entry((i, o.client)).or_default();
                    *n += 1;
                    if *n == 2 {
                        let mine: Vec<String> = history
                            .iter()
                            .filter(|x| x.client == o.client && !x.ok() && x.kind != Kind::Connect)
                            .filter(|x| judge(&self.faults, x, settle).map(|j| j.0) == Some(i))
                            .map(|x| format!("    {}", x.describe()))
                            .collect();
                        problems.push((
                            o.end,
                            format!(
                                "client {} saw more than one error during fault {} ({}):\n{}",
                                o.client,
                                f.n,
                                f.kind.as_str(),
                                mine.join("\n")
                            ),
                        ));
                    }
                }
                Ok(()) => {}
            }
        }
        for (at, what) in problems.into_iter().take(20) {
            self.violation(history, at, what);
        }
    }

    fn check_waits(&mut self, history: &[Op]) {
        let mut worst: Option<&Op> = None;
        for o in history.iter().filter(|o| o.ok() && o.kind != Kind::Connect) {
            let took = o.end - o.start;
            if took > self.longest {
                self.longest = took;
                worst = Some(o);
            }
        }
        if let Some(o) = worst.filter(|_| self.longest > BUFFER_WINDOW) {
            let what = format!(
                "a request waited {:?}, longer than the buffer's window ({BUFFER_WINDOW:?}): {}",
                self.longest,
                o.describe()
            );
            self.violation(history, o.end, what);
        }
    }

    fn check_recovery(&mut self, history: &[Op]) {
        let proxies = history.iter().map(|o| o.proxy).max().map_or(0, |m| m + 1);
        let mut problems = Vec::new();
        for f in &self.faults {
            // The first write through each proxy started after the strike and
            // acknowledged: the last of those is when the system served again.
            let mut last = Duration::ZERO;
            for p in 0..proxies {
                let first = history
                    .iter()
                    .filter(|o| o.proxy == p && o.kind == Kind::Write && o.ok())
                    .find(|o| o.start >= f.start)
                    .map(|o| o.end.saturating_sub(f.start));
                last = last.max(first.unwrap_or(Duration::MAX));
            }
            let bound = if f.kind.planned() {
                PLANNED_BOUND.max(f.end - f.start + Duration::from_secs(1))
            } else {
                UNPLANNED_BOUND
            };
            if last > bound {
                problems.push((f.start, format!(
                    "fault {} ({}): not serving writes through every proxy again within {bound:?} ({})",
                    f.n,
                    f.kind.as_str(),
                    if last == Duration::MAX { "never".to_string() } else { format!("{last:?}") }
                )));
            }
            self.per_kind
                .entry(f.kind)
                .or_default()
                .recovered
                .push(last);
        }
        for (at, what) in problems {
            self.violation(history, at, what);
        }
    }

    fn check_resources(&mut self) {
        let mut problems = Vec::new();
        for (i, (base, end)) in self.resources.iter().enumerate() {
            // Server connections may grow up to what the pools may hold (a new
            // primary's pre-warm fills its pool), not beyond.
            let conn_slack =
                (end.server_ceiling - base.server_connections * (1.0 + GROWTH)).max(1.0);
            // A socket per server connection, a maintenance task per pool.
            let more_conns = (end.server_connections - base.server_connections).max(0.0);
            let more_pools = (end.pools - base.pools).max(0.0);
            for (what, b, e, slack) in [
                ("RSS (kB)", base.rss_kb as f64, end.rss_kb as f64, 0.0),
                (
                    "file descriptors",
                    base.fds as f64,
                    end.fds as f64,
                    2.0 + more_conns,
                ),
                (
                    "server connections",
                    base.server_connections,
                    end.server_connections,
                    conn_slack,
                ),
                (
                    "tasks",
                    base.tasks,
                    end.tasks,
                    2.0 + more_pools + TASKS_PER_HOST * HOSTS,
                ),
            ] {
                if e > b * (1.0 + GROWTH) + slack {
                    problems.push(format!(
                        "p{}: {what} grew from {b} after warm-up to {e} at the end (more than {}%)",
                        i + 1,
                        GROWTH * 100.0
                    ));
                }
            }
        }
        for what in problems {
            self.violation(&[], Duration::ZERO, what);
        }
    }

    /// The report as Markdown (what `handoff-bench chaos` prints and BENCHMARKS.md
    /// quotes).
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "seed {}: {} faults in {:.0} s; {} requests, {} writes acknowledged, {} lost, {} duplicated; longest successful request {:?}\n",
            self.seed,
            self.faults.len(),
            self.took.as_secs_f64(),
            self.requests,
            self.acked_writes,
            self.lost,
            self.duplicated,
            self.longest
        );
        let _ = writeln!(
            s,
            "| fault | count | errors | failed logins | serving again: median / max |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|");
        for (kind, k) in &self.per_kind {
            let mut r = k.recovered.clone();
            r.sort();
            let med = r.get(r.len() / 2).copied().unwrap_or_default();
            let max = r.last().copied().unwrap_or_default();
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} / {} ms |",
                kind.as_str(),
                k.count,
                k.errors,
                k.login_errors,
                med.as_millis(),
                max.as_millis()
            );
        }
        let _ = writeln!(
            s,
            "\n| proxy | RSS kB | fds | server connections | tasks (pools) |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|");
        for (i, (b, e)) in self.resources.iter().enumerate() {
            let _ = writeln!(
                s,
                "| p{} | {} → {} | {} → {} | {} → {} (pools hold ≤ {}) | {} → {} ({} → {}) |",
                i + 1,
                b.rss_kb,
                e.rss_kb,
                b.fds,
                e.fds,
                b.server_connections,
                e.server_connections,
                e.server_ceiling,
                b.tasks,
                e.tasks,
                b.pools,
                e.pools
            );
        }
        // RSS along the run: a leak keeps growing, a working set levels off.
        let n = self.faults.len();
        if n >= 4 {
            let _ = writeln!(
                s,
                "\nRSS kB after a quarter, half, three quarters and all of the faults:"
            );
            for p in 0..self.resources.len() {
                let at: Vec<String> = [n / 4, n / 2, 3 * n / 4, n - 1]
                    .iter()
                    .map(|&i| {
                        self.faults[i]
                            .rss_kb
                            .get(p)
                            .copied()
                            .unwrap_or(0)
                            .to_string()
                    })
                    .collect();
                let _ = writeln!(s, "- p{}: {}", p + 1, at.join(", "));
            }
        }
        if self.violations.is_empty() {
            let _ = writeln!(s, "\nevery check passed");
        } else {
            let _ = writeln!(s, "\n{} violations:\n", self.violations.len());
            for v in &self.violations {
                let _ = writeln!(s, "{v}");
            }
        }
        s
    }
}

/// The fault a failed request `o` is charged to, and whether it allows the failure: the
/// fault it ended in, or, if that one does not allow it, the one it started in (a
/// request spanning two faults, such as a write sent while its proxy was cut off that
/// hangs until the next fault). `None`: outside any fault.
fn judge(faults: &[Fault], o: &Op, settle: Duration) -> Option<(usize, Result<(), String>)> {
    let i = fault_of(faults, o.end, o.start, settle)?;
    let started = fault_of(faults, o.start, o.start, settle).filter(|&j| j != i);
    Some(match (allowed(&faults[i], o), started) {
        (Err(_), Some(j)) if allowed(&faults[j], o).is_ok() => (j, Ok(())),
        (r, _) => (i, r),
    })
}

/// The last fault to strike by `at`, if `started` (a request's start) was before that
/// fault had been dealt with and settled.
fn fault_of(faults: &[Fault], at: Duration, started: Duration, settle: Duration) -> Option<usize> {
    let i = faults.iter().rposition(|f| f.start <= at)?;
    (started <= faults[i].end + settle).then_some(i)
}

/// Whether fault `f` allows request `o` to fail, and why not.
fn allowed(f: &Fault, o: &Op) -> Result<(), String> {
    match f.kind {
        _ if f.kind.planned() => Err("a planned fault".to_string()),
        // A session-mode reader's session is its backend on a standby: when the
        // harness restarts that standby to follow the new primary, the session
        // ends, and the next request hears of it.
        _ if o.proxy == super::SESSION_PROXY
            && o.kind == Kind::ReplicaRead
            && f.standby_restarted.is_some_and(|at| o.end >= at) =>
        {
            Ok(())
        }
        FaultKind::Crash => {
            if o.start <= f.start + CRASH_SLACK {
                Ok(())
            } else if o.proxy == super::SESSION_PROXY {
                // A session-mode client's session is its backend: the crash
                // ends it even between requests, and the next request hears
                // of it (once: the one-error rule below).
                Ok(())
            } else {
                Err("sent after the primary died".into())
            }
        }
        FaultKind::Partition => {
            let served = f.served.unwrap_or(f.end) + Duration::from_secs(1);
            if o.start > f.start + SILENT_DETECTION {
                Err("sent after handoff should have revoked the silent primary".into())
            } else if o.end > served {
                Err("failed after the new primary was established (it waited for a timeout instead)".into())
            } else {
                Ok(())
            }
        }
        // Its clients are cut off too: what they sent meanwhile may fail,
        // after the documented timeouts; nobody else's may.
        FaultKind::ProxyPartition => {
            if Some(o.proxy) != f.proxy {
                Err("a client of another proxy".into())
            } else {
                Ok(())
            }
        }
        FaultKind::ProxyKill => {
            if Some(o.proxy) != f.proxy {
                Err("a client of another proxy".into())
            } else if o.kind == Kind::Connect || o.start <= f.start + STRIKE_SLACK {
                Ok(())
            } else {
                Err("sent after the kill, not a login".into())
            }
        }
        _ => Err("not an allowed kind".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fault(n: usize, kind: FaultKind, start: f64, end: f64, proxy: Option<usize>) -> Fault {
        Fault {
            n,
            kind,
            detail: String::new(),
            start: Duration::from_secs_f64(start),
            end: Duration::from_secs_f64(end),
            proxy,
            promoted: None,
            served: None,
            standby_restarted: None,
            rss_kb: Vec::new(),
        }
    }

    fn failed(proxy: usize, kind: Kind, start: f64, end: f64) -> Op {
        Op {
            client: 1,
            proxy,
            kind,
            start: Duration::from_secs_f64(start),
            end: Duration::from_secs_f64(end),
            id: None,
            timeline: None,
            error: Some(("57P01".into(), "terminating connection".into())),
        }
    }

    const SETTLE: Duration = Duration::from_secs(1);

    #[test]
    fn a_crash_allows_what_its_backends_answered_before_they_noticed_and_no_later() {
        let faults = [fault(1, FaultKind::Crash, 10.0, 13.0, None)];
        let early = failed(0, Kind::Write, 10.3, 10.31);
        assert!(matches!(judge(&faults, &early, SETTLE), Some((0, Ok(())))));
        let late = failed(0, Kind::Write, 10.7, 10.71);
        assert!(matches!(judge(&faults, &late, SETTLE), Some((0, Err(_)))));
        // A session-mode client's next request may fail: its session was its backend.
        let session = failed(crate::chaos::SESSION_PROXY, Kind::Write, 12.0, 12.01);
        assert!(judge(&faults, &session, SETTLE).unwrap().1.is_ok());
        let outside = failed(0, Kind::Write, 20.0, 20.01);
        assert!(judge(&faults, &outside, SETTLE).is_none());
    }

    #[test]
    fn a_request_spanning_two_faults_is_judged_by_either_but_a_planned_one_alone_allows_nothing() {
        let faults = [
            fault(1, FaultKind::ProxyPartition, 50.0, 55.3, Some(0)),
            fault(2, FaultKind::Switchover, 57.0, 58.2, Some(2)),
        ];
        // Sent by p1's client while p1 was cut off, failed in the switchover after it.
        let hung = failed(0, Kind::Write, 54.9, 61.0);
        assert!(matches!(judge(&faults, &hung, SETTLE), Some((0, Ok(())))));
        // Another proxy's client in the same span: neither fault allows it.
        let other = failed(1, Kind::Write, 54.9, 61.0);
        let (i, r) = judge(&faults, &other, SETTLE).unwrap();
        assert_eq!(i, 1, "charged to the fault it ended in");
        assert!(r.is_err());
        // Sent during the switchover itself: a planned fault allows no error.
        let during = failed(0, Kind::Write, 57.1, 57.2);
        assert!(judge(&faults, &during, SETTLE).unwrap().1.is_err());
    }

    #[test]
    fn a_session_mode_reader_may_fail_once_its_standby_was_restarted_and_not_before() {
        let mut f = fault(1, FaultKind::Partition, 50.0, 60.0, None);
        f.standby_restarted = Some(Duration::from_secs(57));
        let faults = [f];
        let after = failed(crate::chaos::SESSION_PROXY, Kind::ReplicaRead, 57.5, 57.6);
        assert!(judge(&faults, &after, SETTLE).unwrap().1.is_ok());
        let before = failed(crate::chaos::SESSION_PROXY, Kind::ReplicaRead, 55.0, 55.1);
        assert!(judge(&faults, &before, SETTLE).unwrap().1.is_err());
    }
}
