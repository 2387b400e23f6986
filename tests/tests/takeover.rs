//! Takeover (`handoff --takeover`): a new handoff process takes a running one's
//! listening sockets and clients over, and the clients do not notice — under load, in
//! both pool modes, ten times in a row, with a changed configuration, during a
//! switchover; and a successor that fails at any step before it took a client leaves
//! the running process serving everything.
//!
//! These run the real binary (two processes hand over to each other) in front of real
//! PostgreSQL; every acknowledged write is checked on the server.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use handoff::api::takeover::{Message, FORMAT};
use handoff_tests::admin::server;
use handoff_tests::load::{history, ids, pgbench, pgbench_done, Load};
use handoff_tests::raw::{http, http_body};
use handoff_tests::{conn_str, eventually, Cluster};
use tokio_postgres::error::SqlState;
use tokio_postgres::{AsyncMessage, Client, NoTls};

/// One handoff deployment: its addresses, environment and log directory; processes
/// started from it take each other over.
struct Deployment {
    listen: SocketAddr,
    admin: SocketAddr,
    socket: PathBuf,
    env: Vec<(String, String)>,
    dir: tempfile::TempDir,
    started: usize,
    /// Every process started, killed when the test ends (a failed test leaves none).
    pids: Vec<u32>,
}

impl Drop for Deployment {
    fn drop(&mut self) {
        for pid in &self.pids {
            // Only a handoff still running (a pid freed and reused is someone else's).
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains("handoff") {
                let _ = handoff_tests::signal(*pid, "KILL");
            }
        }
    }
}

impl Deployment {
    fn new(cluster: &Cluster, extra: &[(&str, &str)]) -> Self {
        let port = handoff_tests::pg::free_port().unwrap();
        let admin = handoff_tests::pg::free_port().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("handoff.takeover");
        let mut env: Vec<(String, String)> = vec![
            ("HANDOFF_LISTEN".into(), format!("127.0.0.1:{port}")),
            ("HANDOFF_ADMIN_LISTEN".into(), format!("127.0.0.1:{admin}")),
            (
                "HANDOFF_SHARDS".into(),
                format!("main={}", cluster.primary.addr()),
            ),
            ("HANDOFF_POOL_SIZE".into(), "8".into()),
            ("HANDOFF_SHUTDOWN_TIMEOUT".into(), "10s".into()),
            (
                "HANDOFF_TAKEOVER_SOCKET".into(),
                socket.display().to_string(),
            ),
            ("HANDOFF_LOG".into(), "info".into()),
        ];
        set(&mut env, extra);
        Self {
            listen: format!("127.0.0.1:{port}").parse().unwrap(),
            admin: format!("127.0.0.1:{admin}").parse().unwrap(),
            socket,
            env,
            dir,
            started: 0,
            pids: Vec::new(),
        }
    }

    /// Every process's log, for a failure's message.
    fn logs(&self) -> String {
        (1..=self.started)
            .map(|i| {
                let p = self.dir.path().join(format!("handoff-{i}.log"));
                format!("--- process {i} ---\n{}", read(&p))
            })
            .collect()
    }

    fn url(&self) -> String {
        conn_str(&self.listen, "postgres", "postgres", None)
    }

    /// Starts a process (`takeover`: with `--takeover`) with the deployment's
    /// environment and `extra` over it; its output goes to a log file of its own.
    fn spawn(&mut self, takeover: bool, extra: &[(&str, &str)]) -> (Child, PathBuf) {
        self.started += 1;
        let log = self
            .dir
            .path()
            .join(format!("handoff-{}.log", self.started));
        let out = std::fs::File::create(&log).unwrap();
        let mut env = self.env.clone();
        set(&mut env, extra);
        let mut cmd = handoff_tests::handoff_command();
        cmd.envs(env).stdout(out.try_clone().unwrap()).stderr(out);
        if takeover {
            cmd.arg("--takeover");
        }
        let child = cmd.spawn().unwrap();
        self.pids.push(child.id());
        (child, log)
    }

    /// Starts the first process and waits until it serves.
    async fn first(&mut self) -> Child {
        let (child, log) = self.spawn(false, &[]);
        let url = self.url();
        eventually(Duration::from_secs(20), "handoff to serve", || {
            let url = url.clone();
            async move { Ok(tokio_postgres::connect(&url, NoTls).await.is_ok()) }
        })
        .await
        .unwrap_or_else(|e| panic!("{e}: {}", read(&log)));
        child
    }

