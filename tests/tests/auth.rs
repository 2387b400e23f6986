//! Client and server authentication through the proxy.

use handoff_tests::pg::{MD5_USER, PASSWORD_USER, SCRAM_USER};
use handoff_tests::{conn_str, start_proxy, Cluster};
use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;

async fn try_connect(
    proxy: &handoff::Proxy,
    user: &str,
    db: &str,
    pw: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) =
        tokio_postgres::connect(&conn_str(&proxy.listen_addr(), user, db, Some(pw)), NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

/// The server-side message of a database error (plus detail), for assertions.
fn msg(err: &tokio_postgres::Error) -> String {
    err.as_db_error()
        .map(|d| format!("{} {}", d.message(), d.detail().unwrap_or("")))
        .unwrap_or_else(|| err.to_string())
}

#[tokio::test]
async fn client_auth_right_wrong_unknown() {
    let cluster = Cluster::start(0).unwrap();
    let proxy = start_proxy(
        &cluster,
        &[
            ("HANDOFF_USERS", "postgres=secret"),
            ("HANDOFF_DATABASES", "postgres=main;app=main/postgres"),
        ],
    )
    .await
    .unwrap();

    let c = try_connect(&proxy, "postgres", "postgres", "secret")
        .await
        .unwrap();
    let who: String = c
        .query_one("select current_user", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(who, "postgres");

    // A routed alias reaches the server database it names.
    let c = try_connect(&proxy, "postgres", "app", "secret")
        .await
        .unwrap();
    let db: String = c
        .query_one("select current_database()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(db, "postgres");

    let err = try_connect(&proxy, "postgres", "postgres", "wrong")
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Some(&SqlState::INVALID_PASSWORD), "{err}");
    assert!(
        msg(&err).contains("password authentication failed for user \"postgres\""),
        "{err}"
    );

    // Unknown users fail exactly like wrong passwords.
    let err = try_connect(&proxy, "mallory", "postgres", "secret")
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Some(&SqlState::INVALID_PASSWORD), "{err}");

    let err = try_connect(&proxy, "postgres", "nosuchdb", "secret")
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Some(&SqlState::INVALID_CATALOG_NAME), "{err}");
    assert!(msg(&err).contains("not configured in handoff"), "{err}");
    proxy.shutdown().await;
}

#[tokio::test]
async fn server_auth_methods_and_server_errors() {
    let cluster = Cluster::start(0).unwrap();
    cluster
        .primary
        .psql(&format!(
            "set password_encryption = 'md5'; create role {MD5_USER} login password 'pw-md5'; \
             set password_encryption = 'scram-sha-256'; \
             create role {SCRAM_USER} login password 'pw-scram'; \
             create role {PASSWORD_USER} login password 'pw-clear'"
        ))
        .unwrap();
    let users =
        format!("postgres=secret,{MD5_USER}=pw-md5,{SCRAM_USER}=pw-scram,{PASSWORD_USER}=pw-clear");
    let proxy = start_proxy(
        &cluster,
        &[("HANDOFF_USERS", &users), ("HANDOFF_DATABASES", "*=main")],
    )
    .await
    .unwrap();

    // pg_hba.conf makes the server demand md5, scram-sha-256 and cleartext from these
    // roles; trust for postgres.
    for (user, pw) in [
        ("postgres", "secret"),
        (MD5_USER, "pw-md5"),
        (SCRAM_USER, "pw-scram"),
        (PASSWORD_USER, "pw-clear"),
    ] {
        let c = try_connect(&proxy, user, "postgres", pw)
            .await
            .unwrap_or_else(|e| panic!("{user}: {e}"));
        let who: String = c
            .query_one("select current_user", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(who, user);
    }

    // A database that is routed but missing on the server: the server's 3D000 reaches the client.
    let err = try_connect(&proxy, "postgres", "missing_db", "secret")
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Some(&SqlState::INVALID_CATALOG_NAME), "{err}");
    assert!(msg(&err).contains("missing_db"), "{err}");
    proxy.shutdown().await;
}

