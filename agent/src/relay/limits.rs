//! Caps on what unauthenticated sources can make the relay hold (pure): handshakes in flight
//! and connections, per source address and overall. A handshake takes a connection slot from
//! its first packet, so handshakes that complete can never push the relay over its connection
//! cap.
//!
//! ```text
//!  Initial ──begin(ip)──▶ handshake ──established(ip)──▶ connection ──closed(ip)──▶ freed
//!     │ over a cap              └──failed(ip)──▶ freed
//!     └──▶ refused (CONNECTION_REFUSED), counted and logged by reason
//! ```

use std::{collections::HashMap, net::IpAddr};

/// The caps (flags of `fedmesh node`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caps {
    /// Connections (established and in handshake) from all sources together.
    pub connections: u32,
    /// Connections (established and in handshake) from one source address.
    pub connections_per_source: u32,
    /// Handshakes in flight from all sources together.
    pub handshakes: u32,
    /// Handshakes in flight from one source address.
    pub handshakes_per_source: u32,
    /// Connections one peer node (one SPIFFE ID, whatever its addresses) may hold; one each way
    /// is the norm.
    pub connections_per_peer: u32,
}

impl Default for Caps {
    fn default() -> Self {
        Self {
            connections: 1024,
            connections_per_source: 64,
            handshakes: 128,
            handshakes_per_source: 16,
            connections_per_peer: 8,
        }
    }
}

/// Which cap refused a new connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Over {
    /// [`Caps::connections`].
    Connections,
    /// [`Caps::connections_per_source`].
    ConnectionsPerSource,
    /// [`Caps::handshakes`].
    Handshakes,
    /// [`Caps::handshakes_per_source`].
    HandshakesPerSource,
}

impl Over {
    /// A short label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connections => "connections",
            Self::ConnectionsPerSource => "connections_per_source",
            Self::Handshakes => "handshakes",
            Self::HandshakesPerSource => "handshakes_per_source",
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Count {
    handshakes: u32,
    connections: u32,
}

/// What the relay holds right now, by source address.
#[derive(Debug, Default)]
pub struct Limits {
    caps: Caps,
    by_source: HashMap<IpAddr, Count>,
    total: Count,
}

impl Limits {
    /// Nothing held yet, under `caps`.
    pub fn new(caps: Caps) -> Self {
        Self {
            caps,
            ..Self::default()
        }
    }

    /// A handshake from `ip` starts, unless a cap refuses it.
    pub fn begin(&mut self, ip: IpAddr) -> Result<(), Over> {
        let here = self.by_source.get(&ip).copied().unwrap_or_default();
        let caps = self.caps;
        if self.total.handshakes >= caps.handshakes {
            return Err(Over::Handshakes);
        }
        if here.handshakes >= caps.handshakes_per_source {
            return Err(Over::HandshakesPerSource);
        }
        if self.total.handshakes + self.total.connections >= caps.connections {
            return Err(Over::Connections);
        }
        if here.handshakes + here.connections >= caps.connections_per_source {
            return Err(Over::ConnectionsPerSource);
        }
        self.total.handshakes += 1;
        self.by_source.entry(ip).or_default().handshakes += 1;
        Ok(())
    }

    /// The handshake from `ip` completed: it is a connection now.
    pub fn established(&mut self, ip: IpAddr) {
        self.update(ip, |c| {
            c.handshakes = c.handshakes.saturating_sub(1);
            c.connections += 1;
        });
    }

    /// The handshake from `ip` failed or timed out.
    pub fn failed(&mut self, ip: IpAddr) {
        self.update(ip, |c| c.handshakes = c.handshakes.saturating_sub(1));
    }

    /// A connection from `ip` closed.
    pub fn closed(&mut self, ip: IpAddr) {
        self.update(ip, |c| c.connections = c.connections.saturating_sub(1));
    }

    /// Handshakes in flight from all sources.
    pub fn handshakes(&self) -> u32 {
        self.total.handshakes
    }

    /// Connections from all sources (established only).
    pub fn connections(&self) -> u32 {
        self.total.connections
    }

    fn update(&mut self, ip: IpAddr, f: impl Fn(&mut Count)) {
        f(&mut self.total);
        if let Some(c) = self.by_source.get_mut(&ip) {
            f(c);
            if *c == Count::default() {
                self.by_source.remove(&ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    fn caps() -> Caps {
        Caps {
            connections: 5,
            connections_per_source: 3,
            handshakes: 4,
            handshakes_per_source: 2,
            connections_per_peer: 8,
        }
    }

    #[test]
    fn handshakes_are_capped_per_source_and_overall() {
        let mut l = Limits::new(caps());
        assert_eq!(l.begin(ip(1)), Ok(()));
        assert_eq!(l.begin(ip(1)), Ok(()));
        assert_eq!(l.begin(ip(1)), Err(Over::HandshakesPerSource));
        assert_eq!(l.begin(ip(2)), Ok(()));
        assert_eq!(l.begin(ip(3)), Ok(()));
        assert_eq!(l.begin(ip(4)), Err(Over::Handshakes));
        l.failed(ip(3));
        assert_eq!(l.begin(ip(4)), Ok(()), "a failed handshake frees its slot");
        assert_eq!(l.handshakes(), 4);
    }

    #[test]
    fn connections_are_capped_per_source_and_overall() {
        let mut l = Limits::new(caps());
        for _ in 0..2 {
            l.begin(ip(1)).unwrap();
            l.established(ip(1));
        }
        l.begin(ip(1)).unwrap();
        assert_eq!(
            l.begin(ip(1)),
            Err(Over::ConnectionsPerSource),
            "a handshake in flight holds a connection slot of its source"
        );
        l.established(ip(1));
        assert_eq!(l.begin(ip(1)), Err(Over::ConnectionsPerSource));
        l.begin(ip(2)).unwrap();
        l.established(ip(2));
        l.begin(ip(3)).unwrap();
        assert_eq!(
            l.begin(ip(4)),
            Err(Over::Connections),
            "a handshake in flight holds a connection slot"
        );
        l.closed(ip(1));
        assert_eq!(l.begin(ip(4)), Ok(()));
        assert_eq!(l.connections(), 3);
    }

    #[test]
    fn sources_holding_nothing_are_forgotten() {
        let mut l = Limits::new(caps());
        l.begin(ip(1)).unwrap();
        l.established(ip(1));
        l.closed(ip(1));
        l.begin(ip(2)).unwrap();
        l.failed(ip(2));
        assert!(l.by_source.is_empty());
        assert_eq!((l.handshakes(), l.connections()), (0, 0));
    }
}
