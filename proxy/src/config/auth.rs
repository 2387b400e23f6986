//! Client users and their secrets, the console's users, and the admin role handoff logs in to servers as.

use std::collections::HashMap;
use std::net::SocketAddr;

use handoff_protocol::auth::ScramVerifier;

use super::values::Vars;
use super::variable::{Applies, Topic, Variable};
use super::{invalid, ConfigError};

/// The users and authentication variables.
pub(super) const VARIABLES: &[Variable] = &[
    Variable {
        name: "HANDOFF_USERS",
        topic: Topic::Auth,
        default: "(unset: no client password, loopback listen only)",
        applies: Applies::Takeover,
        help: "`user=password` or `user=SCRAM-SHA-256$iter:salt$StoredKey:ServerKey`, comma separated; required when `HANDOFF_LISTEN` is not loopback",
    },
    Variable {
        name: "HANDOFF_USERS_FILE",
        topic: Topic::Auth,
        default: "(unset)",
        applies: Applies::OnSighup,
        help: "a users file as PgBouncer's `userlist.txt`: `\"user\" \"secret\"` per line, the secret a password, a `SCRAM-SHA-256$…` verifier or an `md5…` secret; read again on SIGHUP (a broken file is refused and the old list stays)",
    },
    Variable {
        name: "HANDOFF_AUTH_USER",
        topic: Topic::Auth,
        default: "(unset: no lookup)",
        applies: Applies::Takeover,
        help: "server role that looks up a user `HANDOFF_USERS` and the file do not list, on the primary of the shard the client's database routes to (PgBouncer's `auth_user`); its password, if the server asks, comes from `HANDOFF_USERS` or the file",
    },
    Variable {
        name: "HANDOFF_AUTH_QUERY",
        topic: Topic::Auth,
        default: "SELECT usename, passwd FROM pg_shadow WHERE usename=$1",
        applies: Applies::Takeover,
        help: "the lookup: `$1` is the user; one row (name, secret) or none",
    },
    Variable {
        name: "HANDOFF_AUTH_CACHE_TTL",
        topic: Topic::Auth,
        default: "60s",
        applies: Applies::Takeover,
        help: "how long a looked-up secret is kept; a failed login with a cached one asks the server again next time",
    },
    Variable {
        name: "HANDOFF_ADMIN_USERS",
        topic: Topic::Auth,
        default: "(unset: nobody)",
        applies: Applies::Takeover,
        help: "users, comma separated, who may use the admin console (`psql -U <user> handoff`, or the database name `pgbouncer`); they authenticate like any client",
    },
    Variable {
        name: "HANDOFF_ADMIN_DB_USER",
        topic: Topic::Auth,
        default: "(the first user of HANDOFF_USERS with a password, else postgres)",
        applies: Applies::Takeover,
        help: "server role handoff runs switchover SQL, health checks and discovery probes as",
    },
    Variable {
        name: "HANDOFF_ADMIN_DB_PASSWORD",
        topic: Topic::Auth,
        default: "(that user's password, if any)",
        applies: Applies::Takeover,
        help: "its password",
    },
    Variable {
        name: "HANDOFF_ADMIN_DB_NAME",
        topic: Topic::Auth,
        default: "postgres",
        applies: Applies::Takeover,
        help: "database handoff connects to for switchover SQL",
    },
];

/// A client user's credentials.
#[derive(Debug, Clone)]
pub struct UserSecret {
    /// What the client must prove knowledge of.
    pub verifier: ScramVerifier,
    /// The plain password, when configured as one: also used to log in to servers.
    pub password: Option<String>,
}

/// The admin role handoff logs in to servers as, for switchovers, the fence, health
/// checks, discovery and the watchdog (`HANDOFF_ADMIN_DB_*`).
#[derive(Debug, Clone)]
pub struct AdminDbSettings {
    pub user: String,
    pub password: Option<String>,
    pub database: String,
}

pub(super) fn parse_client_users(
    vars: &Vars,
    listen: SocketAddr,
) -> Result<Option<HashMap<String, UserSecret>>, ConfigError> {
    let users = vars.get("HANDOFF_USERS").map(parse_users).transpose()?;
    let other_source =
        vars.given("HANDOFF_USERS_FILE").is_some() || vars.given("HANDOFF_AUTH_USER").is_some();
    if users.is_none() && !other_source && !listen.ip().is_loopback() {
        return Err(invalid(
            "HANDOFF_USERS",
            format!(
                "must be set (or HANDOFF_USERS_FILE, or HANDOFF_AUTH_USER) because \
                 HANDOFF_LISTEN={listen} is not a loopback address (clients without a \
                 password are allowed on loopback only)"
            ),
        ));
    }
    Ok(users)
}

pub(super) fn parse_admin_users(vars: &Vars) -> Result<Vec<String>, ConfigError> {
    const VAR: &str = "HANDOFF_ADMIN_USERS";
    let mut users = Vec::new();
    for u in vars
        .given(VAR)
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
    {
        if u.is_empty() {
            continue;
        }
        if u.contains(char::is_whitespace) || u.contains('=') {
            return Err(invalid(
                VAR,
                format!("'{u}' is not a user name (list names, comma separated; passwords go in HANDOFF_USERS)"),
            ));
        }
        users.push(u.to_string());
    }
    Ok(users)
}

/// The admin role: `HANDOFF_ADMIN_DB_USER`, else the first client user (by name) with a
/// password, else `postgres`.
pub(super) fn parse_admin_db(
    vars: &Vars,
    users: Option<&HashMap<String, UserSecret>>,
) -> AdminDbSettings {
    let fallback = users.and_then(|u| {
        let mut names: Vec<&String> = u.keys().filter(|n| u[*n].password.is_some()).collect();
        names.sort();
        names
            .first()
            .map(|n| (n.to_string(), u[*n].password.clone()))
    });
    let (user, password) = match vars.given("HANDOFF_ADMIN_DB_USER") {
        Some(u) => (u.to_string(), None),
        None => fallback.unwrap_or_else(|| ("postgres".to_string(), None)),
    };
    AdminDbSettings {
        user,
        password: vars
            .given("HANDOFF_ADMIN_DB_PASSWORD")
            .map(str::to_string)
            .or(password),
        database: vars
            .get("HANDOFF_ADMIN_DB_NAME")
            .unwrap_or_default()
            .to_string(),
    }
}

fn parse_users(s: &str) -> Result<HashMap<String, UserSecret>, ConfigError> {
    const VAR: &str = "HANDOFF_USERS";
    let mut users = HashMap::new();
    for entry in s.split(',').filter(|e| !e.trim().is_empty()) {
        let (user, secret) = entry.split_once('=').ok_or_else(|| {
            invalid(
                VAR,
                "entries must be user=password or user=SCRAM-SHA-256$...",
            )
        })?;
        let user = user.trim();
        if user.is_empty() {
            return Err(invalid(VAR, "an entry has an empty user name"));
        }
        let secret = if secret.starts_with("SCRAM-SHA-256$") {
            let verifier = ScramVerifier::parse(secret)
                .map_err(|e| invalid(VAR, format!("user '{user}': {e}")))?;
            UserSecret {
                verifier,
                password: None,
            }
        } else {
            let verifier = ScramVerifier::from_password(secret)
                .map_err(|e| invalid(VAR, format!("user '{user}': {e}")))?;
            UserSecret {
                verifier,
                password: Some(secret.to_string()),
            }
        };
        if users.insert(user.to_string(), secret).is_some() {
            return Err(invalid(VAR, format!("user '{user}' is listed twice")));
        }
    }
    Ok(users)
}
