//! The lot: quiet transaction-mode clients kept without a task of their own, woken by
//! what they send, by their closing, and ended by the console's `KILL`. (Its own
//! binary: the parked gauge and the task count are process-wide.)

use std::time::Duration;

use handoff_protocol::backend::{BackendMessage, TransactionStatus};
use handoff_tests::admin::metric;
use handoff_tests::raw::RawClient;
use handoff_tests::{conn_str, eventually, start_proxy, Cluster};
use tokio_postgres::NoTls;

/// The test's clients.
const N: usize = 30;

/// Waits until the proxy's tasks are at most `max` (10 s at most).
async fn until_tasks_at_most(proxy: &handoff::Proxy, max: f64, what: &str) {
    if let Err(tasks) = tasks_at_most_within(proxy, max, Duration::from_secs(10)).await {
        panic!("timed out waiting for {what}: {tasks} tasks, at most {max} expected");
    }
}

/// Whether the proxy's tasks come down to at most `max` within `limit` (the count
/// last seen if not).
async fn tasks_at_most_within(
    proxy: &handoff::Proxy,
    max: f64,
    limit: Duration,
) -> Result<(), f64> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let tasks = metric(proxy, "handoff_tasks", &[]).await;
        if tasks <= max {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(tasks);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn until_parked(proxy: &handoff::Proxy, n: f64, what: &str) {
    eventually(Duration::from_secs(10), what, || async move {
        Ok(metric(proxy, "handoff_clients_parked", &[]).await == n)
    })
    .await
    .unwrap();
}

/// A second after their last requests, most clients are neither parked nor in the lot:
/// in a quiet spell that follows a short one (or their first), a client keeps its task
/// and its relay's loop for 3 s. `spell` says which quiet spell of theirs it is.
async fn kept_in_tasks(proxy: &handoff::Proxy, tasks_before: f64, spell: &str) {
    tokio::time::sleep(Duration::from_secs(1)).await;
    let tasks = metric(proxy, "handoff_tasks", &[]).await;
    let parked = metric(proxy, "handoff_clients_parked", &[]).await;
    assert!(
        tasks >= tasks_before + (N / 2) as f64 && parked <= (N / 2) as f64,
        "{spell} went straight to the lot: {tasks} tasks ({tasks_before} before the clients), {parked} parked"
    );
}

/// A simple Query message.
fn query(sql: &str) -> Vec<u8> {
    let mut m = vec![b'Q'];
    m.extend_from_slice(&(sql.len() as u32 + 5).to_be_bytes());
    m.extend_from_slice(sql.as_bytes());
    m.push(0);
    m
}

/// The first column of each row a simple query returns, as text, up to ReadyForQuery.
async fn rows(c: &mut RawClient, sql: &str) -> Vec<String> {
    c.send(&query(sql)).await.unwrap();
    let mut out = Vec::new();
    loop {
        match c.read_message().await.unwrap() {
            Some(BackendMessage::ReadyForQuery(_)) => return out,
            Some(BackendMessage::ErrorResponse(f)) => panic!("{sql}: {:?}", f.message()),
            Some(BackendMessage::Other(f)) if f.tag == b'D' => {
                // Column count (2 bytes), then the first column's length and bytes.
                let len = i32::from_be_bytes(f.body[2..6].try_into().unwrap()) as usize;
                out.push(String::from_utf8_lossy(&f.body[6..6 + len]).into_owned());
            }
            Some(_) => {}
            None => panic!("{sql}: closed"),
        }
    }
}

/// Quiet clients wait in the lot: no task each, woken by what they send, by their
/// closing, and ended by the console's `KILL`. (Raw clients, so that the test itself
/// runs no task per client either.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_clients_hold_no_task_and_leave_the_lot_when_they_send_close_or_are_killed() {
    let cluster = Cluster::start(0).unwrap();
    let proxy = start_proxy(
        &cluster,
        &[
            ("HANDOFF_POOL_MODE", "transaction"),
            ("HANDOFF_ADMIN_USERS", "postgres"),
        ],
    )
    .await
    .unwrap();
    let addr = proxy.listen_addr();
    let login = || RawClient::login_trust(addr, "postgres", "postgres");

    // One client first: the pool and whatever else the first one starts. It sets a
    // parameter and prepares a statement of its own, which must outlive its stays in
    // the lot (the lot keeps the session without its transaction's parts).
    let mut clients = vec![login().await.unwrap()];
    rows(&mut clients[0], "set datestyle = 'SQL, DMY'").await;
    rows(&mut clients[0], "prepare mine as select 'kept'::text").await;
    until_parked(&proxy, 1.0, "the first client to be parked").await;
    let tasks_before = metric(&proxy, "handoff_tasks", &[]).await;
    assert!(tasks_before > 0.0, "no handoff_tasks in /metrics");
    // A session just logged in goes to the lot at once: no task each even before the
    // first request.
    for _ in 1..N {
        clients.push(login().await.unwrap());
    }
    let few = tasks_before + (N / 3) as f64;
    if let Err(tasks) = tasks_at_most_within(&proxy, few, Duration::from_millis(300)).await {
        panic!("clients just logged in held {tasks} tasks 0.3 s after the last login (at most {few} expected): not sent to the lot");
    }
    // Each is woken by its first request, and keeps its task after it: a client's first
    // quiet spell waits there, as a client that sends every second or two does (the
    // stay in the lot since its login was no quiet spell of the client's).
    for c in &mut clients[1..] {
        c.send(&query("select 1")).await.unwrap();
        c.drain_until_ready().await.unwrap();
    }
    kept_in_tasks(&proxy, tasks_before, "their first quiet spell").await;
    // Quiet for 3 s: in the lot, with no task.
    until_tasks_at_most(&proxy, few, "the clients quiet for 3 s to go to the lot").await;
    assert_eq!(
        metric(&proxy, "handoff_clients_parked", &[]).await,
        N as f64,
        "the lot's clients count as parked"
    );

    // The first client's parameter and statement came through the lot with it.
    assert_eq!(rows(&mut clients[0], "show datestyle").await, ["SQL, DMY"]);
    assert_eq!(rows(&mut clients[0], "execute mine").await, ["kept"]);

    // Each is woken by its request after that long quiet spell, and goes back to the lot
    // after 0.5 s of quiet, not after 3 s in its task.
    for (i, c) in clients.iter_mut().enumerate() {
        c.send(&query(&format!("select {i}"))).await.unwrap();
        let (bytes, status) = c.drain_until_ready().await.unwrap();
        assert!(bytes > 0, "client {i} got no row");
        assert_eq!(status, TransactionStatus::Idle);
    }
    if let Err(tasks) = tasks_at_most_within(&proxy, few, Duration::from_millis(2200)).await {
        panic!("clients quiet for long last time still held {tasks} tasks 2.2 s after their request (at most {few} expected): not sent to the lot after 0.5 s");
    }

    // Woken again within 3 s of their last request, they count as clients that send
    // often: they keep their tasks, and go to the lot once quiet 3 s.
    for c in clients.iter_mut() {
        c.send(&query("select 2")).await.unwrap();
        c.drain_until_ready().await.unwrap();
    }
    kept_in_tasks(&proxy, tasks_before, "a quiet spell after a short one").await;
    until_tasks_at_most(&proxy, few, "the clients quiet for 3 s to go to the lot").await;

    // A parked client that closes leaves: its session ends without a request.
    let p = &proxy;
    clients.truncate(N - 10);
    until_parked(
        &proxy,
        (N - 10) as f64,
        "the closed clients to leave the lot",
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "the closed sessions to end",
        || async move { Ok(metric(p, "handoff_client_connections", &[]).await == (N - 10) as f64) },
    )
    .await
    .unwrap();

    // KILL ends the parked sessions of the database, in the lot: their sockets close.
    until_tasks_at_most(&proxy, few, "the rest to be in the lot again").await;
    let console_url = conn_str(&addr, "postgres", "handoff", None);
    let (console, conn) = tokio_postgres::connect(&console_url, NoTls).await.unwrap();
    tokio::spawn(conn);
    console.simple_query("KILL postgres").await.unwrap();
    for (i, c) in clients.iter_mut().enumerate() {
        let r = tokio::time::timeout(Duration::from_secs(10), c.read_message()).await;
        assert!(
            matches!(r, Ok(Ok(None)) | Ok(Err(_))),
            "client {i} was not closed by KILL: {r:?}"
        );
    }
    until_parked(&proxy, 0.0, "the killed clients to leave the lot").await;
    eventually(
        Duration::from_secs(10),
        "only the console to be left",
        || async move { Ok(metric(p, "handoff_client_connections", &[]).await == 1.0) },
    )
    .await
    .unwrap();
    // The proxy goes on: a new client is served.
    let mut c = login().await.unwrap();
    c.send(&query("select 1")).await.unwrap();
    c.drain_until_ready().await.unwrap();
}
