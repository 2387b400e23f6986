//! Authentication exchanges: SCRAM-SHA-256 as client and as server, MD5, and the stored
//! SCRAM verifier format PostgreSQL uses (`SCRAM-SHA-256$iter:salt$StoredKey:ServerKey`).
//!
//! Primitives come from RustCrypto (`sha2`, `hmac`, `pbkdf2`, `md-5`); secrets are compared
//! in constant time with `subtle`. Passwords are used as given (no SASLprep), which is what
//! PostgreSQL does too for passwords that SASLprep would reject.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use md5::Md5;
use sha2::{Digest, Sha256};
use std::fmt::Write as _;
use subtle::ConstantTimeEq;

/// The only SASL mechanism the proxy offers and uses.
pub const SCRAM_SHA_256: &str = "SCRAM-SHA-256";
/// Iterations used when the proxy derives a verifier from a plain password.
pub const DEFAULT_ITERATIONS: u32 = 4096;

type HmacSha256 = Hmac<Sha256>;

/// Why an authentication exchange failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error("SCRAM nonce does not match")]
    NonceMismatch,
    #[error("channel binding is not supported")]
    ChannelBinding,
    #[error("password authentication failed")]
    BadProof,
    #[error("server signature does not match: the server does not know the password")]
    BadServerSignature,
    #[error("the server reported a SCRAM error: {0}")]
    ServerError(String),
    #[error("invalid SCRAM verifier: {0}")]
    BadVerifier(&'static str),
    #[error("no randomness available")]
    Random,
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

fn salted_password(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let mut out = [0u8; 32];
    pbkdf2::pbkdf2_hmac::<Sha256>(password, salt, iterations, &mut out);
    out
}

fn random_nonce() -> Result<String, AuthError> {
    let mut nonce = String::with_capacity(24);
    push_random_nonce(&mut nonce)?;
    Ok(nonce)
}

/// Appends 18 random bytes in base64 (24 characters) to `out`.
fn push_random_nonce(out: &mut String) -> Result<(), AuthError> {
    let mut raw = [0u8; 18];
    getrandom::getrandom(&mut raw).map_err(|_| AuthError::Random)?;
    B64.encode_string(raw, out);
    Ok(())
}

fn xor(a: &[u8; 32], b: &[u8; 32]) -> [u8; 32] {
    let mut out = [0u8; 32];
    for i in 0..32 {
        out[i] = a[i] ^ b[i];
    }
    out
}

/// Splits `k=value` attributes of a SCRAM message, checking their order.
fn attrs<const N: usize>(msg: &str, keys: [char; N]) -> Result<[&str; N], AuthError> {
    let mut values = [""; N];
    let mut parts = msg.split(',');
    for (k, value) in keys.into_iter().zip(&mut values) {
        let p = parts
            .next()
            .ok_or(AuthError::Malformed("missing attributes"))?;
        *value = p
            .strip_prefix(k)
            .and_then(|r| r.strip_prefix('='))
            .ok_or(AuthError::Malformed("unexpected attribute"))?;
    }
    Ok(values)
}

/// A stored SCRAM-SHA-256 secret: what a server keeps instead of the password.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramVerifier {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl std::fmt::Debug for ScramVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScramVerifier(..)")
    }
}

impl ScramVerifier {
    /// Derives a verifier from a password with a fresh random salt.
    pub fn from_password(password: &str) -> Result<Self, AuthError> {
        let mut salt = vec![0u8; 16];
        getrandom::getrandom(&mut salt).map_err(|_| AuthError::Random)?;
        Ok(Self::derive(password, salt, DEFAULT_ITERATIONS))
    }

    /// Derives a verifier from a password, salt and iteration count.
    pub fn derive(password: &str, salt: Vec<u8>, iterations: u32) -> Self {
        let salted = salted_password(password.as_bytes(), &salt, iterations);
        let client_key = hmac(&salted, b"Client Key");
        Self {
            iterations,
            salt,
            stored_key: Sha256::digest(client_key).into(),
            server_key: hmac(&salted, b"Server Key"),
        }
    }

