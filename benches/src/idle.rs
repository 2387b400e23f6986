//! `handoff-bench idle`: resident memory of the handoff process holding many idle
//! client connections (each logged in, then silent).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use handoff_tests::raw::RawClient;
use handoff_tests::Cluster;

/// Resident set size of a process, in KiB.
fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")
}

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The release `handoff` binary next to this one.
fn handoff_binary() -> Result<std::path::PathBuf> {
    let me = std::env::current_exe()?;
    let bin = me.with_file_name("handoff");
    if !bin.is_file() {
        bail!(
            "{} not found: build it first (cargo build --release -p handoff)",
            bin.display()
        );
    }
    Ok(bin)
}

pub async fn run(clients: usize, mode: &str) -> Result<()> {
    let limit = rlimit::increase_nofile_limit(u64::MAX).context("raising the open-file limit")?;
    if (limit as usize) < clients + 100 {
        bail!("the open-file limit is {limit}; {clients} clients need more (raise the hard limit)");
    }
    let cluster = tokio::task::block_in_place(|| Cluster::start(0))?;
    let port = handoff_tests::pg::free_port()?;
    let admin = handoff_tests::pg::free_port()?;
    let child = Command::new(handoff_binary()?)
        .env("HANDOFF_SHARDS", format!("main={}", cluster.primary.addr()))
        .env("HANDOFF_LISTEN", format!("127.0.0.1:{port}"))
        .env("HANDOFF_ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
        .env("HANDOFF_MAX_CLIENT_CONN", (clients + 10).to_string())
        .env("HANDOFF_POOL_MODE", mode)
        // The default log level: per-client spans exist, as in production.
        .env("HANDOFF_LOG", "info")
        .stdout(Stdio::null())
        .spawn()
        .context("starting handoff")?;
    let child = Kill(child);
    let pid = child.0.id();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        if Instant::now() > deadline {
            bail!("handoff did not start listening");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // One client first, so the pool and its server connection exist in the baseline.
    let first = RawClient::login_trust(addr, "postgres", "postgres").await?;
    let base = rss_kib(pid)?;
    println!(
        "handoff ({mode} mode) baseline RSS with 1 client: {:.1} MiB",
        base as f64 / 1024.0
    );
    let started = Instant::now();
    let mut held = vec![first];
    while held.len() < clients {
        let batch = (clients - held.len()).min(200);
        let mut tasks = Vec::with_capacity(batch);
        for _ in 0..batch {
            tasks.push(tokio::spawn(RawClient::login_trust(
                addr, "postgres", "postgres",
            )));
        }
        for t in tasks {
            held.push(t.await??);
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_kib(pid)?;
    let grown = after.saturating_sub(base);
    println!(
        "{} idle clients logged in in {:.1} s; RSS {:.1} MiB ({:.1} MiB over baseline, {:.0} bytes per client)",
        held.len(),
        started.elapsed().as_secs_f64(),
        after as f64 / 1024.0,
        grown as f64 / 1024.0,
        grown as f64 * 1024.0 / held.len() as f64
    );
    drop(held);
    drop(child);
    Ok(())
}
