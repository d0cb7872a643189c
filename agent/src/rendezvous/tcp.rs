//! The TLS/TCP carrier: the same frames as the QUIC carrier's datagrams, for sites that may
//! open only TCP (443) connections out, directly or through an HTTP CONNECT proxy.
//!
//! ```text
//!  node ──TCP [──proxy CONNECT──] ──TLS 1.3 (same pinned server certificate; node's
//!        collaboration certificate checked by the same verifier, gate and standing as QUIC)
//!        ──HTTP/1.1 Upgrade: fedmesh-rendezvous/1 (see [`super::upgrade`])──▶ 101
//!        then both ways:  ┌─────────────┬──────────────────────────────────────┐
//!                         │ len: u16 BE │ frame (super::frame), len bytes      │
//!                         └─────────────┴──────────────────────────────────────┘
//!        (len 0: a keep-alive, sent after 500 ms without frames)
//! ```
//!
//! UDP semantics over a reliable stream: frames towards a node wait in a queue bounded in bytes
//! (the rendezvous's per-receiver queue) and are dropped when it is full, so a slow TCP reader
//! never blocks the forwarder or another node, and memory stays bounded. A link that hears
//! nothing for 2 s, or whose writes stall for 10 s, is closed. The handshake (TLS and the HTTP
//! head, at most [`super::upgrade::MAX_HEAD`] bytes) must finish within 10 s; at most
//! [`MAX_PENDING`] may be in progress at once.

use std::{
    collections::VecDeque,
    future::Future,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Result;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use fedmesh_certs::{CertInfo, tls};
use fedmesh_documents::NodeRef;
use quinn::{Connection, VarInt};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{Notify, Semaphore},
};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{
    ALPN, Bucket, DropLabels, Forwarder, Rendezvous, Shared, admit, collab_of, leave,
    upgrade::{self, HeadError},
};

/// A keep-alive is sent after this long without frames.
pub const KEEPALIVE: Duration = Duration::from_millis(500);
/// A link that hears nothing (not even a keep-alive) for this long is lost.
pub const IDLE: Duration = Duration::from_secs(2);
/// A link whose writes make no progress for this long is closed.
pub const WRITE_STALL: Duration = Duration::from_secs(10);
/// TLS handshake and HTTP head, at most.
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; more connections are closed at once.
pub const MAX_PENDING: usize = 1024;
/// The ALPN of the TCP carrier: what it is on the wire until the upgrade (HTTP/1.1).
pub const TCP_ALPN: &[u8] = b"http/1.1";
/// Most bytes written to the stream in one go.
const BATCH: usize = 256 * 1024;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Why a frame was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueError {
    /// The queue is full: the frame is dropped (as a full socket buffer would).
    Full,
    /// The link is closed.
    Closed,
}

#[derive(Default)]
struct Queue {
    frames: VecDeque<Bytes>,
    bytes: usize,
}

/// One framed carrier link over a byte stream (TLS over TCP): a bounded send queue, a writer,
/// a reader. Used by the rendezvous for each TCP node and by a node's carrier.
pub struct StreamLink {
    queue: Mutex<Queue>,
    notify: Notify,
    closed: CancellationToken,
    max_bytes: usize,
}

impl std::fmt::Debug for StreamLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamLink")
            .field("queued", &lock(&self.queue).bytes)
            .field("closed", &self.closed.is_cancelled())
            .finish()
    }
}

impl StreamLink {
    /// A link queueing at most `max_bytes` of frames.
    pub fn new(max_bytes: usize) -> Self {
        Self {
            queue: Mutex::new(Queue::default()),
            notify: Notify::new(),
            closed: CancellationToken::new(),
            max_bytes,
        }
    }

    /// Queues one frame (at most 65 535 bytes) for the writer; never waits.
    pub fn send(&self, frame: Bytes) -> Result<(), QueueError> {
        if self.closed.is_cancelled() {
            return Err(QueueError::Closed);
        }
        if frame.is_empty() || frame.len() > usize::from(u16::MAX) {
            return Err(QueueError::Full);
        }
        let mut queue = lock(&self.queue);
        if queue.bytes + frame.len() > self.max_bytes {
            return Err(QueueError::Full);
        }
        queue.bytes += frame.len();
        queue.frames.push_back(frame);
        drop(queue);
        self.notify.notify_one();
        Ok(())
    }

    /// Closes the link: its [`StreamLink::run`] ends.
    pub fn close(&self) {
        self.closed.cancel();
    }

    /// Whether the link is closed.
    pub fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    /// Bytes waiting to be written.
    pub fn queued(&self) -> usize {
        lock(&self.queue).bytes
    }

