//! Connections of the admin role (`HANDOFF_ADMIN_DB_USER`) to servers, over
//! tokio-postgres: a switchover's SQL, the fence, health checks, discovery probes and the
//! split-brain watchdog all log in through [`AdminDb`], with the same TLS settings as every
//! other server connection. A failed login is classified once, here: fenced, unreachable,
//! or refused.

use std::time::Duration;

use handoff_protocol::sqlstate;
use tokio::task::JoinHandle;
use tokio_postgres::Client;

use crate::config::{AdminDbSettings, HostPort};
use crate::net::tls::ServerTls;

/// Logs the admin role in to servers.
#[derive(Debug, Clone)]
pub struct AdminDb {
    settings: AdminDbSettings,
    tls: ServerTls,
}

/// An admin session, with the task that drives its connection (stopped when the
/// session is dropped).
#[derive(Debug)]
pub struct AdminSession {
    pub client: Client,
    /// The database it is logged in to.
    pub database: String,
    task: JoinHandle<()>,
}

impl Drop for AdminSession {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl AdminSession {
    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }
}

/// Why an admin login failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdminConnectError {
    /// The database does not accept connections: the server is fenced.
    #[error("{0}")]
    Fenced(String),
    /// No answer, or the server is starting, stopping or ending sessions (57P…).
    #[error("{0}")]
    Unreachable(String),
    /// It answered and refused for another reason (authentication, too many
    /// connections, a TLS certificate handoff does not accept, …): it is up.
    #[error("{0}")]
    Refused(String),
}

pub use crate::error::is_fence_refusal;

impl AdminConnectError {
    fn from_pg(addr: &HostPort, user: &str, e: &tokio_postgres::Error) -> Self {
        match e.as_db_error() {
            Some(db) if is_fence_refusal(db.code().code(), db.message()) => {
                AdminConnectError::Fenced(format!("{addr}: {}", db.message()))
            }
            Some(db) if sqlstate::is_operator_intervention(db.code().code()) => {
                AdminConnectError::Unreachable(format!("{addr}: {}", db.message()))
            }
            Some(db) => AdminConnectError::Refused(format!(
                "{addr} (as {user}): {} ({})",
                db.message(),
                db.code().code()
            )),
            // tokio-postgres's own "password missing" (in the error's source): the
            // server asked for a password and handoff has none. It is up; a setting is
            // missing.
            None if std::error::Error::source(e)
                .is_some_and(|c| c.to_string().contains("password missing")) =>
            {
                AdminConnectError::Refused(format!(
                    "{addr}: the server asks the admin role \"{user}\" for a password and HANDOFF_ADMIN_DB_PASSWORD is not set"
                ))
            }
            // A TLS failure is the server answering with a certificate (or a refusal)
            // handoff does not accept: it is up, the setting is wrong.
            None if e.to_string().contains("TLS") => {
                AdminConnectError::Refused(format!("{addr}: {e}"))
            }
            None => AdminConnectError::Unreachable(match std::error::Error::source(e) {
                Some(cause) => format!("{addr}: {e}: {cause}"),
                None => format!("{addr}: {e}"),
            }),
        }
    }
}

impl AdminDb {
    pub fn new(settings: AdminDbSettings, tls: ServerTls) -> Self {
        Self { settings, tls }
    }

    /// The admin role's name.
    pub fn user(&self) -> &str {
        &self.settings.user
    }

    /// `HANDOFF_ADMIN_DB_NAME`: the database admin sessions log in to.
    pub fn database(&self) -> &str {
        &self.settings.database
    }

    /// Logs in to `database` on `addr` within `timeout`; `application` names the session
    /// in `pg_stat_activity`.
    pub async fn open(
        &self,
        addr: &HostPort,
        database: &str,
        application: &str,
        timeout: Duration,
    ) -> Result<AdminSession, AdminConnectError> {
        let mut c = tokio_postgres::Config::new();
        c.host(&addr.host)
            .port(addr.port)
            .user(&self.settings.user)
            .dbname(database)
            .application_name(application)
            .connect_timeout(timeout);
        if let Some(p) = &self.settings.password {
            c.password(p);
        }
        match tokio::time::timeout(timeout, self.tls.pg_connect(&mut c)).await {
            Ok(Ok((client, task))) => Ok(AdminSession {
                client,
                database: database.to_string(),
                task,
            }),
            Ok(Err(e)) => Err(AdminConnectError::from_pg(addr, self.user(), &e)),
            Err(_) => Err(AdminConnectError::Unreachable(format!(
                "{addr}: no answer within {timeout:?}"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_datallowconn_refusal_counts_as_fenced() {
        assert!(is_fence_refusal(
            "55000",
            "database \"postgres\" is not currently accepting connections"
        ));
        assert!(!is_fence_refusal("55000", "something else"));
        assert!(!is_fence_refusal(
            "57P03",
            "the database system is starting up"
        ));
    }

    #[tokio::test]
    async fn a_closed_port_is_unreachable() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let db = AdminDb::new(
            AdminDbSettings {
                user: "postgres".into(),
                password: None,
                database: "postgres".into(),
            },
            ServerTls::default(),
        );
        let addr = HostPort {
            host: "127.0.0.1".into(),
            port,
        };
        let e = db
            .open(&addr, "postgres", "test", Duration::from_secs(2))
            .await
            .unwrap_err();
        assert!(matches!(e, AdminConnectError::Unreachable(_)), "{e:?}");
    }
}
