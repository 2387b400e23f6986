//! Client authentication: SCRAM-SHA-256 against `HANDOFF_USERS`, or none at all when
//! `HANDOFF_USERS` is unset (allowed on a loopback listen address only).

use handoff_protocol::auth::{AuthError, ScramServer, ScramVerifier, SCRAM_SHA_256};
use handoff_protocol::backend::{Authentication, BackendMessage};
use handoff_protocol::error::ProxyError;
use handoff_protocol::frontend::{parse_sasl_initial, tag};
use handoff_protocol::sqlstate;

use crate::config::UserSecret;
use crate::error::ConnError;
use crate::net::stream::{Conn, MAX_STARTUP_MESSAGE};

/// How a login attempt ended, when it did not succeed.
#[derive(Debug)]
pub enum Failure {
    /// Tell the client this, then close.
    Refuse(ProxyError),
    /// The client went away; nothing to say.
    Gone,
}

impl From<ConnError> for Failure {
    fn from(e: ConnError) -> Self {
        match e {
            ConnError::Frame(f) => Failure::Refuse(ProxyError::fatal(
                sqlstate::PROTOCOL_VIOLATION,
                format!("invalid message during authentication: {f}"),
            )),
            ConnError::Eof | ConnError::Io(_) => Failure::Gone,
        }
    }
}

fn auth_failed(user: &str) -> Failure {
    Failure::Refuse(ProxyError::fatal(
        sqlstate::INVALID_PASSWORD,
        format!("password authentication failed for user \"{user}\""),
    ))
}

/// Runs SCRAM-SHA-256 with the client. `secret` is `None` for an unknown user: the
/// exchange then runs against `decoy` and always fails, so an attacker cannot tell
/// unknown users from wrong passwords.
pub async fn scram(
    client: &mut Conn,
    user: &str,
    secret: Option<&UserSecret>,
    decoy: &ScramVerifier,
) -> Result<(), Failure> {
    let verifier = secret
        .map(|s| s.verifier.clone())
        .unwrap_or_else(|| decoy.clone());
    client
        .send(|b| {
            BackendMessage::Authentication(Authentication::Sasl {
                mechanisms: vec![SCRAM_SHA_256.to_string()],
            })
            .encode(b)
        })
        .await
        .map_err(ConnError::from)?;

    let first = expect_password_message(client).await?;
    let (mechanism, data) = parse_sasl_initial(&first.body).map_err(ConnError::from)?;
    if mechanism != SCRAM_SHA_256 {
        return Err(Failure::Refuse(ProxyError::fatal(
            sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
            format!("client selected an invalid SASL authentication mechanism \"{mechanism}\""),
        )));
    }
    let mut server = ScramServer::new(verifier);
    let server_first = server
        .handle_client_first(&data)
        .map_err(|e| scram_failure(e, user))?;
    client
        .send(|b| {
            BackendMessage::Authentication(Authentication::SaslContinue {
                data: server_first.into(),
            })
            .encode(b)
        })
        .await
        .map_err(ConnError::from)?;

    let fin = expect_password_message(client).await?;
    let server_final = server
        .handle_client_final(&fin.body)
        .map_err(|e| scram_failure(e, user))?;
    if secret.is_none() {
        return Err(auth_failed(user));
    }
    client
        .send(|b| {
            BackendMessage::Authentication(Authentication::SaslFinal {
                data: server_final.into(),
            })
            .encode(b)
        })
        .await
        .map_err(ConnError::from)?;
    Ok(())
}

fn scram_failure(e: AuthError, user: &str) -> Failure {
    match e {
        AuthError::BadProof => auth_failed(user),
        other => Failure::Refuse(ProxyError::fatal(
            sqlstate::PROTOCOL_VIOLATION,
            format!("invalid SCRAM exchange: {other}"),
        )),
    }
}

async fn expect_password_message(client: &mut Conn) -> Result<handoff_protocol::Frame, Failure> {
    let frame = client.read_frame(MAX_STARTUP_MESSAGE).await?;
    if frame.tag != tag::PASSWORD {
        return Err(Failure::Refuse(ProxyError::fatal(
            sqlstate::PROTOCOL_VIOLATION,
            format!(
                "expected SASL response, got message type 0x{:02x}",
                frame.tag
            ),
        )));
    }
    Ok(frame)
}
