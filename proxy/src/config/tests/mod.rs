//! The configuration's parsing: defaults, refusals that name the variable, and each
//! topic's settings.

use super::*;
use handoff_protocol::auth::ScramVerifier;

pub(super) fn cfg(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
    Config::from_vars(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())))
}

pub(super) fn err_var(vars: &[(&str, &str)]) -> String {
    match cfg(vars) {
        Err(ConfigError::Invalid { var, .. }) => var.to_string(),
        Err(ConfigError::Unknown(v)) => v,
        Ok(_) => panic!("{vars:?} was accepted"),
    }
}

#[test]
fn defaults() {
    let c = cfg(&[]).unwrap();
    assert_eq!(c.listen, "127.0.0.1:6432".parse().unwrap());
    assert_eq!(c.admin_listen, "127.0.0.1:6480".parse().unwrap());
    assert_eq!(c.shards.len(), 1);
    assert_eq!(c.shards[0].name, "main");
    assert_eq!(c.shards[0].hosts[0].to_string(), "127.0.0.1:5432");
    assert_eq!(c.route("anything").unwrap().shard, 0);
    assert!(c.users.is_none());
    assert_eq!(c.limits.max_client_conn, 1000);
    assert_eq!(c.pool_mode, PoolMode::Transaction);
    assert_eq!(c.pool.size, 20);
    assert_eq!(c.pool.min_idle, 0);
    assert_eq!(c.pool.query_wait_timeout, Duration::from_secs(120));
    assert_eq!(c.pool.idle_timeout, Duration::from_secs(600));
    assert_eq!(c.pool.lifetime, Duration::from_secs(3600));
    assert_eq!(c.pool.max_prepared, 200);
    let s = cfg(&[("HANDOFF_POOL_MODE", "session")]).unwrap();
    assert_eq!(s.pool_mode, PoolMode::Session);
    assert_eq!(c.connect_timeout, Duration::from_secs(5));
    assert_eq!(c.shutdown_timeout, Duration::from_secs(30));
}

#[test]
fn unknown_variable_is_named() {
    let e = cfg(&[("HANDOFF_LISTNE", "x")]).unwrap_err();
    assert_eq!(e, ConfigError::Unknown("HANDOFF_LISTNE".into()));
    assert!(e.to_string().contains("HANDOFF_LISTNE"));
    // Variables of other programs are none of our business.
    assert!(cfg(&[("PGPORT", "1")]).is_ok());
}

#[test]
fn bad_values_name_their_variable() {
    assert_eq!(err_var(&[("HANDOFF_LISTEN", "nowhere")]), "HANDOFF_LISTEN");
    assert_eq!(
        err_var(&[("HANDOFF_ADMIN_LISTEN", "1.2.3.4")]),
        "HANDOFF_ADMIN_LISTEN"
    );
    assert_eq!(
        err_var(&[("HANDOFF_MAX_CLIENT_CONN", "0")]),
        "HANDOFF_MAX_CLIENT_CONN"
    );
    assert_eq!(
        err_var(&[("HANDOFF_MAX_CLIENT_CONN", "-3")]),
        "HANDOFF_MAX_CLIENT_CONN"
    );
    assert_eq!(err_var(&[("HANDOFF_POOL_SIZE", "0")]), "HANDOFF_POOL_SIZE");
    assert_eq!(
        err_var(&[("HANDOFF_POOL_MIN_IDLE", "30")]),
        "HANDOFF_POOL_MIN_IDLE"
    );
    assert_eq!(
        err_var(&[("HANDOFF_MAX_PREPARED_STATEMENTS", "x")]),
        "HANDOFF_MAX_PREPARED_STATEMENTS"
    );
    assert_eq!(
        err_var(&[("HANDOFF_QUERY_WAIT_TIMEOUT", "0")]),
        "HANDOFF_QUERY_WAIT_TIMEOUT"
    );
    assert_eq!(
        err_var(&[("HANDOFF_SERVER_LIFETIME", "1y")]),
        "HANDOFF_SERVER_LIFETIME"
    );
    assert_eq!(
        err_var(&[("HANDOFF_POOL_MODE", "statement")]),
        "HANDOFF_POOL_MODE"
    );
    assert_eq!(
        err_var(&[("HANDOFF_CONNECT_TIMEOUT", "5")]),
        "HANDOFF_CONNECT_TIMEOUT"
    );
    assert_eq!(
        err_var(&[("HANDOFF_CONNECT_TIMEOUT", "0")]),
        "HANDOFF_CONNECT_TIMEOUT"
    );
    assert_eq!(
        err_var(&[("HANDOFF_SHUTDOWN_TIMEOUT", "soon")]),
        "HANDOFF_SHUTDOWN_TIMEOUT"
    );
    assert_eq!(err_var(&[("HANDOFF_SHARDS", "main")]), "HANDOFF_SHARDS");
    // Set but empty is refused, not read as the default shard.
    for empty in ["", "  "] {
        let e = Config::from_vars([("HANDOFF_SHARDS", empty)]).unwrap_err();
        assert!(
            e.to_string().contains("HANDOFF_SHARDS: is set but empty"),
            "{e}"
        );
    }
    assert_eq!(
        err_var(&[("HANDOFF_SHARDS", "main=host")]),
        "HANDOFF_SHARDS"
    );
    assert_eq!(err_var(&[("HANDOFF_SHARDS", "main=h:0")]), "HANDOFF_SHARDS");
    assert_eq!(
        err_var(&[("HANDOFF_SHARDS", "a=h:1;a=h:2")]),
        "HANDOFF_SHARDS"
    );
    assert_eq!(err_var(&[("HANDOFF_SHARDS", "a b=h:1")]), "HANDOFF_SHARDS");
    assert_eq!(
        err_var(&[("HANDOFF_DATABASES", "app=nope")]),
        "HANDOFF_DATABASES"
    );
    assert_eq!(
        err_var(&[("HANDOFF_DATABASES", "app")]),
        "HANDOFF_DATABASES"
    );
    assert_eq!(err_var(&[("HANDOFF_USERS", "alice")]), "HANDOFF_USERS");
    assert_eq!(
        err_var(&[("HANDOFF_USERS", "a=SCRAM-SHA-256$bad")]),
        "HANDOFF_USERS"
    );
    assert_eq!(err_var(&[("HANDOFF_USERS", "a=x,a=y")]), "HANDOFF_USERS");
}

