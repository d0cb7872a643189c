//! The transport seam: where the node-to-node QUIC session's datagrams travel.
//!
//! ```text
//!  admission, streams, revocation, budgets   (relay: the same whatever the path)
//!                 │ one quinn Endpoint
//!                 ▼
//!  Transport::socket()  ── direct UDP today ([`DirectUdp`]); a rendezvous-carried socket later
//!  Transport::locate(peer, endpoints) ── the address to dial a peer at on that socket
//! ```
//!
//! A transport supplies the socket quinn runs on (any `quinn::AsyncUdpSocket`) and turns a
//! peer's advertised [`Endpoint`]s into an address on that socket. A relayed path (datagrams to
//! a rendezvous server and on to the peer, with peers mapped to synthetic addresses) is one more
//! implementation; nothing above the socket changes.

use std::{fmt, net::SocketAddr, sync::Arc};

use anyhow::{Context, Result};
use fedmesh_documents::{Endpoint, NodeRef};
use futures::future::BoxFuture;
use quinn::{AsyncUdpSocket, Runtime};

/// Where the relay's QUIC endpoint sends and receives datagrams.
pub trait Transport: Send + Sync + fmt::Debug + 'static {
    /// The socket the QUIC endpoint runs on.
    fn socket(&self) -> Arc<dyn AsyncUdpSocket>;

    /// The relay's QUIC endpoint, made on [`Transport::socket`]; a transport that dials
    /// connections of its own from that socket keeps it.
    fn attach(&self, _endpoint: &quinn::Endpoint) {}

    /// Whether `addr`, from [`Transport::locate`], is the peer's own address, where it may also
    /// take TCP (TLS streams, [`super::tls_streams`]), rather than one of this transport's making.
    fn reaches_directly(&self, _addr: SocketAddr) -> bool {
        false
    }

    /// The address to dial `peer` at on [`Transport::socket`], from the endpoints it advertised;
    /// an error in words when this transport cannot reach it.
    fn locate<'a>(
        &'a self,
        peer: &'a NodeRef,
        endpoints: &'a [Endpoint],
    ) -> BoxFuture<'a, Result<SocketAddr, String>>;
}

/// Direct UDP: peers dial this node's advertised QUIC endpoint, and it dials theirs.
#[derive(Debug)]
pub struct DirectUdp {
    socket: Arc<dyn AsyncUdpSocket>,
}

/// Socket buffers large enough for a fast path.
const SOCKET_BUFFER: usize = 8 * 1024 * 1024;

impl DirectUdp {
    /// Binds a UDP socket on `addr` with large buffers.
    pub fn bind(addr: SocketAddr) -> Result<Self> {
        use socket2::{Domain, Protocol, Socket, Type};
        let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
        let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
        let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
        socket
            .bind(&addr.into())
            .with_context(|| format!("binding the relay's UDP socket {addr}"))?;
        let socket = quinn::TokioRuntime.wrap_udp_socket(socket.into())?;
        Ok(Self { socket })
    }
}

impl Transport for DirectUdp {
    fn socket(&self) -> Arc<dyn AsyncUdpSocket> {
        self.socket.clone()
    }

    fn reaches_directly(&self, _addr: SocketAddr) -> bool {
        true
    }

    fn locate<'a>(
        &'a self,
        peer: &'a NodeRef,
        endpoints: &'a [Endpoint],
    ) -> BoxFuture<'a, Result<SocketAddr, String>> {
        Box::pin(async move {
            let address = endpoints
                .iter()
                .find_map(|e| match e {
                    Endpoint::Quic { address } => Some(address.as_str()),
                    _ => None,
                })
                .ok_or_else(|| format!("{peer} advertises no QUIC endpoint"))?;
            tokio::net::lookup_host(address)
                .await
                .map_err(|e| format!("cannot resolve {address}: {e}"))?
                .next()
                .ok_or_else(|| format!("{address} resolves to no address"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn direct_udp_dials_the_advertised_quic_endpoint() {
        let t = DirectUdp::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        assert!(t.socket().local_addr().unwrap().port() > 0);
        let peer: NodeRef = "org-b/n1".parse().unwrap();
        let endpoints = [
            Endpoint::IstioGateway {
                address: "gw.example:443".into(),
            },
            Endpoint::Quic {
                address: "127.0.0.1:4433".into(),
            },
        ];
        assert_eq!(
            t.locate(&peer, &endpoints).await.unwrap(),
            "127.0.0.1:4433".parse().unwrap()
        );
        assert_eq!(
            t.locate(&peer, &endpoints[..1]).await.unwrap_err(),
            "org-b/n1 advertises no QUIC endpoint"
        );
        let unresolvable = [Endpoint::Quic {
            address: "no-such-host.invalid:4433".into(),
        }];
        assert!(
            t.locate(&peer, &unresolvable)
                .await
                .unwrap_err()
                .starts_with("cannot resolve no-such-host.invalid:4433")
        );
    }
}
