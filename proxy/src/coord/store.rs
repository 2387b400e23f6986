//! The few etcd v3 operations coordination uses, over etcd's gRPC API, each bounded by
//! `HANDOFF_ETCD_TIMEOUT`, with one error type.
//!
//! The gRPC client is generated from `proxy/proto/etcd.proto` (the part of etcd's API
//! used here) and committed as `proxy/generated/etcdserverpb.rs`, so that building handoff needs no
//! protobuf compiler; a test checks that the committed code is what the `.proto`
//! generates. The transport is tonic's HTTP/2 channel, balanced over every endpoint.

use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use super::etcdserverpb as pb;
use crate::config::EtcdSettings;
use pb::kv_client::KvClient;
use pb::lease_client::LeaseClient;
use pb::watch_client::WatchClient;

/// An etcd request failed or did not answer in time.
#[derive(Debug, Clone, thiserror::Error)]
#[error("etcd: {0}")]
pub(crate) struct StoreError(pub String);

impl From<tonic::Status> for StoreError {
    fn from(s: tonic::Status) -> Self {
        // tonic's own Display lists the metadata and details too; the code and the
        // message are what an operator needs.
        StoreError(format!("{:?}: {}", s.code(), s.message()))
    }
}

/// Why the etcd client could not be set up (bad CA file, bad endpoint).
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("cannot read HANDOFF_ETCD_CA_FILE {path}: {source}")]
    CaFile {
        path: String,
        source: std::io::Error,
    },
    #[error("HANDOFF_ETCD_ENDPOINTS: {endpoint}: {reason}")]
    Endpoint { endpoint: String, reason: String },
}

/// One key's value and revisions.
#[derive(Debug, Clone)]
pub(crate) struct Kv {
    pub key: String,
    pub value: Vec<u8>,
    pub mod_revision: i64,
}

impl From<&pb::KeyValue> for Kv {
    fn from(kv: &pb::KeyValue) -> Self {
        Self {
            key: String::from_utf8_lossy(&kv.key).into_owned(),
            value: kv.value.clone(),
            mod_revision: kv.mod_revision,
        }
    }
}

