//! `run` against a real cluster through handoff, and the lost-write checker on real rows.

use std::time::Duration;

use clap::Parser;
use handoff_tests::{start_proxy, Cluster};

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_second_run_through_handoff_writes_complete_json() {
    let cluster = tokio::task::block_in_place(|| Cluster::start(0)).unwrap();
    let proxy = start_proxy(&cluster, &[]).await.unwrap();
    let out = std::env::temp_dir().join(format!("handoff-bench-test-{}", std::process::id()));
    let url = format!("postgres://postgres@{}/postgres", proxy.listen_addr());
    let args = RunArgs::try_parse_from([
        "run",
        "--target",
        &format!("handoff={url}"),
        "--workload",
        "tpcb",
        "--clients",
        "4",
        "--duration",
        "2s",
        "--accounts",
        "1000",
        "--event",
        "1s:echo '{\"event\": \"ran\"}'",
        "--out",
        out.to_str().unwrap(),
        "--quiet",
    ])
    .unwrap();
    let results = run(args).await.unwrap();
    assert_eq!(results.len(), 1);
    let json_path = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "json"))
        .unwrap();
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    let t = &doc["targets"][0];
    assert_eq!(t["name"], "handoff");
    let txns = t["transactions"].as_u64().unwrap();
    assert!(txns > 100, "{txns} transactions in 2 s");
    assert_eq!(t["errors"], 0, "{}", t["errors_by_kind"]);
    assert_eq!(
        t["acknowledged_writes"].as_u64().unwrap(),
        txns,
        "every tpcb transaction writes"
    );
    assert_eq!(t["lost_writes"], 0);
    let timeline = t["timeline"].as_array().unwrap();
    // 20 buckets for 2 s, plus any for transactions that finished after the deadline.
    assert!(
        (20..=40).contains(&timeline.len()),
        "{} points",
        timeline.len()
    );
    let summed: u64 = timeline.iter().map(|p| p["txns"].as_u64().unwrap()).sum();
    assert_eq!(summed, txns, "the timeline accounts for every transaction");
    assert!(t["latency_ms"]["p99"].as_f64().unwrap() >= t["latency_ms"]["p50"].as_f64().unwrap());
    assert_eq!(t["events"][0]["exit_code"], 0);
    // An event that printed JSON (a switchover's report) has it nested, and the run's
    // events and metadata are at the top.
    assert_eq!(t["events"][0]["report"]["event"], "ran", "{}", t["events"]);
    assert!(t["events"][0]["output"].is_null());
    assert_eq!(doc["events"][0]["target"], "handoff");
    assert_eq!(doc["events"][0]["report"]["event"], "ran");
    assert_eq!(
        doc["meta"]["handoff_bench_version"],
        env!("CARGO_PKG_VERSION")
    );
    let at = doc["meta"]["finished_at"].as_str().unwrap();
    assert!(
        at.len() == 20 && at.ends_with('Z') && at.contains('T'),
        "{at}"
    );
    assert_eq!(doc["workload"], "tpcb");
    let started = t["events"][0]["started_s"].as_f64().unwrap();
    assert!((1.0..1.5).contains(&started), "event started at {started}");
    let svg = std::fs::read_to_string(json_path.with_extension("svg")).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("polyline"),
        "not a plot"
    );
    let png = std::fs::read(json_path.with_extension("png")).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "not a PNG plot"
    );
    let _ = std::fs::remove_dir_all(&out);

    // Open loop: --rate sets the arrival rate whatever the latency.
    let args = RunArgs::try_parse_from([
        "run",
        "--target",
        &format!("handoff={url}"),
        "--workload",
        "select",
        "--clients",
        "4",
        "--duration",
        "2s",
        "--rate",
        "200",
        "--accounts",
        "1000",
        "--out",
        out.to_str().unwrap(),
        "--quiet",
    ])
    .unwrap();
    let r = run(args).await.unwrap();
    let n = r[0].summary.txns;
    assert!(
        (360..=410).contains(&n),
        "{n} transactions at 200/s for 2 s"
    );
    let _ = std::fs::remove_dir_all(&out);

    // The lost-write checker reports an acknowledged row that disappeared.
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let ids: Vec<i64> = client
        .query(
            &format!("select id from {} order by id limit 50", workload::WRITES),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids.len(), 50);
    assert!(workload::find_lost(&client, &ids).await.unwrap().is_empty());
    client
        .execute(
            &format!("delete from {} where id = $1", workload::WRITES),
            &[&ids[17]],
        )
        .await
        .unwrap();
    assert_eq!(
        workload::find_lost(&client, &ids).await.unwrap(),
        vec![ids[17]]
    );
    tokio::time::timeout(Duration::from_secs(30), proxy.shutdown())
        .await
        .unwrap();
}

#[test]
fn a_process_cpu_time_grows_with_its_work() {
    let pid = std::process::id();
    let before = cpu_time(pid).expect("our own /proc entry");
    // Busy for a while on this thread.
    let start = std::time::Instant::now();
    let mut x = 0u64;
    while start.elapsed() < Duration::from_millis(300) {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
    }
    std::hint::black_box(x);
    let after = cpu_time(pid).unwrap();
    assert!(
        after > before + Duration::from_millis(100),
        "{before:?} → {after:?}"
    );
    assert!(cpu_time(u32::MAX).is_none(), "no such process");
}
