//! Switchover, fence, watchdog, coordination and Patroni settings.

use super::{cfg, err_var};
use crate::config::*;
use std::time::Duration;

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

#[test]
fn replica_settings() {
    let c = cfg(&[]).unwrap();
    assert_eq!(
        c.replicas.max_lag,
        ReplicaLag {
            bytes: Some(16 << 20),
            time: Some(Duration::from_secs(10))
        }
    );
    assert_eq!(c.replicas.pool_size, c.pool.size, "the primary's pool size");
    assert_eq!(c.replicas.check_interval, Duration::from_secs(1));
    let c = cfg(&[
        ("HANDOFF_REPLICA_MAX_LAG", "64kB"),
        ("HANDOFF_REPLICA_POOL_SIZE", "3"),
        ("HANDOFF_REPLICA_CHECK_INTERVAL", "250ms"),
    ])
    .unwrap();
    assert_eq!(
        c.replicas.max_lag,
        ReplicaLag {
            bytes: Some(64 << 10),
            time: None
        }
    );
    assert_eq!(c.replicas.pool_size, 3);
    let c = cfg(&[("HANDOFF_REPLICA_MAX_LAG", "5s")]).unwrap();
    assert_eq!(c.replicas.max_lag.time, Some(Duration::from_secs(5)));
    assert_eq!(c.replicas.max_lag.bytes, None);
    for (var, bad) in [
        ("HANDOFF_REPLICA_MAX_LAG", "far"),
        ("HANDOFF_REPLICA_MAX_LAG", ","),
        ("HANDOFF_REPLICA_MAX_LAG", "1MB,2MB"),
        ("HANDOFF_REPLICA_MAX_LAG", "1s,2s"),
        ("HANDOFF_REPLICA_POOL_SIZE", "0"),
        ("HANDOFF_REPLICA_CHECK_INTERVAL", "0"),
    ] {
        assert_eq!(err_var(&[(var, bad)]), var, "{bad}");
    }
}