/// The end of the key range holding every key that starts with `prefix`: the prefix
/// with its last byte that is not 0xff incremented, and what follows it dropped (etcd's
/// convention; `\0` means "to the end of the key space").
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// The etcd client. Cheap to clone; connects lazily, so a proxy starts even when etcd
/// is down, and reconnects by itself.
#[derive(Clone)]
pub(crate) struct Store {
    channel: Channel,
    timeout: Duration,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// A watch on a range of keys: [`WatchStream::message`] waits for the next change.
pub(crate) struct WatchStream {
    answers: tonic::codec::Streaming<pb::WatchResponse>,
    /// Keeps the request side open; dropped with the watch, which ends it.
    _open: Open,
}

impl WatchStream {
    /// The next batch of changes. `Ok(None)`: etcd ended the watch; an error: the
    /// stream broke or etcd cancelled the watch (its start revision was compacted, say).
    pub async fn message(&mut self) -> Result<Option<pb::WatchResponse>, StoreError> {
        match self.answers.message().await? {
            Some(r) if r.canceled => Err(StoreError(format!(
                "the watch was cancelled: {} (compacted at revision {})",
                r.cancel_reason, r.compact_revision
            ))),
            other => Ok(other),
        }
    }
}

/// Holds a request stream of [`one_then_open`] open; dropping it ends the stream.
pub(crate) struct Open(#[allow(dead_code)] tokio::sync::oneshot::Sender<()>);

/// A stream of one request that then stays open until the returned [`Open`] is
/// dropped: etcd ends a stream call whose sender has finished, so a watch or a lease
/// renewal must keep its request side open while it reads the answers — but no longer.
/// A request side that never ended kept a task of the HTTP/2 client sending it alive
/// for good: one per lease renewal, about one and a half a second (the fault campaign
/// found it as a proxy's tasks growing without load).
fn one_then_open<T: Send + Unpin + 'static>(
    item: T,
) -> (impl tokio_stream::Stream<Item = T> + Send + 'static, Open) {
    let (open, closed) = tokio::sync::oneshot::channel();
    (
        OneThenOpen {
            item: Some(item),
            closed,
        },
        Open(open),
    )
}

struct OneThenOpen<T> {
    item: Option<T>,
    closed: tokio::sync::oneshot::Receiver<()>,
}

impl<T: Unpin> tokio_stream::Stream for OneThenOpen<T> {
    type Item = T;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<T>> {
        use std::future::Future;
        if let Some(item) = self.item.take() {
            return std::task::Poll::Ready(Some(item));
        }
        // Ends once the holder of `Open` drops it (nothing is ever sent).
        std::pin::Pin::new(&mut self.closed).poll(cx).map(|_| None)
    }
}

impl Store {
    pub async fn connect(settings: &EtcdSettings) -> Result<Self, SetupError> {
        let tls = match &settings.ca_file {
            Some(path) => {
                let pem = std::fs::read(path).map_err(|source| SetupError::CaFile {
                    path: path.display().to_string(),
                    source,
                })?;
                Some(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)))
            }
            None => None,
        };
        let mut endpoints = Vec::with_capacity(settings.endpoints.len());
        for given in &settings.endpoints {
            let bad = |reason: String| SetupError::Endpoint {
                endpoint: given.clone(),
                reason,
            };
            let uri = if given.contains("://") {
                given.clone()
            } else {
                format!("http://{given}")
            };
            let mut endpoint = Endpoint::from_shared(uri)
                .map_err(|e| bad(e.to_string()))?
                .connect_timeout(settings.timeout)
                .http2_keep_alive_interval(settings.timeout)
                .keep_alive_timeout(settings.timeout)
                .keep_alive_while_idle(true);
            if let Some(tls) = &tls {
                endpoint = endpoint
                    .tls_config(tls.clone())
                    .map_err(|e| bad(e.to_string()))?;
            }
            endpoints.push(endpoint);
        }
        Ok(Self {
            channel: Channel::balance_list(endpoints.into_iter()),
            timeout: settings.timeout,
        })
    }

    fn kv(&self) -> KvClient<Channel> {
        KvClient::new(self.channel.clone())
    }

    fn lease(&self) -> LeaseClient<Channel> {
        LeaseClient::new(self.channel.clone())
    }

    async fn bounded<T>(
        &self,
        work: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(StoreError(format!("no answer within {:?}", self.timeout))),
        }
    }

    /// Every key under `prefix`, and the store's revision when read.
    pub async fn list(&self, prefix: &str) -> Result<(Vec<Kv>, i64), StoreError> {
        let request = pb::RangeRequest {
            key: prefix.into(),
            range_end: prefix_end(prefix.as_bytes()),
        };
        let mut kv = self.kv();
        let r = self
            .bounded(async { Ok(kv.range(request).await?.into_inner()) })
            .await?;
        let revision = r.header.map(|h| h.revision).unwrap_or(0);
        Ok((r.kvs.iter().map(Kv::from).collect(), revision))
    }

    pub async fn get(&self, key: &str) -> Result<Option<Kv>, StoreError> {
        let request = pb::RangeRequest {
            key: key.into(),
            range_end: Vec::new(),
        };
        let mut kv = self.kv();
        let r = self
            .bounded(async { Ok(kv.range(request).await?.into_inner()) })
            .await?;
        Ok(r.kvs.first().map(Kv::from))
    }

    pub async fn put(
        &self,
        key: &str,
        value: String,
        lease: Option<i64>,
    ) -> Result<(), StoreError> {
        let request = put_request(key, value, lease);
        let mut kv = self.kv();
        self.bounded(async { Ok(kv.put(request).await.map(|_| ())?) })
            .await
    }

    /// Writes `key` only if it does not exist. True if written.
    pub async fn create(
        &self,
        key: &str,
        value: String,
        lease: Option<i64>,
    ) -> Result<bool, StoreError> {
        let when = compare(key, pb::compare::TargetUnion::CreateRevision(0));
        self.txn(when, put_op(key, value, lease)).await
    }

    /// Writes `key` only if it was last modified at `mod_revision` (0: does not
    /// exist). True if written.
    pub async fn swap(
        &self,
        key: &str,
        value: String,
        mod_revision: i64,
    ) -> Result<bool, StoreError> {
        let when = compare(key, pb::compare::TargetUnion::ModRevision(mod_revision));
        self.txn(when, put_op(key, value, None)).await
    }

    /// Writes `key` only while `lock` is held under `lease`. True if written.
    pub async fn put_holding(
        &self,
        lock: &str,
        lease: i64,
        key: &str,
        value: String,
    ) -> Result<bool, StoreError> {
        let when = compare(lock, pb::compare::TargetUnion::Lease(lease));
        self.txn(when, put_op(key, value, None)).await
    }

    /// Runs `then` if `when` holds. True if it ran.
    async fn txn(&self, when: pb::Compare, then: pb::RequestOp) -> Result<bool, StoreError> {
        let request = pb::TxnRequest {
            compare: vec![when],
            success: vec![then],
            failure: Vec::new(),
        };
        let mut kv = self.kv();
        self.bounded(async { Ok(kv.txn(request).await?.into_inner().succeeded) })
            .await
    }

    /// Deletes `key` if it is held under `lease` (a lock released by its holder).
    pub async fn delete_holding(&self, key: &str, lease: i64) -> Result<(), StoreError> {
        let when = compare(key, pb::compare::TargetUnion::Lease(lease));
        let delete = pb::RequestOp {
            request: Some(pb::request_op::Request::RequestDeleteRange(
                pb::DeleteRangeRequest {
                    key: key.into(),
                    range_end: Vec::new(),
                },
            )),
        };
        self.txn(when, delete).await.map(|_| ())
    }

    pub async fn delete_prefix(&self, prefix: &str) -> Result<(), StoreError> {
        let request = pb::DeleteRangeRequest {
            key: prefix.into(),
            range_end: prefix_end(prefix.as_bytes()),
        };
        let mut kv = self.kv();
        self.bounded(async { Ok(kv.delete_range(request).await.map(|_| ())?) })
            .await
    }

    /// A new lease of `ttl` (whole seconds).
    pub async fn grant(&self, ttl: Duration) -> Result<i64, StoreError> {
        let request = pb::LeaseGrantRequest {
            ttl: ttl.as_secs() as i64,
            id: 0,
        };
        let mut lease = self.lease();
        let r = self
            .bounded(async { Ok(lease.lease_grant(request).await?.into_inner()) })
            .await?;
        if !r.error.is_empty() {
            return Err(StoreError(format!("lease not granted: {}", r.error)));
        }
        Ok(r.id)
    }

    /// Renews `lease` once. `Ok(false)`: the lease is gone (expired or revoked).
    pub async fn renew(&self, lease: i64) -> Result<bool, StoreError> {
        let mut client = self.lease();
        let work = async move {
            let (request, _open) = one_then_open(pb::LeaseKeepAliveRequest { id: lease });
            let mut answers = client.lease_keep_alive(request).await?.into_inner();
            match answers.message().await? {
                Some(r) => Ok(r.ttl > 0),
                None => Ok(false),
            }
        };
        self.bounded(work).await
    }

    pub async fn revoke(&self, lease: i64) -> Result<(), StoreError> {
        let mut client = self.lease();
        let request = pb::LeaseRevokeRequest { id: lease };
        self.bounded(async { Ok(client.lease_revoke(request).await.map(|_| ())?) })
            .await
    }

    /// Watches every key under `prefix` from `revision` on. Returns once etcd has
    /// confirmed the watch.
    pub async fn watch(&self, prefix: &str, revision: i64) -> Result<WatchStream, StoreError> {
        let mut client = WatchClient::new(self.channel.clone());
        let create = pb::WatchRequest {
            request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
                pb::WatchCreateRequest {
                    key: prefix.into(),
                    range_end: prefix_end(prefix.as_bytes()),
                    start_revision: revision,
                },
            )),
        };
        let work = async move {
            let (request, open) = one_then_open(create);
            let answers = client.watch(request).await?.into_inner();
            let mut stream = WatchStream {
                answers,
                _open: open,
            };
            match stream.message().await? {
                Some(r) if r.created => Ok(stream),
                Some(_) => Err(StoreError(
                    "the watch's first answer did not confirm it".into(),
                )),
                None => Err(StoreError(
                    "etcd ended the watch before confirming it".into(),
                )),
            }
        };
        self.bounded(work).await
    }
}

