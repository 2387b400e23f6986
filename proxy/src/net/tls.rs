//! TLS with rustls (ring provider), both ways:
//! - **to clients** (`HANDOFF_TLS_MODE`, `HANDOFF_TLS_CERT`, `HANDOFF_TLS_KEY`): an
//!   SSLRequest is answered `S` and the handshake done; the certificate and key are read
//!   again on [`ClientTls::reload`] (SIGHUP), new connections get the new ones;
//! - **to servers** (`HANDOFF_SERVER_TLS`, `HANDOFF_SERVER_TLS_CA`): handoff sends an
//!   SSLRequest before the startup message, with libpq's `sslmode` meanings.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use handoff_protocol::framing::{StartupPacket, ENCRYPTION_ACCEPTED, ENCRYPTION_DECLINED};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, Error as TlsError, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::config::{ClientTlsMode, ServerTcp, ServerTlsMode};

use crate::net::stream::Stream;
use crate::sync::ReadWrite;

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Why TLS could not be set up (at startup, or on a reload): names the variable.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("{var}: cannot read {}: {message}", path.display())]
    Read {
        var: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("{var}: no certificate in {}", path.display())]
    NoCertificate { var: &'static str, path: PathBuf },
    #[error("{var}: {source}")]
    Rustls { var: &'static str, source: TlsError },
    #[error("{var}: required with HANDOFF_SERVER_TLS={mode}")]
    Missing {
        var: &'static str,
        mode: &'static str,
    },
}

fn read_certs(
    path: &Path,
    var: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let read = |message: String| TlsSetupError::Read {
        var,
        path: path.to_path_buf(),
        message,
    };
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| read(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| read(format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(TlsSetupError::NoCertificate {
            var,
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// The ALPN protocol name PostgreSQL registered for its wire protocol.
pub const POSTGRESQL_ALPN: &[u8] = b"postgresql";

/// TLS towards clients, reloadable.
#[derive(Debug)]
pub struct ClientTls {
    pub mode: ClientTlsMode,
    cert: PathBuf,
    key: PathBuf,
    config: RwLock<Option<Arc<rustls::ServerConfig>>>,
}

impl ClientTls {
    /// Loads the certificate and key (when TLS is on); an error names the variable.
    pub fn new(
        mode: ClientTlsMode,
        cert: Option<&Path>,
        key: Option<&Path>,
    ) -> Result<Self, TlsSetupError> {
        let t = Self {
            mode,
            cert: cert.map(Path::to_path_buf).unwrap_or_default(),
            key: key.map(Path::to_path_buf).unwrap_or_default(),
            config: RwLock::new(None),
        };
        if mode != ClientTlsMode::Disable {
            t.reload()?;
        }
        Ok(t)
    }

    fn load(&self) -> Result<Arc<rustls::ServerConfig>, TlsSetupError> {
        let certs = read_certs(&self.cert, "HANDOFF_TLS_CERT")?;
        let key = PrivateKeyDer::from_pem_file(&self.key).map_err(|e| TlsSetupError::Read {
            var: "HANDOFF_TLS_KEY",
            path: self.key.clone(),
            message: format!("no private key: {e}"),
        })?;
        let rustls = |source| TlsSetupError::Rustls {
            var: "HANDOFF_TLS_CERT/HANDOFF_TLS_KEY",
            source,
        };
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(rustls)?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(rustls)?;
        // As PostgreSQL 17: a client that offers ALPN must offer `postgresql`; direct TLS
        // requires it (checked after the handshake).
        config.alpn_protocols = vec![POSTGRESQL_ALPN.to_vec()];
        Ok(Arc::new(config))
    }

    /// Reads the certificate and key again; on error the old ones stay in use.
    pub fn reload(&self) -> Result<(), TlsSetupError> {
        if self.mode == ClientTlsMode::Disable {
            return Ok(());
        }
        let config = self.load()?;
        *self.config.writing() = Some(config);
        Ok(())
    }

    /// The acceptor for a new connection, when TLS is on.
    pub fn acceptor(&self) -> Option<TlsAcceptor> {
        self.config.reading().clone().map(TlsAcceptor::from)
    }
}

/// Accepts any certificate: `sslmode=require`/`prefer` (encryption without
/// authentication, as libpq does without a root certificate).
#[derive(Debug)]
struct AcceptAny(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain must lead to the CA; the name is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(TlsError::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// How handoff connects to PostgreSQL servers: TLS, and the TCP options every server
/// socket gets before TLS is negotiated ([`ServerTcp`]).
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub mode: ServerTlsMode,
    config: Option<Arc<rustls::ClientConfig>>,
    tcp: ServerTcp,
}

impl Default for ServerTls {
    /// No TLS to servers, the kernel's TCP defaults.
    fn default() -> Self {
        Self {
            mode: ServerTlsMode::Disable,
            config: None,
            tcp: ServerTcp::NONE,
        }
    }
}

impl ServerTls {
    pub fn new(mode: ServerTlsMode, ca: Option<&Path>) -> Result<Self, TlsSetupError> {
        if mode == ServerTlsMode::Disable {
            return Ok(Self {
                mode,
                config: None,
                tcp: ServerTcp::NONE,
            });
        }
        let provider = provider();
        let rustls = |source| TlsSetupError::Rustls {
            var: "HANDOFF_SERVER_TLS_CA",
            source,
        };
        let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(rustls)?;
        let verifier: Arc<dyn ServerCertVerifier> = match mode {
            ServerTlsMode::Prefer | ServerTlsMode::Require => Arc::new(AcceptAny(provider)),
            ServerTlsMode::VerifyCa | ServerTlsMode::VerifyFull => {
                let path = ca.ok_or(TlsSetupError::Missing {
                    var: "HANDOFF_SERVER_TLS_CA",
                    mode: mode.as_str(),
                })?;
                let mut roots = rustls::RootCertStore::empty();
                for c in read_certs(path, "HANDOFF_SERVER_TLS_CA")? {
                    roots.add(c).map_err(rustls)?;
                }
                let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .map_err(|e| {
                        rustls(TlsError::General(format!(
                            "cannot build the certificate verifier: {e}"
                        )))
                    })?;
                if mode == ServerTlsMode::VerifyCa {
                    Arc::new(ChainOnly(webpki))
                } else {
                    webpki
                }
            }
            ServerTlsMode::Disable => unreachable!("handled above"),
        };
        let config = builder
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(Self {
            mode,
            config: Some(Arc::new(config)),
            tcp: ServerTcp::NONE,
        })
    }

    /// These settings with `tcp` applied to every server socket.
    pub fn with_tcp(self, tcp: ServerTcp) -> Self {
        Self { tcp, ..self }
    }

    /// Negotiates TLS on a fresh server connection (before the startup message):
    /// `Ok(Stream::Plain)` when TLS is off, or `prefer` and the server declined.
    pub async fn negotiate(&self, mut tcp: TcpStream, host: &str) -> io::Result<Stream> {
        self.tcp.apply(&tcp);
        let Some(config) = &self.config else {
            return Ok(Stream::Plain(tcp));
        };
        let connector = TlsConnector::from(Arc::clone(config));
        let mut request = bytes::BytesMut::with_capacity(8);
        StartupPacket::SslRequest.encode(&mut request);
        tcp.write_all(&request).await?;
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer).await?;
        match answer[0] {
            ENCRYPTION_ACCEPTED => {
                let name = ServerName::try_from(host.to_string())
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
                let tls = connector
                    .connect(name, tcp)
                    .await
                    .map_err(|e| io::Error::new(e.kind(), format!("TLS handshake failed: {e}")))?;
                Ok(Stream::ToServer(Box::new(tls)))
            }
            ENCRYPTION_DECLINED if self.mode == ServerTlsMode::Prefer => Ok(Stream::Plain(tcp)),
            ENCRYPTION_DECLINED => Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!(
                    "the server does not accept TLS (HANDOFF_SERVER_TLS={})",
                    self.mode.as_str()
                ),
            )),
            other => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unexpected answer to SSLRequest: {other:#04x}"),
            )),
        }
    }
}

/// tokio-postgres over rustls: the admin role's connections (switchover SQL, health
/// checks, discovery probes) use it with [`ServerTls`]'s settings; the test harness and
/// the bench with their own.
pub mod pg {
    use std::io;
    use std::pin::Pin;
    use std::sync::Arc;
    use std::task::{Context, Poll};

    use futures_core::future::BoxFuture;
    use rustls::pki_types::ServerName;
    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
    use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};

    /// Connects tokio-postgres over TLS with this rustls configuration.
    #[derive(Clone)]
    pub struct MakeRustls(pub Arc<rustls::ClientConfig>);

    pub struct Connect {
        config: Arc<rustls::ClientConfig>,
        name: ServerName<'static>,
    }

    pub struct Stream(tokio_rustls::client::TlsStream<tokio_postgres::Socket>);

    impl MakeTlsConnect<tokio_postgres::Socket> for MakeRustls {
        type Stream = Stream;
        type TlsConnect = Connect;
        type Error = io::Error;

        fn make_tls_connect(&mut self, domain: &str) -> io::Result<Connect> {
            let name = ServerName::try_from(domain.to_string())
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            Ok(Connect {
                config: Arc::clone(&self.0),
                name,
            })
        }
    }

    impl TlsConnect<tokio_postgres::Socket> for Connect {
        type Stream = Stream;
        type Error = io::Error;
        type Future = BoxFuture<'static, io::Result<Stream>>;

        fn connect(self, socket: tokio_postgres::Socket) -> Self::Future {
            Box::pin(async move {
                let c = tokio_rustls::TlsConnector::from(self.config);
                Ok(Stream(c.connect(self.name, socket).await?))
            })
        }
    }

    impl tokio_postgres::tls::TlsStream for Stream {
        fn channel_binding(&self) -> ChannelBinding {
            ChannelBinding::none()
        }
    }

    impl AsyncRead for Stream {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Stream {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            b: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.get_mut().0).poll_write(cx, b)
        }

        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().0).poll_flush(cx)
        }

        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
        }
    }
}

impl ServerTls {
    /// Connects tokio-postgres with these TLS settings; the connection runs in a task
    /// (aborted when the returned handle is dropped by the caller's `abort`).
    pub async fn pg_connect(
        &self,
        cfg: &mut tokio_postgres::Config,
    ) -> Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), tokio_postgres::Error> {
        use tokio_postgres::config::SslMode;
        self.tcp.configure(cfg);
        match &self.config {
            None => {
                cfg.ssl_mode(SslMode::Disable);
                let (client, conn) = cfg.connect(tokio_postgres::NoTls).await?;
                Ok((
                    client,
                    tokio::spawn(async move {
                        let _ = conn.await;
                    }),
                ))
            }
            Some(config) => {
                cfg.ssl_mode(if self.mode == ServerTlsMode::Prefer {
                    SslMode::Prefer
                } else {
                    SslMode::Require
                });
                let (client, conn) = cfg.connect(pg::MakeRustls(Arc::clone(config))).await?;
                Ok((
                    client,
                    tokio::spawn(async move {
                        let _ = conn.await;
                    }),
                ))
            }
        }
    }
}
