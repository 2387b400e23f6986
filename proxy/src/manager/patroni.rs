//! Patroni (`HANDOFF_PATRONI`), through its REST API: `GET /cluster` (members, their
//! addresses and roles, the leader, maintenance mode) and `POST /switchover`. Plain
//! HTTP/1.1 over hyper, one connection per request, endpoints tried in order. Patroni
//! signals a coming stop of the leader by its `before_stop` hook calling `handoff hold`
//! (`HANDOFF_PATRONI_HOOK`), not in its view.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpStream;

use super::{Fut, Intervals, Kind, Manager, ManagerError, View};
use crate::config::{HostPort, PatroniSettings};
use crate::sync::Locked;

/// One member of a Patroni cluster, as `GET /cluster` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    /// `leader`, `standby_leader`, `replica`, `sync_standby`, `quorum_standby`, …
    pub role: String,
    /// `running`, `streaming`, `stopped`, `starting`, `stopping`, `crashed`, …
    pub state: String,
    /// Where its PostgreSQL listens.
    pub addr: HostPort,
    /// Its REST API (`host:port`), from `api_url`.
    pub api: Option<HostPort>,
    /// As Patroni last reported it (may lag behind a promotion).
    pub timeline: Option<u32>,
}

impl Member {
    /// Holds Patroni's leader lock as a primary (not a standby cluster's leader).
    pub fn is_leader(&self) -> bool {
        matches!(self.role.as_str(), "leader" | "master" | "primary")
    }
}

/// What `GET /cluster` answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    pub scope: String,
    pub members: Vec<Member>,
    /// Maintenance mode: Patroni neither fails over nor switches over.
    pub paused: bool,
}

impl Cluster {
    /// Parses a `GET /cluster` body. Members without a usable address are skipped.
    pub fn parse(v: &Value) -> Result<Self, ManagerError> {
        let members = v
            .get("members")
            .and_then(Value::as_array)
            .ok_or_else(|| ManagerError::Malformed("no \"members\" list".into()))?;
        let members = members
            .iter()
            .filter_map(|m| {
                let host = m.get("host")?.as_str()?.to_string();
                let port = u16::try_from(m.get("port")?.as_u64()?).ok()?;
                let api = m
                    .get("api_url")
                    .and_then(Value::as_str)
                    .and_then(api_of_url);
                Some(Member {
                    name: m.get("name")?.as_str()?.to_string(),
                    role: m.get("role").and_then(Value::as_str).unwrap_or("").into(),
                    state: m.get("state").and_then(Value::as_str).unwrap_or("").into(),
                    addr: HostPort { host, port },
                    api,
                    timeline: m
                        .get("timeline")
                        .and_then(Value::as_u64)
                        .and_then(|t| u32::try_from(t).ok()),
                })
            })
            .collect();
        Ok(Self {
            scope: v
                .get("scope")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            members,
            paused: v.get("pause").and_then(Value::as_bool).unwrap_or(false),
        })
    }

    /// The member holding the leader lock as a primary.
    pub fn leader(&self) -> Option<&Member> {
        self.members.iter().find(|m| m.is_leader())
    }

    /// The member named `name`.
    pub fn member(&self, name: &str) -> Option<&Member> {
        self.members.iter().find(|m| m.name == name)
    }

    /// The answer as a manager's [`View`].
    pub fn view(&self) -> View {
        View {
            name: self.scope.clone(),
            members: self
                .members
                .iter()
                .map(|m| super::Member {
                    name: m.name.clone(),
                    addr: m.addr.clone(),
                    leader: m.is_leader(),
                    role: m.role.clone(),
                    state: m.state.clone(),
                    timeline: m.timeline,
                    not_candidate: if m.is_leader() {
                        Some("is already the leader".into())
                    } else if !matches!(m.state.as_str(), "streaming" | "running") {
                        Some(format!("is {}, not streaming from the leader", m.state))
                    } else {
                        None
                    },
                })
                .collect(),
            paused: self.paused.then(|| {
                format!(
                    "Patroni cluster \"{}\" is paused (maintenance mode): it does not switch over",
                    self.scope
                )
            }),
            stopping: None,
        }
    }
}

/// `http://host:port/patroni` → `host:port`.
fn api_of_url(url: &str) -> Option<HostPort> {
    let rest = url.strip_prefix("http://")?;
    let authority = rest.split('/').next()?;
    HostPort::parse_any(authority).ok()
}

