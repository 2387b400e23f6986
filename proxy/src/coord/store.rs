//! A thin layer over the etcd v3 client (`etcd-client`): the few operations
//! coordination uses, each bounded by `HANDOFF_ETCD_TIMEOUT`, with one error type.

use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, PutOptions, Txn, TxnOp,
    WatchOptions, WatchStream,
};

use crate::config::EtcdSettings;

/// An etcd request failed or did not answer in time.
#[derive(Debug, Clone, thiserror::Error)]
#[error("etcd: {0}")]
pub(crate) struct StoreError(pub String);

impl From<etcd_client::Error> for StoreError {
    fn from(e: etcd_client::Error) -> Self {
        StoreError(e.to_string())
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
    #[error("HANDOFF_ETCD_ENDPOINTS: {0}")]
    Client(etcd_client::Error),
}

/// One key's value and revisions.
#[derive(Debug, Clone)]
pub(crate) struct Kv {
    pub key: String,
    pub value: Vec<u8>,
    pub mod_revision: i64,
}

impl From<&etcd_client::KeyValue> for Kv {
    fn from(kv: &etcd_client::KeyValue) -> Self {
        Self {
            key: String::from_utf8_lossy(kv.key()).into_owned(),
            value: kv.value().to_vec(),
            mod_revision: kv.mod_revision(),
        }
    }
}

/// The etcd client. Cheap to clone; connects lazily, so a proxy starts even when etcd
/// is down.
#[derive(Clone)]
pub(crate) struct Store {
    client: Client,
    timeout: Duration,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Store {
    pub async fn connect(settings: &EtcdSettings) -> Result<Self, SetupError> {
        let mut options = ConnectOptions::new()
            .with_timeout(settings.timeout)
            .with_connect_timeout(settings.timeout)
            .with_keep_alive(settings.timeout, settings.timeout);
        if let Some(path) = &settings.ca_file {
            let pem = std::fs::read(path).map_err(|source| SetupError::CaFile {
                path: path.display().to_string(),
                source,
            })?;
            options = options.with_tls(
                etcd_client::TlsOptions::new()
                    .ca_certificate(etcd_client::Certificate::from_pem(pem)),
            );
        }
        let client = Client::connect(&settings.endpoints, Some(options))
            .await
            .map_err(SetupError::Client)?;
        Ok(Self {
            client,
            timeout: settings.timeout,
        })
    }

    async fn bounded<T>(
        &self,
        work: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, work).await {
            Ok(r) => r.map_err(StoreError::from),
            Err(_) => Err(StoreError(format!("no answer within {:?}", self.timeout))),
        }
    }

    /// Every key under `prefix`, and the store's revision when read.
    pub async fn list(&self, prefix: &str) -> Result<(Vec<Kv>, i64), StoreError> {
        let mut c = self.client.clone();
        let r = self
            .bounded(c.get(prefix, Some(GetOptions::new().with_prefix())))
            .await?;
        let rev = r.header().map(|h| h.revision()).unwrap_or(0);
        Ok((r.kvs().iter().map(Kv::from).collect(), rev))
    }

    pub async fn get(&self, key: &str) -> Result<Option<Kv>, StoreError> {
        let mut c = self.client.clone();
        let r = self.bounded(c.get(key, None)).await?;
        Ok(r.kvs().first().map(Kv::from))
    }

    pub async fn put(
        &self,
        key: &str,
        value: String,
        lease: Option<i64>,
    ) -> Result<(), StoreError> {
        let mut c = self.client.clone();
        let opts = lease.map(|l| PutOptions::new().with_lease(l));
        self.bounded(c.put(key, value, opts)).await.map(|_| ())
    }

    /// Writes `key` only if it does not exist. True if written.
    pub async fn create(
        &self,
        key: &str,
        value: String,
        lease: Option<i64>,
    ) -> Result<bool, StoreError> {
        let opts = lease.map(|l| PutOptions::new().with_lease(l));
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, value, opts)]);
        self.txn(txn).await
    }

    /// Writes `key` only if it was last modified at `mod_revision` (0: does not
    /// exist). True if written.
    pub async fn swap(
        &self,
        key: &str,
        value: String,
        mod_revision: i64,
    ) -> Result<bool, StoreError> {
        let txn = Txn::new()
            .when([Compare::mod_revision(key, CompareOp::Equal, mod_revision)])
            .and_then([TxnOp::put(key, value, None)]);
        self.txn(txn).await
    }

    /// Writes `key` only while `lock` is held under `lease`. True if written.
    pub async fn put_holding(
        &self,
        lock: &str,
        lease: i64,
        key: &str,
        value: String,
    ) -> Result<bool, StoreError> {
        let txn = Txn::new()
            .when([Compare::lease(lock, CompareOp::Equal, lease)])
            .and_then([TxnOp::put(key, value, None)]);
        self.txn(txn).await
    }

    async fn txn(&self, txn: Txn) -> Result<bool, StoreError> {
        let mut c = self.client.clone();
        Ok(self.bounded(c.txn(txn)).await?.succeeded())
    }

    /// Deletes `key` if it is held under `lease` (a lock released by its holder).
    pub async fn delete_holding(&self, key: &str, lease: i64) -> Result<(), StoreError> {
        let txn = Txn::new()
            .when([Compare::lease(key, CompareOp::Equal, lease)])
            .and_then([TxnOp::delete(key, None)]);
        self.txn(txn).await.map(|_| ())
    }

    pub async fn delete_prefix(&self, prefix: &str) -> Result<(), StoreError> {
        let mut c = self.client.clone();
        self.bounded(c.delete(prefix, Some(DeleteOptions::new().with_prefix())))
            .await
            .map(|_| ())
    }

    /// A new lease of `ttl`.
    pub async fn grant(&self, ttl: Duration) -> Result<i64, StoreError> {
        let mut c = self.client.clone();
        let r = self
            .bounded(c.lease_grant(ttl.as_secs() as i64, None))
            .await?;
        Ok(r.id())
    }

    /// Renews `lease` once. `Ok(false)`: the lease is gone (expired or revoked).
    pub async fn renew(&self, lease: i64) -> Result<bool, StoreError> {
        let mut c = self.client.clone();
        let work = async move {
            let (mut keeper, mut stream) = c.lease_keep_alive(lease).await?;
            keeper.keep_alive().await?;
            match stream.message().await? {
                Some(r) => Ok(r.ttl() > 0),
                None => Ok(false),
            }
        };
        self.bounded(work).await
    }

    pub async fn revoke(&self, lease: i64) -> Result<(), StoreError> {
        let mut c = self.client.clone();
        self.bounded(c.lease_revoke(lease)).await.map(|_| ())
    }

    /// Watches every key under `prefix` from `revision` on.
    pub async fn watch(&self, prefix: &str, revision: i64) -> Result<WatchStream, StoreError> {
        let mut c = self.client.clone();
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision);
        self.bounded(c.watch(prefix, Some(opts))).await
    }
}
