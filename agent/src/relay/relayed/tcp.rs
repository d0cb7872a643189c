//! The node's TLS/TCP carrier to a rendezvous server, directly or through an HTTP CONNECT proxy,
//! and the choice between it and QUIC/UDP.
//!
//! ```text
//!  auto:  QUIC/UDP ─────────────┐ first to answer wins; the carrier that won last time
//!         TLS/TCP (after 300 ms)┘ starts first next time (a site that drops UDP stays on TCP)
//!         on TLS/TCP: QUIC/UDP is tried again every 30 s, and replaces it when it answers
//!  tcp:   [TCP to the proxy, CONNECT host:port, 200] TCP, TLS (pin), Upgrade, 101, frames
//! ```
//!
//! The end-to-end node-to-node QUIC session is the same on either carrier.

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use bytes::BytesMut;
use fedmesh_certs::NodeIdentity;
use fedmesh_documents::RendezvousServer;
use rustls::pki_types::ServerName;
use tokio::{io::AsyncWriteExt, net::TcpStream};
use tokio_rustls::{TlsConnector, client::TlsStream};

use super::{Carrier, proxy::ProxySettings};
use crate::rendezvous::{
    tcp::{Link, StreamLink, TCP_ALPN},
    upgrade,
};

/// How long the TLS/TCP carrier (more round trips than QUIC, maybe a proxy) may take to open.
const TCP_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// The head start of the preferred carrier in `auto`.
const HEAD_START: Duration = Duration::from_millis(300);
/// Frames queued towards the rendezvous, at most.
const SEND_QUEUE: usize = 1024 * 1024;

/// Which carrier a node uses to reach rendezvous servers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum CarrierMode {
    /// QUIC over UDP first, TLS over TCP when UDP does not answer.
    #[default]
    Auto,
    /// QUIC over UDP only.
    Udp,
    /// TLS over TCP only (through the proxy, if one applies).
    Tcp,
}

/// How a node reaches rendezvous servers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CarrierOptions {
    /// Which carrier.
    pub mode: CarrierMode,
    /// The HTTP CONNECT proxy of the TCP carrier.
    pub proxy: ProxySettings,
    /// In `auto`, how often a node on the TLS/TCP carrier tries QUIC/UDP again.
    pub quic_retry: Duration,
}

impl Default for CarrierOptions {
    fn default() -> Self {
        Self {
            mode: CarrierMode::Auto,
            proxy: ProxySettings::default(),
            quic_retry: QUIC_RETRY,
        }
    }
}

/// In `auto`, how often a node on the TLS/TCP carrier tries QUIC/UDP again (UDP may have been
/// blocked only for a while; QUIC carries more, and the sealed path needs it).
pub const QUIC_RETRY: Duration = Duration::from_secs(30);

/// A carrier connection just opened, before it carries.
pub(super) enum Dialled {
    Quic(quinn::Connection),
    Tcp(Box<TcpCarrier>),
}

/// An upgraded TLS/TCP carrier connection: run [`StreamLink::run`] with its stream and leftover
/// bytes to carry frames; send with [`StreamLink::send`].
#[derive(Debug)]
pub struct TcpCarrier {
    /// The frame queue and state.
    pub link: Arc<StreamLink>,
    /// The TLS stream, past the upgrade.
    pub stream: TlsStream<TcpStream>,
    /// Bytes read past the upgrade answer (the first frames).
    pub leftover: BytesMut,
}

impl Dialled {
    pub(super) fn link(&self) -> Link {
        match self {
            Self::Quic(conn) => Link::Quic(conn.clone()),
            Self::Tcp(tcp) => Link::Stream(tcp.link.clone()),
        }
    }

    pub(super) fn kind(&self) -> &'static str {
        match self {
            Self::Quic(_) => "udp",
            Self::Tcp(_) => "tcp",
        }
    }
}

impl Carrier {
    /// On the TLS/TCP carrier in `auto`: tries QUIC/UDP to `server` every
    /// [`CarrierOptions::quic_retry`] and returns the first connection it opens. Never returns
    /// otherwise.
    pub(super) async fn quic_again(
        &self,
        server: &RendezvousServer,
        on_tcp: bool,
    ) -> quinn::Connection {
        let (mode, every) = {
            let options = super::lock(&self.options);
            (options.mode, options.quic_retry)
        };
        if !on_tcp || mode != CarrierMode::Auto {
            return std::future::pending().await;
        }
        loop {
            tokio::time::sleep(every).await;
            if let Ok(conn) = self.connect(server).await {
                self.prefer_tcp.store(false, Ordering::Relaxed);
                return conn;
            }
        }
    }

