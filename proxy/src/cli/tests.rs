//! The CLI's reading of answers and its argument parsing.

use super::*;

fn shards(json: &str) -> Shards {
    api::decode(json.as_bytes()).unwrap_or_else(|e| panic!("{e}"))
}

fn shard(name: &str, extra: &str) -> String {
    format!(
        r#"{{"name":"{name}","state":"serving","epoch":1,"primary":"h:1","hosts":["h:1"],"source":"probe","patroni":null,"in_flight":0,"buffer":{{"state":"idle","depth":0}},"since_ms":1,"reason":"","split_brain":[],"watched":[],"coordination":null{extra}}}"#
    )
}

#[test]
fn coordination_is_shown_up_or_down_with_members_and_the_operation() {
    let main = shard("main", "").replace(
        r#""coordination":null"#,
        r#""coordination":{
            "recorded":{"primary":"10.0.0.2:5432","epoch":4,"by":"b"},
            "operation":{"id":"a-1","kind":"switchover","coordinator":"a","epoch":3,
              "from":"10.0.0.1:5432","phase":"hold","acks":[{"proxy":"b"}],
              "locked_by":"a","this_proxy":"taking part","error":null}}"#,
    );
    let v = shards(&format!(
        r#"{{"shards":[{main}],
          "coordination":{{"enabled":true,"up":true,"proxy":"b","prefix":"/handoff",
            "members":[{{"id":"a","admin":"10.0.0.5:6480","self":false}},
                       {{"id":"b","admin":"10.0.0.6:6480","self":true}}]}}}}"#
    ));
    let lines = coordination_lines(&v);
    assert!(lines[0].starts_with("coordination up: proxy b of /handoff (2 members: a (admin 10.0.0.5:6480), b (admin 10.0.0.6:6480, this one))"), "{lines:?}");
    assert!(
        lines[1].contains("recorded primary 10.0.0.2:5432 at epoch 4 (by b)"),
        "{lines:?}"
    );
    assert!(lines[2].contains("operation a-1 (switchover, coordinated by a): hold; acknowledged by [b]; this proxy: taking part"), "{lines:?}");

    let down = shards(
        r#"{"shards":[],"coordination":{"enabled":true,"up":false,"proxy":"b","prefix":"/h","error":"etcd: no answer"}}"#,
    );
    assert!(coordination_lines(&down)[0]
        .starts_with("coordination DOWN: proxy b of /h: etcd: no answer"));
    let off = shards(r#"{"shards":[],"coordination":{"enabled":false}}"#);
    assert_eq!(
        coordination_lines(&off),
        ["coordination off (HANDOFF_ETCD_ENDPOINTS is not set)"]
    );
}

#[test]
fn acknowledgements_name_the_coordinator_and_whoever_is_missing() {
    let c: api::report::Coordinated = api::decode(
        br#"{"proxies":[{"proxy":"a","coordinator":true,"ack_ms":0.0,"lameduck_ms":null,"cancelled":null},{"proxy":"b","ack_ms":41.5,"lameduck_ms":3,"cancelled":0}],"missing":["c"]}"#,
    )
    .unwrap();
    assert_eq!(
        acknowledgements(&c).unwrap(),
        "acknowledged by a (coordinator), b 41.5 ms; NOT by c"
    );
}

