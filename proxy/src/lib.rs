//! handoff: a failover-safe PostgreSQL proxy and connection pooler.
//!
//! [`Proxy::start`] binds the client and admin listeners from a [`Config`] and runs
//! until [`Proxy::shutdown`]; [`Proxy::take_over`] starts instead on the listeners of a
//! handoff running on this host and takes its clients over ([`takeover`]). The binary
//! (`src/main.rs`) reads the configuration from `HANDOFF_*` environment variables and
//! shuts down on SIGTERM/SIGINT, or once a successor has taken it over.
//!
//! This file only wires the layers together (docs/architecture.md). From the top:
//! `admin` (HTTP API) · `coord` (coordination with other proxies over etcd) ·
//! `frontend` (listener, startup, client authentication) · `console` · `actions` ·
//! `relay` (session and transaction mode) · `clients` (the client registry) · [`shard`]
//! (state machine, switchover, fence, failure detection, watchdog) · [`backend`] (server
//! logins, pools, cancel, the admin role's connections) · [`net`] (streams, TLS,
//! buffers). On the ground floor, usable by all: [`config`], [`metrics`], `error`,
//! `limits`, [`shutdown`], and [`manager`] (the HA managers: Patroni, pg_auto_failover).

#![forbid(unsafe_code)]

mod actions;
mod admin;
pub mod api;
pub mod backend;
mod clients;
pub mod config;
mod console;
pub(crate) mod coord;
mod error;
mod frontend;
pub use frontend::users::UsersError;
mod limits;
pub mod manager;
pub mod metrics;
pub mod net;
mod relay;
pub mod shard;
pub mod shutdown;
mod sync;
pub mod takeover;
#[cfg(test)]
mod testing;
pub mod utc;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use handoff_protocol::auth::ScramVerifier;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Notify};