    /// Parses PostgreSQL's `SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>` form.
    pub fn parse(s: &str) -> Result<Self, AuthError> {
        let rest = s
            .strip_prefix("SCRAM-SHA-256$")
            .ok_or(AuthError::BadVerifier("must start with SCRAM-SHA-256$"))?;
        let (params, keys) = rest
            .split_once('$')
            .ok_or(AuthError::BadVerifier("missing '$' before the keys"))?;
        let (iter, salt) = params.split_once(':').ok_or(AuthError::BadVerifier(
            "missing ':' between iterations and salt",
        ))?;
        let (stored, server) = keys
            .split_once(':')
            .ok_or(AuthError::BadVerifier("missing ':' between the keys"))?;
        let iterations: u32 = iter
            .parse()
            .map_err(|_| AuthError::BadVerifier("iteration count is not a number"))?;
        if iterations == 0 {
            return Err(AuthError::BadVerifier("iteration count must be positive"));
        }
        let salt = B64
            .decode(salt)
            .map_err(|_| AuthError::BadVerifier("salt is not base64"))?;
        let key = |k: &str| -> Result<[u8; 32], AuthError> {
            B64.decode(k)
                .ok()
                .and_then(|v| <[u8; 32]>::try_from(v.as_slice()).ok())
                .ok_or(AuthError::BadVerifier("keys must be 32 bytes of base64"))
        };
        Ok(Self {
            iterations,
            salt,
            stored_key: key(stored)?,
            server_key: key(server)?,
        })
    }

    /// Formats the verifier the way PostgreSQL stores it.
    pub fn to_postgres_string(&self) -> String {
        format!(
            "SCRAM-SHA-256${}:{}${}:{}",
            self.iterations,
            B64.encode(&self.salt),
            B64.encode(self.stored_key),
            B64.encode(self.server_key)
        )
    }
}

/// The two keys a SCRAM-SHA-256 exchange lets a proxy in the middle learn: the
/// ClientKey (from the client's proof) and the ServerKey (from the stored verifier).
/// With them the proxy logs in to a server that keeps the same verifier without ever
/// knowing the password (PgBouncer's SCRAM pass-through).
#[derive(Clone, PartialEq, Eq)]
pub struct ScramKeys {
    pub client_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl std::fmt::Debug for ScramKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScramKeys(..)")
    }
}

/// What a [`ScramClient`] proves knowledge of.
#[derive(Clone)]
enum ClientSecret {
    Password(String),
    Keys(ScramKeys),
}

/// The client side of SCRAM-SHA-256 (the proxy authenticating to a server).
pub struct ScramClient {
    secret: ClientSecret,
    client_first_bare: String,
    nonce: String,
    /// Set once the server's first message is handled: expected server signature.
    server_signature: Option<[u8; 32]>,
}

impl std::fmt::Debug for ScramClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScramClient(..)")
    }
}

impl ScramClient {
    /// Starts an exchange; returns the client and its client-first message.
    pub fn new(password: &str) -> Result<(Self, Vec<u8>), AuthError> {
        Ok(Self::with_nonce("", password, random_nonce()?))
    }

    /// Starts an exchange with a given user name and nonce. PostgreSQL ignores the name
    /// (it uses the startup packet's), so [`ScramClient::new`] sends an empty one.
    pub fn with_nonce(user: &str, password: &str, nonce: String) -> (Self, Vec<u8>) {
        Self::start(user, ClientSecret::Password(password.to_string()), nonce)
    }

    /// Starts an exchange proving knowledge of `keys` instead of a password; the
    /// server's salt and iteration count are then not used.
    pub fn with_keys(keys: ScramKeys) -> Result<(Self, Vec<u8>), AuthError> {
        Ok(Self::start("", ClientSecret::Keys(keys), random_nonce()?))
    }

    fn start(user: &str, secret: ClientSecret, nonce: String) -> (Self, Vec<u8>) {
        let client_first_bare = format!("n={user},r={nonce}");
        let first = format!("n,,{client_first_bare}").into_bytes();
        let client = Self {
            secret,
            client_first_bare,
            nonce,
            server_signature: None,
        };
        (client, first)
    }

