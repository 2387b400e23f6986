use super::*;

fn cfg(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
    Config::from_vars(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())))
}

fn err_var(vars: &[(&str, &str)]) -> String {
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
    assert_eq!(c.max_client_conn, 1000);
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

#[test]
fn buffer_settings() {
    let c = cfg(&[]).unwrap();
    assert!(c.buffer.enabled && !c.buffer.dry_run);
    assert_eq!(c.buffer.size, 1000);
    assert_eq!(c.buffer.max_bytes, 64 << 20);
    assert_eq!(c.buffer.window, Duration::from_secs(10));
    assert_eq!(c.buffer.max_failover_duration, Duration::from_secs(20));
    assert_eq!(
        c.buffer.drain_concurrency, c.pool.size,
        "defaults to the pool size"
    );
    assert_eq!(c.buffer.shards, None);
    let c = cfg(&[
        ("HANDOFF_SHARDS", "a=h:1;b=h:2"),
        ("HANDOFF_DATABASES", "*=a"),
        ("HANDOFF_BUFFER_SHARDS", "b"),
        ("HANDOFF_BUFFER_MAX_BYTES", "1kB"),
        ("HANDOFF_BUFFER_DRY_RUN", "on"),
    ])
    .unwrap();
    assert_eq!(c.buffer.shards, Some(vec!["b".to_string()]));
    assert_eq!(c.buffer.max_bytes, 1024);
    assert!(c.buffer.dry_run);
    assert_eq!(
        err_var(&[("HANDOFF_BUFFER_ENABLED", "maybe")]),
        "HANDOFF_BUFFER_ENABLED"
    );
    assert_eq!(
        err_var(&[("HANDOFF_BUFFER_SIZE", "0")]),
        "HANDOFF_BUFFER_SIZE"
    );
    assert_eq!(
        err_var(&[("HANDOFF_BUFFER_MAX_BYTES", "64XB")]),
        "HANDOFF_BUFFER_MAX_BYTES"
    );
    assert_eq!(
        err_var(&[("HANDOFF_BUFFER_WINDOW", "0")]),
        "HANDOFF_BUFFER_WINDOW"
    );
    assert_eq!(
        err_var(&[("HANDOFF_BUFFER_WINDOW", "30s")]),
        "HANDOFF_BUFFER_WINDOW"
    );
    assert_eq!(
        err_var(&[("HANDOFF_BUFFER_DRAIN_CONCURRENCY", "0")]),
        "HANDOFF_BUFFER_DRAIN_CONCURRENCY"
    );
    assert_eq!(
        err_var(&[("HANDOFF_BUFFER_SHARDS", "nope")]),
        "HANDOFF_BUFFER_SHARDS"
    );
    assert_eq!(parse_size("64MB"), Ok(64 << 20));
    assert!(parse_size("MB").is_err());
}

#[test]
fn switchover_settings() {
    let c = cfg(&[]).unwrap();
    assert_eq!(c.drain_timeout, Duration::from_secs(5));
    assert_eq!(c.switchover.max_lag, 16 << 20);
    assert_eq!(c.switchover.timeout, Duration::from_secs(10));
    assert!(c.switchover.terminate);
    assert_eq!(
        (c.admin_db.user.as_str(), c.admin_db.password.as_deref()),
        ("postgres", None)
    );
    assert_eq!(c.admin_db.database, "postgres");
    // The admin role falls back to the first client user (by name) with a password.
    let c = cfg(&[("HANDOFF_USERS", "zed=z,amy=a")]).unwrap();
    assert_eq!(
        (c.admin_db.user.as_str(), c.admin_db.password.as_deref()),
        ("amy", Some("a"))
    );
    let c = cfg(&[
        ("HANDOFF_USERS", "amy=a"),
        ("HANDOFF_ADMIN_DB_USER", "ops"),
        ("HANDOFF_ADMIN_DB_PASSWORD", "pw"),
        ("HANDOFF_ADMIN_DB_NAME", "admin"),
        ("HANDOFF_SWITCHOVER_MAX_LAG", "1MB"),
        ("HANDOFF_SWITCHOVER_TERMINATE", "off"),
        ("HANDOFF_DRAIN_TIMEOUT", "250ms"),
    ])
    .unwrap();
    assert_eq!(
        (
            c.admin_db.user.as_str(),
            c.admin_db.password.as_deref(),
            c.admin_db.database.as_str()
        ),
        ("ops", Some("pw"), "admin")
    );
    assert_eq!(c.switchover.max_lag, 1 << 20);
    assert!(!c.switchover.terminate);
    assert_eq!(c.drain_timeout, Duration::from_millis(250));
    for (var, bad) in [
        ("HANDOFF_DRAIN_TIMEOUT", "soon"),
        ("HANDOFF_SWITCHOVER_MAX_LAG", "lots"),
        ("HANDOFF_SWITCHOVER_TIMEOUT", "0"),
        ("HANDOFF_SWITCHOVER_TERMINATE", "maybe"),
        ("HANDOFF_SWITCHOVER_DEMOTE_TIMEOUT", "0"),
        ("HANDOFF_SWITCHOVER_DEMOTE_TIMEOUT", "a while"),
        ("HANDOFF_WATCHDOG_INTERVAL", "0"),
        ("HANDOFF_WATCHDOG_INTERVAL", "often"),
    ] {
        assert_eq!(err_var(&[(var, bad)]), var);
    }
}

#[test]
fn fence_and_watchdog_settings() {
    let c = cfg(&[]).unwrap();
    assert_eq!(c.switchover.demote_command, None);
    assert_eq!(c.switchover.demote_timeout, Duration::from_secs(60));
    assert_eq!(c.watchdog_interval, Duration::from_millis(250));
    let c = cfg(&[
        (
            "HANDOFF_SWITCHOVER_DEMOTE_COMMAND",
            "pg_ctl -D /data stop -m fast",
        ),
        ("HANDOFF_SWITCHOVER_DEMOTE_TIMEOUT", "2m"),
        ("HANDOFF_WATCHDOG_INTERVAL", "1s"),
    ])
    .unwrap();
    assert_eq!(
        c.switchover.demote_command.as_deref(),
        Some("pg_ctl -D /data stop -m fast")
    );
    assert_eq!(c.switchover.demote_timeout, Duration::from_secs(120));
    assert_eq!(c.watchdog_interval, Duration::from_secs(1));
}

#[test]
fn the_declared_defaults_are_the_ones_parsed() {
    // Every default written in VARIABLES (not a description in parentheses), given
    // explicitly, yields exactly the configuration of an empty environment: the parser
    // has no default of its own.
    let explicit: Vec<(&str, &str)> = VARIABLES
        .iter()
        .filter(|v| !v.default.starts_with('('))
        .map(|v| (v.name, v.default))
        .collect();
    assert!(explicit.len() > 30, "{explicit:?}");
    let implicit = cfg(&[]).unwrap();
    let given = cfg(&explicit).unwrap();
    assert_eq!(format!("{implicit:?}"), format!("{given:?}"));
    // And the help text says what docs/configuration.md says about the first host.
    assert!(!Config::help().contains("the first host is the primary"));
}

#[test]
fn coordination_settings() {
    assert!(
        cfg(&[]).unwrap().etcd.is_none(),
        "off unless endpoints are given"
    );
    let c = cfg(&[
        (
            "HANDOFF_ETCD_ENDPOINTS",
            "http://10.0.0.1:2379/, http://10.0.0.2:2379",
        ),
        ("HANDOFF_LISTEN", "127.0.0.1:7000"),
    ])
    .unwrap();
    let e = c.etcd.unwrap();
    assert_eq!(
        e.endpoints,
        ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]
    );
    assert_eq!(e.prefix, "/handoff");
    assert!(e.proxy_id.ends_with(":7000"), "{}", e.proxy_id);
    assert_eq!(e.lease_ttl, Duration::from_secs(5));
    assert_eq!(e.timeout, Duration::from_secs(2));
    assert_eq!(e.failpoint, None);
    let e = cfg(&[
        ("HANDOFF_ETCD_ENDPOINTS", "https://etcd:2379"),
        ("HANDOFF_ETCD_CA_FILE", "/etc/ca.pem"),
        ("HANDOFF_ETCD_PREFIX", "/prod/"),
        ("HANDOFF_PROXY_ID", "proxy-a.eu_1:6432"),
        ("HANDOFF_FAILPOINT", "fenced:30s"),
    ])
    .unwrap()
    .etcd
    .unwrap();
    assert_eq!(e.prefix, "/prod");
    assert_eq!(e.proxy_id, "proxy-a.eu_1:6432");
    assert_eq!(
        e.failpoint,
        Some(Failpoint {
            point: "fenced".into(),
            pause: Duration::from_secs(30)
        })
    );
    let with = |k: &'static str, v: &'static str| {
        err_var(&[("HANDOFF_ETCD_ENDPOINTS", "http://etcd:2379"), (k, v)])
    };
    assert_eq!(
        err_var(&[("HANDOFF_ETCD_ENDPOINTS", "etcd:2379")]),
        "HANDOFF_ETCD_ENDPOINTS"
    );
    assert_eq!(
        err_var(&[("HANDOFF_ETCD_ENDPOINTS", "http://etcd")]),
        "HANDOFF_ETCD_ENDPOINTS"
    );
    assert_eq!(
        err_var(&[("HANDOFF_ETCD_ENDPOINTS", " , ")]),
        "HANDOFF_ETCD_ENDPOINTS"
    );
    assert_eq!(
        err_var(&[("HANDOFF_ETCD_ENDPOINTS", "https://etcd:2379")]),
        "HANDOFF_ETCD_CA_FILE"
    );
    assert_eq!(
        with("HANDOFF_ETCD_PREFIX", "handoff"),
        "HANDOFF_ETCD_PREFIX"
    );
    assert_eq!(with("HANDOFF_ETCD_PREFIX", "/"), "HANDOFF_ETCD_PREFIX");
    assert_eq!(with("HANDOFF_PROXY_ID", "a/b"), "HANDOFF_PROXY_ID");
    assert_eq!(
        with("HANDOFF_ETCD_LEASE_TTL", "1s"),
        "HANDOFF_ETCD_LEASE_TTL"
    );
    assert_eq!(
        with("HANDOFF_ETCD_LEASE_TTL", "2500ms"),
        "HANDOFF_ETCD_LEASE_TTL"
    );
    assert_eq!(with("HANDOFF_ETCD_TIMEOUT", "0"), "HANDOFF_ETCD_TIMEOUT");
    assert_eq!(
        with("HANDOFF_FAILPOINT", "sideways:1s"),
        "HANDOFF_FAILPOINT"
    );
    assert_eq!(with("HANDOFF_FAILPOINT", "held"), "HANDOFF_FAILPOINT");
    assert_eq!(
        err_var(&[("HANDOFF_FAILPOINT", "held:1s")]),
        "HANDOFF_FAILPOINT",
        "a failpoint without coordination is a mistake"
    );
}

