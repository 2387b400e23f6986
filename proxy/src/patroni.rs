//! A client of Patroni's REST API for the shards it manages (`HANDOFF_PATRONI`):
//! `GET /cluster` (members, their addresses and roles, the leader) and
//! `POST /switchover`. Plain HTTP/1.1 over hyper, one connection per request, endpoints
//! tried in order. It only reads and asks; what handoff does with the answers lives in
//! the shard layer (`shard::patroni`).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpStream;

use crate::config::HostPort;

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
    pub fn parse(v: &Value) -> Result<Self, PatroniError> {
        let members = v
            .get("members")
            .and_then(Value::as_array)
            .ok_or_else(|| PatroniError::Malformed("no \"members\" list".into()))?;
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

    /// The member named `name`, or listening on `name` (`host:port`).
    pub fn member(&self, name: &str) -> Option<&Member> {
        self.members
            .iter()
            .find(|m| m.name == name)
            .or_else(|| self.members.iter().find(|m| m.addr.to_string() == name))
    }

    /// The member listening on `addr`.
    pub fn at(&self, addr: &HostPort) -> Option<&Member> {
        self.members.iter().find(|m| &m.addr == addr)
    }
}

/// `http://host:port/patroni` → `host:port`.
fn api_of_url(url: &str) -> Option<HostPort> {
    let rest = url.strip_prefix("http://")?;
    let authority = rest.split('/').next()?;
    HostPort::parse_any(authority).ok()
}

/// Why Patroni could not be asked, or what it refused.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PatroniError {
    #[error("{0}")]
    Unreachable(String),
    /// Patroni answered with this status and message.
    #[error("Patroni answered {status}: {message}")]
    Refused { status: u16, message: String },
    #[error("malformed answer from Patroni: {0}")]
    Malformed(String),
}

/// The Patroni REST API of one shard.
#[derive(Debug)]
pub struct Source {
    pub shard: String,
    endpoints: Vec<HostPort>,
    timeout: Duration,
    /// The last `GET /cluster` answer (any endpoint), for status and discovery.
    pub view: tokio::sync::watch::Sender<Option<Arc<Cluster>>>,
}

impl Source {
    pub fn new(shard: &str, endpoints: Vec<HostPort>, timeout: Duration) -> Self {
        Self {
            shard: shard.to_string(),
            endpoints,
            timeout,
            view: tokio::sync::watch::channel(None).0,
        }
    }

    /// The configured REST endpoints.
    pub fn endpoints(&self) -> &[HostPort] {
        &self.endpoints
    }

    /// `GET /cluster` from the first endpoint that answers; remembered in `view`.
    pub async fn cluster(&self) -> Result<Arc<Cluster>, PatroniError> {
        let mut last = PatroniError::Unreachable("no endpoint configured".into());
        for ep in &self.endpoints {
            let r = match request(ep, Method::GET, "/cluster", None, self.timeout).await {
                Ok((200, body)) => serde_json::from_slice::<Value>(&body)
                    .map_err(|e| PatroniError::Malformed(e.to_string()))
                    .and_then(|v| Cluster::parse(&v)),
                Ok((status, body)) => Err(PatroniError::Refused {
                    status,
                    message: message(&body),
                }),
                Err(e) => Err(e),
            };
            let label = match &r {
                Ok(_) => "ok",
                Err(PatroniError::Unreachable(_)) => "unreachable",
                Err(_) => "error",
            };
            metrics::counter!(crate::metrics::PATRONI_REQUESTS, "shard" => self.shard.clone(), "request" => "cluster", "result" => label)
                .increment(1);
            match r {
                Ok(c) => {
                    let c = Arc::new(c);
                    self.view.send_replace(Some(Arc::clone(&c)));
                    return Ok(c);
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// `POST /switchover {"leader", "candidate"}` to `api` (the leader's REST API),
    /// else to the configured endpoints in order. Patroni answers when the switchover
    /// is over (or refused): its message on success.
    pub async fn switchover(
        &self,
        api: Option<&HostPort>,
        leader: &str,
        candidate: &str,
        timeout: Duration,
    ) -> Result<String, PatroniError> {
        let body = serde_json::json!({ "leader": leader, "candidate": candidate }).to_string();
        let mut targets: Vec<&HostPort> = api.into_iter().collect();
        targets.extend(self.endpoints.iter().filter(|e| Some(*e) != api));
        let mut last = PatroniError::Unreachable("no endpoint configured".into());
        for ep in targets {
            let r = request(ep, Method::POST, "/switchover", Some(body.clone()), timeout).await;
            let label = match &r {
                Ok((s, _)) if *s < 300 => "ok",
                Ok(_) => "refused",
                Err(_) => "unreachable",
            };
            metrics::counter!(crate::metrics::PATRONI_REQUESTS, "shard" => self.shard.clone(), "request" => "switchover", "result" => label)
                .increment(1);
            match r {
                Ok((s, b)) if s < 300 => return Ok(message(&b)),
                Ok((status, b)) => {
                    return Err(PatroniError::Refused {
                        status,
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
) -> Result<(u16, Bytes), PatroniError> {
    let work = async {
        let stream = TcpStream::connect((ep.host.as_str(), ep.port))
            .await
            .map_err(|e| PatroniError::Unreachable(format!("{ep}: {e}")))?;
        let _ = stream.set_nodelay(true);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| PatroniError::Unreachable(format!("{ep}: {e}")))?;
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
            .map_err(|e| PatroniError::Malformed(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| PatroniError::Unreachable(format!("{ep}: {e}")))?;
        let status = resp.status().as_u16();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| PatroniError::Unreachable(format!("{ep}: {e}")))?
            .to_bytes();
        conn.abort();
        Ok((status, bytes))
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(PatroniError::Unreachable(format!(
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
        assert_eq!(c.member("127.0.0.1:25432").unwrap().name, "pg0");
        assert!(c.member("pg9").is_none());
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
