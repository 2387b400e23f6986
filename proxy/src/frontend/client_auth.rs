//! Client authentication: SCRAM-SHA-256 against a user's SCRAM secret (or the one
//! derived from its password), MD5 against an MD5 secret, or none at all when no source
//! of users is configured (allowed on a loopback listen address only). What the
//! exchange yields is what handoff logs in to the server with.

use handoff_protocol::auth::{
    md5_response_from_secret, secrets_equal, AuthError, ScramServer, ScramVerifier, SCRAM_SHA_256,
};
use handoff_protocol::backend::{Authentication, BackendMessage};
use handoff_protocol::error::ProxyError;
use handoff_protocol::frontend::{parse_sasl_initial, tag};
use handoff_protocol::sqlstate;

use crate::backend::login::Credentials;
use crate::error::ConnError;
use crate::frontend::users::Secret;
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

/// Authenticates the client against `secret` and returns what handoff logs in to the
/// server with. `secret` is `None` for an unknown user: SCRAM then runs against
/// `decoy` and always fails, so an attacker cannot tell unknown users from wrong
/// passwords.
pub async fn authenticate(
    client: &mut Conn,
    user: &str,
    secret: Option<&Secret>,
    decoy: &ScramVerifier,
) -> Result<Credentials, Failure> {
    match secret {
        Some(Secret::Md5(stored)) => {
            md5(client, user, stored).await?;
            Ok(Credentials::Md5(stored.clone()))
        }
        Some(Secret::Password { password, verifier }) => {
            scram(client, user, Some(verifier), decoy).await?;
            Ok(Credentials::Password(password.clone()))
        }
        Some(Secret::Scram(verifier)) => {
            let keys = scram(client, user, Some(verifier), decoy).await?;
            Ok(keys.map(Credentials::Scram).unwrap_or_default())
        }
        None => scram(client, user, None, decoy)
            .await
            .map(|_| Credentials::None),
    }
}

/// MD5 with the client, checked against the stored secret.
async fn md5(client: &mut Conn, user: &str, stored: &str) -> Result<(), Failure> {
    let mut salt = [0u8; 4];
    getrandom::getrandom(&mut salt).map_err(|_| {
        Failure::Refuse(ProxyError::fatal(
            sqlstate::INTERNAL_ERROR,
            "no randomness for the MD5 salt",
        ))
    })?;
    client
        .send(|b| BackendMessage::Authentication(Authentication::Md5Password { salt }).encode(b))
        .await
        .map_err(ConnError::from)?;
    let answer = expect_password_message(client).await?;
    let answer =
        handoff_protocol::frontend::parse_password(&answer.body).map_err(ConnError::from)?;
    let want = md5_response_from_secret(stored, salt).ok_or_else(|| auth_failed(user))?;
    if secrets_equal(answer.as_bytes(), want.as_bytes()) {
        Ok(())
    } else {
        Err(auth_failed(user))
    }
}

/// SCRAM-SHA-256 with the client; the keys it yields (see [`ScramServer::keys`]).
async fn scram(
    client: &mut Conn,
    user: &str,
    verifier: Option<&ScramVerifier>,
    decoy: &ScramVerifier,
) -> Result<Option<handoff_protocol::auth::ScramKeys>, Failure> {
    let known = verifier.is_some();
    let verifier = verifier.unwrap_or(decoy).clone();
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
    if !known {
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
    Ok(server.keys())
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
