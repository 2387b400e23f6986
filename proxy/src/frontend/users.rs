//! Who may log in, and with what secret: `HANDOFF_USERS`, the users file
//! (`HANDOFF_USERS_FILE`, read again on SIGHUP) and, for a user neither lists, the
//! server itself (`HANDOFF_AUTH_QUERY` run as `HANDOFF_AUTH_USER` on the shard's primary,
//! PgBouncer's `auth_query`), whose answer is cached for `HANDOFF_AUTH_CACHE_TTL`.
//!
//! No plaintext password is needed for any of them: a SCRAM verifier lets the client
//! authenticate to handoff, and the keys that exchange yields log handoff in to the
//! server ([`crate::backend::login::Credentials`]); an MD5 secret does the same with MD5.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use handoff_protocol::auth::ScramVerifier;
use handoff_protocol::error::ProxyError;
use handoff_protocol::sqlstate;
use tokio::time::Instant;

use crate::backend::admin::{AdminConnectError, AdminDb};
use crate::config::{AdminDbSettings, Config, UserSecret};
use crate::net::tls::ServerTls;
use crate::shard::control::{self, Admitted};
use crate::shard::failure::Report;
use crate::shard::{health, Ctx, Shard};
use crate::sync::{Locked, ReadWrite};

/// A user's secret.
#[derive(Clone, Debug)]
pub(crate) enum Secret {
    /// Given in plain: the client proves it with SCRAM; handoff logs in with it.
    Password {
        password: String,
        verifier: ScramVerifier,
    },
    /// A SCRAM-SHA-256 verifier (as PostgreSQL stores it).
    Scram(ScramVerifier),
    /// An MD5 secret (`md5` + 32 hex digits, as PostgreSQL stores it): the client
    /// authenticates with MD5.
    Md5(String),
}

impl Secret {
    /// Reads a secret as PostgreSQL stores one, or a plain password.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.starts_with("SCRAM-SHA-256$") {
            return ScramVerifier::parse(s)
                .map(Secret::Scram)
                .map_err(|e| e.to_string());
        }
        if handoff_protocol::auth::md5_response_from_secret(s, [0; 4]).is_some() {
            return Ok(Secret::Md5(s.to_ascii_lowercase()));
        }
        if s.is_empty() {
            return Err("the secret is empty".into());
        }
        let verifier = ScramVerifier::from_password(s).map_err(|e| e.to_string())?;
        Ok(Secret::Password {
            password: s.to_string(),
            verifier,
        })
    }

    fn from_config(u: &UserSecret) -> Self {
        match &u.password {
            Some(p) => Secret::Password {
                password: p.clone(),
                verifier: u.verifier.clone(),
            },
            None => Secret::Scram(u.verifier.clone()),
        }
    }
}

/// Reads a users file: one user per line, `"name" "secret"` (PgBouncer's userlist.txt:
/// both double-quoted, `""` for a quote inside); blank lines and lines starting with
/// `;` or `#` are skipped. The secret is a SCRAM verifier, an MD5 secret, or a password.
pub(crate) fn parse_file(text: &str) -> Result<HashMap<String, Secret>, String> {
    let mut users = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with(';') || line.starts_with('#') {
            continue;
        }
        let (name, rest) = quoted(line).ok_or(format!("line {n}: expected \"user\" \"secret\""))?;
        let (secret, rest) =
            quoted(rest.trim_start()).ok_or(format!("line {n}: expected \"user\" \"secret\""))?;
        if !rest.trim().is_empty() && !rest.trim_start().starts_with('"') {
            return Err(format!("line {n}: unexpected text after the secret"));
        }
        if name.is_empty() {
            return Err(format!("line {n}: empty user name"));
        }
        let secret =
            Secret::parse(&secret).map_err(|e| format!("line {n} (user \"{name}\"): {e}"))?;
        if users.insert(name.clone(), secret).is_some() {
            return Err(format!("line {n}: user \"{name}\" is listed twice"));
        }
    }
    Ok(users)
}

/// `"..."` at the start of `s` (with `""` for `"`): the text and what follows.
fn quoted(s: &str) -> Option<(String, &str)> {
    let rest = s.strip_prefix('"')?;
    let mut out = String::new();
    let mut chars = rest.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if c == '"' {
            if matches!(chars.peek(), Some((_, '"'))) {
                chars.next();
                out.push('"');
                continue;
            }
            return Some((out, &rest[i + 1..]));
        }
        out.push(c);
    }
    None
}

