//! Server connections: connect to a PostgreSQL server, log in (trust, cleartext, MD5 or
//! SCRAM-SHA-256), and collect its parameters and backend key data.

use std::net::SocketAddr;
use std::time::Duration;

use handoff_protocol::auth::{
    md5_response, md5_response_from_secret, AuthError, ScramClient, ScramKeys, SCRAM_SHA_256,
};
use handoff_protocol::backend::{Authentication, BackendMessage};
use handoff_protocol::framing::StartupPacket;
use handoff_protocol::frontend::{encode_password, encode_sasl_initial, encode_sasl_response};
use tokio::net::TcpStream;

use crate::config::HostPort;
use crate::error::{ConnError, ServerError};
use crate::net::stream::{Conn, MAX_STARTUP_MESSAGE};

/// What handoff logs in to a server with, as the client's user.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Credentials {
    /// Nothing: the server must trust the user.
    #[default]
    None,
    /// The password (`HANDOFF_USERS` or the users file gave it in plain).
    Password(String),
    /// The keys the client's SCRAM exchange with handoff yielded: they answer a
    /// SCRAM-SHA-256 server keeping the same verifier.
    Scram(ScramKeys),
    /// The stored MD5 secret (`md5` + 32 hex digits): it answers an MD5 server.
    Md5(String),
}

impl Credentials {
    fn kind(&self) -> &'static str {
        match self {
            Credentials::None => "no password",
            Credentials::Password(_) => "a password",
            Credentials::Scram(_) => "SCRAM keys",
            Credentials::Md5(_) => "an MD5 secret",
        }
    }
}

/// What a server login needs.
#[derive(Debug, Clone, Copy)]
pub struct Login<'a> {
    pub addr: &'a HostPort,
    pub user: &'a str,
    pub database: &'a str,
    /// Further startup parameters to pass on (application_name, options, …).
    pub params: &'a [(String, String)],
    pub credentials: &'a Credentials,
    pub timeout: Duration,
    /// TLS towards the server (`HANDOFF_SERVER_TLS`).
    pub tls: &'a crate::net::tls::ServerTls,
}

/// An authenticated server connection, ready for queries.
#[derive(Debug)]
pub struct ServerConn {
    pub conn: Conn,
    /// ParameterStatus values the server reported at startup.
    pub params: Vec<(String, String)>,
    /// The server's backend key data, for forwarding cancel requests.
    pub pid: i32,
    /// The backend's secret key: 4 bytes in protocol 3.0, up to 256 in 3.2.
    pub key: bytes::Bytes,
    /// The resolved address, for cancel requests.
    pub peer: SocketAddr,
}

/// Connects and logs in, within `login.timeout`.
pub async fn connect(login: Login<'_>) -> Result<ServerConn, ServerError> {
    let addr = login.addr.to_string();
    match tokio::time::timeout(login.timeout, connect_inner(login, &addr)).await {
        Ok(r) => r,
        Err(_) => Err(ServerError::Timeout {
            addr,
            after: login.timeout,
        }),
    }
}

async fn connect_inner(login: Login<'_>, addr: &str) -> Result<ServerConn, ServerError> {
    let stream = TcpStream::connect((login.addr.host.as_str(), login.addr.port))
        .await
        .map_err(|source| ServerError::Connect {
            addr: addr.to_string(),
            source,
        })?;
    let _ = stream.set_nodelay(true);
    let peer = stream.peer_addr().map_err(|source| ServerError::Connect {
        addr: addr.to_string(),
        source,
    })?;
    let stream = login
        .tls
        .negotiate(stream, &login.addr.host)
        .await
        .map_err(|e| ServerError::Tls {
            addr: addr.to_string(),
            message: e.to_string(),
        })?;
    let mut conn = Conn::with_stream(stream);
    let proto = |source: ConnError| ServerError::Protocol {
        addr: addr.to_string(),
        source,
    };
    let mut params = vec![
        ("user".to_string(), login.user.to_string()),
        ("database".to_string(), login.database.to_string()),
    ];
    params.extend(login.params.iter().cloned());
    // Protocol 3.2 (longer cancel keys) where the server has it: a server older than
    // PostgreSQL 18 answers NegotiateProtocolVersion and the login goes on in 3.0.
    let startup = StartupPacket::Startup { minor: 2, params };
    conn.send(|b| startup.encode(b))
        .await
        .map_err(|e| proto(e.into()))?;

    let mut scram: Option<ScramClient> = None;
    let mut server = ServerConn {
        conn,
        params: Vec::new(),
        pid: 0,
        key: bytes::Bytes::new(),
        peer,
    };
    loop {
        let frame = server
            .conn
            .read_frame(MAX_STARTUP_MESSAGE)
            .await
            .map_err(proto)?;
        let msg = BackendMessage::parse(frame).map_err(|e| proto(e.into()))?;
        match msg {
            BackendMessage::Authentication(auth) => {
                authenticate(&mut server.conn, &mut scram, auth, login, addr).await?
            }
            BackendMessage::ParameterStatus { name, value } => server.params.push((name, value)),
            BackendMessage::BackendKeyData { pid, key } => {
                server.pid = pid;
                server.key = key;
            }
            BackendMessage::NegotiateProtocolVersion { newest_version, .. } => {
                if !((3 << 16)..=(3 << 16 | 2)).contains(&newest_version) {
                    return Err(proto(ConnError::Frame(
                        handoff_protocol::FrameError::Malformed(
                            "the server offered a protocol version handoff did not ask for",
                        ),
                    )));
                }
            }
            BackendMessage::ReadyForQuery(_) => return Ok(server),
            BackendMessage::ErrorResponse(fields) => {
                return Err(ServerError::Rejected {
                    addr: addr.to_string(),
                    fields,
                })
            }
            BackendMessage::NoticeResponse(_) => {}
            other => {
                tracing::debug!(?other, "unexpected message during server login");
                return Err(proto(ConnError::Frame(
                    handoff_protocol::FrameError::Malformed("unexpected message during login"),
                )));
            }
        }
    }
}