    /// Carries frames over `stream` (`leftover`: bytes already read past the HTTP head) until
    /// the link is closed, the peer goes away or falls silent; hands each received frame to
    /// `on_frame`. Returns why it ended.
    pub async fn run<S>(
        &self,
        stream: S,
        leftover: BytesMut,
        mut on_frame: impl FnMut(Bytes),
    ) -> String
    where
        S: AsyncRead + AsyncWrite,
    {
        let (mut reader, mut writer) = tokio::io::split(stream);
        let write = async {
            let mut out = BytesMut::with_capacity(BATCH + 2 + usize::from(u16::MAX));
            loop {
                {
                    let mut queue = lock(&self.queue);
                    while out.len() < BATCH
                        && let Some(frame) = queue.frames.pop_front()
                    {
                        queue.bytes -= frame.len();
                        out.put_u16(frame.len() as u16);
                        out.put_slice(&frame);
                    }
                }
                if out.is_empty() {
                    tokio::select! {
                        () = self.notify.notified() => continue,
                        () = tokio::time::sleep(KEEPALIVE) => out.put_u16(0),
                    }
                }
                let wrote = tokio::time::timeout(WRITE_STALL, async {
                    writer.write_all(&out).await?;
                    writer.flush().await
                })
                .await;
                match wrote {
                    Ok(Ok(())) => out.clear(),
                    Ok(Err(e)) => return format!("write failed: {e}"),
                    Err(_) => return "writes stalled for 10 s".to_owned(),
                }
            }
        };
        let read = async {
            let mut buf = leftover;
            loop {
                while buf.len() >= 2 {
                    let len = usize::from(u16::from_be_bytes([buf[0], buf[1]]));
                    if buf.len() < 2 + len {
                        break;
                    }
                    buf.advance(2);
                    let frame = buf.split_to(len).freeze();
                    if !frame.is_empty() {
                        on_frame(frame);
                    }
                }
                if buf.capacity() - buf.len() < 4096 {
                    buf.reserve(64 * 1024);
                }
                match tokio::time::timeout(IDLE, reader.read_buf(&mut buf)).await {
                    Ok(Ok(0)) => return "closed by the other end".to_owned(),
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return format!("read failed: {e}"),
                    Err(_) => return "nothing heard for 2 s".to_owned(),
                }
            }
        };
        let reason = tokio::select! {
            reason = write => reason,
            reason = read => reason,
            () = self.closed.cancelled() => "closed".to_owned(),
        };
        self.closed.cancel();
        let mut queue = lock(&self.queue);
        queue.frames.clear();
        queue.bytes = 0;
        reason
    }
}

/// A node's connection to the rendezvous, whichever the carrier.
#[derive(Clone, Debug)]
pub enum Link {
    /// QUIC datagrams.
    Quic(Connection),
    /// Frames over TLS/TCP.
    Stream(Arc<StreamLink>),
}

