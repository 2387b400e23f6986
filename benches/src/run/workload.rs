//! The workloads: what one transaction is, the schema they need, and the lost-write
//! check for the ones that write.

use std::collections::HashSet;

use anyhow::{Context, Result};
use tokio_postgres::{Client, Statement};

/// Accounts table read and updated by the workloads.
pub const ACCOUNTS: &str = "handoff_bench_accounts";
/// One row per acknowledged write, keyed by a run-unique id (pgbench's history table).
pub const WRITES: &str = "handoff_bench_writes";
/// Tellers (10 per branch) and branches (one per 100,000 accounts), as in pgbench.
pub const TELLERS: &str = "handoff_bench_tellers";
pub const BRANCHES: &str = "handoff_bench_branches";

/// Branches for a number of accounts: pgbench's scale.
pub fn branches(accounts: i32) -> i32 {
    (accounts / 100_000).max(1)
}

/// What a transaction does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    /// pgbench -S-like: one point read, simple query protocol.
    Select,
    /// pgbench's TPC-B-like write transaction: update an account, read it, update a
    /// teller and a branch, insert a history row (with a unique id).
    Tpcb,
    /// Point reads through a named prepared statement.
    Prepared,
    /// 80% select, 20% tpcb.
    Mixed,
}

/// The workload's name as the command line spells it (`select`, `tpcb`, …).
pub fn name(w: Workload) -> &'static str {
    match w {
        Workload::Select => "select",
        Workload::Tpcb => "tpcb",
        Workload::Prepared => "prepared",
        Workload::Mixed => "mixed",
    }
}

impl Workload {
    pub fn writes(self) -> bool {
        matches!(self, Workload::Tpcb | Workload::Mixed)
    }
}

/// Creates and fills the tables if they are missing.
pub async fn setup(client: &Client, accounts: i32) -> Result<()> {
    // Already there and filled (a standby, `@replica`, cannot run the DDL below even
    // with IF NOT EXISTS): nothing to do.
    if ready(client, accounts).await {
        return Ok(());
    }
    client
        .batch_execute(&format!(
            "create table if not exists {ACCOUNTS} (aid int primary key, abalance int not null default 0);
             create table if not exists {TELLERS} (tid int primary key, tbalance int not null default 0);
             create table if not exists {BRANCHES} (bid int primary key, bbalance int not null default 0);
             create table if not exists {WRITES} (id bigint primary key, aid int not null, delta int not null,
                                                  at timestamptz not null default now());"
        ))
        .await
        .context("creating the workload tables")?;
    let n: i64 = client
        .query_one(&format!("select count(*) from {ACCOUNTS}"), &[])
        .await?
        .get(0);
    let b = branches(accounts);
    client
        .batch_execute(&format!(
            "insert into {BRANCHES} (bid) select g from generate_series(1, {b}) g on conflict do nothing;
             insert into {TELLERS} (tid) select g from generate_series(1, {t}) g on conflict do nothing;",
            t = b * 10
        ))
        .await
        .context("filling the branches and tellers tables")?;
    if n < i64::from(accounts) {
        client
            .batch_execute(&format!(
                "insert into {ACCOUNTS} (aid) select g from generate_series(1, {accounts}) g on conflict do nothing"
            ))
            .await
            .context("filling the accounts table")?;
    }
    Ok(())
}

/// True if every table exists and the accounts table has `accounts` rows.
pub async fn ready(client: &Client, accounts: i32) -> bool {
    let q = format!(
        "select (select count(*) from {ACCOUNTS}), (select count(*) from {TELLERS}), \
         (select count(*) from {BRANCHES}), (select count(*) from {WRITES} where false)"
    );
    match client.query_one(&q, &[]).await {
        Ok(row) => {
            row.get::<_, i64>(0) >= i64::from(accounts)
                && row.get::<_, i64>(1) >= i64::from(branches(accounts) * 10)
                && row.get::<_, i64>(2) >= i64::from(branches(accounts))
        }
        Err(_) => false,
    }
}

/// The id prefix for this run's writes: above every id already in the table, so ids
/// never repeat across runs. Ids are `epoch | client << 28 | sequence`.
pub async fn next_epoch(client: &Client) -> Result<i64> {
    let max: i64 = client
        .query_one(&format!("select coalesce(max(id), 0) from {WRITES}"), &[])
        .await?
        .get(0);
    Ok(((max >> 40) + 1) << 40)
}