#[test]
fn managed_shards_show_the_leader_members_and_what_handoff_serves_and_others_nothing() {
    let with = |name: &str, manager: &str| shard(name, &format!(r#","manager":{manager}"#));
    let v = shards(&format!(
        r#"{{"shards":[{},{},{},{},{}],"coordination":{{"enabled":false}}}}"#,
        with(
            "main",
            r#"{"kind":"patroni","endpoints":[],"cluster":"s","paused":null,"leader":"pg1","stopping":null,"agrees":true,"members":[
            {"name":"pg0","addr":"10.0.0.1:5432","leader":false,"role":"replica","state":"streaming","timeline":1,"not_candidate":null},
            {"name":"pg1","addr":"h:1","leader":true,"role":"leader","state":"running","timeline":1,"not_candidate":"is already the leader"}]}"#
        ),
        shard("other", ""),
        with(
            "paf",
            r#"{"kind":"pg_auto_failover","endpoints":[],"cluster":"default/0","paused":null,"leader":null,"stopping":"h:1","agrees":false,"members":[
            {"name":"node_1","addr":"h:1","leader":false,"role":"primary -> draining","state":"healthy","timeline":1,"not_candidate":"x"}]}"#
        ),
        with(
            "new",
            r#"{"kind":"patroni","endpoints":[],"cluster":null,"paused":null,"leader":null,"stopping":null,"agrees":null,"members":null}"#
        ),
        with(
            "down",
            r#"{"kind":"pg_auto_failover","endpoints":[],"cluster":"default/0","paused":null,"leader":"node_1","stopping":null,"agrees":true,"members":[],"error":"connection refused"}"#
        ),
    ));
    assert_eq!(
        manager_lines(&v),
        [
            "patroni main: leader pg1; pg0 10.0.0.1:5432 replica streaming, pg1 h:1 leader running; handoff serves it (h:1)",
            "pg_auto_failover paf: leader (none); node_1 h:1 primary -> draining healthy; handoff serves h:1 (serving); told h:1 to stop taking writes",
            "patroni new: not answered yet",
            "pg_auto_failover down: NOT ANSWERING (connection refused); handoff serves h:1 (serving)",
        ]
    );
}

#[test]
fn standbys_are_shown_with_their_state_lag_and_upstream_and_the_primary_is_not() {
    let v = shards(&format!(
        r#"{{"shards":[{}],"coordination":{{"enabled":false}}}}"#,
        shard(
            "main",
            r#","standbys":[
            {"host":"h:1","in_rotation":false,"state":"not_standby","lag_bytes":null,"lag_seconds":null,"upstream":null,"transactions":0,"chosen":0,"detail":"the shard's primary"},
            {"host":"h:2","in_rotation":true,"state":"in_rotation","lag_bytes":0,"lag_seconds":0.0,"upstream":"h:1","transactions":3,"chosen":40,"detail":""},
            {"host":"h:3","in_rotation":false,"state":"lagging","lag_bytes":20000000,"lag_seconds":12.5,"upstream":"h:1","transactions":0,"chosen":2,"detail":""}]"#
        )
    ));
    assert_eq!(
        standby_lines(&v),
        [
            "standby      shard main: h:2 in_rotation, lag 0 bytes / 0.0s, from h:1, 3 reading now",
            "standby      shard main: h:3 lagging, lag 20000000 bytes / 12.5s, from h:1, 0 reading now",
        ]
    );
    // An answer from a proxy without standbys in it still reads.
    let old = shards(&format!(
        r#"{{"shards":[{}],"coordination":{{"enabled":false}}}}"#,
        shard("main", "")
    ));
    assert!(standby_lines(&old).is_empty());
}

#[test]
fn the_command_line_parses_as_documented() {
    let cli = Cli::try_parse_from([
        "handoff",
        "hold",
        "--shard",
        "main",
        "--timeout",
        "2s",
        "--admin",
        "0.0.0.0:1",
    ])
    .unwrap();
    let Some(Command::Hold(h)) = cli.command else {
        panic!("not a hold")
    };
    assert_eq!(h.timeout, Duration::from_secs(2));
    let c = Client::new(&h.admin).unwrap();
    assert_eq!(c.addr, "127.0.0.1:1".parse().unwrap());
    assert!(Cli::try_parse_from(["handoff", "hold", "--shard", "m", "--timeout", "0s"]).is_err());
    let e = Cli::try_parse_from(["handoff", "switchover", "--shard", "main"]).unwrap_err();
    assert!(e.to_string().contains("--to HOST:PORT"), "{e}");
}

#[test]
fn a_proxy_that_does_not_answer_in_time_is_reported_as_such() {
    // Accepts, then says nothing: the request gives up at its timeout, with the message
    // Patroni's hook log shows.
    let quiet = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let client = Client {
        addr: quiet.local_addr().unwrap(),
        token: None,
    };
    let err = client
        .call(Method::GET, "/v1/shards", None, Duration::from_millis(200))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "no answer from the admin API: no answer within 200ms"
    );
}
