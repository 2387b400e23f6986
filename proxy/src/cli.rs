//! `handoff switchover`, `handoff hold` and `handoff status`: small clients of the
//! admin API.
//!
//! Both read the admin address from `--admin` or `HANDOFF_ADMIN_LISTEN` and the token
//! from `--token` or `HANDOFF_ADMIN_TOKEN`, as the proxy itself does.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::Duration;

use serde_json::Value;

struct Common {
    admin: SocketAddr,
    token: Option<String>,
    json: bool,
}

const USAGE_SWITCHOVER: &str = "usage: handoff switchover --shard NAME --to HOST:PORT|MEMBER \
     [--admin ADDR] [--token TOKEN] [--json]";
const USAGE_HOLD: &str = "usage: handoff hold --shard NAME [--primary HOST:PORT] \
     [--timeout DURATION] [--reason TEXT] [--admin ADDR] [--token TOKEN] [--json]";
const USAGE_STATUS: &str = "usage: handoff status [--admin ADDR] [--token TOKEN] [--json]";

/// Splits `--name value` pairs; `--json` is a flag.
fn parse(
    args: Vec<String>,
    known: &[&str],
    usage: &str,
) -> Result<(Common, Vec<(String, String)>), CliError> {
    let mut admin =
        std::env::var("HANDOFF_ADMIN_LISTEN").unwrap_or_else(|_| "127.0.0.1:6480".into());
    let mut token = std::env::var("HANDOFF_ADMIN_TOKEN")
        .ok()
        .filter(|t| !t.is_empty());
    let mut json = false;
    let mut rest = Vec::new();
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        if a == "--json" {
            json = true;
            continue;
        }
        if a == "--help" || a == "-h" {
            return Err(CliError::Help(usage.to_string()));
        }
        let Some(name) = a.strip_prefix("--") else {
            return Err(CliError::Usage(format!(
                "unexpected argument '{a}'\n{usage}"
            )));
        };
        let (name, value) = match name.split_once('=') {
            Some((n, v)) => (n.to_string(), v.to_string()),
            None => {
                let v = it
                    .next()
                    .ok_or_else(|| CliError::Usage(format!("--{name} needs a value\n{usage}")))?;
                (name.to_string(), v)
            }
        };
        match name.as_str() {
            "admin" => admin = value,
            "token" => token = Some(value),
            n if known.contains(&n) => rest.push((name, value)),
            _ => return Err(CliError::Usage(format!("unknown option --{name}\n{usage}"))),
        }
    }
    let mut admin: SocketAddr = admin
        .parse()
        .map_err(|_| CliError::Usage(format!("admin address '{admin}' is not IP:port")))?;
    if admin.ip().is_unspecified() {
        admin.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    Ok((Common { admin, token, json }, rest))
}

/// Why the admin API could not be asked.
#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error("cannot reach the admin API at {addr}: {source}")]
    Unreachable {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("no answer from the admin API: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed {0} from the admin API")]
    Malformed(&'static str),
    /// The command line itself is wrong (with the usage).
    #[error("{0}")]
    Usage(String),
    /// `--help`: the usage, printed on standard output with exit status 0.
    #[error("{0}")]
    Help(String),
}

impl CliError {
    /// What the command line's problem ends in: the usage and success for `--help`,
    /// else the error and exit status 2.
    fn exit(self) -> ExitCode {
        match self {
            CliError::Help(usage) => {
                println!("{usage}");
                ExitCode::SUCCESS
            }
            other => fail(&other),
        }
    }
}

/// One HTTP/1.1 request with `Connection: close`; returns the status and the JSON body.
fn request(
    c: &Common,
    method: &str,
    path: &str,
    body: Option<&Value>,
    timeout: Duration,
) -> Result<(u16, Value), CliError> {
    let mut s = TcpStream::connect_timeout(&c.admin, Duration::from_secs(5)).map_err(|source| {
        CliError::Unreachable {
            addr: c.admin,
            source,
        }
    })?;
    s.set_read_timeout(Some(timeout))?;
    let payload = body.map(|b| b.to_string()).unwrap_or_default();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {}\r\n",
        c.admin,
        payload.len()
    );
    if body.is_some() {
        req.push_str("Content-Type: application/json\r\n");
    }
    if let Some(t) = &c.token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(&payload);
    s.write_all(req.as_bytes())?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let text = String::from_utf8_lossy(&resp);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or(CliError::Malformed("HTTP response"))?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or(CliError::Malformed("HTTP status line"))?;
    let json = serde_json::from_str(body.trim()).unwrap_or(Value::String(body.to_string()));
    Ok((status, json))
}