fn put_request(key: &str, value: String, lease: Option<i64>) -> pb::PutRequest {
    pb::PutRequest {
        key: key.into(),
        value: value.into_bytes(),
        lease: lease.unwrap_or(0),
    }
}

fn put_op(key: &str, value: String, lease: Option<i64>) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(pb::request_op::Request::RequestPut(put_request(
            key, value, lease,
        ))),
    }
}

/// `key`'s create revision, mod revision or lease equals the value given.
fn compare(key: &str, equals: pb::compare::TargetUnion) -> pb::Compare {
    use pb::compare::{CompareResult, CompareTarget, TargetUnion};
    let target = match equals {
        TargetUnion::Version(_) => CompareTarget::Version,
        TargetUnion::CreateRevision(_) => CompareTarget::Create,
        TargetUnion::ModRevision(_) => CompareTarget::Mod,
        TargetUnion::Value(_) => CompareTarget::Value,
        TargetUnion::Lease(_) => CompareTarget::Lease,
    };
    pb::Compare {
        result: CompareResult::Equal as i32,
        target: target as i32,
        key: key.into(),
        target_union: Some(equals),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_covers_exactly_the_prefix() {
        assert_eq!(prefix_end(b"/handoff/"), b"/handoff0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
        assert_eq!(prefix_end(b""), vec![0]);
    }

    #[test]
    fn a_comparison_targets_what_it_compares() {
        let c = compare("k", pb::compare::TargetUnion::Lease(7));
        assert_eq!(c.target, pb::compare::CompareTarget::Lease as i32);
        assert_eq!(c.result, pb::compare::CompareResult::Equal as i32);
        let c = compare("k", pb::compare::TargetUnion::ModRevision(3));
        assert_eq!(c.target, pb::compare::CompareTarget::Mod as i32);
    }
}
