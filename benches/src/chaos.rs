//! `handoff-bench chaos`: the long fault campaign — by default the goal's 100 planned
//! switchovers, 20 primary crashes, 10 silent partitions of the primary, 5 of a proxy
//! from everything, 10 proxy kills, 10 takeovers and 10 etcd restarts, shuffled by `--seed`, through three proxies over etcd in front
//! of a synchronous primary with two standbys in network namespaces — then every
//! checker over the whole history (`handoff_tests::chaos`). Prints the report as
//! Markdown (the form BENCHMARKS.md quotes) and fails if any check did.

use std::time::Duration;

use anyhow::{bail, Result};
use handoff_tests::chaos::{self, Plan};

/// Options of `handoff-bench chaos`.
#[derive(Debug, clap::Parser)]
#[command(name = "handoff-bench chaos")]
pub struct Args {
    /// Picks the schedule (the same seed, the same order of faults and targets).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    #[arg(long, default_value_t = 100)]
    pub switchovers: usize,
    #[arg(long, default_value_t = 20)]
    pub crashes: usize,
    #[arg(long, default_value_t = 10)]
    pub partitions: usize,
    /// p1 cut off from clients, servers and etcd for 5 s.
    #[arg(long, default_value_t = 5)]
    pub proxy_partitions: usize,
    #[arg(long, default_value_t = 10)]
    pub proxy_kills: usize,
    #[arg(long, default_value_t = 10)]
    pub takeovers: usize,
    #[arg(long, default_value_t = 10)]
    pub etcd_restarts: usize,
    /// Writers per proxy (tpcb-like transactions with unique ids).
    #[arg(long, default_value_t = 3)]
    pub writers: usize,
    /// Point readers per proxy, on the primary.
    #[arg(long, default_value_t = 1)]
    pub readers: usize,
    /// Readers per proxy through `postgres@replica`.
    #[arg(long, default_value_t = 1)]
    pub replica_readers: usize,
    /// Quiet time after each fault (seconds).
    #[arg(long, default_value_t = 1.0)]
    pub settle: f64,
}

pub async fn run(a: Args) -> Result<()> {
    let base = Plan::long(a.seed);
    let plan = Plan {
        switchovers: a.switchovers,
        crashes: a.crashes,
        partitions: a.partitions,
        proxy_partitions: a.proxy_partitions,
        proxy_kills: a.proxy_kills,
        takeovers: a.takeovers,
        etcd_restarts: a.etcd_restarts,
        mix: chaos::workload::Mix {
            writers: a.writers,
            readers: a.readers,
            replica_readers: a.replica_readers,
            ..base.mix
        },
        settle: Duration::from_secs_f64(a.settle),
        ..base
    };
    // The campaign drives its own runtime from a plain thread.
    let report = tokio::task::spawn_blocking(move || {
        std::thread::spawn(move || chaos::run(&plan))
            .join()
            .map_err(|_| anyhow::anyhow!("the campaign panicked"))?
    })
    .await??;
    println!("{}", report.markdown());
    if !report.violations.is_empty() {
        bail!(
            "{} checks failed (seed {})",
            report.violations.len(),
            report.seed
        );
    }
    Ok(())
}
