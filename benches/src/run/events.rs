//! Events injected into a run at given times (`--event 10s:'<shell command>'`): how a
//! switchover, a PAUSE/RESUME or a crash is provoked. Each event's start and end are
//! recorded so plots and reports can show them.

use std::time::Duration;

use anyhow::{bail, Context, Result};

/// A command to run `at` after the run starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub at: Duration,
    pub command: String,
}

/// What happened when an event ran (seconds since the run's start).
#[derive(Debug, Clone, PartialEq)]
pub struct EventRecord {
    pub command: String,
    pub started: f64,
    pub ended: f64,
    pub exit_code: Option<i32>,
    pub output: String,
}

impl EventRecord {
    /// `5.00s..7.68s (2671 ms, exit Some(0))`, for the tables.
    pub fn span(&self) -> String {
        format!(
            "{:.2}s..{:.2}s ({:.0} ms, exit {:?})",
            self.started,
            self.ended,
            (self.ended - self.started) * 1000.0,
            self.exit_code
        )
    }
}

/// Parses `<duration>:<command>`, the duration written `500ms`, `10s` or `1m`.
pub fn parse(spec: &str) -> Result<Event> {
    let (at, command) = spec.split_once(':').with_context(|| {
        format!("--event '{spec}': expected <time>:<command>, e.g. 10s:'pg_ctl promote'")
    })?;
    let at = parse_duration(at.trim()).with_context(|| format!("--event '{spec}'"))?;
    if command.trim().is_empty() {
        bail!("--event '{spec}': the command is empty");
    }
    Ok(Event {
        at,
        command: command.trim().to_string(),
    })
}

/// Parses `250ms`, `10s`, `2m`.
pub fn parse_duration(s: &str) -> Result<Duration> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .with_context(|| format!("'{s}' is not a duration like 500ms, 10s, 1m"))?;
    Ok(match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        _ => bail!("'{s}' needs a unit: ms, s or m"),
    })
}

/// Events in the order they fire (stable for equal times).
pub fn schedule(mut events: Vec<Event>) -> Vec<Event> {
    events.sort_by_key(|e| e.at);
    events
}

/// Runs the events at their times relative to `start`, each in `sh -c`, one after the
/// other (an event that is still running delays the next).
pub async fn run_all(events: Vec<Event>, start: tokio::time::Instant) -> Vec<EventRecord> {
    let mut records = Vec::new();
    for e in schedule(events) {
        tokio::time::sleep_until(start + e.at).await;
        let started = start.elapsed().as_secs_f64();
        if let Some(rest) = e.command.strip_prefix("POST ") {
            let (exit_code, output) = match post(rest).await {
                Ok((status, body)) => (Some(i32::from(!(200..300).contains(&status))), body),
                Err(err) => (None, format!("{err:#}")),
            };
            records.push(EventRecord {
                command: e.command.clone(),
                started,
                ended: start.elapsed().as_secs_f64(),
                exit_code,
                output: output.chars().take(4000).collect(),
            });
            continue;
        }
        let out = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(&e.command)
            .output()
            .await;
        let ended = start.elapsed().as_secs_f64();
        let (exit_code, output) = match out {
            Ok(o) => (
                o.status.code(),
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                ),
            ),
            Err(err) => (None, format!("could not run: {err}")),
        };
        records.push(EventRecord {
            command: e.command,
            started,
            ended,
            exit_code,
            output: output.chars().take(2000).collect(),
        });
    }
    records
}

/// An event written `POST http://host:port/path <JSON body>`: an HTTP request made by
/// the harness itself (e.g. handoff's admin API), so no HTTP client needs installing.
async fn post(spec: &str) -> Result<(u16, String)> {
    let (url, body) = spec.trim().split_once(' ').unwrap_or((spec.trim(), ""));
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("'{url}' is not an http:// URL"))?;
    let (addr, path) = rest.split_once('/').unwrap_or((rest, ""));
    let addr: std::net::SocketAddr = addr
        .parse()
        .with_context(|| format!("'{addr}' is not IP:port"))?;
    handoff_tests::raw::http_body(addr, "POST", &format!("/{path}"), None, body.trim()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_orders_events() {
        let e = parse("10s:pg_ctl promote -D x").unwrap();
        assert_eq!(e.at, Duration::from_secs(10));
        assert_eq!(e.command, "pg_ctl promote -D x");
        assert_eq!(parse("250ms: echo a:b").unwrap().command, "echo a:b");
        for bad in ["10s", "10:echo", "x:echo", "5s:  ", "5h:echo"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        let order: Vec<String> = schedule(vec![
            parse("2s:b").unwrap(),
            parse("500ms:a").unwrap(),
            parse("2s:c").unwrap(),
        ])
        .into_iter()
        .map(|e| e.command)
        .collect();
        assert_eq!(order, ["a", "b", "c"]);
    }

    #[tokio::test(start_paused = true)]
    async fn events_fire_at_their_times_and_are_recorded() {
        let start = tokio::time::Instant::now();
        let records = run_all(
            vec![
                parse("2s:echo second; exit 3").unwrap(),
                parse("1s:echo first").unwrap(),
            ],
            start,
        )
        .await;
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].command, "echo first");
        assert!(
            records[0].started >= 1.0 && records[0].started < 1.5,
            "{:?}",
            records[0]
        );
        assert_eq!(records[0].exit_code, Some(0));
        assert_eq!(records[0].output.trim(), "first");
        assert!(records[1].started >= 2.0, "{:?}", records[1]);
        assert_eq!(records[1].exit_code, Some(3));
    }
}