/// [`request`] with the whole exchange, connecting included, bounded by `timeout`.
fn request_within(
    c: &Common,
    method: &str,
    path: &str,
    body: Option<&Value>,
    timeout: Duration,
) -> Result<(u16, Value), CliError> {
    let (tx, rx) = std::sync::mpsc::channel();
    let (c2, method, path, body) = (
        Common {
            admin: c.admin,
            token: c.token.clone(),
            json: c.json,
        },
        method.to_string(),
        path.to_string(),
        body.cloned(),
    );
    std::thread::spawn(move || {
        let _ = tx.send(request(&c2, &method, &path, body.as_ref(), timeout));
    });
    rx.recv_timeout(timeout).unwrap_or_else(|_| {
        Err(CliError::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer within {timeout:?}"),
        )))
    })
}

fn fail(msg: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("handoff: {msg}");
    ExitCode::from(2)
}

/// `handoff switchover --shard main --to host:port`.
pub fn switchover(args: Vec<String>) -> ExitCode {
    let (common, opts) = match parse(args, &["shard", "to"], USAGE_SWITCHOVER) {
        Ok(p) => p,
        Err(e) => return e.exit(),
    };
    let get = |n: &str| opts.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    let (Some(shard), Some(to)) = (get("shard"), get("to")) else {
        return fail(&USAGE_SWITCHOVER);
    };
    let body = serde_json::json!({ "to": to });
    let path = format!("/v1/shards/{shard}/switchover");
    match request(
        &common,
        "POST",
        &path,
        Some(&body),
        Duration::from_secs(130),
    ) {
        Err(e) => fail(&e),
        Ok((status, v)) => {
            if common.json {
                println!("{v}");
            } else {
                print_switchover(status, &v);
            }
            if status == 200 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// `handoff hold --shard main`: holds the shard's new transactions and waits for those
/// running to finish, for an HA manager about to stop the primary (Patroni's
/// `postgresql.before_stop`). Always returns within `--timeout` (default 10s): a hook
/// that hangs would stall the manager. With `--primary` (the server about to stop) the
/// proxy holds only if that server is the shard's primary: the hook also runs when a
/// replica stops. Exit 0 once held (or already held, or not the primary), 1 when the
/// proxy refused, 2 when it could not be asked in time.
pub fn hold(args: Vec<String>) -> ExitCode {
    let (common, opts) = match parse(args, &["shard", "timeout", "reason", "primary"], USAGE_HOLD) {
        Ok(p) => p,
        Err(e) => return e.exit(),
    };
    let get = |n: &str| opts.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    let Some(shard) = get("shard") else {
        return fail(&USAGE_HOLD);
    };
    let timeout = match get("timeout").map(|t| handoff::config::parse_duration(&t)) {
        None => Duration::from_secs(10),
        Some(Ok(t)) if !t.is_zero() => t,
        Some(_) => {
            return fail(&format!(
                "--timeout must be a duration like 10s\n{USAGE_HOLD}"
            ))
        }
    };
    let reason = get("reason").unwrap_or_else(|| "handoff hold (before the primary stops)".into());
    let mut body = serde_json::json!({ "reason": reason });
    if let Some(p) = get("primary") {
        body["primary"] = Value::String(p);
    }
    let path = format!("/v1/shards/{shard}/hold");
    match request_within(&common, "POST", &path, Some(&body), timeout) {
        Err(e @ CliError::Unreachable { .. }) => fail(&e),
        Err(e) => fail(&format!(
            "{e} (a hold the proxy received goes on until it sees the next primary)"
        )),
        Ok((status, v)) => {
            if common.json {
                println!("{v}");
            } else if status == 200 {
                let held = v.get("held").and_then(Value::as_bool).unwrap_or(false);
                let ms = v.get("lameduck_ms").and_then(Value::as_u64).unwrap_or(0);
                if v.get("not_primary").and_then(Value::as_bool) == Some(true) {
                    println!(
                        "shard {shard}: not held: the server stopping is not its primary ({})",
                        v.get("primary").and_then(Value::as_str).unwrap_or("?")
                    );
                } else if held {
                    println!(
                        "shard {shard}: held at epoch {}, in-flight transactions done in {ms} ms",
                        v.get("epoch").and_then(Value::as_u64).unwrap_or(0)
                    );
                } else {
                    println!(
                        "shard {shard}: already held ({})",
                        v.get("state").and_then(Value::as_str).unwrap_or("?")
                    );
                }
            } else {
                eprintln!(
                    "handoff: hold refused (HTTP {status}): {}",
                    v.get("error").and_then(Value::as_str).unwrap_or("")
                );
            }
            if status == 200 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn print_switchover(status: u16, v: &Value) {
    if v.get("outcome").is_none() {
        println!(
            "switchover failed (HTTP {status}): {}",
            v.get("error")
                .and_then(Value::as_str)
                .unwrap_or("unknown error")
        );
        return;
    }
    let s = |k: &str| {
        v.get(k)
            .map(|x| {
                x.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| x.to_string())
            })
            .unwrap_or_default()
    };
    println!(
        "shard {}: {} -> {}: {}",
        s("shard"),
        s("from"),
        s("to"),
        s("outcome")
    );
    if let Some(steps) = v.get("steps").and_then(Value::as_array) {
        for st in steps {
            let name = st.get("step").and_then(Value::as_str).unwrap_or("?");
            let ms = st.get("ms").and_then(Value::as_f64).unwrap_or(0.0);
            let err = st.get("error").and_then(Value::as_str);
            match err {
                None => println!("  {name:<10} {ms:>9.1} ms  ok"),
                Some(e) => println!("  {name:<10} {ms:>9.1} ms  {e}"),
            }
        }
    }
    println!(
        "  total      {:>9.1} ms",
        v.get("total_ms").and_then(Value::as_f64).unwrap_or(0.0)
    );
    if let Some(lsn) = v.get("fence_lsn").and_then(Value::as_str) {
        println!("  fence LSN {lsn}, epoch {}", s("epoch"));
    }
    let cancelled = v
        .get("lameduck_cancelled")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    if cancelled > 0 {
        println!("  {cancelled} transaction(s) outlived HANDOFF_DRAIN_TIMEOUT and were cancelled");
    }
    if let Some(line) = v.get("coordination").and_then(acknowledgements) {
        println!("  {line}");
    }
    if let Some(e) = v.get("error").and_then(Value::as_str) {
        println!("  error: {e}");
    }
}

/// Who acknowledged a coordinated operation, and when (from its `coordination`).
fn acknowledgements(c: &Value) -> Option<String> {
    let proxies = c.get("proxies")?.as_array()?;
    let acked: Vec<String> = proxies
        .iter()
        .map(|p| {
            let id = p.get("proxy").and_then(Value::as_str).unwrap_or("?");
            if p.get("coordinator").and_then(Value::as_bool) == Some(true) {
                format!("{id} (coordinator)")
            } else {
                format!(
                    "{id} {:.1} ms",
                    p.get("ack_ms").and_then(Value::as_f64).unwrap_or(0.0)
                )
            }
        })
        .collect();
    let missing: Vec<&str> = c
        .get("missing")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let mut line = format!("acknowledged by {}", acked.join(", "));
    if !missing.is_empty() {
        line.push_str(&format!("; NOT by {}", missing.join(", ")));
    }
    Some(line)
}

/// Coordination: etcd's health, the members, each shard's record and operation.
/// One line per Patroni shard: Patroni's leader and members as last read.
fn patroni_lines(v: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for s in v
        .get("shards")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let Some(p) = s.get("patroni").filter(|p| !p.is_null()) else {
            continue;
        };
        let name = s.get("name").and_then(Value::as_str).unwrap_or("?");
        let members: Vec<String> = p
            .get("members")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(|m| {
                let t = |k: &str| m.get(k).and_then(Value::as_str).unwrap_or("?").to_string();
                format!("{} {} {} {}", t("name"), t("addr"), t("role"), t("state"))
            })
            .collect();
        let line = if members.is_empty() {
            format!("patroni {name}: not answered yet")
        } else {
            format!(
                "patroni {name}: leader {}; {}",
                p.get("leader").and_then(Value::as_str).unwrap_or("(none)"),
                members.join(", ")
            )
        };
        out.push(line);
    }
    out
}

fn coordination_lines(v: &Value) -> Vec<String> {
    let Some(c) = v.get("coordination") else {
        return Vec::new();
    };
    if c.get("enabled").and_then(Value::as_bool) != Some(true) {
        return vec!["coordination off (HANDOFF_ETCD_ENDPOINTS is not set)".into()];
    }
    let t = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let members: Vec<String> = c
        .get("members")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|m| {
            let me = if m.get("self").and_then(Value::as_bool) == Some(true) {
                ", this one"
            } else {
                ""
            };
            format!("{} (admin {}{me})", t(m, "id"), t(m, "admin"))
        })
        .collect();
    let mut out = vec![match c.get("up").and_then(Value::as_bool) {
        Some(true) => format!(
            "coordination up: proxy {} of {} ({} members: {})",
            t(c, "proxy"),
            t(c, "prefix"),
            members.len(),
            members.join(", ")
        ),
        _ => format!(
            "coordination DOWN: proxy {} of {}: {}; serving on the last known state, no operation can start",
            t(c, "proxy"),
            t(c, "prefix"),
            t(c, "error")
        ),
    }];
    for s in v
        .get("shards")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let name = t(s, "name");
        let Some(sc) = s.get("coordination").filter(|x| !x.is_null()) else {
            continue;
        };
        if let Some(r) = sc.get("recorded").filter(|x| !x.is_null()) {
            out.push(format!(
                "  shard {name}: recorded primary {} at epoch {} (by {})",
                t(r, "primary"),
                r.get("epoch").and_then(Value::as_u64).unwrap_or(0),
                t(r, "by")
            ));
        }
        if let Some(op) = sc.get("operation").filter(|x| !x.is_null()) {
            let acks: Vec<String> = op
                .get("acks")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .map(|a| t(a, "proxy"))
                .collect();
            out.push(format!(
                "  shard {name}: operation {} ({}, coordinated by {}): {}; acknowledged by [{}]; this proxy: {}{}",
                t(op, "id"),
                t(op, "kind"),
                t(op, "coordinator"),
                t(op, "phase"),
                acks.join(", "),
                t(op, "this_proxy"),
                match op.get("error").and_then(Value::as_str) {
                    Some(e) => format!("; {e}"),
                    None => String::new(),
                }
            ));
        }
    }
    out
}

/// The replaced primaries each shard watches, and any split brain.
fn print_watched(v: &Value) {
    for s in v
        .get("shards")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let shard = s.get("name").and_then(Value::as_str).unwrap_or("");
        for w in s
            .get("watched")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let t = |k: &str| w.get(k).and_then(Value::as_str).unwrap_or("").to_string();
            match w.get("split_brain").and_then(Value::as_str) {
                Some(why) => println!(
                    "SPLIT BRAIN  shard {shard}: {} ({}, replaced at epoch {}): {why}; now {}",
                    t("host"),
                    t("why"),
                    w.get("replaced_at_epoch")
                        .and_then(Value::as_u64)
                        .unwrap_or(0),
                    t("state")
                ),
                None => println!(
                    "watched      shard {shard}: {} ({}, replaced at epoch {}): {}{}",
                    t("host"),
                    t("why"),
                    w.get("replaced_at_epoch")
                        .and_then(Value::as_u64)
                        .unwrap_or(0),
                    t("state"),
                    match t("detail") {
                        d if d.is_empty() => String::new(),
                        d => format!(" ({d})"),
                    }
                ),
            }
        }
    }
}

