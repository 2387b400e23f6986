//! pgbench through the proxy: select-only load from 16 clients, no failed transactions.

use handoff_tests::{start_proxy, Cluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_select_only_has_no_failures() {
    let cluster = Cluster::start(0).unwrap();
    cluster.pgbench_init(1).unwrap();
    let proxy = start_proxy(&cluster, &[("HANDOFF_USERS", "postgres=secret")])
        .await
        .unwrap();
    let port = proxy.listen_addr().port().to_string();
    let bin = cluster.bin.bin("pgbench");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(bin)
            .args(["-S", "-c", "16", "-j", "2", "-T", "5", "-n"])
            .args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres", "postgres"])
            .env("PGPASSWORD", "secret")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let field = |name: &str| -> u64 {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no '{name}' in pgbench output:\n{stdout}"))
    };
    assert_eq!(field("number of failed transactions:"), 0, "{stdout}");
    let done = field("number of transactions actually processed:");
    assert!(done > 1000, "only {done} transactions in 5 s:\n{stdout}");
    proxy.shutdown().await;
}
