//! `HANDOFF_SWITCHOVER_DEMOTE_COMMAND`: a shell command handoff runs after a completed
//! switchover to stop or rejoin the old primary (`pg_ctl stop`, `systemctl stop`,
//! `kubectl delete pod`, `pg_rewind` and a restart as a standby, …).
//!
//! It runs with `sh -c`, in its own process group, with the shard and both servers in
//! its environment. Every line it prints is logged; it is killed (the whole group) after
//! `HANDOFF_SWITCHOVER_DEMOTE_TIMEOUT`. Its outcome goes into the switchover's report; a
//! failing or hanging command never undoes the switchover — the old primary stays
//! fenced either way.

use std::process::Stdio;
use std::time::Duration;

use crate::sync::Locked;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;
use tokio::time::Instant;

/// The last bytes of output kept for the report.
const KEEP_OUTPUT: usize = 4096;

/// What the demote command did.
#[derive(Debug, Clone)]
pub(crate) struct Outcome {
    pub command: String,
    pub exit_code: Option<i32>,
    pub timed_out: bool,
    pub duration: Duration,
    /// The end of what it printed (stdout and stderr, interleaved by line).
    pub output: String,
    /// Why it could not run or did not succeed.
    pub error: Option<String>,
}

impl Outcome {
    pub fn ok(&self) -> bool {
        self.error.is_none()
    }

    /// The run as the switchover's report shows it.
    pub fn to_report(&self) -> crate::api::report::Demote {
        crate::api::report::Demote {
            command: self.command.clone(),
            ok: self.ok(),
            exit_code: self.exit_code,
            timed_out: self.timed_out,
            ms: (self.duration.as_secs_f64() * 1e6).round() / 1e3,
            output: self.output.clone(),
            error: self.error.clone(),
        }
    }
}

async fn lines(
    from: impl AsyncRead + Unpin,
    stream: &'static str,
    shard: String,
    keep: std::sync::Arc<std::sync::Mutex<String>>,
) {
    let mut r = BufReader::new(from).lines();
    while let Ok(Some(line)) = r.next_line().await {
        tracing::info!(shard = %shard, stream, "demote command: {line}");
        let mut k = keep.locked();
        k.push_str(&line);
        k.push('\n');
        if k.len() > 2 * KEEP_OUTPUT {
            let cut = k.len() - KEEP_OUTPUT;
            let cut = (cut..k.len()).find(|i| k.is_char_boundary(*i)).unwrap_or(0);
            k.drain(..cut);
        }
    }
}

/// Runs `command` with `env` added to handoff's own environment, for at most `timeout`.
pub(crate) async fn run(
    command: &str,
    env: &[(&str, String)],
    timeout: Duration,
    shard: &str,
) -> Outcome {
    let started = Instant::now();
    let mut outcome = Outcome {
        command: command.to_string(),
        exit_code: None,
        timed_out: false,
        duration: Duration::ZERO,
        output: String::new(),
        error: None,
    };
    tracing::info!(shard, command, "running the demote command");
    let spawned = Command::new("/bin/sh")
        .arg("-c")
        .arg(command)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            outcome.error = Some(format!("cannot start /bin/sh: {e}"));
            outcome.duration = started.elapsed();
            return outcome;
        }
    };
    let keep = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let mut readers = Vec::new();
    if let Some(out) = child.stdout.take() {
        readers.push(tokio::spawn(lines(
            out,
            "stdout",
            shard.to_string(),
            keep.clone(),
        )));
    }
    if let Some(err) = child.stderr.take() {
        readers.push(tokio::spawn(lines(
            err,
            "stderr",
            shard.to_string(),
            keep.clone(),
        )));
    }
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) => {
            outcome.exit_code = status.code();
            if !status.success() {
                outcome.error = Some(match status.code() {
                    Some(c) => format!("the demote command exited with status {c}"),
                    None => "the demote command was killed by a signal".to_string(),
                });
            }
        }
        Ok(Err(e)) => outcome.error = Some(format!("waiting for the demote command: {e}")),
        Err(_) => {
            outcome.timed_out = true;
            outcome.error = Some(format!(
                "the demote command did not finish within HANDOFF_SWITCHOVER_DEMOTE_TIMEOUT ({timeout:?}) and was killed"
            ));
            // The whole process group: the shell and whatever it started. (A system
            // call, not a `kill` program: a slim image may have none.)
            if let Some(pid) = child
                .id()
                .and_then(|p| rustix::process::Pid::from_raw(p as i32))
            {
                let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
            }
            let _ = child.kill().await;
        }
    }
    // Output readers end when every writer of the pipes is gone; a grandchild that
    // escaped the group may keep them open, so they are not waited for long.
    for r in readers {
        let _ = tokio::time::timeout(Duration::from_secs(1), r).await;
    }
    outcome.output = keep.locked().clone();
    if outcome.output.len() > KEEP_OUTPUT {
        let cut = outcome.output.len() - KEEP_OUTPUT;
        let cut = (cut..outcome.output.len())
            .find(|i| outcome.output.is_char_boundary(*i))
            .unwrap_or(0);
        outcome.output.drain(..cut);
    }
    outcome.duration = started.elapsed();
    match &outcome.error {
        None => tracing::info!(
            shard,
            ms = outcome.duration.as_millis() as u64,
            "the demote command succeeded"
        ),
        Some(e) => {
            tracing::warn!(shard, error = %e, "the demote command failed; the old primary stays fenced")
        }
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn success_failure_and_timeout_are_reported() {
        let ok = run(
            "echo \"from $HANDOFF_SHARD\"; echo oops >&2",
            &[("HANDOFF_SHARD", "main".into())],
            Duration::from_secs(10),
            "main",
        )
        .await;
        assert!(ok.ok(), "{ok:?}");
        assert_eq!(ok.exit_code, Some(0));
        assert!(ok.output.contains("from main"), "{ok:?}");
        assert!(ok.output.contains("oops"), "{ok:?}");

        let failed = run("exit 3", &[], Duration::from_secs(10), "main").await;
        assert_eq!(failed.exit_code, Some(3));
        assert!(failed.error.unwrap().contains("status 3"));

        // A hanging command and the child it started are both killed.
        let dir = std::env::temp_dir().join(format!("handoff-demote-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pidfile = dir.join("child.pid");
        let started = tokio::time::Instant::now();
        let hung = run(
            &format!("sleep 30 & echo $! > {}; sleep 30", pidfile.display()),
            &[],
            Duration::from_millis(300),
            "main",
        )
        .await;
        assert!(hung.timed_out, "{hung:?}");
        assert!(started.elapsed() < Duration::from_secs(10), "{hung:?}");
        assert!(hung
            .error
            .unwrap()
            .contains("HANDOFF_SWITCHOVER_DEMOTE_TIMEOUT"));
        let child: u32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let alive = || {
            std::fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit_once(')')
                        .map(|(_, r)| !r.trim_start().starts_with('Z'))
                })
                .unwrap_or(false)
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while alive() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!alive(), "the command's child survived the timeout");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
