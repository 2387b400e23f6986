//! handoff in front of a real repmgr cluster (Debian's repmgr 5, two nodes, an sshd of
//! the test's own for `repmgr standby switchover`): switchovers asked of handoff (it
//! runs `repmgr standby switchover` on the candidate) and of repmgr's own CLI, with
//! repmgr stopping the primary through handoff's pg_ctl and reporting its events with
//! `handoff recheck`; repmgr refusing (it cannot reach the old primary over SSH); a
//! standby unreachable; the primary killed under
//! repmgrd. Each runs a load through handoff and checks, at the end, that every
//! acknowledged write is on the primary.

use std::net::SocketAddr;
use std::time::Duration;

use handoff_tests::admin::{metric, shard_state, switchover};
use handoff_tests::handoff_binary;
use handoff_tests::load::{assert_acked_on, assert_nothing_lost, Load, Outcome};
use handoff_tests::paf::Hold;
use handoff_tests::patroni::server_user_copy;
use handoff_tests::repmgr::{Options, RepmgrCluster};

/// Each test runs its own cluster: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Setup {
    proxy: Option<handoff::Proxy>,
    repmgr: RepmgrCluster,
    _bin: tempfile::TempDir,
}

impl Setup {
    fn proxy(&self) -> &handoff::Proxy {
        self.proxy.as_ref().expect("running")
    }

    fn listen(&self) -> SocketAddr {
        self.proxy().listen_addr()
    }

    fn streaming(&self) {
        tokio::task::block_in_place(|| self.repmgr.wait_streaming(Duration::from_secs(60)))
            .unwrap();
    }
}

/// A two-node repmgr cluster whose primary stops go through handoff's pg_ctl, and
/// handoff in front of it, shard `main` named by repmgr alone.
async fn setup(extra: &[(&str, &str)]) -> Setup {
    let admin_port = handoff_tests::pg::free_port_outside_ephemeral().unwrap();
    let admin = format!("127.0.0.1:{admin_port}");
    let (bin, copy) = server_user_copy(&handoff_binary()).unwrap();
    let opts = Options {
        hold: Some(Hold {
            shard: "main".into(),
            admin: admin.clone(),
            handoff: copy,
            timeout: "5s".into(),
        }),
        repmgrd: false,
    };
    let repmgr = tokio::task::spawn_blocking(move || RepmgrCluster::start(2, opts))
        .await
        .unwrap()
        .unwrap();
    Load::prepare(&repmgr.nodes[0].conn()).await.unwrap();
    let url = format!("main={}", repmgr.url());
    let command = repmgr.switchover_command();
    let vars: Vec<(&str, &str)> = vec![
        ("HANDOFF_LISTEN", "127.0.0.1:0"),
        ("HANDOFF_ADMIN_LISTEN", &admin),
        ("HANDOFF_SHARDS", "main"),
        ("HANDOFF_REPMGR", &url),
        ("HANDOFF_REPMGR_SWITCHOVER_COMMAND", &command),
        ("HANDOFF_SHUTDOWN_TIMEOUT", "5s"),
        ("HANDOFF_POOL_SIZE", "8"),
        ("HANDOFF_SWITCHOVER_TIMEOUT", "60s"),
    ];
    let proxy = handoff_tests::start_proxy_with(&vars, extra).await.unwrap();
    Setup {
        proxy: Some(proxy),
        repmgr,
        _bin: bin,
    }
}

async fn nothing_lost(s: &Setup, out: &Outcome, primary: usize) {
    let n = &s.repmgr.nodes[primary];
    assert_nothing_lost(&n.conn(), &n.name, out).await;
}

