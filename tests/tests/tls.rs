//! TLS on both sides: clients to handoff (`HANDOFF_TLS_*`, with a reload of the
//! certificate) and handoff to a PostgreSQL server running with `ssl=on`
//! (`HANDOFF_SERVER_TLS*`), with certificates from a CA made in the test.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use handoff_tests::tls::{MakeRustls, TestCa};
use handoff_tests::{conn_str, start_proxy, Cluster};
use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// Turns on `ssl` on the primary with a certificate from `ca` for `names`.
fn enable_server_ssl(cluster: &Cluster, ca: &TestCa, names: &[&str]) {
    enable_ssl_on(cluster, &cluster.primary, ca, names);
}

/// Turns on `ssl` on `p` (a standby too: `ALTER SYSTEM` writes a file, not WAL).
fn enable_ssl_on(cluster: &Cluster, p: &handoff_tests::Node, ca: &TestCa, names: &[&str]) {
    let (cert, key) = ca.issue(names).unwrap();
    let dir = cluster.dir();
    let cert = write(dir, &format!("{}.crt", p.name), &cert);
    let key = write(dir, &format!("{}.key", p.name), &key);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    for f in [&cert, &key] {
        cluster.bin.give_to_server_user(f).unwrap();
    }
    p.psql(&format!(
        "ALTER SYSTEM SET ssl_cert_file = '{}'",
        cert.display()
    ))
    .unwrap();
    p.psql(&format!(
        "ALTER SYSTEM SET ssl_key_file = '{}'",
        key.display()
    ))
    .unwrap();
    p.psql("ALTER SYSTEM SET ssl = on").unwrap();
    p.psql("SELECT pg_reload_conf()").unwrap();
    std::thread::sleep(Duration::from_millis(300));
}

/// handoff with TLS both ways: to clients with a certificate for "localhost" from `ca`
/// (`proxy.crt`, `proxy.key` in the returned directory), to servers verified against
/// `ca`; `extra` adds variables.
async fn tls_both_ways(
    cluster: &Cluster,
    ca: &TestCa,
    extra: &[(&str, &str)],
) -> (handoff::Proxy, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let ca_file = write(dir.path(), "ca.pem", &ca.cert_pem);
    let (cert, key) = ca.issue(&["localhost"]).unwrap();
    let cert_file = write(dir.path(), "proxy.crt", &cert);
    let key_file = write(dir.path(), "proxy.key", &key);
    let mut vars = vec![
        ("HANDOFF_TLS_MODE", "require"),
        ("HANDOFF_TLS_CERT", cert_file.to_str().unwrap()),
        ("HANDOFF_TLS_KEY", key_file.to_str().unwrap()),
        ("HANDOFF_SERVER_TLS", "verify-full"),
        ("HANDOFF_SERVER_TLS_CA", ca_file.to_str().unwrap()),
    ];
    vars.extend_from_slice(extra);
    let proxy = start_proxy(cluster, &vars).await.unwrap();
    (proxy, dir)
}

async fn tls_client(
    proxy: &handoff::Proxy,
    ca_pem: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    // The proxy's certificate is for "localhost": connect by that name.
    let url = format!(
        "host=localhost port={} user=postgres dbname=postgres sslmode=require connect_timeout=10",
        proxy.listen_addr().port()
    );
    let (c, conn) = tokio_postgres::connect(&url, MakeRustls::trusting(ca_pem).unwrap()).await?;
    tokio::spawn(conn);
    Ok(c)
}

