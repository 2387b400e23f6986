//! Where handoff listens (clients, the admin API), TLS on both sides, and its log.

use std::net::SocketAddr;

use super::values::{parse_addr, Vars};
use super::variable::{Applies, Topic, Variable};
use super::{invalid, ConfigError};

/// The listening, TLS, admin API and log variables.
pub(super) const VARIABLES: &[Variable] = &[
    Variable {
        name: "HANDOFF_LISTEN",
        topic: Topic::Listen,
        default: "127.0.0.1:6432",
        applies: Applies::Restart,
        help: "address clients connect to",
    },
    Variable {
        name: "HANDOFF_ADMIN_LISTEN",
        topic: Topic::Listen,
        default: "127.0.0.1:6480",
        applies: Applies::Restart,
        help: "admin HTTP API (`/healthz`, `/readyz`, `/metrics`)",
    },
    Variable {
        name: "HANDOFF_TAKEOVER_SOCKET",
        topic: Topic::Listen,
        default: "($RUNTIME_DIRECTORY, else $XDG_RUNTIME_DIR, else /tmp)/handoff-PORT.takeover",
        applies: Applies::Restart,
        help: "the Unix socket (mode 0600) a new handoff started with `--takeover` connects to, to take this one's listeners and clients over; `PORT` is `HANDOFF_LISTEN`'s; `off` for none (also the default when `HANDOFF_LISTEN`'s port is 0)",
    },
    Variable {
        name: "HANDOFF_ADMIN_TOKEN",
        topic: Topic::Listen,
        default: "(unset)",
        applies: Applies::Takeover,
        help: "bearer token for the admin API (all but the two health probes); required when `HANDOFF_ADMIN_LISTEN` is not loopback",
    },
    Variable {
        name: "HANDOFF_TLS_MODE",
        topic: Topic::Listen,
        default: "disable",
        applies: Applies::Takeover,
        help: "TLS for clients: `disable` (SSLRequest answered `N`), `allow` (TLS for clients that ask), `require` (plaintext clients get `28000`)",
    },
    Variable {
        name: "HANDOFF_TLS_CERT",
        topic: Topic::Listen,
        default: "(unset)",
        applies: Applies::OnSighup,
        help: "PEM certificate chain for client TLS; read again on SIGHUP",
    },
    Variable {
        name: "HANDOFF_TLS_KEY",
        topic: Topic::Listen,
        default: "(unset)",
        applies: Applies::OnSighup,
        help: "PEM private key for client TLS; read again on SIGHUP",
    },
    Variable {
        name: "HANDOFF_SERVER_TLS",
        topic: Topic::Listen,
        default: "disable",
        applies: Applies::Takeover,
        help: "TLS to PostgreSQL, as libpq's `sslmode`: `disable`, `prefer`, `require` (encrypt, no verification), `verify-ca` (chain), `verify-full` (chain and host name)",
    },
    Variable {
        name: "HANDOFF_SERVER_TLS_CA",
        topic: Topic::Listen,
        default: "(unset)",
        applies: Applies::Takeover,
        help: "PEM CA certificates server certificates must chain to (`verify-ca`, `verify-full`)",
    },
    Variable {
        name: "HANDOFF_LOG",
        topic: Topic::Listen,
        default: "info",
        applies: Applies::Takeover,
        help: "log filter in `tracing` EnvFilter syntax, e.g. `info,handoff=debug`",
    },
    Variable {
        name: "HANDOFF_WORKER_THREADS",
        topic: Topic::Listen,
        default: "0",
        applies: Applies::Takeover,
        help: "threads that run the sessions (`0`: one per CPU); `1` spends less CPU per transaction while the proxy is far from busy (no wake-ups between threads) but can use only one core",
    },
];

/// TLS towards clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientTlsMode {
    Disable,
    Allow,
    Require,
}

/// TLS towards servers (libpq's `sslmode` values).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerTlsMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl ServerTlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ServerTlsMode::Disable => "disable",
            ServerTlsMode::Prefer => "prefer",
            ServerTlsMode::Require => "require",
            ServerTlsMode::VerifyCa => "verify-ca",
            ServerTlsMode::VerifyFull => "verify-full",
        }
    }
}