#[test]
fn patroni_shards_may_list_no_hosts_and_name_their_rest_endpoints() {
    let c = cfg(&[
        ("HANDOFF_SHARDS", "main;other=10.0.0.9:5432"),
        (
            "HANDOFF_PATRONI",
            "main=http://10.0.0.1:8008,http://10.0.0.2:8008/ ; other=http://10.0.0.9:8008",
        ),
        ("HANDOFF_DATABASES", "*=main"),
        ("HANDOFF_PATRONI_HELD_INTERVAL", "75ms"),
    ])
    .unwrap();
    assert!(c.shards[0].hosts.is_empty());
    let main = c.patroni.shard("main").unwrap();
    let eps: Vec<String> = main.endpoints.iter().map(|e| e.to_string()).collect();
    assert_eq!(eps, ["10.0.0.1:8008", "10.0.0.2:8008"]);
    assert!(c.patroni.shard("other").is_some());
    assert_eq!(c.patroni.held_interval, Duration::from_millis(75));
    assert_eq!(c.patroni.interval, Duration::from_secs(1));
    assert_eq!(c.hold_timeout, Duration::from_secs(5));
    // Without Patroni nothing changes.
    assert!(cfg(&[]).unwrap().patroni.shards.is_empty());
}

#[test]
fn bad_patroni_settings_name_their_variable() {
    for (vars, var) in [
        (vec![("HANDOFF_SHARDS", "main")], "HANDOFF_SHARDS"),
        (
            vec![("HANDOFF_PATRONI", "nope=http://h:8008")],
            "HANDOFF_PATRONI",
        ),
        (vec![("HANDOFF_PATRONI", "main=h:8008")], "HANDOFF_PATRONI"),
        (
            vec![("HANDOFF_PATRONI", "main=https://h:8008")],
            "HANDOFF_PATRONI",
        ),
        (
            vec![("HANDOFF_PATRONI", "main=http://h:8008/cluster")],
            "HANDOFF_PATRONI",
        ),
        (vec![("HANDOFF_PATRONI", "main=")], "HANDOFF_PATRONI"),
        (
            vec![("HANDOFF_PATRONI", "main=http://h:8008;main=http://g:8008")],
            "HANDOFF_PATRONI",
        ),
        (
            vec![("HANDOFF_PATRONI_HELD_INTERVAL", "0")],
            "HANDOFF_PATRONI_HELD_INTERVAL",
        ),
        (vec![("HANDOFF_HOLD_TIMEOUT", "0s")], "HANDOFF_HOLD_TIMEOUT"),
    ] {
        assert_eq!(err_var(&vars), var, "{vars:?}");
    }
}
