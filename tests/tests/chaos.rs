//! The fault campaign in CI: a short seeded schedule of every kind of fault — planned
//! switchovers through each proxy, primary crashes, silent partitions of the primary
//! (network namespaces, links down), proxy kills and takeovers, etcd restarts —
//! against three proxies over etcd and a synchronous primary with two standbys, under
//! writers, readers and replica readers; then every checker over the whole history
//! (`handoff_tests::chaos::check`). `HANDOFF_CHAOS_SEED` picks another schedule; a
//! failure prints the seed and the requests around each violation.
//! `handoff-bench chaos` runs the long campaign.

use handoff_tests::chaos::{self, Plan};

#[test]
fn a_short_campaign_loses_nothing_and_fails_only_what_its_faults_allow() {
    let seed = std::env::var("HANDOFF_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7);
    let plan = Plan::short(seed);
    let report = chaos::run(&plan).unwrap_or_else(|e| panic!("seed {seed}: {e:#}"));
    let text = report.markdown();
    eprintln!("{text}");
    assert!(report.violations.is_empty(), "{text}");
    let planned = plan.switchovers
        + plan.crashes
        + plan.partitions
        + plan.proxy_partitions
        + plan.proxy_kills
        + plan.takeovers
        + plan.etcd_restarts;
    // And the warm-up's switchover.
    assert_eq!(report.faults.len(), planned + 1, "{text}");
    // The checks mean something only with real load through every fault.
    assert!(report.acked_writes > 500, "{text}");
    assert!(
        report.faults.iter().all(|f| f.end > f.start),
        "every fault was dealt with: {text}"
    );
}