impl Link {
    /// Sends one frame, or says why it was dropped (a metrics label).
    pub fn send(&self, frame: Bytes) -> Result<(), &'static str> {
        match self {
            Self::Quic(conn) => conn.send_datagram(frame).map_err(|e| match e {
                quinn::SendDatagramError::TooLarge => "too_large_for_receiver",
                _ => "receiver_gone",
            }),
            Self::Stream(link) => link.send(frame).map_err(|e| match e {
                QueueError::Full => "queue_full",
                QueueError::Closed => "receiver_gone",
            }),
        }
    }

    /// Closes it (`code` and `reason` reach QUIC peers).
    pub fn close(&self, code: VarInt, reason: &[u8]) {
        match self {
            Self::Quic(conn) => conn.close(code, reason),
            Self::Stream(link) => link.close(),
        }
    }

    /// Whether both are the same connection.
    pub fn same(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Quic(a), Self::Quic(b)) => a.stable_id() == b.stable_id(),
            (Self::Stream(a), Self::Stream(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

/// The TLS acceptor for the current collaboration CA, remade when it changes.
struct Acceptors {
    ca: Vec<u8>,
    acceptor: TlsAcceptor,
}

fn acceptor(shared: &Shared, cache: &mut Option<Acceptors>) -> Result<Option<TlsAcceptor>> {
    let Some(bundle) = shared.collab.borrow().as_ref().map(|c| c.bundle.clone()) else {
        return Ok(None);
    };
    let ca = bundle.ca_der().to_vec();
    if let Some(cached) = cache.as_ref().filter(|c| c.ca == ca) {
        return Ok(Some(cached.acceptor.clone()));
    }
    let config = tls::server_config_for_members(
        vec![shared.server.cert.clone()],
        shared.server.key()?,
        &bundle,
        &[TCP_ALPN, ALPN],
        &shared.gate,
    )?;
    let acceptor = TlsAcceptor::from(Arc::new(config));
    *cache = Some(Acceptors {
        ca,
        acceptor: acceptor.clone(),
    });
    Ok(Some(acceptor))
}

impl Rendezvous {
    /// Serves the TLS/TCP carrier on `listener` until `shutdown` completes (links already
    /// upgraded end when [`Rendezvous::run`] shuts down, or here).
    pub async fn run_tcp(
        &self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<()> {
        let stop = CancellationToken::new();
        let pending = Arc::new(Semaphore::new(MAX_PENDING));
        let mut cache = None;
        tokio::pin!(shutdown);
        loop {
            let (tcp, remote) = tokio::select! {
                () = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        warn!(%error, "rendezvous TCP accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let shared = self.shared.clone();
            let refused = |reason| {
                shared
                    .metrics
                    .refused
                    .get_or_create(&DropLabels {
                        collab: collab_of(&shared),
                        reason,
                    })
                    .inc();
            };
            let Ok(permit) = pending.clone().try_acquire_owned() else {
                refused("busy");
                continue;
            };
            let acceptor = match acceptor(&shared, &mut cache) {
                Ok(Some(acceptor)) => acceptor,
                Ok(None) => {
                    refused("not_ready");
                    continue;
                }
                Err(error) => {
                    warn!(error = %format!("{error:#}"), "rendezvous TLS config");
                    continue;
                }
            };
            let stop = stop.child_token();
            tokio::spawn(
                async move { serve_tcp(&shared, tcp, remote, acceptor, permit, stop).await },
            );
        }
        stop.cancel();
        Ok(())
    }
}

async fn write_refusal<S: AsyncWrite + Unpin>(
    stream: &mut S,
    status: u16,
    title: &str,
    reason: &str,
) {
    let text = upgrade::refusal(status, title, reason);
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(text.as_bytes()).await?;
        stream.shutdown().await
    })
    .await;
}

async fn serve_tcp(
    shared: &Arc<Shared>,
    tcp: TcpStream,
    remote: SocketAddr,
    acceptor: TlsAcceptor,
    permit: tokio::sync::OwnedSemaphorePermit,
    stop: CancellationToken,
) {
    let collab = collab_of(shared);
    let refused = |reason: &'static str| shared.count_refused(&collab, reason);
    let _ = tcp.set_nodelay(true);
    let opened = tokio::time::timeout(HANDSHAKE_DEADLINE, async {
        let mut tls = acceptor
            .accept(tcp)
            .await
            .map_err(|e| ("handshake", e.to_string()))?;
        match upgrade::read_head(&mut tls, upgrade::MAX_HEAD).await {
            Ok((head, rest)) => Ok((tls, head, rest)),
            Err(e @ HeadError::TooLarge { .. }) => {
                write_refusal(
                    &mut tls,
                    431,
                    "Request Header Fields Too Large",
                    &e.to_string(),
                )
                .await;
                Err((e.as_str(), e.to_string()))
            }
            Err(e) => Err((e.as_str(), e.to_string())),
        }
    });
    let opened = tokio::select! {
        opened = opened => opened,
        () = stop.cancelled() => return,
    };
    let (mut tls, head, rest) = match opened {
        Ok(Ok(opened)) => opened,
        Ok(Err((reason, error))) => {
            refused(reason);
            if let Some(held_back) =
                shared
                    .throttle
                    .admit("tcp handshake", &remote.ip().to_string(), Instant::now())
            {
                warn!(%remote, %error, held_back, "rendezvous TCP carrier refused");
            }
            return;
        }
        Err(_) => {
            refused("handshake_timeout");
            return;
        }
    };
    if let Err(e) = upgrade::check_upgrade_request(&head) {
        refused(e.as_str());
        debug!(%remote, error = %e, "not a carrier upgrade");
        write_refusal(&mut tls, 400, "Bad Request", &e.to_string()).await;
        return;
    }
    let info = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .and_then(|cert| CertInfo::parse(cert).ok());
    let Some(info) = info else {
        refused("no_certificate");
        write_refusal(&mut tls, 403, "Forbidden", "no client certificate").await;
        return;
    };
    let node = NodeRef::from(&info.spiffe_id);
    let stream_link = Arc::new(StreamLink::new(shared.options.queue_bytes));
    let link = Link::Stream(stream_link.clone());
    if let Err((reason, _)) = admit(shared, &node, &link, &info, &collab) {
        refused(reason);
        write_refusal(&mut tls, 403, "Forbidden", reason).await;
        return;
    }
    drop(permit);
    let switched = tokio::time::timeout(HANDSHAKE_DEADLINE, async {
        tls.write_all(upgrade::SWITCHING.as_bytes()).await?;
        tls.flush().await
    })
    .await;
    if !matches!(switched, Ok(Ok(()))) {
        leave(shared, &node, &link, &collab);
        return;
    }
    info!(node = %node, serial = %info.serial, %remote, "node connected to the rendezvous over TCP");
    let bucket = Bucket::new(shared.options.rate, shared.options.burst);
    let mut forwarder = Forwarder::new(shared, &node, &collab, Arc::new(Mutex::new(bucket)));
    let reason = tokio::select! {
        reason = stream_link.run(tls, rest, |frame| forwarder.forward(frame)) => reason,
        () = stop.cancelled() => "the rendezvous is shutting down".to_owned(),
    };
    leave(shared, &node, &link, &collab);
    debug!(node = %node, %reason, "node left the rendezvous (TCP)");
}