#[test]
fn shards_and_databases() {
    let c = cfg(&[
        (
            "HANDOFF_SHARDS",
            "a=10.0.0.1:5432,10.0.0.2:5433; b=[::1]:6000",
        ),
        ("HANDOFF_DATABASES", "app=a;reports=b/warehouse;*=a"),
    ])
    .unwrap();
    assert_eq!(c.shards[0].hosts.len(), 2);
    assert_eq!(c.shards[0].hosts[1].port, 5433);
    assert_eq!(c.shards[1].hosts[0].host, "::1");
    assert_eq!(c.shards[1].hosts[0].to_string(), "[::1]:6000");
    let r = c.route("reports").unwrap();
    assert_eq!((r.shard, r.server_db.as_deref()), (1, Some("warehouse")));
    assert_eq!(c.route("other").unwrap().shard, 0);
    // Two shards need explicit routes.
    assert_eq!(
        err_var(&[("HANDOFF_SHARDS", "a=h:1;b=h:2")]),
        "HANDOFF_DATABASES"
    );
    // Without '*' an unlisted database has no route.
    let c = cfg(&[("HANDOFF_DATABASES", "app=main")]).unwrap();
    assert!(c.route("other").is_none());
}

#[test]
fn users_accept_passwords_and_verifiers() {
    let v = ScramVerifier::derive("pw", b"salt".to_vec(), 4096).to_postgres_string();
    let c = cfg(&[("HANDOFF_USERS", &format!("alice=secret,bob={v}"))]).unwrap();
    let users = c.users.unwrap();
    assert_eq!(users["alice"].password.as_deref(), Some("secret"));
    assert!(users["bob"].password.is_none());
    assert_eq!(users["bob"].verifier.iterations, 4096);
}

#[test]
fn open_listeners_need_credentials() {
    assert_eq!(
        err_var(&[("HANDOFF_LISTEN", "0.0.0.0:6432")]),
        "HANDOFF_USERS"
    );
    assert!(cfg(&[("HANDOFF_LISTEN", "0.0.0.0:6432"), ("HANDOFF_USERS", "a=b")]).is_ok());
    assert_eq!(
        err_var(&[("HANDOFF_ADMIN_LISTEN", "0.0.0.0:6480")]),
        "HANDOFF_ADMIN_TOKEN"
    );
    assert!(cfg(&[
        ("HANDOFF_ADMIN_LISTEN", "0.0.0.0:6480"),
        ("HANDOFF_ADMIN_TOKEN", "t")
    ])
    .is_ok());
}

#[test]
fn server_tcp_options() {
    assert_eq!(cfg(&[]).unwrap().server_tcp, ServerTcp::default());
    let c = cfg(&[
        ("HANDOFF_SERVER_TCP_USER_TIMEOUT", "3s"),
        ("HANDOFF_SERVER_TCP_KEEPALIVE", "0"),
    ])
    .unwrap();
    assert_eq!(c.server_tcp.user_timeout, Some(Duration::from_secs(3)));
    assert_eq!(c.server_tcp.keepalive, None, "0 turns keepalives off");
    assert_eq!(
        err_var(&[("HANDOFF_SERVER_TCP_USER_TIMEOUT", "10")]),
        "HANDOFF_SERVER_TCP_USER_TIMEOUT"
    );
    assert_eq!(
        err_var(&[("HANDOFF_SERVER_TCP_KEEPALIVE", "-1s")]),
        "HANDOFF_SERVER_TCP_KEEPALIVE"
    );
}

#[test]
fn worker_threads() {
    assert_eq!(
        cfg(&[]).unwrap().worker_threads,
        0,
        "one per CPU by default"
    );
    assert_eq!(
        cfg(&[("HANDOFF_WORKER_THREADS", "1")])
            .unwrap()
            .worker_threads,
        1
    );
    assert_eq!(
        err_var(&[("HANDOFF_WORKER_THREADS", "two")]),
        "HANDOFF_WORKER_THREADS"
    );
}

#[test]
fn durations() {
    assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
    assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
    assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
    assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
    assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
    for bad in ["", "s", "10", "1.5s", "10 s", "-1s", "3d"] {
        assert!(parse_duration(bad).is_err(), "{bad}");
    }
}

#[test]
fn help_and_reference_list_every_variable_once() {
    let help = Config::help();
    let reference = Config::reference_markdown();
    for v in VARIABLES {
        assert!(help.contains(v.name), "--help misses {}", v.name);
        assert_eq!(
            reference.matches(&format!("| `{}` |", v.name)).count(),
            1,
            "the reference lists {} once",
            v.name
        );
        assert!(!v.help.is_empty() && !v.help.contains('\n'), "{}", v.name);
    }
    // Every topic has a section, and the sections hold every variable.
    for topic in Topic::ALL {
        assert!(reference.contains(&format!("### {}\n", topic.title())));
    }
    // The terminal gets no Markdown.
    assert!(!help.contains('`'), "--help shows Markdown backquotes");
}

mod failover;
