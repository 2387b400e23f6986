//! The `handoff` command line (clap): running the proxy, and the small clients of its
//! admin API — `switchover`, `hold`, `recheck`, `status`, `healthcheck`. The clients read the
//! admin address from `--admin` or `HANDOFF_ADMIN_LISTEN` and the token from `--token`
//! or `HANDOFF_ADMIN_TOKEN`, as the proxy itself does, speak HTTP/1.1 with hyper, and
//! read the answers as the API's own types ([`handoff::api`]).

use std::net::{Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use handoff::api::{self, report::SwitchoverReport, ErrorAnswer, ShardChange, Shards};
use http_body_util::{BodyExt, Full};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;

/// handoff: a failover-safe PostgreSQL proxy. Without a subcommand it runs the proxy,
/// configured by the environment variables listed below.
#[derive(Debug, Parser)]
#[command(name = "handoff", version, disable_help_subcommand = false)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Take over the handoff running on this host (HANDOFF_TAKEOVER_SOCKET): its
    /// listening sockets and its clients move to this process, with no client
    /// disconnected; then it exits. The way to upgrade handoff or change a setting.
    #[arg(long)]
    pub takeover: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a planned switchover of a shard to one of its standbys (a member's name on a
    /// shard an HA manager runs) and print each step.
    #[command(
        override_usage = "handoff switchover --shard NAME --to HOST:PORT|MEMBER [--admin ADDR] [--token TOKEN] [--json]"
    )]
    Switchover(SwitchoverArgs),
    /// Hold new transactions of a shard before an HA manager stops its primary
    /// (Patroni's before_stop); returns within --timeout.
    #[command(
        override_usage = "handoff hold --shard NAME [--primary HOST:PORT] [--timeout DURATION] [--reason TEXT] [--admin ADDR] [--token TOKEN] [--json]"
    )]
    Hold(HoldArgs),
    /// Tell handoff its HA manager just changed something (repmgr's
    /// event_notification_command): it reads the manager and checks the primary now.
    #[command(
        override_usage = "handoff recheck --shard NAME [--event TEXT] [--admin ADDR] [--token TOKEN] [--json]"
    )]
    Recheck(RecheckArgs),
    /// Print every shard's state, the replaced primaries watched, each HA manager's view
    /// and the coordination between proxies.
    #[command(override_usage = "handoff status [--admin ADDR] [--token TOKEN] [--json]")]
    Status(Admin),
    /// Exit 0 if the admin API (HANDOFF_ADMIN_LISTEN) answers GET /healthz with 200.
    #[command(override_usage = "handoff healthcheck")]
    Healthcheck,
    /// Start a new handoff (this binary, this environment) that takes the running one
    /// over, in the background; exit 0 once it serves, 1 if it failed (the running one
    /// then serves on). For a service manager's reload: upgrade, or change any setting.
    #[command(override_usage = "handoff takeover")]
    Takeover,
}

/// Where the admin API is, and how to print its answer.
#[derive(Debug, Args)]
pub struct Admin {
    /// The admin API's address [default: HANDOFF_ADMIN_LISTEN, else 127.0.0.1:6480]
    #[arg(long, value_name = "ADDR")]
    admin: Option<String>,
    /// Bearer token [default: HANDOFF_ADMIN_TOKEN]
    #[arg(long, value_name = "TOKEN")]
    token: Option<String>,
    /// Print the API's JSON answer as it is.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct SwitchoverArgs {
    #[arg(long, value_name = "NAME")]
    shard: String,
    /// The standby to promote: host:port, or the HA manager's name for it (a Patroni
    /// member, a pg_auto_failover node).
    #[arg(long, value_name = "HOST:PORT|MEMBER")]
    to: String,
    #[command(flatten)]
    admin: Admin,
}

#[derive(Debug, Args)]
pub struct HoldArgs {
    #[arg(long, value_name = "NAME")]
    shard: String,
    /// The server about to stop: held only if it is the shard's primary (the hook also
    /// runs when a replica stops).
    #[arg(long, value_name = "HOST:PORT")]
    primary: Option<String>,
    /// The most the command may take, whatever happens: a hook that hangs would stall
    /// the HA manager.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = positive_duration)]
    timeout: Duration,
    #[arg(
        long,
        value_name = "TEXT",
        default_value = "handoff hold (before the primary stops)"
    )]
    reason: String,
    #[command(flatten)]
    admin: Admin,
}