    /// Takes `old` over with a new process (`extra` changes its environment): returns
    /// the new one once the old one has exited, having handed everything over.
    async fn take_over(&mut self, old: Child, extra: &[(&str, &str)]) -> (Child, Duration) {
        let started = Instant::now();
        let (mut new, log) = self.spawn(true, extra);
        let status = wait(old, Duration::from_secs(40)).await;
        assert!(
            status.is_some_and(|s| s.success()),
            "the old process did not end well after the takeover: {status:?}; the new one's log: {}",
            read(&log)
        );
        assert!(
            new.try_wait().unwrap().is_none(),
            "the new process exited: {}",
            read(&log)
        );
        (new, started.elapsed())
    }
}

fn set(env: &mut Vec<(String, String)>, extra: &[(&str, &str)]) {
    for (k, v) in extra {
        env.retain(|(name, _)| name != k);
        env.push((k.to_string(), v.to_string()));
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The child's exit status within `within` (`None`: still running, then killed).
async fn wait(mut child: Child, within: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

fn stop(mut child: Child) {
    let _ = handoff_tests::signal(child.id(), "TERM");
    let _ = child.wait();
}

async fn connect(url: &str) -> Client {
    let (c, conn) = tokio_postgres::connect(url, NoTls).await.unwrap();
    tokio::spawn(conn);
    c
}

/// A client whose connection's asynchronous messages (notifications) arrive on a channel.
async fn listening_client(
    url: &str,
) -> (
    Client,
    tokio::sync::mpsc::UnboundedReceiver<(String, String)>,
) {
    let (c, mut conn) = tokio_postgres::connect(url, NoTls).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(m) = futures_util::StreamExt::next(&mut messages).await {
            match m {
                Ok(AsyncMessage::Notification(n)) => {
                    let _ = tx.send((n.channel().to_string(), n.payload().to_string()));
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    (c, rx)
}

/// A cancel sent for `client` (through the proxy, whichever process has it now) stops
/// its running query with 57014.
async fn cancel_reaches_the_backend(client: &Client) {
    let token = client.cancel_token();
    let cancel = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        token.cancel_query(NoTls).await
    });
    let started = Instant::now();
    let err = client
        .simple_query("SELECT pg_sleep(20)")
        .await
        .expect_err("the sleep is cancelled");
    cancel.await.unwrap().unwrap();
    assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

fn assert_no_errors(out: &handoff_tests::load::Outcome) {
    assert!(
        out.errors.is_empty(),
        "{} errors, e.g. {:?}",
        out.errors.len(),
        &out.errors[..out.errors.len().min(5)]
    );
    assert!(out.ok > 0, "the load ran");
}

async fn assert_acked_on(node: &handoff_tests::Node, out: &handoff_tests::load::Outcome) {
    let on_server = ids(&server(node)).await.unwrap();
    let missing: Vec<_> = out
        .acked
        .iter()
        .filter(|id| !on_server.contains(id))
        .collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged writes missing",
        missing.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_mode_clients_move_through_ten_takeovers_without_an_error() {
    let cluster = Cluster::start(0).unwrap();
    cluster.pgbench_init(1).unwrap();
    Load::prepare(&server(&cluster.primary)).await.unwrap();
    cluster
        .primary
        .psql("CREATE TABLE mid (id int PRIMARY KEY)")
        .unwrap();
    let mut d = Deployment::new(&cluster, &[]);
    let mut proc = d.first().await;
    let url = d.url();
    let load = Load::start(d.listen, 12).await.unwrap();
    // pgbench through the first takeovers (it runs for a fixed time).
    let history_before = history(&cluster.primary).await;
    let bench = pgbench(&cluster, d.listen.port(), 4, 5);

    // A client with a parameter SET, a protocol-level and a SQL-level named statement.
    let c = connect(&format!("{url} application_name=mover")).await;
    // (Transaction mode follows the parameters the server reports, as PgBouncer does.)
    c.batch_execute("SET TimeZone = 'Asia/Tokyo'")
        .await
        .unwrap();
    c.batch_execute("PREPARE twice(int) AS SELECT $1 * 2")
        .await
        .unwrap();
    let plus = c.prepare("SELECT $1::int + 1").await.unwrap();
    // A client in the middle of a transaction while the takeover starts.
    let mut mid = connect(&url).await;
    // `c` and `mid` are quiet: after 3 s they are parked in the lot (kept without a
    // task) when the first takeover starts; they are moved from there.
    eventually(
        Duration::from_secs(10),
        "the quiet clients to be parked",
        || async {
            let (_, text) = http(d.admin, "GET", "/metrics", None).await?;
            Ok(text
                .lines()
                .find_map(|l| l.strip_prefix("handoff_clients_parked "))
                .is_some_and(|n| n.trim().parse::<f64>().is_ok_and(|n| n >= 2.0)))
        },
    )
    .await
    .unwrap();

    let mut longest = Duration::ZERO;
    for round in 0..10i32 {
        let tx = mid.transaction().await.unwrap();
        tx.execute("INSERT INTO mid VALUES ($1)", &[&round])
            .await
            .unwrap();
        let finish = async {
            tokio::time::sleep(Duration::from_millis(400)).await;
            tx.execute("INSERT INTO mid VALUES ($1)", &[&(round + 100)])
                .await
                .unwrap();
            tx.commit().await.unwrap();
        };
        let ((new, took), ()) = tokio::join!(d.take_over(proc, &[]), finish);
        proc = new;
        longest = longest.max(took);

        let row = c.query_one(&plus, &[&round]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), round + 1, "round {round}");
        let r = c.simple_query("EXECUTE twice(21)").await.unwrap();
        let got = r.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_string),
            _ => None,
        });
        assert_eq!(got.as_deref(), Some("42"), "round {round}");
        let t: String = c.query_one("SHOW TimeZone", &[]).await.unwrap().get(0);
        assert_eq!(
            t, "Asia/Tokyo",
            "round {round}: the SET moved with the client"
        );
        let a: String = c
            .query_one("SHOW application_name", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(a, "mover", "round {round}: the startup parameter moved");
    }
    cancel_reaches_the_backend(&c).await;
    let committed = tokio::task::spawn_blocking(move || pgbench_done("handoff", bench))
        .await
        .unwrap();
    assert!(committed > 0);
    let rows = history(&cluster.primary).await - history_before;
    assert!(
        rows >= committed,
        "pgbench committed {committed} transactions, the server has {rows} history rows"
    );

    // A cancel for a client still in the old process (its transaction has not ended),
    // received by the new one, which has the listener by then: passed back, it stops
    // the query; the client then moves.
    let token = mid.cancel_token();
    let tx = mid.transaction().await.unwrap();
    let (mut started, log) = d.spawn(true, &[]);
    let sleep = async {
        let r = tx.simple_query("SELECT pg_sleep(20)").await;
        tx.rollback().await.unwrap();
        r
    };
    let cancel = async {
        eventually(Duration::from_secs(20), "the new process to accept", || {
            let log = log.clone();
            async move { Ok(read(&log).contains("taking its clients over")) }
        })
        .await
        .unwrap();
        token.cancel_query(NoTls).await.unwrap();
    };
    let (slept, ()) = tokio::join!(sleep, cancel);
    assert_eq!(
        slept.expect_err("cancelled").code(),
        Some(&SqlState::QUERY_CANCELED)
    );
    let status = wait(proc, Duration::from_secs(40)).await;
    assert!(status.is_some_and(|s| s.success()), "{}", d.logs());
    assert!(started.try_wait().unwrap().is_none(), "{}", d.logs());
    proc = started;
    mid.simple_query("SELECT 1").await.unwrap();

    let out = load.stop().await;
    assert_no_errors(&out);
    assert_acked_on(&cluster.primary, &out).await;
    let committed = cluster.primary.psql("SELECT count(*) FROM mid").unwrap();
    assert_eq!(
        committed, "20",
        "every transaction open across a takeover committed"
    );
    eprintln!(
        "10 takeovers: {} requests, longest takeover {longest:?}",
        out.ok
    );
    stop(proc);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_clients_keep_their_own_backend_across_takeovers() {
    let cluster = Cluster::start(0).unwrap();
    cluster.pgbench_init(1).unwrap();
    Load::prepare(&server(&cluster.primary)).await.unwrap();
    let mut d = Deployment::new(&cluster, &[("HANDOFF_POOL_MODE", "session")]);
    let mut proc = d.first().await;
    let url = d.url();
    let load = Load::start(d.listen, 6).await.unwrap();
    let history_before = history(&cluster.primary).await;
    let bench = pgbench(&cluster, d.listen.port(), 4, 3);

    let (c, mut notes) = listening_client(&url).await;
    c.batch_execute(
        "CREATE TEMP TABLE mine (x int); INSERT INTO mine VALUES (7); LISTEN moved; \
         SET search_path = pg_temp, public; SELECT pg_advisory_lock(4242)",
    )
    .await
    .unwrap();
    let pid: i32 = c
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let direct = connect(&server(&cluster.primary)).await;

    for round in 0..3 {
        let (new, _) = d.take_over(proc, &[]).await;
        proc = new;
        let now: i32 = c
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap_or_else(|e| panic!("{e}: {}", d.logs()))
            .get(0);
        assert_eq!(now, pid, "round {round}: the same server backend");
        let x: i32 = c.query_one("SELECT x FROM mine", &[]).await.unwrap().get(0);
        assert_eq!(x, 7, "round {round}: the temp table is there");
        let held: bool = direct
            .query_one("SELECT pg_try_advisory_lock(4242)", &[])
            .await
            .unwrap()
            .get(0);
        assert!(
            !held,
            "round {round}: the advisory lock is still the client's"
        );
        direct
            .batch_execute(&format!("NOTIFY moved, 'round {round}'"))
            .await
            .unwrap();
        let note = tokio::time::timeout(Duration::from_secs(10), notes.recv())
            .await
            .expect("the notification arrives")
            .unwrap();
        assert_eq!(note, ("moved".to_string(), format!("round {round}")));
    }
    cancel_reaches_the_backend(&c).await;
    let committed = tokio::task::spawn_blocking(move || pgbench_done("handoff", bench))
        .await
        .unwrap();
    let rows = history(&cluster.primary).await - history_before;
    assert!(
        committed > 0 && rows >= committed,
        "{committed} committed, {rows} rows"
    );

    let out = load.stop().await;
    assert_no_errors(&out);
    assert_acked_on(&cluster.primary, &out).await;
    stop(proc);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_mode_reader_on_a_standby_keeps_its_backend_across_takeovers() {
    let cluster = Cluster::start(1).unwrap();
    let shards = format!(
        "main={},{}",
        cluster.primary.addr(),
        cluster.standbys[0].addr()
    );
    let mut d = Deployment::new(
        &cluster,
        &[
            ("HANDOFF_POOL_MODE", "session"),
            ("HANDOFF_SHARDS", &shards),
        ],
    );
    let mut proc = d.first().await;
    // `@replica` waits for the standby to join the read rotation.
    let c = connect(&conn_str(&d.listen, "postgres", "postgres@replica", None)).await;
    c.batch_execute("SET application_name = 'reader'")
        .await
        .unwrap();
    let pid: i32 = c
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    for round in 0..2 {
        let (new, _) = d.take_over(proc, &[]).await;
        proc = new;
        let row = c
            .query_one(
                "SELECT pg_backend_pid(), pg_is_in_recovery(), current_setting('application_name')",
                &[],
            )
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e}: {}", d.logs()));
        assert_eq!(
            row.get::<_, i32>(0),
            pid,
            "round {round}: the same standby backend"
        );
        assert!(row.get::<_, bool>(1), "round {round}: still on the standby");
        assert_eq!(
            row.get::<_, String>(2),
            "reader",
            "round {round}: its settings kept"
        );
    }
    stop(proc);
}

/// `SHOW STATS`' total transactions of database `postgres`, through the console (a
/// console session stays in the process it started in: closed at once).
async fn xact_count(d: &Deployment) -> u64 {
    let console = connect(&conn_str(&d.listen, "postgres", "handoff", None)).await;
    let rows = console.simple_query("SHOW STATS").await.unwrap();
    rows.iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) if r.get("database") == Some("postgres") => {
                r.get("total_xact_count").and_then(|v| v.parse().ok())
            }
            _ => None,
        })
        .unwrap_or(0)
}

/// Speaks the hand-over format as a successor would, up to a chosen step, then goes.
struct FakeSuccessor {
    tx: handoff::net::passfd::Sender,
    rx: handoff::net::passfd::Receiver,
}

impl FakeSuccessor {
    async fn connect(socket: &Path) -> Self {
        let s = tokio::net::UnixStream::connect(socket).await.unwrap();
        let (tx, rx) = handoff::net::passfd::split(s);
        Self { tx, rx }
    }

    async fn send(&self, m: &Message) {
        self.tx
            .send(&serde_json::to_vec(m).unwrap(), &[])
            .await
            .unwrap();
    }

    async fn recv(&mut self) -> Option<(Message, usize)> {
        let (body, fds) = tokio::time::timeout(Duration::from_secs(30), self.rx.recv())
            .await
            .expect("an answer in time")
            .unwrap()?;
        Some((handoff::api::takeover::decode(&body).unwrap(), fds.len()))
    }

    /// One that has said hello in this format and received the listeners.
    async fn up_to_the_listeners(socket: &Path) -> Self {
        let mut fake = Self::connect(socket).await;
        fake.send(&Self::hello(FORMAT)).await;
        assert!(matches!(
            fake.recv().await,
            Some((Message::Hello { .. }, 0))
        ));
        assert!(matches!(
            fake.recv().await,
            Some((Message::Listeners { .. }, 2))
        ));
        fake
    }

    fn hello(format: u32) -> Message {
        Message::Hello {
            format,
            version: "test".into(),
            pid: 1,
        }
    }
}

/// New connections still get in (the running process accepts again).
async fn serves_new_clients(url: &str) {
    for _ in 0..10 {
        let c = tokio::time::timeout(Duration::from_secs(5), tokio_postgres::connect(url, NoTls))
            .await
            .expect("a new connection is accepted in time")
            .unwrap();
        tokio::spawn(c.1);
        c.0.simple_query("SELECT 1").await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successor_that_fails_before_taking_a_client_leaves_everything_served() {
    let cluster = Cluster::start(0).unwrap();
    Load::prepare(&server(&cluster.primary)).await.unwrap();
    let mut d = Deployment::new(&cluster, &[("HANDOFF_SHUTDOWN_TIMEOUT", "3s")]);
    let proc = d.first().await;
    let url = d.url();
    let load = Load::start(d.listen, 8).await.unwrap();

    // A broken configuration: the new process says why and exits; nothing moved.
    let (bad, log) = d.spawn(true, &[("HANDOFF_POOL_SIZE", "lots")]);
    let status = wait(bad, Duration::from_secs(20)).await.expect("it exits");
    assert_eq!(status.code(), Some(2), "{}", read(&log));
    assert!(read(&log).contains("HANDOFF_POOL_SIZE"), "{}", read(&log));

    // A format the running process does not speak: it answers with its own and stops.
    let mut fake = FakeSuccessor::connect(&d.socket).await;
    fake.send(&FakeSuccessor::hello(FORMAT + 1)).await;
    match fake.recv().await {
        Some((Message::Hello { format, .. }, 0)) => assert_eq!(format, FORMAT),
        other => panic!("{other:?}"),
    }
    assert!(fake.recv().await.is_none(), "then it closes the channel");
    serves_new_clients(&url).await;

    // One that takes the listeners and dies before it is ready.
    drop(FakeSuccessor::up_to_the_listeners(&d.socket).await);
    serves_new_clients(&url).await;

    // One that says it is ready, receives clients and dies without taking any: the
    // running process accepts again and serves those clients on.
    let mut fake = FakeSuccessor::up_to_the_listeners(&d.socket).await;
    fake.send(&Message::Ready).await;
    match fake.recv().await {
        Some((Message::Client(c), 1)) => assert_eq!(c.user, "postgres"),
        other => panic!("expected a client with its socket: {other:?}"),
    }
    drop(fake);
    serves_new_clients(&url).await;

    // A shard held (buffering) for longer than HANDOFF_SHUTDOWN_TIMEOUT: the takeover
    // is refused, naming the shard; the held requests are released by the resume.
    let (status, body) = http_body(d.admin, "POST", "/v1/shards/main/buffer", None, "{}")
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let (refused, log) = d.spawn(true, &[]);
    let status = wait(refused, Duration::from_secs(30))
        .await
        .expect("it exits");
    assert_eq!(status.code(), Some(1), "{}", read(&log));
    let said = read(&log);
    assert!(
        said.contains("refused") && said.contains("shard \"main\""),
        "{said}"
    );
    let (status, body) = http_body(d.admin, "POST", "/v1/shards/main/resume", None, "{}")
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");

    // The running process counted each attempt for what it was.
    let (status, body) = http(d.admin, "GET", "/metrics", None).await.unwrap();
    assert_eq!(status, 200);
    for (result, n) in [("refused", 2), ("failed", 2), ("done", 0)] {
        let line = format!("handoff_takeovers_total{{result=\"{result}\"}} {n}\n");
        assert!(body.contains(&line), "{line}: {body}");
    }

    // Then a real successor takes everything over, started as a service manager's
    // reload would: `handoff takeover` returns once it serves, and it tells the
    // manager (NOTIFY_SOCKET, as systemd's Type=notify) that it is the main process.
    let notify_path = d.dir.path().join("notify");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut cli = handoff_tests::handoff_command();
    cli.envs(d.env.clone())
        .env("NOTIFY_SOCKET", &notify_path)
        .arg("takeover")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    // (Read up to its own line: the new process it leaves running logs to the same
    // output, and keeps it open; the rest is copied to a file, for a failure's message,
    // until that process ends.)
    let successor_log = d.dir.path().join("successor.log");
    let copy_to = successor_log.clone();
    let (status, said) = tokio::task::spawn_blocking(move || {
        let mut child = cli.spawn().unwrap();
        let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut lines = std::io::BufRead::lines(stdout).map_while(Result::ok);
        let line = lines
            .find(|l| l.starts_with("handoff: "))
            .unwrap_or_default();
        std::thread::spawn(move || {
            use std::io::Write;
            if let Ok(mut f) = std::fs::File::create(copy_to) {
                for l in lines {
                    let _ = writeln!(f, "{l}");
                }
            }
        });
        (child.wait().unwrap(), line)
    })
    .await
    .unwrap();
    assert!(status.success(), "{said}: {}", d.logs());
    let pid: u32 = said
        .split_whitespace()
        .find_map(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("the new process's id: {said}"));
    d.pids.push(pid);
    let mut buf = [0u8; 128];
    let n = notify.recv(&mut buf).unwrap_or_else(|e| {
        panic!(
            "no word from the new process {pid} on NOTIFY_SOCKET within 30 s ({e}): {}\n--- the new process ---\n{}",
            d.logs(),
            read(&successor_log)
        )
    });
    assert_eq!(
        std::str::from_utf8(&buf[..n]).unwrap(),
        format!("READY=1\nMAINPID={pid}\n")
    );
    let status = wait(proc, Duration::from_secs(40)).await;
    assert!(status.is_some_and(|s| s.success()), "{}", d.logs());

    let out = load.stop().await;
    assert_no_errors(&out);
    assert_acked_on(&cluster.primary, &out).await;
    let _ = handoff_tests::signal(pid, "TERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_applies_a_new_configuration_and_waits_out_a_switchover() {
    let mut cluster = Cluster::start(1).unwrap();
    Load::prepare(&server(&cluster.primary)).await.unwrap();
    let hosts = format!(
        "main={},{}",
        cluster.primary.addr(),
        cluster.standbys[0].addr()
    );
    let mut d = Deployment::new(
        &cluster,
        &[
            ("HANDOFF_SHARDS", hosts.as_str()),
            ("HANDOFF_DATABASES", "*=main"),
            ("HANDOFF_ADMIN_USERS", "postgres"),
        ],
    );
    let proc = d.first().await;
    let load = Load::start(d.listen, 8).await.unwrap();
    // Long enough that the new process's own count, a moment after the takeover, is
    // far below this: only the old one's counts carried over make up for it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let xacts_before = xact_count(&d).await;
    assert!(xacts_before > 100, "{xacts_before}");

    // A shard added and the pool size changed: the new process runs with both.
    let two = format!("{hosts};second={}", cluster.primary.addr());
    let (proc, _) = d
        .take_over(
            proc,
            &[("HANDOFF_SHARDS", two.as_str()), ("HANDOFF_POOL_SIZE", "5")],
        )
        .await;
    let (_, shards) = http(d.admin, "GET", "/v1/shards", None).await.unwrap();
    let shards: serde_json::Value = serde_json::from_str(&shards).unwrap();
    let names: Vec<_> = shards["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["main", "second"]);
    {
        let console = connect(&conn_str(&d.listen, "postgres", "handoff", None)).await;
        let rows = console.simple_query("SHOW CONFIG").await.unwrap();
        let pool_size = rows.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r)
                if r.get("key") == Some("HANDOFF_POOL_SIZE") =>
            {
                Some((
                    r.get("value").unwrap().to_string(),
                    r.get("applies").unwrap().to_string(),
                ))
            }
            _ => None,
        });
        assert_eq!(pool_size, Some(("5".into(), "takeover".into())));
    }
    // SHOW STATS goes on from the old process's counts.
    let xacts_after = xact_count(&d).await;
    assert!(
        xacts_after >= xacts_before,
        "{xacts_after} < {xacts_before}"
    );

    // A takeover asked for while a switchover runs: it waits until the shard serves
    // again, then moves everyone; no client sees either.
    let to = cluster.standbys[0].addr();
    let admin = d.admin;
    let switch = tokio::spawn(async move {
        http_body(
            admin,
            "POST",
            "/v1/shards/main/switchover",
            None,
            &format!("{{\"to\": \"{to}\"}}"),
        )
        .await
        .unwrap()
    });
    tokio::time::sleep(Duration::from_millis(30)).await;
    let (proc, _) = d
        .take_over(
            proc,
            &[("HANDOFF_SHARDS", two.as_str()), ("HANDOFF_POOL_SIZE", "5")],
        )
        .await;
    let (status, report) = switch.await.unwrap();
    assert_eq!(status, 200, "{report}");
    assert!(
        d.logs()
            .contains("takeover: waiting for the shard to serve"),
        "the takeover overlapped the switchover: {}",
        d.logs()
    );
    cluster.swap(0);

    let out = load.stop().await;
    assert_no_errors(&out);
    assert_acked_on(&cluster.primary, &out).await;
    stop(proc);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_etcd_the_successor_keeps_the_proxy_id_and_its_membership() {
    let mut cluster = Cluster::start(1).unwrap();
    Load::prepare(&server(&cluster.primary)).await.unwrap();
    let etcd = handoff_tests::etcd::Etcd::start().unwrap();
    let coordinated = [
        ("HANDOFF_ETCD_ENDPOINTS", etcd.endpoint()),
        ("HANDOFF_ETCD_PREFIX", "/handoff-takeover".to_string()),
        ("HANDOFF_ETCD_LEASE_TTL", "2s".to_string()),
        ("HANDOFF_ETCD_TIMEOUT", "1s".to_string()),
    ];
    let vars: Vec<(&str, &str)> = coordinated.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let logs = handoff_tests::proxies::log_dir().unwrap();
    let mut p2 = handoff_tests::proxies::ProxyProcess::start(&cluster, "p2", &vars, logs.path())
        .await
        .unwrap();
    let hosts = format!(
        "main={},{}",
        cluster.primary.addr(),
        cluster.standbys[0].addr()
    );
    let mut mine = vars.clone();
    mine.extend([
        ("HANDOFF_SHARDS", hosts.as_str()),
        ("HANDOFF_PROXY_ID", "p1"),
    ]);
    let mut d = Deployment::new(&cluster, &mine);
    let proc = d.first().await;
    let members = |c: &serde_json::Value| -> Vec<String> {
        c["members"]
            .as_array()
            .map(|m| {
                m.iter()
                    .filter_map(|m| m["id"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    eventually(Duration::from_secs(20), "p2 to see p1", || async {
        let (_, c) = p2.shard().await?;
        Ok(members(&c).len() == 2)
    })
    .await
    .unwrap();
    let load = Load::start(d.listen, 8).await.unwrap();

    // p2's view of the members, every 20 ms while p1 is taken over.
    let watching = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let watcher = {
        let watching = std::sync::Arc::clone(&watching);
        let admin = p2.admin;
        tokio::spawn(async move {
            let mut gaps = Vec::new();
            let mut looks = 0;
            while watching.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok((200, body)) = http(admin, "GET", "/v1/shards", None).await {
                    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
                    let ids = members(&v["coordination"]);
                    looks += 1;
                    if !ids.iter().any(|i| i == "p1") {
                        gaps.push(ids);
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (looks, gaps)
        })
    };
    let (proc, _) = d.take_over(proc, &[]).await;
    // Past the old process's lease: had the new one not taken the membership over, p1
    // would be gone by now.
    tokio::time::sleep(Duration::from_secs(3)).await;
    watching.store(false, std::sync::atomic::Ordering::Relaxed);
    let (looks, gaps) = watcher.await.unwrap();
    assert!(looks > 20, "{looks}");
    assert!(gaps.is_empty(), "p1 missing from the members: {gaps:?}");

    // A coordinated switchover started on p2 holds p1's new process too.
    let target = cluster.standbys[0].addr();
    let (status, report) = p2.switchover(&target).await.unwrap();
    assert_eq!(status, 200, "{report:#}");
    assert_eq!(report["outcome"], "completed", "{report:#}");
    let acked = handoff_tests::proxies::acknowledged(&report);
    assert!(acked.iter().any(|p| p == "p1"), "{report:#}");
    cluster.swap(0);
    eventually(
        Duration::from_secs(20),
        "p1 to serve the new primary",
        || async {
            let (_, body) = http(d.admin, "GET", "/v1/shards", None).await?;
            let v: serde_json::Value = serde_json::from_str(&body)?;
            Ok(v["shards"][0]["primary"] == target)
        },
    )
    .await
    .unwrap();

    let out = load.stop().await;
    assert_no_errors(&out);
    assert_acked_on(&cluster.primary, &out).await;
    stop(proc);
    p2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_session_stays_with_the_old_process_until_the_bounded_drain() {
    let cluster = Cluster::start(0).unwrap();
    Load::prepare(&server(&cluster.primary)).await.unwrap();
    let ca = handoff_tests::tls::TestCa::new("takeover test CA").unwrap();
    let (cert, key) = ca.issue(&["localhost"]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert).unwrap();
    std::fs::write(&key_path, key).unwrap();
    let (cert_path, key_path) = (
        cert_path.display().to_string(),
        key_path.display().to_string(),
    );
    let mut d = Deployment::new(
        &cluster,
        &[
            ("HANDOFF_TLS_MODE", "allow"),
            ("HANDOFF_TLS_CERT", cert_path.as_str()),
            ("HANDOFF_TLS_KEY", key_path.as_str()),
            ("HANDOFF_SHUTDOWN_TIMEOUT", "3s"),
        ],
    );
    let proc = d.first().await;
    let load = Load::start(d.listen, 8).await.unwrap();
    let tls_url = format!(
        "host=localhost port={} user=postgres dbname=postgres sslmode=require",
        d.listen.port()
    );
    let connector = handoff_tests::tls::MakeRustls::trusting(&ca.cert_pem).unwrap();
    let (tls, conn) = tokio_postgres::connect(&tls_url, connector.clone())
        .await
        .unwrap();
    let tls_conn = tokio::spawn(conn);
    let old_pid = proc.id();

    let (mut new, log) = d.spawn(true, &[]);
    eventually(Duration::from_secs(20), "the new process to accept", || {
        let log = log.clone();
        async move { Ok(read(&log).contains("taking its clients over")) }
    })
    .await
    .unwrap();
    // The plain clients move; the TLS one is still served by the old process.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let one: i32 = tls.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
    assert!(
        std::fs::metadata(format!("/proc/{old_pid}")).is_ok(),
        "the old process waits for its TLS client"
    );
    // After HANDOFF_SHUTDOWN_TIMEOUT it drains: the TLS client, idle, is told 57P01.
    let status = wait(proc, Duration::from_secs(30)).await;
    assert!(status.is_some_and(|s| s.success()), "{}", d.logs());
    let ended = tokio::time::timeout(Duration::from_secs(10), tls_conn)
        .await
        .expect("the TLS session ends")
        .unwrap();
    assert_eq!(
        ended.expect_err("ended by the proxy").code(),
        Some(&SqlState::ADMIN_SHUTDOWN)
    );
    // A new TLS client is served by the new process.
    let (again, conn) = tokio_postgres::connect(&tls_url, connector).await.unwrap();
    tokio::spawn(conn);
    again.simple_query("SELECT 1").await.unwrap();
    assert!(new.try_wait().unwrap().is_none());

    let out = load.stop().await;
    assert_no_errors(&out);
    assert_acked_on(&cluster.primary, &out).await;
    stop(new);
}
