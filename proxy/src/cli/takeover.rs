//! `handoff takeover`: starts a new handoff that takes the running one over, in the
//! background, and returns once it serves (what a service manager's reload runs); and
//! telling systemd which process is the service's (`sd_notify`).

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use tokio::time::Instant;

use handoff::Config;

/// The inode at `path`, if there is a file.
fn inode(path: &Path) -> Option<u64> {
    std::fs::metadata(path).map(|m| m.ino()).ok()
}

/// Starts `handoff --takeover` (this binary, this environment) and waits until it has
/// taken the takeover socket over — it serves, and the old process is handing its
/// clients to it — or has failed. The new process keeps running after this returns.
pub fn run() -> ExitCode {
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("handoff: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    let Some(path) = config.takeover_socket.clone() else {
        eprintln!("handoff: HANDOFF_TAKEOVER_SOCKET is off: nothing to take over");
        return ExitCode::from(2);
    };
    let Some(before) = inode(&path) else {
        eprintln!(
            "handoff: no running handoff at {} (HANDOFF_TAKEOVER_SOCKET)",
            path.display()
        );
        return ExitCode::FAILURE;
    };
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("handoff: cannot find this program to start it again: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut child = match std::process::Command::new(exe)
        .arg("--takeover")
        .stdin(std::process::Stdio::null())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("handoff: cannot start the new process: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The old process waits up to HANDOFF_SHUTDOWN_TIMEOUT for its shards to serve; the
    // new one may take a while to start (discovery, etcd).
    let deadline = Instant::now() + config.shutdown_timeout + Duration::from_secs(150);
    while Instant::now() < deadline {
        match child.try_wait() {
            Ok(Some(status)) => {
                eprintln!("handoff: the new process stopped ({status}); the running one serves on");
                return ExitCode::FAILURE;
            }
            Ok(None) => {}
            Err(e) => {
                eprintln!("handoff: cannot watch the new process: {e}");
                return ExitCode::FAILURE;
            }
        }
        if inode(&path).is_some_and(|now| now != before) {
            println!("handoff: process {} has taken over", child.id());
            return ExitCode::SUCCESS;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    eprintln!("handoff: the new process did not take over in time: stopped it");
    ExitCode::FAILURE
}

/// Tells the service manager (`$NOTIFY_SOCKET`, set by systemd for `Type=notify`) that
/// this process serves and is the service's main process: after a takeover the new
/// process is, and systemd must follow it rather than the old one that exits.
pub fn notify_ready() {
    if let Some(socket) = std::env::var_os("NOTIFY_SOCKET") {
        let state = format!("READY=1\nMAINPID={}\n", std::process::id());
        if let Err(e) = notify(&socket, &state) {
            tracing::warn!(error = %e, "could not notify the service manager");
        }
    }
}

/// Sends `state` to the datagram socket `socket` (`@name`: Linux's abstract namespace).
fn notify(socket: &std::ffi::OsStr, state: &str) -> std::io::Result<()> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let bytes = socket.as_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name)?,
        None => SocketAddr::from_pathname(Path::new(socket))?,
    };
    let s = UnixDatagram::unbound()?;
    s.send_to_addr(state.as_bytes(), &addr)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_notification_reaches_a_path_and_an_abstract_socket() {
        let path = std::env::temp_dir().join(format!("handoff-notify-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let by_path = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        notify(path.as_os_str(), "READY=1\n").unwrap();
        let mut buf = [0u8; 64];
        let n = by_path.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\n");
        let _ = std::fs::remove_file(&path);

        use std::os::linux::net::SocketAddrExt;
        let name = format!("handoff-notify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let abstract_ = std::os::unix::net::UnixDatagram::bind_addr(&addr).unwrap();
        notify(std::ffi::OsStr::new(&format!("@{name}")), "MAINPID=1\n").unwrap();
        let n = abstract_.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"MAINPID=1\n");
        assert!(notify(std::ffi::OsStr::new("/nonexistent/socket"), "x").is_err());
    }
}