/// TLS settings (files are read at startup and, for clients, on SIGHUP).
#[derive(Debug, Clone)]
pub struct TlsSettings {
    pub client_mode: ClientTlsMode,
    pub cert: Option<std::path::PathBuf>,
    pub key: Option<std::path::PathBuf>,
    pub server_mode: ServerTlsMode,
    pub server_ca: Option<std::path::PathBuf>,
}

/// The client and admin listening addresses, the admin API's token and the takeover
/// socket.
pub(super) struct Listeners {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub admin_token: Option<String>,
    pub takeover_socket: Option<std::path::PathBuf>,
}

pub(super) fn parse_listeners(vars: &Vars) -> Result<Listeners, ConfigError> {
    let listen = parse_addr(
        "HANDOFF_LISTEN",
        vars.get("HANDOFF_LISTEN").unwrap_or_default(),
    )?;
    let admin_listen = parse_addr(
        "HANDOFF_ADMIN_LISTEN",
        vars.get("HANDOFF_ADMIN_LISTEN").unwrap_or_default(),
    )?;
    let admin_token = vars.get("HANDOFF_ADMIN_TOKEN").map(str::to_string);
    if !admin_listen.ip().is_loopback() && admin_token.is_none() {
        return Err(invalid(
            "HANDOFF_ADMIN_TOKEN",
            format!(
                "must be set because HANDOFF_ADMIN_LISTEN={admin_listen} is not a loopback address"
            ),
        ));
    }
    let takeover_socket = match vars.given("HANDOFF_TAKEOVER_SOCKET") {
        Some("off") => None,
        Some("") => {
            return Err(invalid(
                "HANDOFF_TAKEOVER_SOCKET",
                "is set but empty: give a path, or off",
            ))
        }
        Some(path) => Some(std::path::PathBuf::from(path)),
        None if listen.port() == 0 => None,
        None => {
            let dir = ["RUNTIME_DIRECTORY", "XDG_RUNTIME_DIR"]
                .iter()
                .filter_map(std::env::var_os)
                .map(std::path::PathBuf::from)
                .find(|p| p.is_absolute())
                .unwrap_or_else(|| std::path::PathBuf::from("/tmp"));
            Some(dir.join(format!("handoff-{}.takeover", listen.port())))
        }
    };
    Ok(Listeners {
        listen,
        admin_listen,
        admin_token,
        takeover_socket,
    })
}

pub(super) fn parse_tls(vars: &Vars) -> Result<TlsSettings, ConfigError> {
    let client_mode = vars.choice(
        "HANDOFF_TLS_MODE",
        &[
            ("disable", ClientTlsMode::Disable),
            ("allow", ClientTlsMode::Allow),
            ("require", ClientTlsMode::Require),
        ],
    )?;
    let server_mode = vars.choice(
        "HANDOFF_SERVER_TLS",
        &[
            ("disable", ServerTlsMode::Disable),
            ("prefer", ServerTlsMode::Prefer),
            ("require", ServerTlsMode::Require),
            ("verify-ca", ServerTlsMode::VerifyCa),
            ("verify-full", ServerTlsMode::VerifyFull),
        ],
    )?;
    let path = |name: &'static str| vars.get(name).map(std::path::PathBuf::from);
    let tls = TlsSettings {
        client_mode,
        cert: path("HANDOFF_TLS_CERT"),
        key: path("HANDOFF_TLS_KEY"),
        server_mode,
        server_ca: path("HANDOFF_SERVER_TLS_CA"),
    };
    if client_mode != ClientTlsMode::Disable {
        for (name, v) in [
            ("HANDOFF_TLS_CERT", &tls.cert),
            ("HANDOFF_TLS_KEY", &tls.key),
        ] {
            if v.is_none() {
                return Err(invalid(
                    name,
                    "required when HANDOFF_TLS_MODE is not disable",
                ));
            }
        }
    }
    if matches!(
        server_mode,
        ServerTlsMode::VerifyCa | ServerTlsMode::VerifyFull
    ) && tls.server_ca.is_none()
    {
        return Err(invalid(
            "HANDOFF_SERVER_TLS_CA",
            "required with HANDOFF_SERVER_TLS=verify-ca or verify-full",
        ));
    }
    Ok(tls)
}