fn read_file(path: &Path) -> Result<HashMap<String, Secret>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse_file(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// The server-side lookup (`HANDOFF_AUTH_USER`).
struct Lookup {
    user: String,
    query: String,
    ttl: Duration,
    /// Sessions as the auth user.
    db: AdminDb,
}

/// Every source of users.
pub(crate) struct Users {
    /// `HANDOFF_USERS`.
    fixed: HashMap<String, Secret>,
    file: Option<PathBuf>,
    from_file: RwLock<HashMap<String, Secret>>,
    lookup: Option<Lookup>,
    cache: Mutex<HashMap<String, (Instant, Secret)>>,
}

impl std::fmt::Debug for Users {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Users")
            .field("fixed", &self.fixed.len())
            .field("file", &self.file)
            .field("lookup", &self.lookup.as_ref().map(|l| &l.user))
            .finish()
    }
}

/// Why users could not be set up or read again.
#[derive(Debug, thiserror::Error)]
#[error("{var}: {reason}")]
pub struct UsersError {
    pub var: &'static str,
    pub reason: String,
}

impl Users {
    pub fn new(cfg: &Config, tls: ServerTls) -> Result<Self, UsersError> {
        let fixed: HashMap<String, Secret> = cfg
            .users
            .iter()
            .flatten()
            .map(|(u, s)| (u.clone(), Secret::from_config(s)))
            .collect();
        let from_file = match &cfg.users_file {
            Some(p) => read_file(p).map_err(|reason| UsersError {
                var: "HANDOFF_USERS_FILE",
                reason,
            })?,
            None => HashMap::new(),
        };
        let lookup = match &cfg.auth_user {
            None => None,
            Some(user) => {
                let password = match fixed.get(user).or_else(|| from_file.get(user)) {
                    None => None,
                    Some(Secret::Password { password, .. }) => Some(password.clone()),
                    Some(_) => {
                        return Err(UsersError {
                            var: "HANDOFF_AUTH_USER",
                            reason: format!(
                                "\"{user}\" has only a stored secret in HANDOFF_USERS or the users file; give its password in plain there (handoff logs in as it before any client), or let the server trust it"
                            ),
                        })
                    }
                };
                let settings = AdminDbSettings {
                    user: user.clone(),
                    password,
                    database: String::new(),
                };
                Some(Lookup {
                    user: user.clone(),
                    query: cfg.auth_query.clone(),
                    ttl: cfg.auth_cache_ttl,
                    db: AdminDb::new(settings, tls),
                })
            }
        };
        Ok(Self {
            fixed,
            file: cfg.users_file.clone(),
            from_file: RwLock::new(from_file),
            lookup,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// True when clients must authenticate (some source of users is configured).
    pub fn required(cfg: &Config) -> bool {
        cfg.users.is_some() || cfg.users_file.is_some() || cfg.auth_user.is_some()
    }

    /// Reads the users file again (SIGHUP). On an error the old list stays.
    pub fn reload(&self) -> Result<usize, UsersError> {
        let Some(path) = &self.file else {
            return Ok(0);
        };
        let users = read_file(path).map_err(|reason| UsersError {
            var: "HANDOFF_USERS_FILE",
            reason,
        })?;
        let n = users.len();
        *self.from_file.writing() = users;
        Ok(n)
    }

    /// The secret of `user` from the lists (`HANDOFF_USERS` first, then the file).
    pub fn listed(&self, user: &str) -> Option<Secret> {
        if let Some(s) = self.fixed.get(user) {
            return Some(s.clone());
        }
        self.from_file.reading().get(user).cloned()
    }

    /// A cached lookup's secret did not authenticate the client: ask the server again
    /// next time (its password may have changed).
    pub fn forget(&self, user: &str) {
        self.cache.locked().remove(user);
    }

    /// The secret of `user`: listed, cached, or looked up on `shard`'s primary in
    /// `database` (the client's server database). `Ok(None)`: no such user (or one
    /// without a password), which fails like a wrong password.
    pub async fn find(
        &self,
        ctx: &Ctx,
        connect_timeout: Duration,
        user: &str,
        lookup_on: Option<(&Arc<Shard>, &str)>,
    ) -> Result<Option<Secret>, ProxyError> {
        if let Some(s) = self.listed(user) {
            return Ok(Some(s));
        }
        let (Some(lookup), Some((shard, database))) = (&self.lookup, lookup_on) else {
            return Ok(None);
        };
        if let Some((at, s)) = self.cache.locked().get(user) {
            if at.elapsed() < lookup.ttl {
                return Ok(Some(s.clone()));
            }
        }
        // Boxed: a lookup is a server login and a query, a future of kilobytes that
        // a listed user's login would otherwise carry through its whole exchange.
        let found = Box::pin(lookup.run(ctx, connect_timeout, shard, database, user)).await?;
        if let Some(s) = &found {
            self.cache
                .locked()
                .insert(user.to_string(), (Instant::now(), s.clone()));
        }
        Ok(found)
    }
}

impl Lookup {
    /// Runs the query on the shard's primary. It passes the shard's gate first, so a
    /// lookup while the primary changes waits in the failover buffer like any request.
    async fn run(
        &self,
        ctx: &Ctx,
        connect_timeout: Duration,
        shard: &Arc<Shard>,
        database: &str,
        user: &str,
    ) -> Result<Option<Secret>, ProxyError> {
        let refused = |why: String| {
            ProxyError::fatal(
                sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
                format!(
                    "cannot look up user \"{user}\" on shard \"{}\": {why}",
                    shard.name
                ),
            )
            .hint("check HANDOFF_AUTH_USER and HANDOFF_AUTH_QUERY")
        };
        loop {
            let mut gen = shard.current();
            let admitted: Admitted = control::admit(ctx, shard, &mut gen, 0)
                .await
                .map_err(|e| e.to_client_fatal(&shard.name))?;
            let session = match self
                .db
                .open(
                    &gen.primary,
                    database,
                    "handoff-auth-query",
                    connect_timeout,
                )
                .await
            {
                Ok(s) => s,
                Err(AdminConnectError::Unreachable(why)) => {
                    drop(admitted);
                    // The primary may be gone: if so, wait in the buffer for the next.
                    if health::suspect(ctx, shard, &gen, Report::ConnectFailed).await {
                        continue;
                    }
                    return Err(refused(why));
                }
                Err(AdminConnectError::Refused(why) | AdminConnectError::Fenced(why)) => {
                    return Err(refused(format!(
                        "as HANDOFF_AUTH_USER \"{}\": {why}",
                        self.user
                    )))
                }
            };
            let row = session
                .client
                .query_opt(self.query.as_str(), &[&user])
                .await
                .map_err(|e| {
                    refused(match e.as_db_error() {
                        Some(db) => format!("{} ({})", db.message(), db.code().code()),
                        None => e.to_string(),
                    })
                })?;
            drop(admitted);
            let Some(row) = row else {
                return Ok(None);
            };
            let secret: Option<String> = row
                .try_get(1)
                .or_else(|_| row.try_get(0))
                .map_err(|e| refused(format!("the query's answer has no password column: {e}")))?;
            return match secret.filter(|s| !s.is_empty()) {
                None => Ok(None),
                Some(s) => Secret::parse(&s).map(Some).map_err(refused),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_files_read_as_pgbouncers() {
        let v = ScramVerifier::derive("pw", b"salt".to_vec(), 16).to_postgres_string();
        let text = format!(
            "; a comment\n\n\"alice\" \"{v}\"\n\"bob\" \"md5{}\"\n\"o\"\"brien\" \"plain pw\"\n",
            "0123456789abcdef0123456789abcdef"
        );
        let users = parse_file(&text).unwrap();
        assert!(matches!(users["alice"], Secret::Scram(_)));
        assert!(matches!(users["bob"], Secret::Md5(_)));
        assert!(
            matches!(&users["o\"brien"], Secret::Password { password, .. } if password == "plain pw")
        );
        for bad in [
            "alice pw",
            "\"alice\"",
            "\"alice\" \"\"",
            "\"a\" \"x\"\n\"a\" \"y\"",
        ] {
            let e = parse_file(bad).unwrap_err();
            assert!(e.starts_with("line "), "{bad}: {e}");
        }
    }
}
