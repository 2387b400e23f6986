use super::*;

// RFC 7677 section 3 example exchange.
const CLIENT_NONCE: &str = "rOprNGfwEbeRWgbNEkqO";
const SERVER_FIRST: &str =
    "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
const CLIENT_FINAL: &str = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
const SERVER_FINAL: &str = "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=";

#[test]
fn client_matches_rfc7677_vector() {
    let (mut c, first) = ScramClient::with_nonce("user", "pencil", CLIENT_NONCE.into());
    assert_eq!(first, b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO");
    let fin = c.handle_server_first(SERVER_FIRST.as_bytes()).unwrap();
    assert_eq!(String::from_utf8(fin).unwrap(), CLIENT_FINAL);
    c.verify_server_final(SERVER_FINAL.as_bytes()).unwrap();
    assert_eq!(
        c.verify_server_final(b"v=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="),
        Err(AuthError::BadServerSignature)
    );
    assert_eq!(
        c.verify_server_final(b"e=invalid-proof"),
        Err(AuthError::ServerError("invalid-proof".into()))
    );
}

#[test]
fn client_rejects_foreign_nonce() {
    let (mut c, _) = ScramClient::with_nonce("", "pencil", "abc".into());
    assert_eq!(
        c.handle_server_first(b"r=xyzdef,s=QUJD,i=4096"),
        Err(AuthError::NonceMismatch)
    );
    assert_eq!(
        c.handle_server_first(b"r=abc,s=QUJD,i=4096"),
        Err(AuthError::NonceMismatch),
        "the server must add its own nonce"
    );
}

fn exchange(verifier: ScramVerifier, password: &str) -> Result<(), AuthError> {
    let mut server = ScramServer::new(verifier);
    let (mut client, first) = ScramClient::new(password)?;
    let server_first = server.handle_client_first(&first)?;
    let client_final = client.handle_server_first(&server_first)?;
    let server_final = server.handle_client_final(&client_final)?;
    client.verify_server_final(&server_final)
}

#[test]
fn server_accepts_right_password_and_rejects_wrong_one() {
    let v = ScramVerifier::derive("s3cret", b"0123456789abcdef".to_vec(), 4096);
    exchange(v.clone(), "s3cret").unwrap();
    assert_eq!(exchange(v, "wrong"), Err(AuthError::BadProof));
}

#[test]
fn server_rejects_channel_binding_and_tampering() {
    let v = ScramVerifier::derive("pw", b"salt".to_vec(), 64);
    let mut s = ScramServer::new(v.clone());
    assert_eq!(
        s.handle_client_first(b"p=tls-server-end-point,,n=,r=abc"),
        Err(AuthError::ChannelBinding)
    );
    let mut s = ScramServer::new(v.clone());
    assert!(s.handle_client_final(b"c=biws,r=x,p=AAAA").is_err());
    let mut s = ScramServer::new(v);
    let first = s.handle_client_first(b"n,,n=,r=abc").unwrap();
    let nonce = std::str::from_utf8(&first)
        .unwrap()
        .split(',')
        .next()
        .unwrap()[2..]
        .to_string();
    // Wrong gs2 header echoed back.
    let msg = format!("c=eSws,r={nonce},p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=");
    assert_eq!(
        s.handle_client_final(msg.as_bytes()),
        Err(AuthError::ChannelBinding)
    );
    // Right header, wrong proof.
    let msg = format!("c=biws,r={nonce},p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=");
    assert_eq!(
        s.handle_client_final(msg.as_bytes()),
        Err(AuthError::BadProof)
    );
    // Nonce changed.
    let msg = "c=biws,r=abcX,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
    assert_eq!(
        s.handle_client_final(msg.as_bytes()),
        Err(AuthError::NonceMismatch)
    );
}

#[test]
fn verifier_round_trips_postgres_format() {
    let v = ScramVerifier::derive("pencil", b"W22ZaJ0SNY7soEsU".to_vec(), 4096);
    let text = v.to_postgres_string();
    assert!(text.starts_with("SCRAM-SHA-256$4096:"));
    assert_eq!(ScramVerifier::parse(&text).unwrap(), v);
    // A verifier parsed from text authenticates the password it came from.
    exchange(ScramVerifier::parse(&text).unwrap(), "pencil").unwrap();
    for bad in [
        "md5abc",
        "SCRAM-SHA-256$x:AAAA$AAAA:AAAA",
        "SCRAM-SHA-256$0:AAAA$AAAA:AAAA",
        "SCRAM-SHA-256$4096:AAAA$AAAA:AAAA",
        "SCRAM-SHA-256$4096:AAAA",
    ] {
        assert!(ScramVerifier::parse(bad).is_err(), "{bad}");
    }
}

#[test]
fn md5_response_matches_postgres() {
    // Computed independently: md5(md5("secret" + "postgres").hex + salt).
    assert_eq!(
        md5_response("postgres", "secret", [1, 2, 3, 4]),
        "md5bb41a296aab6baccb36ff243a562abff"
    );
}

#[test]
fn keys_learnt_from_a_client_log_in_to_a_server_with_the_same_verifier() {
    let v = ScramVerifier::derive("pass-through", b"0123456789abcdef".to_vec(), 4096);
    // The client authenticates to the proxy...
    let mut proxy = ScramServer::new(v.clone());
    assert!(proxy.keys().is_none());
    let (mut client, first) = ScramClient::new("pass-through").unwrap();
    let sf = proxy.handle_client_first(&first).unwrap();
    let cf = client.handle_server_first(&sf).unwrap();
    proxy.handle_client_final(&cf).unwrap();
    let keys = proxy.keys().expect("known after a good proof");
    // ...and the proxy logs in to a server keeping the same verifier with the keys.
    let mut server = ScramServer::new(v);
    let (mut as_client, first) = ScramClient::with_keys(keys.clone()).unwrap();
    let sf = server.handle_client_first(&first).unwrap();
    let cf = as_client.handle_server_first(&sf).unwrap();
    let fin = server.handle_client_final(&cf).unwrap();
    as_client.verify_server_final(&fin).unwrap();
    // Another verifier (the password changed on the server) refuses them.
    let other = ScramVerifier::derive("changed", b"0123456789abcdef".to_vec(), 4096);
    let mut server = ScramServer::new(other);
    let (mut as_client, first) = ScramClient::with_keys(keys).unwrap();
    let sf = server.handle_client_first(&first).unwrap();
    let cf = as_client.handle_server_first(&sf).unwrap();
    assert_eq!(server.handle_client_final(&cf), Err(AuthError::BadProof));
}

#[test]
fn md5_from_the_stored_secret_equals_md5_from_the_password() {
    let secret = md5_secret("postgres", "secret");
    assert_eq!(
        md5_response_from_secret(&secret, [1, 2, 3, 4]).unwrap(),
        md5_response("postgres", "secret", [1, 2, 3, 4])
    );
    assert!(md5_response_from_secret("md5xyz", [0; 4]).is_none());
    assert!(md5_response_from_secret("SCRAM-SHA-256$1:a$b:c", [0; 4]).is_none());
}