pub use config::{Config, ConfigError};
use shutdown::{Phase, Trigger};

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr} (HANDOFF_LISTEN): {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr} (HANDOFF_ADMIN_LISTEN): {source}")]
    AdminListen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot create the decoy SCRAM verifier: {0}")]
    Random(#[from] handoff_protocol::auth::AuthError),
    #[error("failover buffer: {0}")]
    Buffer(#[from] handoff_buffer::ConfigError),
    #[error(transparent)]
    Tls(#[from] net::tls::TlsSetupError),
    #[error(transparent)]
    Etcd(#[from] coord::SetupError),
    #[error("configuration error: {0}")]
    Users(#[from] frontend::users::UsersError),
    #[error("takeover socket: {0}")]
    Takeover(std::io::Error),
}

/// A running proxy.
#[derive(Debug)]
pub struct Proxy {
    /// The client side's handle: reloads (TLS, users) and the console's `SHUTDOWN`.
    frontend: Arc<frontend::Ctx>,
    listen_addr: SocketAddr,
    admin_addr: SocketAddr,
    trigger: Arc<Trigger>,
    signal: shutdown::Signal,
    buffer: handoff_buffer::Buffer,
    /// Closes when the listener and every session have ended.
    done: mpsc::Receiver<()>,
    /// A session tracker for the clients a takeover moves here.
    adopting: std::sync::Mutex<Option<mpsc::Sender<()>>>,
    shutdown_timeout: Duration,
    /// Told when a successor has taken this process's clients over.
    handed_over: Arc<Notify>,
}

/// Both listeners, bound (or inherited from the process taken over).
struct Listeners {
    client: TcpListener,
    admin: TcpListener,
    client_addr: SocketAddr,
    admin_addr: SocketAddr,
}

async fn bind(config: &Config) -> Result<Listeners, StartError> {
    let listen = |source| StartError::Listen {
        addr: config.listen,
        source,
    };
    let admin_listen = |source| StartError::AdminListen {
        addr: config.admin_listen,
        source,
    };
    let client = TcpListener::bind(config.listen).await.map_err(listen)?;
    let admin = TcpListener::bind(config.admin_listen)
        .await
        .map_err(admin_listen)?;
    Ok(Listeners {
        client_addr: client.local_addr().map_err(listen)?,
        admin_addr: admin.local_addr().map_err(admin_listen)?,
        client,
        admin,
    })
}

/// Each shard's starting point: the cluster's record (with coordination), else
/// discovery; the first host listed is only a hint. Shards with no primary start
/// buffering, and hosts found writable on a lower timeline are watched.
async fn start_shards(
    config: &Config,
    ctx: &Arc<shard::Ctx>,
    connected: Option<&coord::Connected>,
) -> Vec<Arc<shard::Shard>> {
    let mut shards = Vec::new();
    for s in &config.shards {
        metrics::zero_shard_series(
            &s.name,
            config.etcd.is_some(),
            ctx.manager(&s.name).map(|m| m.kind().as_str()),
        );
        metrics::zero_replica_series(&s.name, &s.hosts);
        let start = coord::initial_shard(
            connected,
            &ctx.admin,
            &config.health,
            ctx.manager(&s.name).map(|m| m.as_ref()),
            s,
        )
        .await;
        let sh = Arc::new(start.shard);
        if let Some(why) = start.missing {
            tracing::warn!(shard = %sh.name, reason = %why, "no primary found at startup: buffering until discovery finds one");
            let epoch = sh.current().epoch;
            shard::health::revoke(
                ctx,
                &sh,
                epoch,
                &format!("no primary found at startup: {why}"),
            );
        }
        for (host, why) in start.watch {
            if why == shard::watch::Why::LowerTimeline {
                tracing::warn!(shard = %sh.name, %host, "a host is writable on a lower timeline than the primary: watching it for split brain");
            }
            sh.watch.add(&sh.name, host, why, sh.current().epoch, None);
        }
        shards.push(sh);
    }
    shards
}

/// Each shard's own tasks: the failure detector, the split-brain watchdog and the
/// replica check.
fn spawn_shard_tasks(
    ctx: &Arc<shard::Ctx>,
    shards: &[Arc<shard::Shard>],
    coordinated: bool,
    signal: &shutdown::Signal,
) {
    for sh in shards {
        tokio::spawn(shard::monitor::run(
            Arc::clone(ctx),
            Arc::clone(sh),
            signal.clone(),
        ));
        tokio::spawn(shard::watchdog::run(
            Arc::clone(ctx),
            Arc::clone(sh),
            signal.clone(),
        ));
        tokio::spawn(shard::replica_check::run(
            Arc::clone(ctx),
            Arc::clone(sh),
            signal.clone(),
        ));
        metrics::set_source(&sh.name, ctx.source(&sh.name, coordinated));
    }
}

/// On each managed shard, the follower of its HA manager; the holds it starts are
/// actions (on every proxy with coordination).
fn spawn_followers(actions: &Arc<actions::Ctx>, signal: &shutdown::Signal) {
    for sh in &actions.shards {
        let Some(manager) = actions.shard.manager(&sh.name) else {
            continue;
        };
        let weak = Arc::downgrade(actions);
        let hold: shard::managed::Holder = Arc::new(move |shard, reason| {
            let weak = weak.clone();
            Box::pin(async move {
                if let Some(actions) = weak.upgrade() {
                    actions::hold_for_manager(&actions, &shard, &reason).await;
                }
            })
        });
        tokio::spawn(shard::managed::follow(
            Arc::clone(&actions.shard),
            Arc::clone(sh),
            Arc::clone(manager),
            hold,
            signal.clone(),
        ));
    }
}

impl Proxy {
    /// Binds both listeners and starts serving. Port 0 picks a free port; see
    /// [`Proxy::listen_addr`] and [`Proxy::admin_addr`].
    pub async fn start(config: Config) -> Result<Self, StartError> {
        Self::start_with(config, None).await
    }

    /// [`Proxy::start`], on listeners a takeover inherited (else bound here).
    async fn start_with(config: Config, inherited: Option<Listeners>) -> Result<Self, StartError> {
        let successor = inherited.is_some();
        let client_tls = net::tls::ClientTls::new(
            config.tls.client_mode,
            config.tls.cert.as_deref(),
            config.tls.key.as_deref(),
        )?;
        let server_tls =
            net::tls::ServerTls::new(config.tls.server_mode, config.tls.server_ca.as_deref())?
                .with_tcp(config.server_tcp);
        let prometheus = metrics::install();
        let listeners = match inherited {
            Some(l) => l,
            None => bind(&config).await?,
        };
        let (trigger, signal) = shutdown::channel();
        let trigger = Arc::new(trigger);
        let ctx = Arc::new(shard::Ctx::new(&config, server_tls.clone())?);
        let connected = match &config.etcd {
            Some(settings) => Some(coord::Connected::connect(settings).await?),
            None => None,
        };
        let shards = start_shards(&config, &ctx, connected.as_ref()).await;
        let coord = match (connected, &config.etcd) {
            (Some(connected), Some(settings)) => Some(coord::Coord::start(
                connected,
                settings.clone(),
                Arc::clone(&ctx),
                shards.clone(),
                listeners.admin_addr,
                listeners.client_addr,
                signal.clone(),
            )),
            _ => None,
        };
        spawn_shard_tasks(&ctx, &shards, coord.is_some(), &signal);

        // Each layer's handle, from the bottom up.
        let config = Arc::new(config);
        let cancels = Arc::new(backend::cancel::Registry::default());
        let meters = Arc::new(metrics::RelayMeters::new());
        let lot = relay::lot::Lot::new(signal.clone(), meters.parked.clone(), relay::txn::resume);
        let relay = Arc::new(relay::Ctx {
            settings: relay::Settings::from_config(&config),
            shard: Arc::clone(&ctx),
            meters,
            prepared: metrics::PreparedCounters::new(),
            server_tls: server_tls.clone(),
            cancels: Arc::clone(&cancels),
            outbox: Default::default(),
            shared: Default::default(),
            lot,
        });
        let actions = Arc::new(actions::Ctx {
            shards: shards.clone(),
            shard: Arc::clone(&ctx),
            coord,
        });
        spawn_followers(&actions, &signal);
        let clients = Arc::new(clients::Clients::default());
        let console = Arc::new(console::Ctx {
            config: Arc::clone(&config),
            actions: Arc::clone(&actions),
            clients: Arc::clone(&clients),
            cancels,
            shutdown_requested: Default::default(),
        });
        let frontend = Arc::new(frontend::Ctx {
            users: frontend::users::Users::new(&config, server_tls)?,
            decoy: ScramVerifier::from_password("")?,
            limits: Default::default(),
            clients: Arc::clone(&clients),
            client_tls,
            shards,
            relay,
            console,
            config: Arc::clone(&config),
            permits: Arc::new(tokio::sync::Semaphore::new(config.limits.max_client_conn)),
        });
        tokio::spawn(stats_periods(Arc::downgrade(&clients), config.stats_period));
        let admin_state = Arc::new(admin::AdminState {
            token: config.admin_token.clone(),
            prometheus,
            shutdown: signal.clone(),
            actions,
        });
        let (tracker, done) = mpsc::channel(1);
        let handed_over = Arc::new(Notify::new());
        if let Some(path) = &config.takeover_socket {
            start_takeover_socket(
                path,
                successor,
                takeover::Handing {
                    path: path.clone(),
                    trigger: Arc::clone(&trigger),
                    signal: signal.clone(),
                    client: (dup_listener(&listeners.client)?, listeners.client_addr),
                    admin: (dup_listener(&listeners.admin)?, listeners.admin_addr),
                    shards: frontend.shards.clone(),
                    relay: Arc::clone(&frontend.relay),
                    clients: Arc::clone(&clients),
                    shutdown_timeout: config.shutdown_timeout,
                    handed_over: Arc::clone(&handed_over),
                },
            )
            .await;
        }
        let adopting = std::sync::Mutex::new(Some(tracker.clone()));
        tokio::spawn(frontend::listener::run(
            listeners.client,
            Arc::clone(&frontend),
            signal.clone(),
            tracker,
        ));
        tokio::spawn(admin::serve(listeners.admin, admin_state));
        let (listen_addr, admin_addr) = (listeners.client_addr, listeners.admin_addr);
        tracing::info!(%listen_addr, %admin_addr, "handoff is listening");
        Ok(Self {
            frontend,
            listen_addr,
            admin_addr,
            trigger,
            signal,
            buffer: ctx.buffer.clone(),
            done,
            adopting,
            shutdown_timeout: config.shutdown_timeout,
            handed_over,
        })
    }

    /// Takes over the handoff running on this host (`HANDOFF_TAKEOVER_SOCKET`): starts
    /// on its listening sockets, then adopts its clients in the background until it
    /// says it is done ([`takeover`]). On an error nothing was taken: the running
    /// process serves on.
    pub async fn take_over(config: Config) -> Result<Self, takeover::TakeoverError> {
        let p = takeover::connect(&config).await?;
        let inherited = Listeners {
            client: p.client.0,
            admin: p.admin.0,
            client_addr: p.client.1,
            admin_addr: p.admin.1,
        };
        let proxy = Self::start_with(config, Some(inherited))
            .await
            .map_err(|e| takeover::TakeoverError::Start(e.to_string()))?;
        takeover::ready(&p.tx).await?;
        if let Some(tracker) = sync::Locked::locked(&proxy.adopting).take() {
            tokio::spawn(takeover::receive(
                p.tx,
                p.rx,
                Arc::clone(&proxy.frontend),
                proxy.signal.clone(),
                tracker,
            ));
        }
        Ok(proxy)
    }

    /// Resolves once a successor (`handoff --takeover`) has taken this process's
    /// clients over; the process then shuts down ([`Proxy::shutdown`]), leaving only
    /// what could not move.
    pub async fn handed_over(&self) {
        self.handed_over.notified().await
    }

    /// Reads the client TLS certificate and key again (SIGHUP): new connections use
    /// the new ones, established ones keep theirs. On error the old ones stay.
    pub fn reload_tls(&self) -> Result<(), net::tls::TlsSetupError> {
        let r = self.frontend.client_tls.reload();
        match &r {
            Ok(()) => tracing::info!("TLS certificate reloaded"),
            Err(e) => {
                tracing::warn!(error = %e, "TLS certificate reload failed: the old one stays")
            }
        }
        r
    }

    /// Where clients connect.
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen_addr
    }

    /// Resolves when the admin console's `SHUTDOWN` asks the process to stop; the
    /// binary then shuts down as on SIGTERM.
    pub async fn shutdown_requested(&self) {
        self.frontend.console.shutdown_requested.notified().await
    }

    /// Reads `HANDOFF_USERS_FILE` again (SIGHUP); on an error the old list stays.
    pub fn reload_users(&self) -> Result<(), frontend::users::UsersError> {
        match self.frontend.users.reload() {
            Ok(n) => {
                tracing::info!(users = n, "users file reloaded");
                Ok(())
            }
            Err(e) => {
                tracing::warn!(error = %e, "users file not reloaded: the old list stays");
                Err(e)
            }
        }
    }

    /// Where the admin API listens.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Stops accepting and lets sessions end at their next transaction boundary, up to
    /// `HANDOFF_SHUTDOWN_TIMEOUT`; then closes the rest. Returns when all have ended.
    pub async fn shutdown(mut self) {
        drop(sync::Locked::locked(&self.adopting).take());
        self.trigger.advance(Phase::Draining);
        // Held requests end now (57P01); later ones pass through to the drain.
        self.buffer.shutdown();
        tracing::info!(timeout = ?self.shutdown_timeout, "shutting down: draining sessions");
        if tokio::time::timeout(self.shutdown_timeout, self.done.recv())
            .await
            .is_err()
        {
            tracing::warn!("shutdown timeout passed: closing the remaining sessions");
        }
        self.trigger.advance(Phase::Closing);
        let _ = self.done.recv().await;
        tracing::info!("shutdown complete");
    }
}

fn dup_listener(l: &TcpListener) -> Result<std::os::fd::OwnedFd, StartError> {
    use std::os::fd::AsFd;
    l.as_fd().try_clone_to_owned().map_err(StartError::Takeover)
}

/// Listens on the takeover socket (a successor replaces its predecessor's). A socket
/// that cannot be made is logged: the proxy runs on without takeovers.
async fn start_takeover_socket(
    path: &std::path::Path,
    successor: bool,
    handing: takeover::Handing,
) {
    match takeover::bind(path, successor).await {
        Ok(l) => {
            tracing::info!(path = %path.display(), "takeover socket listening");
            tokio::spawn(takeover::serve(l, handing));
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot listen on HANDOFF_TAKEOVER_SOCKET: this process cannot be taken over");
        }
    }
}

/// Ends a `SHOW STATS` period every `period`, for as long as the proxy exists.
async fn stats_periods(clients: std::sync::Weak<clients::Clients>, period: Duration) {
    let mut tick = tokio::time::interval(period);
    loop {
        tick.tick().await;
        match clients.upgrade() {
            Some(c) => c.end_period(),
            None => return,
        }
    }
}