#[tokio::test]
async fn server_rejecting_the_proxys_password_is_reported() {
    let cluster = Cluster::start(0).unwrap();
    cluster
        .primary
        .psql(&format!(
            "create role {SCRAM_USER} login password 'server-side'"
        ))
        .unwrap();
    // The proxy accepts the client with 'proxy-side' but the server wants another password.
    let users = format!("{SCRAM_USER}=proxy-side");
    let proxy = start_proxy(&cluster, &[("HANDOFF_USERS", &users)])
        .await
        .unwrap();
    let err = try_connect(&proxy, SCRAM_USER, "postgres", "proxy-side")
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Some(&SqlState::INVALID_PASSWORD), "{err}");
    assert!(msg(&err).contains(SCRAM_USER), "{err}");
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_stored_scram_verifier_needs_no_plaintext_password_and_failures_are_counted() {
    let cluster = Cluster::start(0).unwrap();
    let verifier =
        handoff_protocol::auth::ScramVerifier::derive("s3cret", b"salt-for-test-01".to_vec(), 4096)
            .to_postgres_string();
    let users = format!("postgres={verifier}");
    assert!(!users.contains("s3cret"));
    let proxy = start_proxy(&cluster, &[("HANDOFF_USERS", &users)])
        .await
        .unwrap();
    let c = try_connect(&proxy, "postgres", "postgres", "s3cret")
        .await
        .unwrap();
    c.simple_query("select 1").await.unwrap();
    let failures = |proxy: &handoff::Proxy| {
        let admin = proxy.admin_addr();
        async move {
            let (_, body) = handoff_tests::raw::http(admin, "GET", "/metrics", None)
                .await
                .unwrap();
            body.lines()
                .find(|l| l.starts_with("handoff_auth_failures_total "))
                .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .unwrap_or(0.0)
        }
    };
    let before = failures(&proxy).await;
    for _ in 0..3 {
        let err = try_connect(&proxy, "postgres", "postgres", "S3cret")
            .await
            .err()
            .unwrap();
        assert_eq!(err.code(), Some(&SqlState::INVALID_PASSWORD), "{err}");
    }
    // (At least: other tests in this binary share the process-wide metrics.)
    assert!(failures(&proxy).await - before >= 3.0);
    proxy.shutdown().await;
}