/// Answers one Authentication request from the server.
async fn authenticate(
    conn: &mut Conn,
    scram: &mut Option<ScramClient>,
    auth: Authentication,
    login: Login<'_>,
    addr: &str,
) -> Result<(), ServerError> {
    let io = |e: std::io::Error| ServerError::Protocol {
        addr: addr.to_string(),
        source: e.into(),
    };
    let scram_err = |source| ServerError::Scram {
        addr: addr.to_string(),
        source,
    };
    let unsupported = |method: &str| {
        match login.credentials {
        Credentials::None => ServerError::NoPassword {
            addr: addr.to_string(),
            user: login.user.to_string(),
        },
        other => ServerError::Unsupported {
            addr: addr.to_string(),
            what: format!(
                "{method} for user \"{}\", but handoff has {} for it (the client authenticated against a stored secret)",
                login.user,
                other.kind()
            ),
        },
    }
    };
    match auth {
        Authentication::Ok => Ok(()),
        Authentication::CleartextPassword => {
            let Credentials::Password(pw) = login.credentials else {
                return Err(unsupported("a cleartext password"));
            };
            conn.send(|b| encode_password(pw, b)).await.map_err(io)
        }
        Authentication::Md5Password { salt } => {
            let answer = match login.credentials {
                Credentials::Password(pw) => md5_response(login.user, pw, salt),
                Credentials::Md5(secret) => {
                    md5_response_from_secret(secret, salt).ok_or_else(|| unsupported("MD5"))?
                }
                _ => return Err(unsupported("MD5")),
            };
            conn.send(|b| encode_password(&answer, b)).await.map_err(io)
        }
        Authentication::Sasl { mechanisms } => {
            if !mechanisms.iter().any(|m| m == SCRAM_SHA_256) {
                return Err(ServerError::Unsupported {
                    addr: addr.to_string(),
                    what: format!("SASL mechanisms {mechanisms:?}"),
                });
            }
            let (client, first) = match login.credentials {
                Credentials::Password(pw) => ScramClient::new(pw),
                Credentials::Scram(keys) => ScramClient::with_keys(keys.clone()),
                _ => return Err(unsupported("SCRAM-SHA-256")),
            }
            .map_err(scram_err)?;
            *scram = Some(client);
            conn.send(|b| encode_sasl_initial(SCRAM_SHA_256, &first, b))
                .await
                .map_err(io)
        }
        Authentication::SaslContinue { data } => {
            let client = scram
                .as_mut()
                .ok_or(scram_err(AuthError::Malformed("SASLContinue before SASL")))?;
            let fin = client.handle_server_first(&data).map_err(scram_err)?;
            conn.send(|b| encode_sasl_response(&fin, b))
                .await
                .map_err(io)
        }
        Authentication::SaslFinal { data } => scram
            .as_ref()
            .ok_or(scram_err(AuthError::Malformed("SASLFinal before SASL")))?
            .verify_server_final(&data)
            .map_err(scram_err),
        Authentication::Unsupported { code } => Err(ServerError::Unsupported {
            addr: addr.to_string(),
            what: format!("authentication request code {code}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::tls::ServerTls;
    use crate::testing::{Answer, StandIn};
    use handoff_protocol::error::ProxyError;

    fn login<'a>(
        addr: &'a HostPort,
        tls: &'a ServerTls,
        credentials: &'a Credentials,
    ) -> Login<'a> {
        Login {
            addr,
            user: "app",
            database: "app",
            params: &[],
            credentials,
            timeout: Duration::from_secs(2),
            tls,
        }
    }

    #[tokio::test]
    async fn a_trusting_server_gives_its_parameters_and_key() {
        let server = StandIn::start(Answer::Ok).await;
        let tls = ServerTls::default();
        let s = connect(login(&server.addr, &tls, &Credentials::None))
            .await
            .unwrap();
        assert_eq!((s.pid, &s.key[..]), (1, &[0u8, 0, 0, 7][..]));
        assert_eq!(
            s.params,
            vec![("server_version".to_string(), "15.0".to_string())]
        );
    }

    #[tokio::test]
    async fn refusals_keep_the_servers_code_and_missing_passwords_are_named() {
        let refused = StandIn::start(Answer::Refuse(ProxyError::fatal(
            "3D000",
            "database \"app\" does not exist",
        )))
        .await;
        let tls = ServerTls::default();
        match connect(login(&refused.addr, &tls, &Credentials::None)).await {
            Err(e @ ServerError::Rejected { .. }) => {
                assert!(!e.primary_may_be_gone());
                assert_eq!(e.to_client("main").code, "3D000");
            }
            other => panic!("{other:?}"),
        }
        let asks = StandIn::start(Answer::AskPassword).await;
        let e = connect(login(&asks.addr, &tls, &Credentials::None))
            .await
            .unwrap_err();
        assert!(matches!(e, ServerError::NoPassword { .. }), "{e:?}");
        assert!(e.to_string().contains("HANDOFF_USERS"), "{e}");
    }

    #[tokio::test]
    async fn a_silent_server_times_out_and_may_be_gone() {
        let silent = StandIn::start(Answer::Silent).await;
        let tls = ServerTls::default();
        let mut l = login(&silent.addr, &tls, &Credentials::None);
        l.timeout = Duration::from_millis(200);
        let e = connect(l).await.unwrap_err();
        assert!(matches!(e, ServerError::Timeout { .. }), "{e:?}");
        assert!(e.primary_may_be_gone());
    }
}