/// The Patroni REST API of one shard.
#[derive(Debug)]
pub struct Source {
    pub shard: String,
    endpoints: Vec<HostPort>,
    timeout: Duration,
    intervals: Intervals,
    hook: bool,
    /// The last `GET /cluster` answer (any endpoint): its members' REST APIs are where
    /// a switchover is asked.
    cluster: std::sync::Mutex<Option<Arc<Cluster>>>,
    /// The same answer as a [`View`].
    view: std::sync::Mutex<Option<Arc<View>>>,
    /// Why the last `GET /cluster` failed, if it did.
    error: std::sync::Mutex<Option<String>>,
}

impl Source {
    pub fn new(shard: &str, endpoints: Vec<HostPort>, settings: &PatroniSettings) -> Self {
        Self {
            shard: shard.to_string(),
            endpoints,
            timeout: settings.timeout,
            intervals: Intervals {
                follow: settings.interval,
                held: settings.held_interval,
            },
            hook: settings.hook,
            cluster: std::sync::Mutex::new(None),
            view: std::sync::Mutex::new(None),
            error: std::sync::Mutex::new(None),
        }
    }

    /// `GET /cluster` from the first endpoint that answers; remembered in `view`.
    pub async fn cluster(&self) -> Result<Arc<Cluster>, ManagerError> {
        let mut last = ManagerError::Unreachable("no endpoint configured".into());
        for ep in &self.endpoints {
            let r = match request(ep, Method::GET, "/cluster", None, self.timeout).await {
                Ok((200, body)) => serde_json::from_slice::<Value>(&body)
                    .map_err(|e| ManagerError::Malformed(e.to_string()))
                    .and_then(|v| Cluster::parse(&v)),
                Ok((status, body)) => Err(ManagerError::Refused {
                    code: status.to_string(),
                    message: message(&body),
                }),
                Err(e) => Err(e),
            };
            let label = match &r {
                Ok(_) => "ok",
                Err(ManagerError::Unreachable(_)) => "unreachable",
                Err(_) => "error",
            };
            metrics::counter!(crate::metrics::PATRONI_REQUESTS, "shard" => self.shard.clone(), "request" => "cluster", "result" => label)
                .increment(1);
            super::count(Kind::Patroni, &self.shard, "view", label);
            match r {
                Ok(c) => {
                    let c = Arc::new(c);
                    *self.view.locked() = Some(Arc::new(c.view()));
                    *self.cluster.locked() = Some(Arc::clone(&c));
                    *self.error.locked() = None;
                    return Ok(c);
                }
                Err(e) => last = e,
            }
        }
        *self.error.locked() = Some(last.to_string());
        Err(last)
    }

    /// `POST /switchover {"leader", "candidate"}` to `api` (the leader's REST API),
    /// else to the configured endpoints in order. Patroni answers when the switchover
    /// is over (or refused): its message on success.
    pub async fn post_switchover(
        &self,
        api: Option<&HostPort>,
        leader: &str,
        candidate: &str,
        timeout: Duration,
    ) -> Result<String, ManagerError> {
        let body = serde_json::json!({ "leader": leader, "candidate": candidate }).to_string();
        let mut targets: Vec<&HostPort> = api.into_iter().collect();
        targets.extend(self.endpoints.iter().filter(|e| Some(*e) != api));
        let mut last = ManagerError::Unreachable("no endpoint configured".into());
        for ep in targets {
            let r = request(ep, Method::POST, "/switchover", Some(body.clone()), timeout).await;
            let label = match &r {
                Ok((s, _)) if *s < 300 => "ok",
                Ok(_) => "refused",
                Err(_) => "unreachable",
            };
            metrics::counter!(crate::metrics::PATRONI_REQUESTS, "shard" => self.shard.clone(), "request" => "switchover", "result" => label)
                .increment(1);
            super::count(Kind::Patroni, &self.shard, "switchover", label);
            match r {
                Ok((s, b)) if s < 300 => return Ok(message(&b)),
                Ok((status, b)) => {
                    return Err(ManagerError::Refused {
                        code: status.to_string(),
                        message: message(&b),
                    })
                }
                // Not reached: the next endpoint may be.
                Err(e) => last = e,
            }
        }
        Err(last)
    }
}

impl Manager for Source {
    fn kind(&self) -> Kind {
        Kind::Patroni
    }

    fn endpoints(&self) -> Vec<String> {
        self.endpoints
            .iter()
            .map(|e| format!("http://{e}"))
            .collect()
    }

    fn intervals(&self) -> Intervals {
        self.intervals
    }