#[derive(Debug, Args)]
pub struct RecheckArgs {
    #[arg(long, value_name = "NAME")]
    shard: String,
    /// What happened, for handoff's log (repmgr's %e).
    #[arg(long, value_name = "TEXT", default_value = "")]
    event: String,
    #[command(flatten)]
    admin: Admin,
}

fn positive_duration(s: &str) -> Result<Duration, String> {
    match handoff::config::parse_duration(s) {
        Ok(d) if !d.is_zero() => Ok(d),
        _ => Err(format!("'{s}' is not a duration like 10s")),
    }
}

/// Why the admin API could not be asked.
#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error("cannot reach the admin API at {addr}: {source}")]
    Unreachable {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("admin address '{0}' is not IP:port")]
    BadAddress(String),
    #[error("no answer from the admin API: {0}")]
    Http(#[from] hyper::Error),
    #[error("no answer from the admin API: no answer within {0:?}")]
    Timeout(Duration),
    #[error("cannot start the client's runtime: {0}")]
    Runtime(std::io::Error),
}

/// An admin API client: its address and token.
struct Client {
    addr: SocketAddr,
    token: Option<String>,
}

impl Client {
    fn new(a: &Admin) -> Result<Self, CliError> {
        let text = a
            .admin
            .clone()
            .or_else(|| std::env::var("HANDOFF_ADMIN_LISTEN").ok())
            .unwrap_or_else(|| "127.0.0.1:6480".into());
        let mut addr: SocketAddr = text.parse().map_err(|_| CliError::BadAddress(text))?;
        // A proxy listening on every address answers on loopback.
        if addr.ip().is_unspecified() {
            addr.set_ip(Ipv4Addr::LOCALHOST.into());
        }
        let token = a
            .token
            .clone()
            .or_else(|| std::env::var("HANDOFF_ADMIN_TOKEN").ok())
            .filter(|t| !t.is_empty());
        Ok(Self { addr, token })
    }

    /// One request, connecting included, bounded by `timeout`: the status and the body.
    fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<String>,
        timeout: Duration,
    ) -> Result<(u16, Bytes), CliError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(CliError::Runtime)?;
        rt.block_on(async {
            tokio::time::timeout(timeout, self.exchange(method, path, body))
                .await
                .map_err(|_| CliError::Timeout(timeout))?
        })
    }

    async fn exchange(
        &self,
        method: Method,
        path: &str,
        body: Option<String>,
    ) -> Result<(u16, Bytes), CliError> {
        let unreachable = |source| CliError::Unreachable {
            addr: self.addr,
            source,
        };
        let stream = tokio::net::TcpStream::connect(self.addr)
            .await
            .map_err(unreachable)?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, self.addr.to_string());
        if body.is_some() {
            req = req.header(CONTENT_TYPE, "application/json");
        }
        if let Some(t) = &self.token {
            req = req.header(AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .expect("a request built from valid parts");
        let resp = sender.send_request(req).await?;
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await?.to_bytes();
        Ok((status, bytes))
    }
}

fn fail(msg: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("handoff: {msg}");
    ExitCode::from(2)
}

/// The error an answer carries, or its text when it is not the API's error shape.
fn error_of(body: &[u8]) -> String {
    api::decode::<ErrorAnswer>(body)
        .map(|e| e.error)
        .unwrap_or_else(|_| String::from_utf8_lossy(body).into_owned())
}

pub fn run(command: Command) -> ExitCode {
    match command {
        Command::Switchover(a) => switchover(&a),
        Command::Hold(a) => hold(&a),
        Command::Recheck(a) => recheck(&a),
        Command::Status(a) => status(&a),
        Command::Healthcheck => healthcheck(),
        Command::Takeover => takeover::run(),
    }
}

