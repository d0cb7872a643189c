//! Carrier sockets (node ⇄ rendezvous): kernel buffers sized for a fast path, and the carrier
//! connections' quinn statistics.
//!
//! A carrier connection carries the end-to-end node-to-node QUIC session's packets as QUIC
//! DATAGRAM frames, at the session's rate. With the kernel's default UDP buffers (about 200 KiB,
//! ~150 full-size packets) the rendezvous, or a node's carrier, overflows its receive buffer
//! whenever it is descheduled for a millisecond or two at a gigabit: the kernel drops the burst
//! (`RcvbufErrors` in `/proc/net/snmp`), the carrier and the end-to-end session both count it as
//! congestion and back off, and on a 20 ms path their loss-based controllers take seconds to
//! grow back. So carrier sockets get the same buffers as the relay's own socket.

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use quinn::Connection;
use tracing::{Level, debug};

/// Kernel buffers of a carrier's UDP socket, each way (the kernel caps them at
/// `net.core.rmem_max` / `wmem_max`), as the relay's own socket has.
pub const CARRIER_SOCKET_BUFFER: usize = 8 * 1024 * 1024;

/// Sizes a carrier socket's kernel buffers ([`CARRIER_SOCKET_BUFFER`]); best effort.
pub fn size_socket(socket: socket2::SockRef<'_>) {
    let _ = socket.set_recv_buffer_size(CARRIER_SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(CARRIER_SOCKET_BUFFER);
}

/// A client endpoint for a node's carrier on `addr` (as `quinn::Endpoint::client`: dual-stack
/// when IPv6), its socket sized by [`size_socket`].
pub fn client_endpoint(addr: SocketAddr) -> io::Result<quinn::Endpoint> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        let _ = socket.set_only_v6(false);
    }
    size_socket((&socket).into());
    socket.bind(&addr.into())?;
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        socket.into(),
        Arc::new(quinn::TokioRuntime),
    )
}

/// Logs a carrier connection's quinn statistics every 2 s at debug level (this module's
/// target) until it closes: round trip, congestion window, congestion events and losses,
/// DATAGRAM frames each way, free space in the datagram send queue. `side` names the end.
/// Does nothing unless debug logging is on for this module.
pub fn log_stats(conn: &Connection, side: String) {
    if !tracing::enabled!(Level::DEBUG) {
        return;
    }
    let conn = conn.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = conn.closed() => return,
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            }
            let s = conn.stats();
            debug!(
                side,
                rtt_us = u64::try_from(s.path.rtt.as_micros()).unwrap_or(u64::MAX),
                cwnd = s.path.cwnd,
                congestion_events = s.path.congestion_events,
                sent_packets = s.path.sent_packets,
                lost_packets = s.path.lost_packets,
                datagrams_tx = s.frame_tx.datagram,
                datagrams_rx = s.frame_rx.datagram,
                send_queue_free = conn.datagram_send_buffer_space(),
                "carrier statistics"
            );
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn carrier_sockets_get_large_kernel_buffers() {
        let endpoint = client_endpoint("127.0.0.1:0".parse().unwrap()).unwrap();
        assert_ne!(endpoint.local_addr().unwrap().port(), 0);
        let plain = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        size_socket((&plain).into());
        let sized = socket2::SockRef::from(&plain).recv_buffer_size().unwrap();
        // Linux caps the request at net.core.rmem_max and reports twice what it keeps.
        if let Ok(max) = std::fs::read_to_string("/proc/sys/net/core/rmem_max") {
            let max: usize = max.trim().parse().unwrap();
            assert_eq!(sized, 2 * CARRIER_SOCKET_BUFFER.min(max));
        }
    }
}