    fn view(&self) -> Fut<'_, Result<Arc<View>, ManagerError>> {
        Box::pin(async move {
            self.cluster().await?;
            self.view
                .locked()
                .clone()
                .ok_or_else(|| ManagerError::Malformed("no view".into()))
        })
    }

    fn last(&self) -> Option<Arc<View>> {
        self.view.locked().clone()
    }

    fn last_error(&self) -> Option<String> {
        self.error.locked().clone()
    }

    fn changed(&self, idle: Duration) -> Fut<'_, ()> {
        // Patroni sends nothing: it is read again after `idle`.
        Box::pin(tokio::time::sleep(idle))
    }

    fn switchover<'a>(
        &'a self,
        leader: &'a super::Member,
        candidate: &'a super::Member,
        timeout: Duration,
    ) -> Fut<'a, Result<String, ManagerError>> {
        Box::pin(async move {
            // Asked of the leader's own REST API first (Patroni's advice).
            let api = self
                .cluster
                .locked()
                .as_ref()
                .and_then(|c| c.member(&leader.name).and_then(|m| m.api.clone()));
            self.post_switchover(api.as_ref(), &leader.name, &candidate.name, timeout)
                .await
        })
    }

    fn hold_hook(&self) -> bool {
        self.hook
    }
}

/// Patroni answers text (or JSON) bodies; one trimmed line for messages.
fn message(body: &[u8]) -> String {
    let s = String::from_utf8_lossy(body);
    s.trim().chars().take(500).collect()
}

/// One HTTP/1.1 request with its own connection, within `timeout`.
async fn request(
    ep: &HostPort,
    method: Method,
    path: &str,
    body: Option<String>,
    timeout: Duration,
) -> Result<(u16, Bytes), ManagerError> {
    let work = async {
        let stream = TcpStream::connect((ep.host.as_str(), ep.port))
            .await
            .map_err(|e| ManagerError::Unreachable(format!("{ep}: {e}")))?;
        let _ = stream.set_nodelay(true);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ManagerError::Unreachable(format!("{ep}: {e}")))?;
        let conn = tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, ep.to_string())
            .header(hyper::header::CONNECTION, "close");
        if body.is_some() {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ManagerError::Malformed(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| ManagerError::Unreachable(format!("{ep}: {e}")))?;
        let status = resp.status().as_u16();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| ManagerError::Unreachable(format!("{ep}: {e}")))?
            .to_bytes();
        conn.abort();
        Ok((status, bytes))
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(ManagerError::Unreachable(format!(
            "{ep}: no answer within {timeout:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_answers_name_the_leader_and_every_member_address() {
        let v: Value = serde_json::from_str(
            r#"{"members": [
              {"name": "pg0", "role": "replica", "state": "stopped", "api_url": "http://127.0.0.1:28008/patroni",
               "host": "127.0.0.1", "port": 25432, "lag": "unknown"},
              {"name": "pg1", "role": "leader", "state": "running", "api_url": "http://127.0.0.1:28009/patroni",
               "host": "127.0.0.1", "port": 25433, "timeline": 2},
              {"name": "broken", "role": "replica"}],
             "scope": "hx", "pause": true}"#,
        )
        .unwrap();
        let c = Cluster::parse(&v).unwrap();
        assert_eq!(c.scope, "hx");
        assert!(c.paused);
        assert_eq!(c.members.len(), 2, "a member without an address is skipped");
        let leader = c.leader().unwrap();
        assert_eq!(leader.name, "pg1");
        assert_eq!(leader.addr.to_string(), "127.0.0.1:25433");
        assert_eq!(leader.api.as_ref().unwrap().to_string(), "127.0.0.1:28009");
        assert_eq!(leader.timeline, Some(2));
        assert_eq!(c.member("pg0").unwrap().addr.port, 25432);
        assert!(c.member("pg9").is_none());
        let view = c.view();
        assert_eq!(view.member("127.0.0.1:25432").unwrap().name, "pg0");
        assert_eq!(view.leader().unwrap().name, "pg1");
        assert!(
            view.paused.is_some(),
            "a paused cluster says it will not switch over"
        );
        assert_eq!(
            view.member("pg0").unwrap().not_candidate.as_deref(),
            Some("is stopped, not streaming from the leader")
        );
        assert_eq!(
            view.member("pg1").unwrap().not_candidate.as_deref(),
            Some("is already the leader")
        );
        assert_eq!(c.members[0].timeline, None);
        // A standby cluster's leader is not a primary.
        let v: Value = serde_json::from_str(
            r#"{"members": [{"name": "s", "role": "standby_leader", "host": "h", "port": 1}]}"#,
        )
        .unwrap();
        assert!(Cluster::parse(&v).unwrap().leader().is_none());
        assert!(Cluster::parse(&serde_json::json!({"scope": "x"})).is_err());
    }
}