/// `handoff status`.
pub fn status(args: Vec<String>) -> ExitCode {
    let (common, _) = match parse(args, &[], USAGE_STATUS) {
        Ok(p) => p,
        Err(e) => return e.exit(),
    };
    match request(&common, "GET", "/v1/shards", None, Duration::from_secs(10)) {
        Err(e) => fail(&e),
        Ok((200, v)) => {
            if common.json {
                println!("{v}");
                return ExitCode::SUCCESS;
            }
            println!(
                "{:<12} {:<12} {:>6} {:<22} {:<8} {:>9} {:>7}  reason",
                "SHARD", "STATE", "EPOCH", "PRIMARY", "SOURCE", "IN-FLIGHT", "HELD"
            );
            for s in v
                .get("shards")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let t = |k: &str| s.get(k).and_then(Value::as_str).unwrap_or("").to_string();
                let n = |k: &str| s.get(k).and_then(Value::as_u64).unwrap_or(0);
                let held = s
                    .pointer("/buffer/depth")
                    .and_then(Value::as_u64)
                    .unwrap_or(0);
                println!(
                    "{:<12} {:<12} {:>6} {:<22} {:<8} {:>9} {:>7}  {}",
                    t("name"),
                    t("state"),
                    n("epoch"),
                    t("primary"),
                    t("source"),
                    n("in_flight"),
                    held,
                    t("reason")
                );
            }
            print_watched(&v);
            for line in patroni_lines(&v) {
                println!("{line}");
            }
            for line in coordination_lines(&v) {
                println!("{line}");
            }
            ExitCode::SUCCESS
        }
        Ok((status, v)) => fail(&format!(
            "admin API answered HTTP {status}: {}",
            v.get("error").and_then(Value::as_str).unwrap_or("")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coordination_is_shown_up_or_down_with_members_and_the_operation() {
        let v: Value = serde_json::from_str(
            r#"{"shards":[{"name":"main","coordination":{
                "recorded":{"primary":"10.0.0.2:5432","epoch":4,"by":"b"},
                "operation":{"id":"a-1","kind":"switchover","coordinator":"a","phase":"hold",
                  "acks":[{"proxy":"b"}],"this_proxy":"taking part","error":null}}}],
              "coordination":{"enabled":true,"up":true,"proxy":"b","prefix":"/handoff",
                "members":[{"id":"a","admin":"10.0.0.5:6480","self":false},
                           {"id":"b","admin":"10.0.0.6:6480","self":true}]}}"#,
        )
        .unwrap();
        let lines = coordination_lines(&v);
        assert!(lines[0].starts_with("coordination up: proxy b of /handoff (2 members: a (admin 10.0.0.5:6480), b (admin 10.0.0.6:6480, this one))"), "{lines:?}");
        assert!(
            lines[1].contains("recorded primary 10.0.0.2:5432 at epoch 4 (by b)"),
            "{lines:?}"
        );
        assert!(lines[2].contains("operation a-1 (switchover, coordinated by a): hold; acknowledged by [b]; this proxy: taking part"), "{lines:?}");

        let down: Value = serde_json::from_str(
            r#"{"shards":[],"coordination":{"enabled":true,"up":false,"proxy":"b","prefix":"/h","error":"etcd: no answer"}}"#,
        )
        .unwrap();
        assert!(coordination_lines(&down)[0]
            .starts_with("coordination DOWN: proxy b of /h: etcd: no answer"));
        let off: Value =
            serde_json::from_str(r#"{"shards":[],"coordination":{"enabled":false}}"#).unwrap();
        assert_eq!(
            coordination_lines(&off),
            ["coordination off (HANDOFF_ETCD_ENDPOINTS is not set)"]
        );
    }

    #[test]
    fn acknowledgements_name_the_coordinator_and_whoever_is_missing() {
        let c: Value = serde_json::from_str(
            r#"{"proxies":[{"proxy":"a","coordinator":true,"ack_ms":0.0},{"proxy":"b","ack_ms":41.5}],"missing":["c"]}"#,
        )
        .unwrap();
        assert_eq!(
            acknowledgements(&c).unwrap(),
            "acknowledged by a (coordinator), b 41.5 ms; NOT by c"
        );
    }

    #[test]
    fn patroni_shards_show_the_leader_and_members_and_others_nothing() {
        let v: Value = serde_json::from_str(
            r#"{"shards":[
              {"name":"main","patroni":{"leader":"pg1","members":[
                {"name":"pg0","addr":"10.0.0.1:5432","role":"replica","state":"streaming"},
                {"name":"pg1","addr":"10.0.0.2:5432","role":"leader","state":"running"}]}},
              {"name":"other","patroni":null},
              {"name":"new","patroni":{"leader":null,"members":null}}]}"#,
        )
        .unwrap();
        assert_eq!(
            patroni_lines(&v),
            [
                "patroni main: leader pg1; pg0 10.0.0.1:5432 replica streaming, pg1 10.0.0.2:5432 leader running",
                "patroni new: not answered yet",
            ]
        );
    }
}