    /// Handles server-first; returns client-final.
    pub fn handle_server_first(&mut self, data: &[u8]) -> Result<Vec<u8>, AuthError> {
        let server_first =
            std::str::from_utf8(data).map_err(|_| AuthError::Malformed("not UTF-8"))?;
        let a = attrs(server_first, ['r', 's', 'i'])?;
        let (nonce, salt, iter) = (a[0], a[1], a[2]);
        if !nonce.starts_with(&self.nonce) || nonce.len() == self.nonce.len() {
            return Err(AuthError::NonceMismatch);
        }
        let salt = B64
            .decode(salt)
            .map_err(|_| AuthError::Malformed("salt is not base64"))?;
        let iterations: u32 = iter
            .parse()
            .map_err(|_| AuthError::Malformed("bad iteration count"))?;
        if iterations == 0 {
            return Err(AuthError::Malformed("bad iteration count"));
        }
        let (client_key, server_key) = match &self.secret {
            ClientSecret::Password(password) => {
                let salted = salted_password(password.as_bytes(), &salt, iterations);
                (hmac(&salted, b"Client Key"), hmac(&salted, b"Server Key"))
            }
            ClientSecret::Keys(k) => (k.client_key, k.server_key),
        };
        let stored_key: [u8; 32] = Sha256::digest(client_key).into();
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{},{server_first},{without_proof}", self.client_first_bare);
        let proof = xor(&client_key, &hmac(&stored_key, auth_message.as_bytes()));
        self.server_signature = Some(hmac(&server_key, auth_message.as_bytes()));
        Ok(format!("{without_proof},p={}", B64.encode(proof)).into_bytes())
    }

    /// Checks server-final: the server proves it knows the verifier.
    pub fn verify_server_final(&self, data: &[u8]) -> Result<(), AuthError> {
        let s = std::str::from_utf8(data).map_err(|_| AuthError::Malformed("not UTF-8"))?;
        if let Some(e) = s.strip_prefix("e=") {
            return Err(AuthError::ServerError(e.to_string()));
        }
        let v = s
            .split(',')
            .next()
            .and_then(|a| a.strip_prefix("v="))
            .ok_or(AuthError::Malformed("missing server signature"))?;
        let got = B64
            .decode(v)
            .map_err(|_| AuthError::Malformed("signature is not base64"))?;
        let want = self
            .server_signature
            .ok_or(AuthError::Malformed("server-final before server-first"))?;
        if bool::from(got.as_slice().ct_eq(&want)) {
            Ok(())
        } else {
            Err(AuthError::BadServerSignature)
        }
    }
}

/// The server side of SCRAM-SHA-256 (the proxy authenticating a client).
pub struct ScramServer {
    verifier: ScramVerifier,
    /// client-first-bare + "," + server-first, once the first round is done.
    transcript: Option<String>,
    nonce: String,
    gs2_header: String,
    /// The client's ClientKey, once its proof checked out.
    client_key: Option<[u8; 32]>,
}

impl std::fmt::Debug for ScramServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScramServer(..)")
    }
}

impl ScramServer {
    pub fn new(verifier: ScramVerifier) -> Self {
        Self {
            verifier,
            transcript: None,
            nonce: String::new(),
            gs2_header: String::new(),
            client_key: None,
        }
    }

    /// After a successful exchange: the keys that log in to a server keeping the same
    /// verifier.
    pub fn keys(&self) -> Option<ScramKeys> {
        self.client_key.map(|client_key| ScramKeys {
            client_key,
            server_key: self.verifier.server_key,
        })
    }

    /// Handles client-first; returns server-first.
    pub fn handle_client_first(&mut self, data: &[u8]) -> Result<Vec<u8>, AuthError> {
        let s = std::str::from_utf8(data).map_err(|_| AuthError::Malformed("not UTF-8"))?;
        let (cb, rest) = s
            .split_once(',')
            .ok_or(AuthError::Malformed("missing GS2 header"))?;
        match cb {
            "n" | "y" => {}
            c if c.starts_with("p=") => return Err(AuthError::ChannelBinding),
            _ => return Err(AuthError::Malformed("bad channel-binding flag")),
        }
        let (authzid, bare) = rest
            .split_once(',')
            .ok_or(AuthError::Malformed("missing GS2 header"))?;
        if !authzid.is_empty() {
            return Err(AuthError::Malformed(
                "authorization identity is not supported",
            ));
        }
        let a = attrs(bare, ['n', 'r'])?;
        let client_nonce = a[1];
        if client_nonce.is_empty() || client_nonce.contains(',') {
            return Err(AuthError::Malformed("bad client nonce"));
        }
        self.gs2_header = format!("{cb},{authzid},");
        // Each string made at its final size: a login does this once per client.
        let mut nonce = String::with_capacity(client_nonce.len() + 24);
        nonce.push_str(client_nonce);
        push_random_nonce(&mut nonce)?;
        self.nonce = nonce;
        let salt_len = self.verifier.salt.len().div_ceil(3) * 4;
        let mut server_first = String::with_capacity(self.nonce.len() + salt_len + 20);
        server_first.push_str("r=");
        server_first.push_str(&self.nonce);
        server_first.push_str(",s=");
        B64.encode_string(&self.verifier.salt, &mut server_first);
        let _ = write!(server_first, ",i={}", self.verifier.iterations);
        let mut transcript = String::with_capacity(bare.len() + 1 + server_first.len());
        transcript.push_str(bare);
        transcript.push(',');
        transcript.push_str(&server_first);
        self.transcript = Some(transcript);
        Ok(server_first.into_bytes())
    }