    /// Opens a carrier connection to `server` as the options say.
    pub(super) async fn dial(&self, server: &RendezvousServer) -> Result<Dialled> {
        let options = super::lock(&self.options).clone();
        let quic = async {
            self.connect(server)
                .await
                .map(Dialled::Quic)
                .context("QUIC/UDP")
        };
        let tcp = async {
            let identity = super::lock(&self.identity).clone();
            tokio::time::timeout(TCP_CONNECT_TIMEOUT, open(server, &identity, &options.proxy))
                .await
                .map(|opened| opened.map(|tcp| Dialled::Tcp(Box::new(tcp))))
                .context("no answer")
                .flatten()
                .context("TLS/TCP")
        };
        match options.mode {
            CarrierMode::Udp => quic.await,
            CarrierMode::Tcp => tcp.await,
            CarrierMode::Auto => {
                let tcp_first = self.prefer_tcp.load(Ordering::Relaxed);
                let (quic_delay, tcp_delay) = match tcp_first {
                    true => (HEAD_START, Duration::ZERO),
                    false => (Duration::ZERO, HEAD_START),
                };
                let quic = async {
                    tokio::time::sleep(quic_delay).await;
                    quic.await
                };
                let tcp = async {
                    tokio::time::sleep(tcp_delay).await;
                    tcp.await
                };
                tokio::pin!(quic, tcp);
                let dialled = tokio::select! {
                    r = &mut quic => match r {
                        Ok(d) => Ok(d),
                        Err(quic_error) => tcp.await.map_err(|e| e.context(format!("{quic_error:#}"))),
                    },
                    r = &mut tcp => match r {
                        Ok(d) => Ok(d),
                        Err(tcp_error) => quic.await.map_err(|e| e.context(format!("{tcp_error:#}"))),
                    },
                }?;
                self.prefer_tcp
                    .store(matches!(dialled, Dialled::Tcp(_)), Ordering::Relaxed);
                Ok(dialled)
            }
        }
    }
}

/// Opens the TLS/TCP carrier to `server`: TCP (through the proxy that applies, if any), TLS
/// pinned to the server presenting `identity`, the upgrade. Not bounded in time: the caller
/// bounds it.
pub async fn open(
    server: &RendezvousServer,
    identity: &NodeIdentity,
    proxy: &ProxySettings,
) -> Result<TcpCarrier> {
    let address = &server.address;
    let tcp = match proxy.for_host(super::proxy::host_of(address)) {
        None => TcpStream::connect(address.as_str())
            .await
            .with_context(|| format!("connecting to {address}"))?,
        Some(proxy) => {
            let mut tcp = TcpStream::connect((proxy.host.as_str(), proxy.port))
                .await
                .with_context(|| format!("connecting to the proxy {proxy}"))?;
            tcp.write_all(upgrade::connect_request(address, proxy.basic.as_deref()).as_bytes())
                .await
                .with_context(|| format!("writing to the proxy {proxy}"))?;
            let (head, rest) = upgrade::read_head(&mut tcp, upgrade::MAX_HEAD)
                .await
                .with_context(|| format!("the proxy {proxy} answering CONNECT {address}"))?;
            let answer = upgrade::parse_response(&head)
                .with_context(|| format!("the proxy {proxy} answering CONNECT {address}"))?;
            if answer.code != 200 {
                bail!(
                    "the proxy {proxy} refused CONNECT {address}: {} {}",
                    answer.code,
                    answer.reason
                );
            }
            if !rest.is_empty() {
                bail!("the proxy {proxy} sent bytes after its CONNECT answer");
            }
            tcp
        }
    };
    let _ = tcp.set_nodelay(true);
    let tls = crate::hub::tls::pinned_client_config(&server.pin_sha256, identity, TCP_ALPN)?;
    let mut stream = TlsConnector::from(Arc::new(tls))
        .connect(ServerName::try_from("rendezvous.fedmesh")?, tcp)
        .await
        .with_context(|| format!("TLS with the rendezvous {address}"))?;
    stream
        .write_all(upgrade::upgrade_request(address).as_bytes())
        .await?;
    stream.flush().await?;
    let (head, leftover) = upgrade::read_head(&mut stream, upgrade::MAX_HEAD)
        .await
        .with_context(|| format!("the rendezvous {address} answering the upgrade"))?;
    let answer = upgrade::parse_response(&head)
        .with_context(|| format!("the rendezvous {address} answering the upgrade"))?;
    if answer.code != 101 || !answer.upgrades {
        bail!(
            "the rendezvous {address} refused the carrier: {} {}",
            answer.code,
            answer.reason
        );
    }
    Ok(TcpCarrier {
        link: Arc::new(StreamLink::new(SEND_QUEUE)),
        stream,
        leftover,
    })
}