fn db_message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_else(|| format!("{e:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_over_tls_reaches_its_standby_over_tls() {
    let cluster = Cluster::start(1).unwrap();
    let ca = TestCa::new("handoff test CA").unwrap();
    enable_server_ssl(&cluster, &ca, &["localhost", "127.0.0.1"]);
    enable_ssl_on(
        &cluster,
        &cluster.standbys[0],
        &ca,
        &["localhost", "127.0.0.1"],
    );
    let (proxy, _files) = tls_both_ways(
        &cluster,
        &ca,
        &[("HANDOFF_REPLICA_CHECK_INTERVAL", "100ms")],
    )
    .await;
    // The replica check itself logs in over verified TLS.
    handoff_tests::admin::wait_in_rotation(&proxy, &[cluster.standbys[0].addr()], true).await;
    let url = format!(
        "host=localhost port={} user=postgres dbname=postgres@replica sslmode=require connect_timeout=10",
        proxy.listen_addr().port()
    );
    let (c, conn) = tokio_postgres::connect(&url, MakeRustls::trusting(&ca.cert_pem).unwrap())
        .await
        .unwrap();
    tokio::spawn(conn);
    let row = c
        .query_one(
            "select ssl, pg_is_in_recovery() from pg_stat_ssl where pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, bool>(0), row.get::<_, bool>(1)),
        (true, true),
        "a TLS connection to the standby"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_clients_and_servers_with_a_certificate_reload() {
    let cluster = Cluster::start(0).unwrap();
    let ca = TestCa::new("handoff test CA").unwrap();
    enable_server_ssl(&cluster, &ca, &["localhost", "127.0.0.1"]);
    let (proxy, files) = tls_both_ways(&cluster, &ca, &[]).await;
    let (cert_file, key_file) = (
        files.path().join("proxy.crt"),
        files.path().join("proxy.key"),
    );

    // TLS client → handoff → TLS server: the server sees its connection encrypted.
    let c = tls_client(&proxy, &ca.cert_pem).await.unwrap();
    let row = c
        .query_one(
            "select ssl from pg_stat_ssl where pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    assert!(
        row.get::<_, bool>(0),
        "handoff's server connection is not TLS"
    );
    // Prepared statements and a 1 MB result through both TLS layers.
    let stmt = c.prepare("select repeat('x', $1)").await.unwrap();
    for n in [1i32, 100_000, 1_000_000] {
        let s: String = c.query_one(&stmt, &[&n]).await.unwrap().get(0);
        assert_eq!(s.len(), n as usize);
    }

    // A plaintext client is refused with a clear error.
    let plain = conn_str(&proxy.listen_addr(), "postgres", "postgres", None);
    let err = tokio_postgres::connect(&format!("{plain} sslmode=disable"), NoTls)
        .await
        .err()
        .unwrap();
    assert_eq!(
        err.code(),
        Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION),
        "{err:?}"
    );
    assert!(
        db_message(&err).contains("HANDOFF_TLS_MODE=require"),
        "{err:?}"
    );

    // psql with sslmode=require.
    let out = std::process::Command::new(cluster.bin.bin("psql"))
        .args(["-X", "-A", "-t", "-c", "select 40 + 2"])
        .arg(format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres sslmode=require",
            proxy.listen_addr().port()
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "psql: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42");

    // A new certificate from another CA, installed by reload: new clients see it, the
    // established one goes on.
    let ca2 = TestCa::new("handoff test CA 2").unwrap();
    assert!(tls_client(&proxy, &ca2.cert_pem).await.is_err());
    let (cert2, key2) = ca2.issue(&["localhost"]).unwrap();
    std::fs::write(&cert_file, cert2).unwrap();
    std::fs::write(&key_file, key2).unwrap();
    proxy.reload_tls().unwrap();
    let c2 = tls_client(&proxy, &ca2.cert_pem).await.unwrap();
    c2.simple_query("select 1").await.unwrap();
    assert!(tls_client(&proxy, &ca.cert_pem).await.is_err());
    c.simple_query("select 1").await.unwrap();
    // A broken file is refused and the working certificate stays.
    std::fs::write(&key_file, "not a key").unwrap();
    let e = proxy.reload_tls().unwrap_err();
    assert!(e.to_string().contains("HANDOFF_TLS_KEY"), "{e}");
    tls_client(&proxy, &ca2.cert_pem)
        .await
        .unwrap()
        .simple_query("select 1")
        .await
        .unwrap();
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_tls_modes_verify_what_they_say() {
    let cluster = Cluster::start(0).unwrap();
    let ca = TestCa::new("server CA").unwrap();
    let other = TestCa::new("someone else").unwrap();
    // The server's certificate names "localhost" only; handoff connects to 127.0.0.1.
    enable_server_ssl(&cluster, &ca, &["localhost"]);
    let dir = tempfile::tempdir().unwrap();
    let ca_file = write(dir.path(), "ca.pem", &ca.cert_pem);
    let other_file = write(dir.path(), "other.pem", &other.cert_pem);
    let login = |mode: &'static str, ca: Option<PathBuf>| {
        let cluster = &cluster;
        async move {
            let ca = ca.map(|p| p.to_str().unwrap().to_string());
            let mut vars = vec![("HANDOFF_SERVER_TLS", mode)];
            if let Some(ca) = ca.as_deref() {
                vars.push(("HANDOFF_SERVER_TLS_CA", ca));
            }
            let proxy = start_proxy(cluster, &vars).await.unwrap();
            let url = conn_str(&proxy.listen_addr(), "postgres", "postgres", None);
            let r = match tokio_postgres::connect(&url, NoTls).await {
                Ok((c, conn)) => {
                    tokio::spawn(conn);
                    let ssl: bool = c
                        .query_one(
                            "select ssl from pg_stat_ssl where pid = pg_backend_pid()",
                            &[],
                        )
                        .await
                        .unwrap()
                        .get(0);
                    Ok(ssl)
                }
                Err(e) => Err(db_message(&e)),
            };
            proxy.shutdown().await;
            r
        }
    };
    // The chain is right but the name is not: verify-ca passes, verify-full does not.
    assert_eq!(login("verify-ca", Some(ca_file.clone())).await, Ok(true));
    let e = login("verify-full", Some(ca_file.clone()))
        .await
        .unwrap_err();
    assert!(e.contains("TLS"), "{e}");
    // Another CA: refused even by verify-ca.
    let e = login("verify-ca", Some(other_file)).await.unwrap_err();
    assert!(e.contains("TLS"), "{e}");
    // require encrypts without verifying; prefer too.
    assert_eq!(login("require", None).await, Ok(true));
    assert_eq!(login("prefer", None).await, Ok(true));
    // A server without TLS: prefer falls back to plain, require refuses.
    cluster.primary.psql("ALTER SYSTEM SET ssl = off").unwrap();
    cluster.primary.psql("SELECT pg_reload_conf()").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(login("prefer", None).await, Ok(false));
    let e = login("require", None).await.unwrap_err();
    assert!(e.contains("does not accept TLS"), "{e}");
    assert_eq!(login("disable", None).await, Ok(false));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificate_of_the_running_binary() {
    let cluster = Cluster::start(0).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (ca1, ca2) = (
        TestCa::new("first").unwrap(),
        TestCa::new("second").unwrap(),
    );
    let (cert, key) = ca1.issue(&["localhost"]).unwrap();
    let cert_file = write(dir.path(), "proxy.crt", &cert);
    let key_file = write(dir.path(), "proxy.key", &key);
    let port = handoff_tests::pg::free_port().unwrap();
    let mut child = handoff_tests::handoff_command()
        .env("HANDOFF_LISTEN", format!("127.0.0.1:{port}"))
        .env(
            "HANDOFF_ADMIN_LISTEN",
            format!("127.0.0.1:{}", handoff_tests::pg::free_port().unwrap()),
        )
        .env("HANDOFF_SHARDS", format!("main={}", cluster.primary.addr()))
        .env("HANDOFF_TLS_MODE", "require")
        .env("HANDOFF_TLS_CERT", &cert_file)
        .env("HANDOFF_TLS_KEY", &key_file)
        .env("HANDOFF_LOG", "warn")
        .spawn()
        .unwrap();
    let connect = |ca: String| async move {
        let url = format!(
            "host=localhost port={port} user=postgres dbname=postgres sslmode=require connect_timeout=5"
        );
        match tokio_postgres::connect(&url, MakeRustls::trusting(&ca).unwrap()).await {
            Ok((c, conn)) => {
                tokio::spawn(conn);
                c.simple_query("select 1").await.is_ok()
            }
            Err(_) => false,
        }
    };
    handoff_tests::eventually(Duration::from_secs(20), "handoff to serve TLS", || {
        let ca = ca1.cert_pem.clone();
        async move { Ok(connect(ca).await) }
    })
    .await
    .unwrap();
    assert!(!connect(ca2.cert_pem.clone()).await);
    let (cert2, key2) = ca2.issue(&["localhost"]).unwrap();
    std::fs::write(&cert_file, cert2).unwrap();
    std::fs::write(&key_file, key2).unwrap();
    handoff_tests::signal(child.id(), "HUP").unwrap();
    handoff_tests::eventually(Duration::from_secs(10), "the new certificate", || {
        let ca = ca2.cert_pem.clone();
        async move { Ok(connect(ca).await) }
    })
    .await
    .unwrap();
    assert!(!connect(ca1.cert_pem.clone()).await);
    assert!(
        child.try_wait().unwrap().is_none(),
        "SIGHUP ended the process"
    );
    let _ = handoff_tests::signal(child.id(), "TERM");
    let _ = child.wait();
}

/// A TLS connection begun without an SSLRequest (PostgreSQL 17's
/// `sslnegotiation=direct`), offering `alpn`.
async fn direct_tls(
    proxy: &handoff::Proxy,
    ca_pem: &str,
    alpn: &[&[u8]],
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    use rustls::pki_types::{pem::PemObject, CertificateDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = tokio::net::TcpStream::connect(proxy.listen_addr()).await?;
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

/// Reads backend messages from `s` until ReadyForQuery (or EOF), as short strings.
async fn read_until_ready(
    s: &mut (impl tokio::io::AsyncRead + Unpin),
    buf: &mut bytes::BytesMut,
) -> Vec<String> {
    use handoff_protocol::backend::BackendMessage;
    use tokio::io::AsyncReadExt;
    let mut seen = Vec::new();
    loop {
        while let Some(f) = handoff_protocol::framing::decode_frame(buf, 1 << 20).unwrap() {
            let m = BackendMessage::parse(f).unwrap();
            let done = matches!(m, BackendMessage::ReadyForQuery(_));
            seen.push(match m {
                BackendMessage::ErrorResponse(e) => format!("Error {}", e.code().unwrap_or("")),
                BackendMessage::Other(f) if f.tag == b'D' => "Row".to_string(),
                BackendMessage::ReadyForQuery(_) => "Ready".to_string(),
                other => format!("{other:?}").chars().take(20).collect(),
            });
            if done {
                return seen;
            }
        }
        match tokio::time::timeout(Duration::from_secs(10), s.read_buf(buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                seen.push("EOF".to_string());
                return seen;
            }
            Ok(Ok(_)) => {}
            Err(_) => panic!("no answer within 10 s: {seen:?}"),
        }
    }
}

#[tokio::test]
async fn direct_tls_needs_the_postgresql_alpn() {
    use handoff_protocol::framing::StartupPacket;
    use handoff_protocol::frontend::FrontendMessage;
    use tokio::io::AsyncWriteExt;
    let cluster = Cluster::start(0).unwrap();
    let ca = TestCa::new("handoff test CA").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = ca.issue(&["localhost"]).unwrap();
    let cert_file = write(dir.path(), "proxy.crt", &cert);
    let key_file = write(dir.path(), "proxy.key", &key);
    let proxy = start_proxy(
        &cluster,
        &[
            ("HANDOFF_TLS_MODE", "require"),
            ("HANDOFF_TLS_CERT", cert_file.to_str().unwrap()),
            ("HANDOFF_TLS_KEY", key_file.to_str().unwrap()),
        ],
    )
    .await
    .unwrap();
    let mut hello = bytes::BytesMut::new();
    StartupPacket::Startup {
        minor: 0,
        params: vec![
            ("user".into(), "postgres".into()),
            ("database".into(), "postgres".into()),
        ],
    }
    .encode(&mut hello);

    // ALPN `postgresql`: a session, served.
    let mut s = direct_tls(&proxy, &ca.cert_pem, &[b"postgresql"])
        .await
        .unwrap();
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"postgresql"[..]));
    s.write_all(&hello).await.unwrap();
    let mut buf = bytes::BytesMut::new();
    let login = read_until_ready(&mut s, &mut buf).await;
    assert_eq!(login.last().map(String::as_str), Some("Ready"), "{login:?}");
    let mut q = bytes::BytesMut::new();
    FrontendMessage::Query {
        sql: bytes::Bytes::from_static(b"SELECT 1"),
    }
    .encode(&mut q);
    s.write_all(&q).await.unwrap();
    let got = read_until_ready(&mut s, &mut buf).await;
    assert!(got.contains(&"Row".to_string()), "{got:?}");

    // No ALPN: refused with 08P01 once encrypted.
    let mut s = direct_tls(&proxy, &ca.cert_pem, &[]).await.unwrap();
    let mut buf = bytes::BytesMut::new();
    let got = read_until_ready(&mut s, &mut buf).await;
    assert_eq!(
        got.first().map(String::as_str),
        Some("Error 08P01"),
        "{got:?}"
    );

    // Another protocol only: the handshake itself fails.
    assert!(direct_tls(&proxy, &ca.cert_pem, &[b"http/1.1"])
        .await
        .is_err());

    // The SSLRequest way still works, with or without ALPN.
    let c = tls_client(&proxy, &ca.cert_pem).await.unwrap();
    c.simple_query("SELECT 1").await.unwrap();
    proxy.shutdown().await;
}