/// A passwordless scram_user login through `proxy` (the server asks for a password):
/// refused with `28000` naming HANDOFF_USERS, not held as if the primary were changing,
/// and the shard still serves.
async fn refused_for_want_of_a_password(proxy: &handoff::Proxy) {
    let url = conn_str(&proxy.listen_addr(), SCRAM_USER, "postgres", None);
    let err = match tokio_postgres::connect(&url, NoTls).await {
        Ok((c, conn)) => {
            tokio::spawn(conn);
            c.simple_query("select 1")
                .await
                .expect_err("the query fails")
        }
        Err(e) => e,
    };
    assert_eq!(
        err.code(),
        Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION),
        "{err}"
    );
    assert!(msg(&err).contains("HANDOFF_USERS"), "{}", msg(&err));
    assert!(!msg(&err).contains("changing its primary"), "{}", msg(&err));
    let (_, shards) = handoff_tests::raw::http(proxy.admin_addr(), "GET", "/v1/shards", None)
        .await
        .unwrap();
    assert!(shards.contains(r#""state":"serving""#), "{shards}");
}

#[tokio::test]
async fn a_server_password_handoff_does_not_have_is_an_authentication_error_naming_the_setting() {
    let cluster = Cluster::start(0).unwrap();
    cluster
        .primary
        .psql(&format!("create role {SCRAM_USER} login password 'pw'"))
        .unwrap();
    // No HANDOFF_USERS: handoff asks clients for no password and has none to give the
    // server, which asks scram_user for one.
    let proxy = start_proxy(&cluster, &[]).await.unwrap();
    refused_for_want_of_a_password(&proxy).await;
    let url = conn_str(&proxy.listen_addr(), "postgres", "postgres", None);
    let (ok, conn) = tokio_postgres::connect(&url, NoTls).await.unwrap();
    tokio::spawn(conn);
    ok.simple_query("select 1").await.unwrap();
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_server_that_wants_a_password_from_everyone_gets_errors_naming_the_settings() {
    let cluster = Cluster::start(0).unwrap();
    cluster
        .primary
        .psql(&format!("create role {SCRAM_USER} login password 'pw'"))
        .unwrap();
    // The admin role's probes and the clients' logins are all asked for a password,
    // and handoff was given none.
    let proxy = start_proxy(&cluster, &[("HANDOFF_ADMIN_DB_USER", SCRAM_USER)])
        .await
        .unwrap();
    refused_for_want_of_a_password(&proxy).await;
    proxy.shutdown().await;
}

/// Connects and runs `select current_user`; the error, if any.
async fn login_as(
    proxy_addr: std::net::SocketAddr,
    user: &str,
    pw: &str,
) -> Result<String, tokio_postgres::Error> {
    let (c, conn) =
        tokio_postgres::connect(&conn_str(&proxy_addr, user, "postgres", Some(pw)), NoTls).await?;
    tokio::spawn(conn);
    let rows = c.simple_query("select current_user").await?;
    Ok(rows
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_auth_looks_users_up_on_the_server() {
    let cluster = Cluster::start(1).unwrap();
    cluster
        .primary
        .psql(&format!(
            "set password_encryption = 'md5'; create role {MD5_USER} login password 'pw-md5'; \
             set password_encryption = 'scram-sha-256'; \
             create role {SCRAM_USER} login password 'pw-scram'; \
             create role waiting_user login password 'pw-wait'; \
             create table auth_writes (id int primary key); \
             grant insert, select on auth_writes to {SCRAM_USER}"
        ))
        .unwrap();
    // No password in handoff's configuration: postgres (trusted by the test server)
    // reads pg_shadow for every user.
    let proxy = start_proxy(
        &cluster,
        &[
            ("HANDOFF_AUTH_USER", "postgres"),
            // The console, to see where a client waits.
            ("HANDOFF_USERS", "ops=ops-pw"),
            ("HANDOFF_ADMIN_USERS", "ops"),
            ("HANDOFF_ADMIN_DB_USER", "postgres"),
            ("HANDOFF_DRAIN_TIMEOUT", "20s"),
            ("HANDOFF_BUFFER_WINDOW", "30s"),
            ("HANDOFF_BUFFER_MAX_FAILOVER_DURATION", "40s"),
            ("HANDOFF_REPLICA_CHECK_INTERVAL", "100ms"),
        ],
    )
    .await
    .unwrap();
    let addr = proxy.listen_addr();

    // A SCRAM user (the server asks handoff for SCRAM: the client's keys answer it) and
    // an MD5 user (handoff asks the client for MD5 and answers the server with the
    // stored secret).
    assert_eq!(
        login_as(addr, SCRAM_USER, "pw-scram").await.unwrap(),
        SCRAM_USER
    );
    assert_eq!(login_as(addr, MD5_USER, "pw-md5").await.unwrap(), MD5_USER);
    for (user, wrong) in [
        (SCRAM_USER, "pw-md5"),
        (MD5_USER, "pw-scram"),
        ("nobody", "x"),
    ] {
        let err = login_as(addr, user, wrong).await.unwrap_err();
        assert_eq!(
            err.code(),
            Some(&SqlState::INVALID_PASSWORD),
            "{user}: {err}"
        );
    }

    // Readers (`@replica`) log in to the standby with the secrets looked up on the
    // primary: the standby asks for SCRAM and MD5 as the primary does.
    handoff_tests::admin::wait_in_rotation(&proxy, &[cluster.standbys[0].addr()], true).await;
    for (user, pw) in [(SCRAM_USER, "pw-scram"), (MD5_USER, "pw-md5")] {
        let (c, conn) =
            tokio_postgres::connect(&conn_str(&addr, user, "postgres@replica", Some(pw)), NoTls)
                .await
                .unwrap_or_else(|e| panic!("{user} as a reader: {e}"));
        tokio::spawn(conn);
        let row = c
            .query_one("select pg_is_in_recovery(), current_user::text", &[])
            .await
            .unwrap();
        assert_eq!(
            (row.get::<_, bool>(0), row.get::<_, String>(1)),
            (true, user.to_string())
        );
    }

    // A user created after handoff started, and a changed password (the cached secret
    // fails once and is asked for again).
    cluster
        .primary
        .psql("create role late_user login password 'pw-late'")
        .unwrap();
    assert_eq!(
        login_as(addr, "late_user", "pw-late").await.unwrap(),
        "late_user"
    );
    cluster
        .primary
        .psql(&format!("alter role {SCRAM_USER} password 'pw-changed'"))
        .unwrap();
    let mut logged_in = false;
    for _ in 0..2 {
        if login_as(addr, SCRAM_USER, "pw-changed").await.is_ok() {
            logged_in = true;
            break;
        }
    }
    assert!(logged_in, "the new password never worked");
    assert!(login_as(addr, SCRAM_USER, "pw-scram").await.is_err());

    // A lookup during a switchover waits in the buffer and completes on the new
    // primary. The switchover is kept in its lameduck by a transaction left open on
    // the old primary, so the login surely arrives while new transactions are held.
    let (writer, conn) = tokio_postgres::connect(
        &conn_str(&addr, SCRAM_USER, "postgres", Some("pw-changed")),
        NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    for i in 0..10 {
        writer
            .execute("insert into auth_writes values ($1)", &[&i])
            .await
            .unwrap();
    }
    writer
        .batch_execute("begin; insert into auth_writes values (100)")
        .await
        .unwrap();
    let target = cluster.standbys[0].addr();
    let switchover = {
        let admin = proxy.admin_addr();
        let body = format!("{{\"to\": \"{target}\"}}");
        tokio::spawn(async move {
            handoff_tests::raw::http_body(admin, "POST", "/v1/shards/main/switchover", None, &body)
                .await
                .unwrap()
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let waiting = tokio::spawn(login_as(addr, "waiting_user", "pw-wait"));
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(
        !waiting.is_finished(),
        "the lookup did not wait for the switchover"
    );
    // It waits before authenticating (in the lookup), not after (for a server).
    let (console, conn) =
        tokio_postgres::connect(&conn_str(&addr, "ops", "handoff", Some("ops-pw")), NoTls)
            .await
            .unwrap();
    tokio::spawn(conn);
    let states: Vec<String> = console
        .simple_query("SHOW CLIENTS")
        .await
        .unwrap()
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get("state").map(str::to_string),
            _ => None,
        })
        .collect();
    assert!(states.contains(&"login".to_string()), "{states:?}");
    assert!(!states.contains(&"waiting".to_string()), "{states:?}");
    // The open transaction commits; the switchover completes; the login with it.
    writer.batch_execute("commit").await.unwrap();
    let (status, report) = switchover.await.unwrap();
    assert_eq!(status, 200, "{report}");
    assert_eq!(waiting.await.unwrap().unwrap(), "waiting_user");
    // Every acknowledged write is on the new primary.
    let (direct, conn) = tokio_postgres::connect(
        &conn_str(&target.parse().unwrap(), "postgres", "postgres", None),
        NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let n: i64 = direct
        .query_one("select count(*) from auth_writes", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 11);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_file_is_read_again_on_sighup() {
    let cluster = Cluster::start(0).unwrap();
    cluster
        .primary
        .psql("create role file_user login; create role added_user login")
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("userlist.txt");
    let md5 = handoff_protocol::auth::md5_secret("file_user", "pw-file");
    std::fs::write(&file, format!("; users\n\"file_user\" \"{md5}\"\n")).unwrap();
    let port = handoff_tests::pg::free_port().unwrap();
    let admin = handoff_tests::pg::free_port().unwrap();
    let mut child = handoff_tests::handoff_command()
        .env("HANDOFF_LISTEN", format!("127.0.0.1:{port}"))
        .env("HANDOFF_ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
        .env("HANDOFF_SHARDS", format!("main={}", cluster.primary.addr()))
        .env("HANDOFF_USERS_FILE", &file)
        .env("HANDOFF_ADMIN_DB_USER", "postgres")
        .env("HANDOFF_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    handoff_tests::eventually(
        std::time::Duration::from_secs(20),
        "handoff to listen",
        || async { Ok(login_as(addr, "file_user", "pw-file").await.is_ok()) },
    )
    .await
    .unwrap();
    let err = login_as(addr, "added_user", "pw-added").await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::INVALID_PASSWORD), "{err}");

    let hup = |child: &std::process::Child| {
        let ok = handoff_tests::signal(child.id(), "HUP").is_ok();
        assert!(ok);
    };
    std::fs::write(
        &file,
        format!("\"file_user\" \"{md5}\"\n\"added_user\" \"pw-added\"\n"),
    )
    .unwrap();
    hup(&child);
    handoff_tests::eventually(
        std::time::Duration::from_secs(10),
        "the new user",
        || async { Ok(login_as(addr, "added_user", "pw-added").await.is_ok()) },
    )
    .await
    .unwrap();
    // A broken file is not taken: the old list stays.
    std::fs::write(&file, "file_user pw-file\n").unwrap();
    hup(&child);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(
        login_as(addr, "file_user", "pw-file").await.unwrap(),
        "file_user"
    );
    assert_eq!(
        login_as(addr, "added_user", "pw-added").await.unwrap(),
        "added_user"
    );

    let _ = handoff_tests::signal(child.id(), "TERM");
    assert!(child.wait().unwrap().success());
}

#[tokio::test]
async fn an_unrouted_database_is_reported_only_after_authentication() {
    let cluster = Cluster::start(0).unwrap();
    let proxy = start_proxy(
        &cluster,
        &[
            ("HANDOFF_USERS", "postgres=secret"),
            ("HANDOFF_DATABASES", "postgres=main"),
        ],
    )
    .await
    .unwrap();
    // A wrong password learns nothing of which databases handoff routes.
    let err = try_connect(&proxy, "postgres", "elsewhere", "wrong")
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Some(&SqlState::INVALID_PASSWORD), "{err}");
    let err = try_connect(&proxy, "postgres", "elsewhere", "secret")
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Some(&SqlState::INVALID_CATALOG_NAME), "{err}");
    assert!(msg(&err).contains("HANDOFF_DATABASES") || msg(&err).contains("not configured"));
    proxy.shutdown().await;
}