/// `handoff switchover --shard main --to host:port`: exit 0 when completed, 1 when
/// refused, rolled back or failed, 2 when the API could not be asked.
fn switchover(a: &SwitchoverArgs) -> ExitCode {
    let client = match Client::new(&a.admin) {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    let body = serde_json::json!({ "to": a.to }).to_string();
    let path = format!("/v1/shards/{}/switchover", a.shard);
    let (status, body) =
        match client.call(Method::POST, &path, Some(body), Duration::from_secs(130)) {
            Ok(r) => r,
            Err(e) => return fail(&e),
        };
    if a.admin.json {
        println!("{}", String::from_utf8_lossy(&body));
    } else {
        match api::decode::<SwitchoverReport>(&body) {
            Ok(report) => print!("{}", switchover_text(&report)),
            Err(_) => println!("switchover failed (HTTP {status}): {}", error_of(&body)),
        }
    }
    if status == 200 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// A switchover's report for a person.
fn switchover_text(r: &SwitchoverReport) -> String {
    let mut out = format!(
        "shard {}: {} -> {}: {}\n",
        r.shard,
        r.from,
        r.to,
        r.outcome.as_str()
    );
    for st in &r.steps {
        match &st.error {
            None => out.push_str(&format!("  {:<10} {:>9.1} ms  ok\n", st.step, st.ms)),
            Some(e) => out.push_str(&format!("  {:<10} {:>9.1} ms  {e}\n", st.step, st.ms)),
        }
    }
    out.push_str(&format!("  total      {:>9.1} ms\n", r.total_ms));
    if let Some(lsn) = &r.fence_lsn {
        out.push_str(&format!("  fence LSN {lsn}, epoch {}\n", r.epoch));
    }
    if r.lameduck_cancelled > 0 {
        out.push_str(&format!(
            "  {} transaction(s) outlived HANDOFF_DRAIN_TIMEOUT and were cancelled\n",
            r.lameduck_cancelled
        ));
    }
    if let Some(line) = r.coordination.as_ref().and_then(acknowledgements) {
        out.push_str(&format!("  {line}\n"));
    }
    if let Some(e) = &r.error {
        out.push_str(&format!("  error: {e}\n"));
    }
    out
}

/// Who acknowledged a coordinated operation, and when.
fn acknowledgements(c: &api::report::Coordinated) -> Option<String> {
    if c.proxies.is_empty() {
        return None;
    }
    let acked: Vec<String> = c
        .proxies
        .iter()
        .map(|p| {
            if p.coordinator {
                format!("{} (coordinator)", p.proxy)
            } else {
                format!("{} {:.1} ms", p.proxy, p.ack_ms)
            }
        })
        .collect();
    let mut line = format!("acknowledged by {}", acked.join(", "));
    if let Some(missing) = c.missing.as_ref().filter(|m| !m.is_empty()) {
        line.push_str(&format!("; NOT by {}", missing.join(", ")));
    }
    Some(line)
}

/// `handoff hold --shard main`: holds the shard's new transactions and waits for those
/// running to finish, for an HA manager about to stop the primary (Patroni's
/// `postgresql.before_stop`). Always returns within `--timeout`. With `--primary` the
/// proxy holds only if that server is the shard's primary. Exit 0 once held (or already
/// held, or not the primary), 1 when the proxy refused, 2 when it could not be asked in
/// time.
fn hold(a: &HoldArgs) -> ExitCode {
    let client = match Client::new(&a.admin) {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    let mut body = serde_json::json!({ "reason": a.reason });
    if let Some(p) = &a.primary {
        body["primary"] = serde_json::Value::String(p.clone());
    }
    let path = format!("/v1/shards/{}/hold", a.shard);
    let (status, body) = match client.call(Method::POST, &path, Some(body.to_string()), a.timeout) {
        Ok(r) => r,
        Err(e @ CliError::Unreachable { .. }) => return fail(&e),
        Err(e) => {
            return fail(&format!(
                "{e} (a hold the proxy received goes on until it sees the next primary)"
            ))
        }
    };
    if a.admin.json {
        println!("{}", String::from_utf8_lossy(&body));
    } else if status == 200 {
        match api::decode::<ShardChange>(&body) {
            Ok(c) => println!("{}", hold_text(&a.shard, &c)),
            Err(e) => return fail(&format!("the answer does not decode: {e}")),
        }
    } else {
        eprintln!("handoff: hold refused (HTTP {status}): {}", error_of(&body));
    }
    if status == 200 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// `handoff recheck --shard main`: exit 0 once the proxy took it, 1 when it refused,
/// 2 when it could not be asked. Returns within 5 s.
fn recheck(a: &RecheckArgs) -> ExitCode {
    let client = match Client::new(&a.admin) {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    let body = serde_json::json!({ "event": a.event }).to_string();
    let path = format!("/v1/shards/{}/recheck", a.shard);
    match client.call(Method::POST, &path, Some(body), Duration::from_secs(5)) {
        Ok((200, body)) => {
            if a.admin.json {
                println!("{}", String::from_utf8_lossy(&body));
            }
            ExitCode::SUCCESS
        }
        Ok((status, body)) => {
            eprintln!(
                "handoff: recheck refused (HTTP {status}): {}",
                error_of(&body)
            );
            ExitCode::FAILURE
        }
        Err(e) => fail(&e),
    }
}

fn hold_text(shard: &str, c: &ShardChange) -> String {
    if c.not_primary {
        format!(
            "shard {shard}: not held: the server stopping is not its primary ({})",
            c.primary.as_deref().unwrap_or("?")
        )
    } else if c.held == Some(true) {
        format!(
            "shard {shard}: held at epoch {}, in-flight transactions done in {} ms",
            c.epoch.unwrap_or(0),
            c.lameduck_ms.unwrap_or(0)
        )
    } else {
        format!(
            "shard {shard}: already held ({})",
            c.state.as_deref().unwrap_or("?")
        )
    }
}

/// `handoff status`.
fn status(a: &Admin) -> ExitCode {
    let client = match Client::new(a) {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    let (status, body) = match client.call(Method::GET, "/v1/shards", None, Duration::from_secs(10))
    {
        Ok(r) => r,
        Err(e) => return fail(&e),
    };
    if status != 200 {
        return fail(&format!(
            "admin API answered HTTP {status}: {}",
            error_of(&body)
        ));
    }
    if a.json {
        println!("{}", String::from_utf8_lossy(&body));
        return ExitCode::SUCCESS;
    }
    match api::decode::<Shards>(&body) {
        Ok(v) => {
            print!("{}", status_text(&v));
            ExitCode::SUCCESS
        }
        Err(e) => fail(&format!("the answer does not decode: {e}")),
    }
}

fn status_text(v: &Shards) -> String {
    let mut out = format!(
        "{:<12} {:<12} {:>6} {:<22} {:<8} {:>9} {:>7}  reason\n",
        "SHARD", "STATE", "EPOCH", "PRIMARY", "SOURCE", "IN-FLIGHT", "HELD"
    );
    for s in &v.shards {
        out.push_str(&format!(
            "{:<12} {:<12} {:>6} {:<22} {:<8} {:>9} {:>7}  {}\n",
            s.name, s.state, s.epoch, s.primary, s.source, s.in_flight, s.buffer.depth, s.reason
        ));
    }
    for line in watched_lines(v)
        .into_iter()
        .chain(standby_lines(v))
        .chain(manager_lines(v))
        .chain(coordination_lines(v))
    {
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// The replaced primaries each shard watches, and any split brain.
fn watched_lines(v: &Shards) -> Vec<String> {
    let mut out = Vec::new();
    for s in &v.shards {
        for w in &s.watched {
            out.push(match &w.split_brain {
                Some(why) => format!(
                    "SPLIT BRAIN  shard {}: {} ({}, replaced at epoch {}): {why}; now {}",
                    s.name, w.host, w.why, w.replaced_at_epoch, w.state
                ),
                None => format!(
                    "watched      shard {}: {} ({}, replaced at epoch {}): {}{}",
                    s.name,
                    w.host,
                    w.why,
                    w.replaced_at_epoch,
                    w.state,
                    match w.detail.as_str() {
                        "" => String::new(),
                        d => format!(" ({d})"),
                    }
                ),
            });
        }
    }
    out
}

/// Each shard's hosts as readers, but its primary: in the read rotation or why not.
fn standby_lines(v: &Shards) -> Vec<String> {
    let mut out = Vec::new();
    for s in &v.shards {
        for st in s.standbys.iter().filter(|st| st.host != s.primary) {
            let lag = match (st.lag_bytes, st.lag_seconds) {
                (Some(b), Some(t)) => format!(", lag {b} bytes / {t:.1}s"),
                (Some(b), None) => format!(", lag {b} bytes"),
                _ => String::new(),
            };
            let from = st
                .upstream
                .as_deref()
                .map(|u| format!(", from {u}"))
                .unwrap_or_default();
            let detail = match st.detail.as_str() {
                "" => String::new(),
                d => format!(" ({d})"),
            };
            out.push(format!(
                "standby      shard {}: {} {}{lag}{from}, {} reading now{detail}",
                s.name, st.host, st.state, st.transactions
            ));
        }
    }
    out
}

/// One line per managed shard: the HA manager's leader and members as last read, and
/// whether handoff serves that leader.
fn manager_lines(v: &Shards) -> Vec<String> {
    let mut out = Vec::new();
    for s in &v.shards {
        let Some(m) = &s.manager else { continue };
        let members: Vec<String> = m
            .members
            .iter()
            .flatten()
            .map(|m| format!("{} {} {} {}", m.name, m.addr, m.role, m.state))
            .collect();
        if let Some(e) = &m.error {
            out.push(format!(
                "{} {}: NOT ANSWERING ({e}); handoff serves {} ({})",
                m.kind, s.name, s.primary, s.state
            ));
            continue;
        }
        if members.is_empty() {
            out.push(format!("{} {}: not answered yet", m.kind, s.name));
            continue;
        }
        let handoff = match m.agrees {
            Some(true) => format!("handoff serves it ({})", s.primary),
            _ => format!("handoff serves {} ({})", s.primary, s.state),
        };
        let stopping = m
            .stopping
            .as_ref()
            .map(|h| format!("; told {h} to stop taking writes"))
            .unwrap_or_default();
        let paused = m
            .paused
            .as_ref()
            .map(|p| format!("; {p}"))
            .unwrap_or_default();
        out.push(format!(
            "{} {}: leader {}; {}; {}{stopping}{paused}",
            m.kind,
            s.name,
            m.leader.as_deref().unwrap_or("(none)"),
            members.join(", "),
            handoff
        ));
    }
    out
}

/// Coordination: etcd's health, the members, each shard's record and operation.
fn coordination_lines(v: &Shards) -> Vec<String> {
    let c = &v.coordination;
    if !c.enabled {
        return vec!["coordination off (HANDOFF_ETCD_ENDPOINTS is not set)".into()];
    }
    let (proxy, prefix) = (
        c.proxy.as_deref().unwrap_or(""),
        c.prefix.as_deref().unwrap_or(""),
    );
    let members: Vec<String> = c
        .members
        .iter()
        .flatten()
        .map(|m| {
            let me = if m.this_proxy { ", this one" } else { "" };
            format!("{} (admin {}{me})", m.member.id, m.member.admin)
        })
        .collect();
    let mut out = vec![if c.up == Some(true) {
        format!(
            "coordination up: proxy {proxy} of {prefix} ({} members: {})",
            members.len(),
            members.join(", ")
        )
    } else {
        format!(
            "coordination DOWN: proxy {proxy} of {prefix}: {}; serving on the last known state, no operation can start",
            c.error.as_deref().unwrap_or("")
        )
    }];
    for s in &v.shards {
        let Some(sc) = &s.coordination else { continue };
        if let Some(r) = &sc.recorded {
            out.push(format!(
                "  shard {}: recorded primary {} at epoch {} (by {})",
                s.name, r.primary, r.epoch, r.by
            ));
        }
        if let Some(op) = &sc.operation {
            let acks: Vec<&str> = op.acks.iter().map(|a| a.proxy.as_str()).collect();
            out.push(format!(
                "  shard {}: operation {} ({}, coordinated by {}): {}; acknowledged by [{}]; this proxy: {}{}",
                s.name,
                op.op.id,
                op.op.kind.as_str(),
                op.op.coordinator,
                op.op.phase.as_str(),
                acks.join(", "),
                op.this_proxy,
                match &op.op.error {
                    Some(e) => format!("; {e}"),
                    None => String::new(),
                }
            ));
        }
    }
    out
}

/// `handoff healthcheck`: GET /healthz on the admin address (for container health
/// checks, so the image needs no HTTP client). Exit 0 when it answers 200.
fn healthcheck() -> ExitCode {
    let client = match Client::new(&Admin {
        admin: None,
        token: None,
        json: false,
    }) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("healthcheck: {e}");
            return ExitCode::FAILURE;
        }
    };
    match client.call(Method::GET, "/healthz", None, Duration::from_secs(3)) {
        Ok((200, _)) => ExitCode::SUCCESS,
        Ok((status, body)) => {
            eprintln!("healthcheck: HTTP {status}: {}", error_of(&body));
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("healthcheck: {e}");
            ExitCode::FAILURE
        }
    }
}

pub mod takeover;

#[cfg(test)]
mod tests;
