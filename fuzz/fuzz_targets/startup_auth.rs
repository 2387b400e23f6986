//! The startup and authentication exchange a client drives: startup packets, password
//! and SASL messages, SCRAM client-first/client-final against a server verifier, and
//! stored verifiers as written in HANDOFF_USERS.
#![no_main]

use std::sync::OnceLock;

use bytes::{Bytes, BytesMut};
use handoff_protocol::auth::{ScramServer, ScramVerifier};
use handoff_protocol::framing::decode_startup;
use handoff_protocol::frontend::{parse_password, parse_sasl_initial};
use libfuzzer_sys::fuzz_target;

fn verifier() -> &'static ScramVerifier {
    static V: OnceLock<ScramVerifier> = OnceLock::new();
    // Few iterations: the fuzzer should spend its time in parsing, not PBKDF2.
    V.get_or_init(|| ScramVerifier::derive("secret", b"0123456789abcdef".to_vec(), 16))
}

fuzz_target!(|data: &[u8]| {
    // Split the input into four parts at 0xFF bytes.
    let mut parts = data.splitn(4, |&b| b == 0xff);
    let startup = parts.next().unwrap_or_default();
    let first = parts.next().unwrap_or_default();
    let fin = parts.next().unwrap_or_default();
    let rest = parts.next().unwrap_or_default();

    let mut buf = BytesMut::from(startup);
    while let Ok(Some(_)) = decode_startup(&mut buf) {}

    let body = Bytes::copy_from_slice(first);
    let _ = parse_password(&body);
    let mut server = ScramServer::new(verifier().clone());
    let client_first = match parse_sasl_initial(&body) {
        Ok((_, data)) => data.to_vec(),
        Err(_) => first.to_vec(),
    };
    if server.handle_client_first(&client_first).is_ok() {
        // A proof that verifies without the password would be a break: the fuzzer
        // does not know it, so a successful final is a finding.
        assert!(
            server.handle_client_final(fin).is_err(),
            "proof accepted without the password"
        );
    }
    if let Ok(s) = std::str::from_utf8(rest) {
        if let Ok(v) = ScramVerifier::parse(s) {
            let again = ScramVerifier::parse(&v.to_postgres_string()).expect("round trip");
            assert_eq!(again.to_postgres_string(), v.to_postgres_string());
        }
    }
});