/// The proxy serves node `i` as the shard's primary, and repmgr agrees.
async fn serves(s: &Setup, i: usize) {
    handoff_tests::admin::wait_serving(s.proxy(), &s.repmgr.nodes[i].addr(), true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchovers_through_handoff_and_repmgr_under_load_lose_nothing() {
    let _serial = SERIAL.lock().await;
    // With the hook: handoff runs repmgr's switchover first and holds when repmgr stops
    // the primary through handoff's pg_ctl.
    let s = setup(&[("HANDOFF_REPMGR_HOOK", "true")]).await;
    let st = shard_state(s.proxy()).await;
    assert_eq!(st["source"], "repmgr", "{st}");
    assert_eq!(st["manager"]["leader"], "node1", "{st}");
    assert_eq!(st["primary"], s.repmgr.nodes[0].addr().as_str(), "{st}");

    let load = Load::start(s.listen(), 8).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Through handoff: it runs `repmgr standby switchover` on node2 and holds when
    // repmgr stops node1.
    let (status, report) = switchover(s.proxy(), "node2").await;
    assert_eq!(status, 200, "{report}");
    let steps: Vec<&str> = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_str().unwrap())
        .collect();
    assert!(steps.contains(&"repmgr_switchover"), "{report}");
    let hook = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|st| st["step"] == "hook")
        .cloned();
    assert_eq!(
        hook.map(|h| h["ok"].clone()),
        Some(serde_json::json!(true)),
        "the hold came with repmgr's stop: {report}"
    );
    assert!(
        !steps.contains(&"promote"),
        "handoff must not promote: {report}"
    );
    serves(&s, 1).await;
    s.streaming();
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Through repmgr's CLI, back: repmgr stops node2 through handoff's pg_ctl, which
    // holds first; its event notification makes handoff read repmgr at once.
    let held_before = metric(s.proxy(), "handoff_holds_total", &["result=\"held\""]).await;
    let out = tokio::task::block_in_place(|| {
        s.repmgr
            .repmgr(0, &["standby", "switchover", "--siblings-follow"])
    })
    .unwrap();
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    serves(&s, 0).await;
    let held = metric(s.proxy(), "handoff_holds_total", &["result=\"held\""]).await;
    assert!(
        held > held_before,
        "repmgr's stop of the primary was not held"
    );
    s.streaming();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let out = load.stop().await;
    nothing_lost(&s, &out, 0).await;

    // What repmgr's event_notification_command runs (`handoff recheck`), by hand.
    let admin = s.proxy().admin_addr();
    let post = |body: &'static str| {
        handoff_tests::raw::http_body(admin, "POST", "/v1/shards/main/recheck", None, body)
    };
    let (status, body) = post(r#"{"event": "standby_promote"}"#).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let (status, body) = post(r#"{"node": 2}"#).await.unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("unknown field"), "{body}");
    let out = std::process::Command::new(handoff_binary())
        .args(["recheck", "--shard", "main", "--event", "test", "--admin"])
        .arg(admin.to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repmgr_refusing_a_standby_down_and_the_primary_killed() {
    let _serial = SERIAL.lock().await;
    let mut s = setup(&[
        ("HANDOFF_BUFFER_WINDOW", "50s"),
        ("HANDOFF_BUFFER_MAX_FAILOVER_DURATION", "60s"),
        ("HANDOFF_HEALTH_CHECK_INTERVAL", "200ms"),
    ])
    .await;
    let load = Load::start(s.listen(), 8).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;

    // repmgr refuses a switchover it cannot carry out (no SSH to the old primary):
    // clients only waited, the old primary serves again.
    s.repmgr.allow_ssh(false).unwrap();
    let epoch = shard_state(s.proxy()).await["epoch"].clone();
    let (status, report) = switchover(s.proxy(), "node2").await;
    assert_eq!(status, 409, "{report}");
    assert_eq!(report["outcome"], "rolled_back", "{report}");
    assert!(
        report["error"].as_str().unwrap().contains("repmgr refused"),
        "{report}"
    );
    let st = shard_state(s.proxy()).await;
    assert_eq!(st["epoch"], epoch, "{st}");
    assert_eq!(st["state"], "serving", "{st}");
    assert_eq!(s.repmgr.primary(), Some(0));
    s.repmgr.allow_ssh(true).unwrap();

    // A standby unreachable: the primary still answers for repmgr, handoff serves on.
    tokio::task::block_in_place(|| s.repmgr.stop(1)).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let st = shard_state(s.proxy()).await;
    assert_eq!(st["state"], "serving", "{st}");
    assert_eq!(st["manager"]["agrees"], true, "{st}");
    tokio::task::block_in_place(|| s.repmgr.restart(1)).unwrap();
    s.streaming();

    // The primary dies under repmgrd: node2 is promoted, handoff serves it. The standby
    // is synchronous first, so a crash loses no acknowledged write.
    s.repmgr
        .psql(0, "alter system set synchronous_standby_names = '*'")
        .unwrap();
    s.repmgr.psql(0, "select pg_reload_conf()").unwrap();
    for i in 0..2 {
        tokio::task::block_in_place(|| s.repmgr.run_repmgrd(i)).unwrap();
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    tokio::task::block_in_place(|| s.repmgr.kill(0));
    serves(&s, 1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let out = load.stop().await;
    assert!(
        out.max_client_errors <= 1,
        "a client saw more than the request in flight fail: {:?}",
        out.errors
    );
    let n = &s.repmgr.nodes[1];
    assert_acked_on(&n.conn(), &n.name, &out).await;
    drop(s.proxy.take());
}
