//! SQLSTATE codes the proxy produces or reacts to (see PostgreSQL's errcodes.txt).

/// successful_completion
pub const SUCCESSFUL_COMPLETION: &str = "00000";
/// connection_exception
pub const CONNECTION_EXCEPTION: &str = "08000";
/// sqlclient_unable_to_establish_sqlconnection
pub const CANNOT_CONNECT_NOW_CLIENT: &str = "08001";
/// connection_failure
pub const CONNECTION_FAILURE: &str = "08006";
/// protocol_violation
pub const PROTOCOL_VIOLATION: &str = "08P01";
/// feature_not_supported
pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
/// invalid_authorization_specification
pub const INVALID_AUTHORIZATION_SPECIFICATION: &str = "28000";
/// invalid_password
pub const INVALID_PASSWORD: &str = "28P01";
/// invalid_catalog_name (unknown database)
pub const INVALID_CATALOG_NAME: &str = "3D000";
/// read_only_sql_transaction
pub const READ_ONLY_SQL_TRANSACTION: &str = "25006";
/// too_many_connections
pub const TOO_MANY_CONNECTIONS: &str = "53300";
/// program_limit_exceeded
pub const PROGRAM_LIMIT_EXCEEDED: &str = "54000";
/// A client idle inside a transaction for too long.
pub const IDLE_IN_TRANSACTION_SESSION_TIMEOUT: &str = "25P03";
/// A client idle outside a transaction for too long.
pub const IDLE_SESSION_TIMEOUT: &str = "57P05";
/// query_canceled
pub const QUERY_CANCELED: &str = "57014";
/// admin_shutdown
pub const ADMIN_SHUTDOWN: &str = "57P01";
/// crash_shutdown
pub const CRASH_SHUTDOWN: &str = "57P02";
/// cannot_connect_now
pub const CANNOT_CONNECT_NOW: &str = "57P03";
/// internal_error
pub const INTERNAL_ERROR: &str = "XX000";
/// in_failed_sql_transaction
pub const IN_FAILED_SQL_TRANSACTION: &str = "25P02";
/// invalid_sql_statement_name (e.g. a prepared statement that does not exist)
pub const INVALID_SQL_STATEMENT_NAME: &str = "26000";
/// duplicate_prepared_statement
pub const DUPLICATE_PREPARED_STATEMENT: &str = "42P05";
/// object_in_use
pub const OBJECT_IN_USE: &str = "55006";
/// object_not_in_prerequisite_state (e.g. a login to a database that does not accept
/// connections)
pub const OBJECT_NOT_IN_PREREQUISITE_STATE: &str = "55000";

/// Class 57P, operator intervention: the server is ending the session or refusing it
/// (admin shutdown, crash shutdown, cannot connect now, database dropped, idle-session
/// timeout).
pub fn is_operator_intervention(code: &str) -> bool {
    code.starts_with("57P")
}

/// The constant for a code the proxy knows, so that a code read from a server can be
/// passed on as `&'static str`.
pub fn known(code: &str) -> Option<&'static str> {
    const ALL: &[&str] = &[
        SUCCESSFUL_COMPLETION,
        CONNECTION_EXCEPTION,
        CANNOT_CONNECT_NOW_CLIENT,
        CONNECTION_FAILURE,
        PROTOCOL_VIOLATION,
        FEATURE_NOT_SUPPORTED,
        INVALID_AUTHORIZATION_SPECIFICATION,
        INVALID_PASSWORD,
        INVALID_CATALOG_NAME,
        READ_ONLY_SQL_TRANSACTION,
        TOO_MANY_CONNECTIONS,
        PROGRAM_LIMIT_EXCEEDED,
        IDLE_IN_TRANSACTION_SESSION_TIMEOUT,
        IDLE_SESSION_TIMEOUT,
        QUERY_CANCELED,
        ADMIN_SHUTDOWN,
        CRASH_SHUTDOWN,
        CANNOT_CONNECT_NOW,
        INTERNAL_ERROR,
        IN_FAILED_SQL_TRANSACTION,
        OBJECT_IN_USE,
        OBJECT_NOT_IN_PREREQUISITE_STATE,
        INVALID_SQL_STATEMENT_NAME,
        DUPLICATE_PREPARED_STATEMENT,
    ];
    ALL.iter().copied().find(|c| *c == code)
}

/// The two-character class of a SQLSTATE (`"28P01"` → `"28"`), or `"??"` for a code that
/// is not five ASCII characters. Used as a bounded metric label.
pub fn class(code: &str) -> &str {
    if code.len() == 5 && code.is_ascii() {
        &code[..2]
    } else {
        "??"
    }
}

/// The admin console: a user not in `HANDOFF_ADMIN_USERS`.
pub const INSUFFICIENT_PRIVILEGE: &str = "42501";
/// The admin console: a command it does not know.
pub const SYNTAX_ERROR: &str = "42601";
/// The admin console: no such shard.
pub const UNDEFINED_OBJECT: &str = "42704";
/// The admin console: a malformed argument (a target that is not `host:port`).
pub const INVALID_PARAMETER_VALUE: &str = "22023";
/// The admin console: a switchover that failed on the servers' side.
pub const SYSTEM_ERROR: &str = "58000";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_and_known_codes() {
        assert_eq!(class("28P01"), "28");
        assert_eq!(class("x"), "??");
        assert!(is_operator_intervention(ADMIN_SHUTDOWN));
        assert!(is_operator_intervention(CANNOT_CONNECT_NOW));
        assert!(!is_operator_intervention(QUERY_CANCELED));
        assert_eq!(known("57P02"), Some(CRASH_SHUTDOWN));
        assert_eq!(known("99999"), None);
    }
}