/// A tiny xorshift generator: enough for picking rows, no dependency.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform in `1..=n`.
    pub fn upto(&mut self, n: i32) -> i32 {
        (self.next() % n.max(1) as u64) as i32 + 1
    }
}

/// One client's state for running transactions.
#[derive(Debug)]
pub struct Session {
    pub client: Client,
    prepared: Option<Statement>,
    rng: Rng,
    accounts: i32,
}

/// What one transaction did.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Read,
    /// A committed write with this id.
    Wrote(i64),
}

impl Session {
    pub fn new(client: Client, seed: u64, accounts: i32) -> Self {
        Self {
            client,
            prepared: None,
            rng: Rng::new(seed),
            accounts,
        }
    }

    /// Runs one transaction. `id` is the unique id a write transaction must insert.
    pub async fn run(
        &mut self,
        workload: Workload,
        id: i64,
    ) -> Result<Outcome, tokio_postgres::Error> {
        let aid = self.rng.upto(self.accounts);
        let kind = match workload {
            Workload::Mixed if self.rng.next().is_multiple_of(5) => Workload::Tpcb,
            Workload::Mixed => Workload::Select,
            w => w,
        };
        match kind {
            Workload::Select | Workload::Mixed => {
                self.client
                    .simple_query(&format!(
                        "select abalance from {ACCOUNTS} where aid = {aid}"
                    ))
                    .await?;
                Ok(Outcome::Read)
            }
            Workload::Prepared => {
                if self.prepared.is_none() {
                    let sql = format!("select abalance from {ACCOUNTS} where aid = $1");
                    self.prepared = Some(self.client.prepare(&sql).await?);
                }
                let stmt = self.prepared.as_ref().expect("prepared above");
                self.client.query_opt(stmt, &[&aid]).await?;
                Ok(Outcome::Read)
            }
            Workload::Tpcb => {
                let delta = (self.rng.next() % 10_001) as i32 - 5000;
                let bid = self.rng.upto(branches(self.accounts));
                let tid = self.rng.upto(branches(self.accounts) * 10);
                self.client
                    .batch_execute(&format!(
                        "begin;
                         update {ACCOUNTS} set abalance = abalance + {delta} where aid = {aid};
                         select abalance from {ACCOUNTS} where aid = {aid};
                         update {TELLERS} set tbalance = tbalance + {delta} where tid = {tid};
                         update {BRANCHES} set bbalance = bbalance + {delta} where bid = {bid};
                         insert into {WRITES} (id, aid, delta) values ({id}, {aid}, {delta});
                         commit;"
                    ))
                    .await?;
                Ok(Outcome::Wrote(id))
            }
        }
    }
}

/// The acknowledged ids that are not in `present`.
pub fn missing(acked: &[i64], present: &HashSet<i64>) -> Vec<i64> {
    let mut lost: Vec<i64> = acked
        .iter()
        .copied()
        .filter(|id| !present.contains(id))
        .collect();
    lost.sort_unstable();
    lost
}

/// Looks every acknowledged id up on the target; returns those not found.
pub async fn find_lost(client: &Client, acked: &[i64]) -> Result<Vec<i64>> {
    let mut present = HashSet::with_capacity(acked.len());
    for chunk in acked.chunks(10_000) {
        let rows = client
            .query(
                &format!("select id from {WRITES} where id = any($1)"),
                &[&chunk],
            )
            .await
            .context("reading back acknowledged writes")?;
        present.extend(rows.iter().map(|r| r.get::<_, i64>(0)));
    }
    Ok(missing(acked, &present))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_reports_exactly_the_absent_ids() {
        let present: HashSet<i64> = [1, 2, 4, 8].into_iter().collect();
        assert_eq!(missing(&[8, 4, 3, 2, 1, 16], &present), vec![3, 16]);
        assert!(missing(&[1, 2], &present).is_empty());
    }

    #[test]
    fn rng_stays_in_range() {
        let mut r = Rng::new(7);
        let mut seen = HashSet::new();
        for _ in 0..10_000 {
            let v = r.upto(10);
            assert!((1..=10).contains(&v));
            seen.insert(v);
        }
        assert_eq!(seen.len(), 10);
    }
}
