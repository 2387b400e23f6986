//! What the tests and `handoff-bench` need from the machine, found or installed on first
//! use: PostgreSQL's server binaries, etcd, `promtool`, PgBouncer, and the Python venvs
//! of Patroni and of the drivers' suites.
//!
//! A missing program is installed with `apt-get` when the process is root or may use
//! `sudo` without a password, and the package registries answer; a venv is made with
//! `/usr/bin/python3 -m venv` and filled with `pip`. Otherwise the caller gets an error
//! naming the one command that installs it, so a test that cannot run fails and says
//! why; nothing is skipped. `HANDOFF_TEST_NO_INSTALL=1` turns installing off (the error
//! then names the command to run by hand).
//!
//! Installs are serialised across processes (cargo runs test binaries one after another,
//! nextest runs them side by side) with a lock file in the temp directory, and each
//! check is repeated under the lock, so a program is installed once.

use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};

use anyhow::{bail, Context, Result};

/// Says what is being installed on the terminal: `cargo test` captures what the test
/// prints with the print macros, not what is written to stderr itself, and an install
/// can take a minute.
fn announce(line: &str) {
    let _ = writeln!(std::io::stderr(), "handoff-tests: {line}");
}

/// The first directory of `PATH` (then of `extra`) holding an executable `name`.
pub fn which(name: &str, extra: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(extra.iter().map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

fn is_root() -> bool {
    // /proc/self is owned by the process's effective uid.
    std::os::unix::fs::MetadataExt::uid(&match std::fs::metadata("/proc/self") {
        Ok(m) => m,
        Err(_) => return false,
    }) == 0
}

/// How commands that need root are run: directly as root, through `sudo -n` when it
/// works without a password, or not at all.
fn privileged() -> Option<Vec<&'static str>> {
    static HOW: OnceLock<Option<Vec<&'static str>>> = OnceLock::new();
    HOW.get_or_init(|| {
        if is_root() {
            return Some(vec![]);
        }
        let sudo_works = Command::new("sudo")
            .args(["-n", "true"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        sudo_works.then(|| vec!["sudo", "-n"])
    })
    .clone()
}

fn installing_allowed() -> bool {
    std::env::var_os("HANDOFF_TEST_NO_INSTALL").is_none_or(|v| v.is_empty() || v == "0")
}

/// Holds the cross-process install lock (and this process's) while alive.
struct InstallLock {
    _file: File,
    _guard: std::sync::MutexGuard<'static, ()>,
}

fn install_lock() -> Result<InstallLock> {
    static IN_PROCESS: Mutex<()> = Mutex::new(());
    let guard = IN_PROCESS.lock().unwrap_or_else(|p| p.into_inner());
    let path = std::env::temp_dir().join("handoff-test-setup.lock");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    file.lock()
        .with_context(|| format!("locking {}", path.display()))?;
    Ok(InstallLock {
        _file: file,
        _guard: guard,
    })
}

/// The command a person would run to install `packages`.
fn apt_hint(packages: &[&str]) -> String {
    let sudo = if is_root() { "" } else { "sudo " };
    format!("{sudo}apt-get install -y {}", packages.join(" "))
}

fn run_privileged(how: &[&str], args: &[&str]) -> Result<()> {
    let mut cmd = match how.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).args(args);
            c
        }
        None => {
            let mut c = Command::new(args[0]);
            c.args(&args[1..]);
            c
        }
    };
    cmd.env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null());
    let status = cmd
        .status()
        .with_context(|| format!("running {}", args.join(" ")))?;
    if !status.success() {
        bail!("`{}` failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Installs Debian `packages` unless `present()` already holds; `what` names what is
/// missing in messages. Fails with the command to run when it cannot install.
pub fn ensure_packages(what: &str, packages: &[&str], present: impl Fn() -> bool) -> Result<()> {
    install_packages(what, packages, present, installing_allowed())
}

fn install_packages(
    what: &str,
    packages: &[&str],
    present: impl Fn() -> bool,
    allowed: bool,
) -> Result<()> {
    if present() {
        return Ok(());
    }
    let _lock = install_lock()?;
    if present() {
        return Ok(());
    }
    let hint = apt_hint(packages);
    if !allowed {
        bail!("missing: {what}; install it with `{hint}` (HANDOFF_TEST_NO_INSTALL is set, so the tests do not)");
    }
    let Some(how) = privileged() else {
        bail!("missing: {what}; install it with `{hint}` (the tests install it themselves when run as root or with password-less sudo)");
    };
    if which("apt-get", &[]).is_none() {
        bail!(
            "missing: {what}, and this machine has no apt-get: install {} with its package manager",
            packages.join(", ")
        );
    }
    announce(&format!(
        "missing: {what}; installing {} with apt-get",
        packages.join(" ")
    ));
    static UPDATED: OnceLock<()> = OnceLock::new();
    if UPDATED.get().is_none() {
        run_privileged(&how, &["apt-get", "update", "-q"]).with_context(|| {
            format!("missing: {what}; `apt-get update` failed (install it with `{hint}`)")
        })?;
        let _ = UPDATED.set(());
    }
    let mut args = vec!["apt-get", "install", "-y", "-q", "--no-install-recommends"];
    args.extend_from_slice(packages);
    run_privileged(&how, &args)
        .with_context(|| format!("missing: {what}; installing it failed (`{hint}`)"))?;
    stop_services(&how, packages);
    if !present() {
        bail!("installed {} but still missing: {what}", packages.join(" "));
    }
    announce(&format!("installed {}", packages.join(" ")));
    Ok(())
}

/// Debian starts the services of some packages on install where systemd runs: the
/// tests start their own servers on free ports, so those are stopped again.
fn stop_services(how: &[&str], packages: &[&str]) {
    if !Path::new("/run/systemd/system").is_dir() {
        return; // systemd does not run here: nothing was started
    }
    for (package, service) in [
        ("etcd-server", "etcd"),
        ("prometheus", "prometheus"),
        ("openssh-server", "ssh"),
    ] {
        if !packages.contains(&package) {
            continue;
        }
        let active = Command::new("systemctl")
            .args(["is-active", "--quiet", service])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if active {
            let _ = run_privileged(how, &["systemctl", "stop", service]);
        }
    }
}

/// PostgreSQL's server binaries (and the contrib extensions asyncpg's suite uses).
pub fn ensure_postgres(present: impl Fn() -> bool) -> Result<()> {
    ensure_packages(
        "PostgreSQL's server binaries (initdb, pg_ctl, pgbench)",
        &["postgresql", "postgresql-contrib"],
        present,
    )
}

/// The `etcd` binary: `HANDOFF_TEST_ETCD`, else on `PATH`, else installed.
pub fn etcd() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("HANDOFF_TEST_ETCD") {
        return Ok(PathBuf::from(p));
    }
    let find = || which("etcd", &["/usr/bin"]);
    ensure_packages("etcd", &["etcd-server"], || find().is_some())?;
    find().context("etcd")
}

/// `promtool` (Debian's `prometheus` package; only `promtool` is used).
pub fn promtool() -> Result<PathBuf> {
    let find = || which("promtool", &["/usr/bin"]);
    ensure_packages("promtool", &["prometheus"], || find().is_some())?;
    find().context("promtool")
}

/// `pg_autoctl` and the monitor's extension for PostgreSQL `major` (Debian's
/// `postgresql-<major>-auto-failover` and `pg-auto-failover-cli`).
pub fn pg_autoctl(major: &str) -> Result<PathBuf> {
    let find = || which("pg_autoctl", &["/usr/bin"]);
    let extension = format!("/usr/share/postgresql/{major}/extension/pgautofailover.control");
    let package = format!("postgresql-{major}-auto-failover");
    ensure_packages(
        "pg_auto_failover (pg_autoctl and its extension)",
        &[&package, "pg-auto-failover-cli"],
        || find().is_some() && Path::new(&extension).is_file(),
    )?;
    find().context("pg_autoctl")
}

/// repmgr for PostgreSQL `major` (its binaries in `bindir`) and an sshd (Debian's
/// `postgresql-<major>-repmgr` and `openssh-server`).
pub fn repmgr(major: &str, bindir: &Path) -> Result<()> {
    let package = format!("postgresql-{major}-repmgr");
    ensure_packages("repmgr and sshd", &[&package, "openssh-server"], || {
        bindir.join("repmgr").is_file() && Path::new("/usr/sbin/sshd").is_file()
    })
}

/// PgBouncer, installed when it can be; `Err` says how to install it.
pub fn pgbouncer() -> Result<PathBuf> {
    let find = || which("pgbouncer", &["/usr/sbin"]);
    ensure_packages("pgbouncer", &["pgbouncer"], || find().is_some())?;
    find().context("pgbouncer")
}

/// A Python venv made with the system's `/usr/bin/python3` (the `postgres` user must be
/// able to run what it holds, so never one under `/root` or another interpreter), with
/// `packages` installed by pip, unless `ready` (run with the venv's python) says it is
/// there already. Returns the venv's directory.
pub fn python_venv(dir: &Path, packages: &[&str], ready: &str) -> Result<PathBuf> {
    let python = dir.join("bin/python");
    let is_ready = || {
        is_executable(&python)
            && Command::new(&python)
                .args(["-c", ready])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
    };
    if is_ready() {
        return Ok(dir.to_path_buf());
    }
    ensure_venv_module()?;
    let _lock = install_lock()?;
    if is_ready() {
        return Ok(dir.to_path_buf());
    }
    let hint = format!(
        "/usr/bin/python3 -m venv {d} && {d}/bin/pip install {}",
        packages
            .iter()
            .map(|p| format!("'{p}'"))
            .collect::<Vec<_>>()
            .join(" "),
        d = dir.display()
    );
    if !installing_allowed() {
        bail!(
            "the venv {} is missing: make it with `{hint}` (HANDOFF_TEST_NO_INSTALL is set)",
            dir.display()
        );
    }
    announce(&format!(
        "making the venv {} ({})",
        dir.display(),
        packages.join(" ")
    ));
    let made = Command::new("/usr/bin/python3")
        .args(["-m", "venv"])
        .arg(dir)
        .stdin(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !made {
        bail!("could not make the venv {}: run `{hint}`", dir.display());
    }
    let installed = Command::new(dir.join("bin/pip"))
        .args(["install", "-q", "--disable-pip-version-check"])
        .args(packages)
        .stdin(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !installed || !is_ready() {
        bail!(
            "installing {} into {} failed: run `{hint}`",
            packages.join(" "),
            dir.display()
        );
    }
    announce(&format!("made the venv {}", dir.display()));
    Ok(dir.to_path_buf())
}

/// Python's venv module for `/usr/bin/python3` (Debian's `python3-venv`): Debian's
/// python3 makes venvs only with it.
pub fn ensure_venv_module() -> Result<()> {
    ensure_packages(
        "Python's venv module (for the venvs of the tests)",
        &["python3-venv"],
        || {
            Command::new("/usr/bin/python3")
                .args(["-c", "import venv, ensurepip"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        },
    )
}

/// Where the tests keep a venv: under `/opt` as root (readable by the `postgres` user
/// that runs the servers), else under the user's cache directory.
pub fn venv_dir(name: &str) -> PathBuf {
    if is_root() {
        return PathBuf::from(format!("/opt/handoff-{name}"));
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    cache.join("handoff").join(name)
}

/// The `patroni` program: `HANDOFF_TEST_PATRONI`, else a venv made for the tests
/// (`/opt/handoff-patroni` as root).
pub fn patroni() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("HANDOFF_TEST_PATRONI") {
        return Ok(PathBuf::from(p));
    }
    let dir = python_venv(
        &venv_dir("patroni"),
        &["patroni[etcd3]", "psycopg2-binary"],
        "import patroni, etcd, psycopg2",
    )?;
    Ok(dir.join("bin/patroni"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn which_finds_executables_only() {
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("plain");
        std::fs::write(&plain, "").unwrap();
        let d = dir.path().to_str().unwrap();
        assert_eq!(which("plain", &[d]), None);
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(which("plain", &[d]), Some(plain));
    }

    #[test]
    fn a_present_program_installs_nothing() {
        // Holds without touching apt: `present` answers first.
        ensure_packages("sh", &["no-such-package-xyz"], || true).unwrap();
    }

    #[test]
    fn refusal_names_the_command_when_installing_is_off() {
        let err = install_packages("a test program", &["no-such-package-xyz"], || false, false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("apt-get install -y no-such-package-xyz"),
            "{err}"
        );
        assert!(err.contains("missing: a test program;"), "{err}");
    }
}
