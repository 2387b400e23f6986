//! Per-user and per-database client connection limits (`HANDOFF_MAX_USER_CLIENT_CONN`,
//! `HANDOFF_MAX_DB_CLIENT_CONN`). A logged-in client holds a [`Slot`] for its whole
//! session; the counts go down when it is dropped.

use std::sync::Arc;

use dashmap::DashMap;
use handoff_protocol::error::ProxyError;
use handoff_protocol::sqlstate;

use crate::metrics as m;

/// Client connections by user and by client database. The names are kept once, shared
/// by every client counted under them (each client's [`Slot`] and its `SHOW CLIENTS`
/// entry hold the same string).
#[derive(Debug, Default)]
pub struct Limits {
    users: DashMap<Arc<str>, usize>,
    databases: DashMap<Arc<str>, usize>,
}

/// One client's place in the counts.
#[derive(Debug)]
pub struct Slot {
    limits: Arc<Limits>,
    user: Arc<str>,
    database: Arc<str>,
}

impl Slot {
    /// The user's name, as the counts keep it.
    pub fn user(&self) -> Arc<str> {
        Arc::clone(&self.user)
    }

    /// The client database's name, as the counts keep it.
    pub fn database(&self) -> Arc<str> {
        Arc::clone(&self.database)
    }
}

/// Counts one more under `key` unless `max` (0: none) is reached; the name as the map
/// keeps it.
fn take(map: &DashMap<Arc<str>, usize>, key: &str, max: usize) -> Option<Arc<str>> {
    // Counted already: no new string.
    let mut n = match map.get_mut(key) {
        Some(n) => n,
        None => map.entry(Arc::from(key)).or_insert(0),
    };
    if max > 0 && *n >= max {
        return None;
    }
    *n += 1;
    Some(Arc::clone(n.key()))
}

fn give_back(map: &DashMap<Arc<str>, usize>, key: &str) {
    map.remove_if_mut(key, |_, n| {
        *n = n.saturating_sub(1);
        *n == 0
    });
}

impl Limits {
    /// Counts a client of `user` on `database`, or refuses it (53300 naming the limit).
    pub fn admit(
        self: &Arc<Self>,
        user: &str,
        database: &str,
        max_user: usize,
        max_db: usize,
    ) -> Result<Slot, ProxyError> {
        let Some(user_key) = take(&self.users, user, max_user) else {
            metrics::counter!(m::CLIENT_REJECTED_TOTAL, "reason" => "max_user_client_conn")
                .increment(1);
            return Err(ProxyError::fatal(
                sqlstate::TOO_MANY_CONNECTIONS,
                format!(
                    "too many connections for role \"{user}\" (HANDOFF_MAX_USER_CLIENT_CONN is {max_user})"
                ),
            ));
        };
        let Some(database_key) = take(&self.databases, database, max_db) else {
            give_back(&self.users, user);
            metrics::counter!(m::CLIENT_REJECTED_TOTAL, "reason" => "max_db_client_conn")
                .increment(1);
            return Err(ProxyError::fatal(
                sqlstate::TOO_MANY_CONNECTIONS,
                format!(
                    "too many connections for database \"{database}\" (HANDOFF_MAX_DB_CLIENT_CONN is {max_db})"
                ),
            ));
        };
        Ok(Slot {
            limits: Arc::clone(self),
            user: user_key,
            database: database_key,
        })
    }

    /// Client connections of `user` now.
    #[cfg(test)]
    fn user_count(&self, user: &str) -> usize {
        self.users.get(user).map_or(0, |n| *n)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        give_back(&self.limits.users, &self.user);
        give_back(&self.limits.databases, &self.database);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_count_per_user_and_database_and_free_on_drop() {
        let l = Arc::new(Limits::default());
        let a = l.admit("app", "db1", 2, 0).unwrap();
        let b = l.admit("app", "db2", 2, 0).unwrap();
        let e = l.admit("app", "db1", 2, 0).unwrap_err();
        assert_eq!(e.code, "53300");
        assert!(e.message.contains("HANDOFF_MAX_USER_CLIENT_CONN"));
        drop(a);
        let c = l.admit("app", "db1", 2, 1).unwrap();
        // db1 is full (1); the refused client does not keep a user slot.
        let e = l.admit("other", "db1", 2, 1).unwrap_err();
        assert!(
            e.message.contains("HANDOFF_MAX_DB_CLIENT_CONN"),
            "{}",
            e.message
        );
        assert_eq!(l.user_count("other"), 0);
        drop((b, c));
        assert_eq!(l.user_count("app"), 0);
        // 0 means no limit.
        let many: Vec<_> = (0..50).map(|_| l.admit("x", "y", 0, 0).unwrap()).collect();
        assert_eq!(l.user_count("x"), 50);
        drop(many);
    }
}