    /// Handles client-final; returns server-final when the proof is right.
    pub fn handle_client_final(&mut self, data: &[u8]) -> Result<Vec<u8>, AuthError> {
        let s = std::str::from_utf8(data).map_err(|_| AuthError::Malformed("not UTF-8"))?;
        let transcript = self
            .transcript
            .as_ref()
            .ok_or(AuthError::Malformed("client-final before client-first"))?;
        let (without_proof, proof) = s
            .rsplit_once(",p=")
            .ok_or(AuthError::Malformed("missing proof"))?;
        let a = attrs(without_proof, ['c', 'r'])?;
        let binding = B64
            .decode(a[0])
            .map_err(|_| AuthError::Malformed("channel binding is not base64"))?;
        if binding != self.gs2_header.as_bytes() {
            return Err(AuthError::ChannelBinding);
        }
        if a[1] != self.nonce {
            return Err(AuthError::NonceMismatch);
        }
        let proof: [u8; 32] = B64
            .decode(proof)
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or(AuthError::Malformed("proof must be 32 bytes of base64"))?;
        let mut auth_message = String::with_capacity(transcript.len() + 1 + without_proof.len());
        auth_message.push_str(transcript);
        auth_message.push(',');
        auth_message.push_str(without_proof);
        let signature = hmac(&self.verifier.stored_key, auth_message.as_bytes());
        let client_key = xor(&proof, &signature);
        let stored: [u8; 32] = Sha256::digest(client_key).into();
        if !bool::from(stored.ct_eq(&self.verifier.stored_key)) {
            return Err(AuthError::BadProof);
        }
        self.client_key = Some(client_key);
        let server_sig = hmac(&self.verifier.server_key, auth_message.as_bytes());
        let mut server_final = String::with_capacity(46);
        server_final.push_str("v=");
        B64.encode_string(server_sig, &mut server_final);
        Ok(server_final.into_bytes())
    }
}

/// The response to an MD5 password challenge: `"md5" + md5(md5(password + user) + salt)`.
pub fn md5_response(user: &str, password: &str, salt: [u8; 4]) -> String {
    let inner = hex(&Md5::digest(
        [password.as_bytes(), user.as_bytes()].concat(),
    ));
    let outer = Md5::digest([inner.as_bytes(), &salt[..]].concat());
    format!("md5{}", hex(&outer))
}

/// PostgreSQL's stored MD5 secret for a password: `"md5" + md5(password + user)`.
pub fn md5_secret(user: &str, password: &str) -> String {
    format!(
        "md5{}",
        hex(&Md5::digest(
            [password.as_bytes(), user.as_bytes()].concat()
        ))
    )
}

/// The response to an MD5 challenge computed from the stored secret (`md5` and 32 hex
/// digits) rather than the password: what a proxy holding only the secret answers a
/// server with, and what it expects from a client. `None` if `secret` is not one.
pub fn md5_response_from_secret(secret: &str, salt: [u8; 4]) -> Option<String> {
    let inner = secret.strip_prefix("md5")?;
    if inner.len() != 32 || !inner.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let inner = inner.to_ascii_lowercase();
    let outer = Md5::digest([inner.as_bytes(), &salt[..]].concat());
    Some(format!("md5{}", hex(&outer)))
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// Compares two secrets in constant time.
pub fn secrets_equal(a: &[u8], b: &[u8]) -> bool {
    bool::from(a.ct_eq(b))
}

#[cfg(test)]
mod tests;
