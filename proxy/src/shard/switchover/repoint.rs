//! In a switchover handoff runs itself, the shard's other standbys are pointed at the
//! target before anything is held, as Vitess's PlannedReparentShard reparents every
//! replica, so they keep serving reads after it: `primary_conninfo` gets the target's
//! host and port with `ALTER SYSTEM`, and a reload applies it (PostgreSQL 13 and later
//! restart the WAL receiver on it). Until the promotion they stream from the target as
//! cascading standbys, so they never hold WAL the target lacks (WAL the old primary
//! writes after the fence would otherwise put them past the new timeline's fork);
//! `recovery_target_timeline` `latest`, the default, then follows the promotion. A
//! switchover that does not happen points them back. A standby that cannot be
//! repointed is reported and left as it is. Under an HA manager the manager does this
//! and handoff only follows.

use std::time::Duration;

use tokio::task::JoinSet;

use crate::backend::admin::{AdminDb, AdminSession};
use crate::config::HostPort;

/// What became of one standby.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Repointed {
    /// Now streams from the new primary (after its reload).
    Done,
    /// Already pointed there.
    Already,
    /// Not a standby (the old primary, a host that is down or left recovery).
    Skipped(String),
    Failed(String),
}

/// An admin session on each of `hosts`, opened at once (an error for one that cannot
/// be reached).
pub(crate) async fn open(
    admin: &AdminDb,
    hosts: Vec<HostPort>,
    timeout: Duration,
) -> Vec<(HostPort, Result<AdminSession, String>)> {
    let mut set = JoinSet::new();
    for host in hosts {
        let admin = admin.clone();
        set.spawn(async move {
            let s = admin
                .open(&host, admin.database(), "handoff-repoint", timeout)
                .await
                .map_err(|e| e.to_string());
            (host, s)
        });
    }
    let mut out = Vec::new();
    while let Some(r) = set.join_next().await {
        if let Ok(r) = r {
            out.push(r);
        }
    }
    out
}

/// Points every host of `standbys` that is in recovery at `new`, one after the other
/// (each a statement and a reload, bounded by `timeout`).
pub(crate) async fn repoint(
    standbys: &[(HostPort, Result<AdminSession, String>)],
    new: &HostPort,
    timeout: Duration,
) -> Vec<(HostPort, Repointed)> {
    let mut out = Vec::new();
    for (host, session) in standbys {
        let r = match session {
            Err(e) => Repointed::Skipped(e.clone()),
            Ok(s) => tokio::time::timeout(timeout, one(s, new))
                .await
                .unwrap_or_else(|_| Repointed::Failed(format!("no answer within {timeout:?}"))),
        };
        out.push((host.clone(), r));
    }
    out.sort_by_key(|a| a.0.to_string());
    out
}

/// The standbys that could not be repointed, with why, as a step's error.
pub(crate) fn failures(results: &[(HostPort, Repointed)]) -> Option<String> {
    let failed: Vec<String> = results
        .iter()
        .filter_map(|(h, r)| match r {
            Repointed::Failed(e) => Some(format!("{h}: {e}")),
            _ => None,
        })
        .collect();
    (!failed.is_empty()).then(|| failed.join("; "))
}

async fn one(session: &AdminSession, new: &HostPort) -> Repointed {
    let row = match session
        .client
        .query_one(
            "SELECT pg_is_in_recovery(), current_setting('primary_conninfo')",
            &[],
        )
        .await
    {
        Ok(r) => r,
        Err(e) => return Repointed::Failed(e.to_string()),
    };
    if !row.get::<_, bool>(0) {
        return Repointed::Skipped("not in recovery".into());
    }
    let conninfo: String = row.get(1);
    let repointed = match pointed_at(&conninfo, new) {
        Ok(c) => c,
        Err(e) => return Repointed::Failed(e),
    };
    if repointed == conninfo {
        return Repointed::Already;
    }
    // ALTER SYSTEM takes no parameters: the value is quoted as a literal.
    let sql = format!(
        "ALTER SYSTEM SET primary_conninfo = '{}'",
        repointed.replace('\'', "''")
    );
    if let Err(e) = session.client.batch_execute(&sql).await {
        return Repointed::Failed(e.to_string());
    }
    match session
        .client
        .batch_execute("SELECT pg_reload_conf()")
        .await
    {
        Ok(()) => Repointed::Done,
        Err(e) => Repointed::Failed(e.to_string()),
    }
}

/// `conninfo` (libpq's `keyword=value` form) with its host and port set to `to`'s, and
/// any `hostaddr` dropped. A URI is refused: it would be rewritten by hand.
pub(crate) fn pointed_at(conninfo: &str, to: &HostPort) -> Result<String, String> {
    let trimmed = conninfo.trim();
    if trimmed.starts_with("postgres://") || trimmed.starts_with("postgresql://") {
        return Err("primary_conninfo is a URI: point it at the new primary by hand".into());
    }
    let mut pairs = parse(trimmed)?;
    pairs.retain(|(k, _)| k != "host" && k != "port" && k != "hostaddr");
    pairs.push(("host".into(), to.host.clone()));
    pairs.push(("port".into(), to.port.to_string()));
    Ok(pairs
        .iter()
        .map(|(k, v)| format!("{k}={}", quote(v)))
        .collect::<Vec<_>>()
        .join(" "))
}

/// libpq's `keyword = value` pairs; values may be single-quoted with `\` escapes.
fn parse(s: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return Ok(out);
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') {
            return Err(format!("primary_conninfo: \"{key}\" has no value"));
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            loop {
                match chars.next() {
                    Some('\\') => match chars.next() {
                        Some(c) => value.push(c),
                        None => return Err("primary_conninfo: unterminated quote".into()),
                    },
                    Some('\'') => break,
                    Some(c) => value.push(c),
                    None => return Err("primary_conninfo: unterminated quote".into()),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                if c == '\\' {
                    chars.next();
                    if let Some(e) = chars.next() {
                        value.push(e);
                    }
                    continue;
                }
                value.push(c);
                chars.next();
            }
        }
        out.push((key, value));
    }
}

fn quote(v: &str) -> String {
    if !v.is_empty() && !v.contains(|c: char| c.is_whitespace() || c == '\'' || c == '\\') {
        return v.to_string();
    }
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_and_port_change_and_everything_else_stays() {
        let to = HostPort {
            host: "10.0.0.2".into(),
            port: 5433,
        };
        let c = "user=postgres passfile='/var/lib/post gres/.pgpass' host=127.0.0.1 port=5432 sslmode=prefer application_name=standby1";
        assert_eq!(
            pointed_at(c, &to).unwrap(),
            "user=postgres passfile='/var/lib/post gres/.pgpass' sslmode=prefer application_name=standby1 host=10.0.0.2 port=5433"
        );
        assert_eq!(
            pointed_at("hostaddr=1.2.3.4 password='it\\'s'", &to).unwrap(),
            "password='it\\'s' host=10.0.0.2 port=5433"
        );
        let again = pointed_at(&pointed_at(c, &to).unwrap(), &to).unwrap();
        assert_eq!(again, pointed_at(c, &to).unwrap(), "stable");
        assert!(pointed_at("postgresql://a@b/c", &to).is_err());
        assert!(pointed_at("host='unterminated", &to).is_err());
        assert!(pointed_at("novalue", &to).is_err());
    }
}
