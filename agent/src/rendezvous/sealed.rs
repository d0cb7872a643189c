//! Sealed datagrams (pure): the rendezvous's fast path beside the carrier connection.
//!
//! On the carrier connection every end-to-end QUIC packet is wrapped in a second QUIC packet
//! (a DATAGRAM frame): a second packet assembly, encryption, acknowledgement and congestion
//! controller per packet at each node, and two at the rendezvous. Once a node's carrier is QUIC
//! over UDP, its relay sends the end-to-end packets instead as plain UDP datagrams from its own
//! socket to the rendezvous's port, each behind this header:
//!
//! ```text
//!  ┌──────┬─────────┬─────────┬────────────────┬──────┬─────────────────────────────────┐
//!  │ kind │ session │ counter │ peer (sealed)  │ tag  │ payload: one end-to-end QUIC     │
//!  │ 1 B  │ 8 B     │ 8 B     │ 8 B            │ 16 B │ datagram (opaque; unchanged)     │
//!  └──────┴─────────┴─────────┴────────────────┴──────┴─────────────────────────────────┘
//! ```
//!
//! - `session` names the node's carrier connection; its keys, one per direction, come from that
//!   connection's TLS exporter (RFC 8446 §7.5), so only the node and the rendezvous it
//!   authenticated to hold them, and they end with the connection.
//! - `peer` is the receiver (node → rendezvous) or the sender (rendezvous → node): the first
//!   8 bytes of SHA-256 of its `org/node`. It is encrypted (AES-128-GCM, nonce = `counter`),
//!   and the tag covers `kind`, `session` and `counter` too; a counter is accepted once (a window
//!   of [`WINDOW`] counters).
//! - The tag does not cover the payload, on purpose: the payload is a packet of the end-to-end
//!   session, which the two nodes authenticate and encrypt themselves, so a payload changed on
//!   the way is discarded there like a lost packet. What the rendezvous decides from a datagram
//!   (who sent it, to whom, against whose rate) rests on the sealed header alone, which nobody
//!   without the keys can forge, redirect or replay. Sealing 8 bytes instead of 1.4 KB keeps the
//!   fast path's cost per packet to a header.
//! - `kind` is below 0x40: a QUIC v1 packet always has that bit (the fixed bit) set, and the
//!   rendezvous does not let its peers grease it, so sealed datagrams and QUIC share one port.

use fedmesh_documents::NodeRef;
use ring::aead::{AES_128_GCM, Aad, LessSafeKey, Nonce, UnboundKey};

/// Bytes before the payload.
pub const HEADER: usize = 41;
/// The TLS exporter label the keys are derived with.
pub const LABEL: &[u8] = b"EXPORTER-fedmesh-rendezvous-sealed-1";
/// Bytes of exporter output a session needs: the session id and two keys.
pub const SECRET_LEN: usize = 8 + 16 + 16;
/// Counters remembered against replay.
pub const WINDOW: u64 = 2048;

const TAG: usize = 16;
const SEALED: std::ops::Range<usize> = 17..25;

/// What a sealed datagram is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A datagram for (from a node) or from (to a node) the peer it names.
    Data = 0x10,
    /// A node's probe: "this is my address; answer".
    Ping = 0x11,
    /// The rendezvous's answer to a probe.
    Pong = 0x12,
}

/// Whether `packet` is a sealed datagram rather than QUIC.
pub fn is_sealed(packet: &[u8]) -> bool {
    matches!(packet.first(), Some(0x10..=0x12))
}

/// The session a sealed datagram names.
pub fn session_of(packet: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(packet.get(1..9)?.try_into().ok()?))
}

/// A node's peer id: the first 8 bytes of SHA-256 of `org/node`.
pub fn peer_id(node: &NodeRef) -> u64 {
    let digest = ring::digest::digest(&ring::digest::SHA256, node.to_string().as_bytes());
    u64::from_be_bytes(digest.as_ref()[..8].try_into().expect("8 bytes"))
}

/// Why a sealed datagram was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SealError {
    /// Shorter than the header.
    Short,
    /// Not a kind this end accepts.
    Kind,
    /// For another session.
    Session,
    /// A counter already seen, or older than the window.
    Replayed,
    /// The tag does not verify.
    Forged,
}

impl SealError {
    /// A short label for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Short => "sealed_short",
            Self::Kind => "sealed_kind",
            Self::Session => "sealed_session",
            Self::Replayed => "sealed_replayed",
            Self::Forged => "sealed_forged",
        }
    }
}

impl std::fmt::Display for SealError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Short => "sealed datagram shorter than its header",
            Self::Kind => "sealed datagram of an unexpected kind",
            Self::Session => "sealed datagram for another session",
            Self::Replayed => "sealed datagram replayed",
            Self::Forged => "sealed datagram does not verify",
        })
    }
}

/// One session's keys, from the carrier connection's exporter output.
pub struct SessionKeys {
    /// The session id.
    pub session: u64,
    up: [u8; 16],
    down: [u8; 16],
}

impl SessionKeys {
    /// Splits [`SECRET_LEN`] bytes of exporter output (label [`LABEL`], no context).
    pub fn new(secret: &[u8; SECRET_LEN]) -> Self {
        let mut up = [0; 16];
        let mut down = [0; 16];
        up.copy_from_slice(&secret[8..24]);
        down.copy_from_slice(&secret[24..40]);
        Self {
            session: u64::from_be_bytes(secret[..8].try_into().expect("8 bytes")),
            up,
            down,
        }
    }

    /// The node's ends: it seals towards the rendezvous and opens what comes back.
    pub fn node(&self) -> (Sealer, Opener) {
        (
            Sealer::new(&self.up, self.session),
            Opener::new(&self.down, self.session),
        )
    }

    /// The rendezvous's ends.
    pub fn rendezvous(&self) -> (Opener, Sealer) {
        (
            Opener::new(&self.up, self.session),
            Sealer::new(&self.down, self.session),
        )
    }
}

fn key(bytes: &[u8; 16]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_128_GCM, bytes).expect("a 16-byte AES-128 key"))
}

fn nonce(counter: u64) -> Nonce {
    let mut n = [0; 12];
    n[4..].copy_from_slice(&counter.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

/// Seals headers in one direction of one session.
pub struct Sealer {
    key: LessSafeKey,
    session: u64,
    next: u64,
}

impl Sealer {
    fn new(bytes: &[u8; 16], session: u64) -> Self {
        Self {
            key: key(bytes),
            session,
            next: 0,
        }
    }

    /// Writes the header of a `kind` datagram naming `peer` into `out` (its payload follows).
    pub fn seal(&mut self, kind: Kind, peer: u64, out: &mut [u8; HEADER]) {
        let counter = self.next;
        // 2^64 datagrams are never sent on one session; the counter never repeats.
        self.next += 1;
        out[0] = kind as u8;
        out[1..9].copy_from_slice(&self.session.to_be_bytes());
        out[9..17].copy_from_slice(&counter.to_be_bytes());
        out[SEALED].copy_from_slice(&peer.to_be_bytes());
        let (aad, rest) = out.split_at_mut(17);
        let (sealed, tag_out) = rest.split_at_mut(8);
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce(counter), Aad::from(&aad[..]), sealed)
            .expect("8 bytes are within AES-GCM's bound");
        tag_out.copy_from_slice(tag.as_ref());
    }

    /// Appends a whole `kind` datagram (header and `payload`) naming `peer` to `out`.
    pub fn seal_into(&mut self, kind: Kind, peer: u64, payload: &[u8], out: &mut Vec<u8>) {
        let mut header = [0; HEADER];
        self.seal(kind, peer, &mut header);
        out.extend_from_slice(&header);
        out.extend_from_slice(payload);
    }
}

/// Opens headers in one direction of one session, each counter once.
pub struct Opener {
    key: LessSafeKey,
    session: u64,
    window: Window,
}

impl Opener {
    fn new(bytes: &[u8; 16], session: u64) -> Self {
        Self {
            key: key(bytes),
            session,
            window: Window::default(),
        }
    }

    /// Verifies `packet`'s header: its kind and the peer it names (the payload is
    /// `&packet[HEADER..]`).
    pub fn open(&mut self, packet: &[u8]) -> Result<(Kind, u64), SealError> {
        let header: &[u8; HEADER] = packet
            .get(..HEADER)
            .and_then(|h| h.try_into().ok())
            .ok_or(SealError::Short)?;
        let kind = match header[0] {
            0x10 => Kind::Data,
            0x11 => Kind::Ping,
            0x12 => Kind::Pong,
            _ => return Err(SealError::Kind),
        };
        if session_of(header) != Some(self.session) {
            return Err(SealError::Session);
        }
        let counter = u64::from_be_bytes(header[9..17].try_into().expect("8 bytes"));
        if !self.window.fresh(counter) {
            return Err(SealError::Replayed);
        }
        let mut sealed = [0; 8 + TAG];
        sealed.copy_from_slice(&header[SEALED.start..]);
        let peer = self
            .key
            .open_in_place(nonce(counter), Aad::from(&header[..17]), &mut sealed)
            .map_err(|_| SealError::Forged)?;
        let peer = u64::from_be_bytes(peer[..8].try_into().expect("8 bytes"));
        self.window.mark(counter);
        Ok((kind, peer))
    }
}

/// The counters seen: the highest, and a bitmap of the [`WINDOW`] below it.
struct Window {
    /// One past the highest counter seen (0: none yet).
    top: u64,
    bits: [u64; (WINDOW / 64) as usize],
}

impl Default for Window {
    fn default() -> Self {
        Self {
            top: 0,
            bits: [0; (WINDOW / 64) as usize],
        }
    }
}

impl Window {
    fn slot(counter: u64) -> (usize, u64) {
        let i = counter % WINDOW;
        ((i / 64) as usize, 1 << (i % 64))
    }

    fn fresh(&self, counter: u64) -> bool {
        if counter >= self.top {
            return true;
        }
        if self.top - counter > WINDOW {
            return false;
        }
        let (word, bit) = Self::slot(counter);
        self.bits[word] & bit == 0
    }

    fn mark(&mut self, counter: u64) {
        if counter >= self.top {
            // Clear the slots between the old top and this counter: they now stand for newer
            // counters not yet seen.
            let gap = counter - self.top;
            if gap >= WINDOW {
                self.bits = [0; (WINDOW / 64) as usize];
            } else {
                for c in self.top..counter {
                    let (word, bit) = Self::slot(c);
                    self.bits[word] &= !bit;
                }
            }
            self.top = counter + 1;
        }
        let (word, bit) = Self::slot(counter);
        self.bits[word] |= bit;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (SessionKeys, SessionKeys) {
        let secret: [u8; SECRET_LEN] = std::array::from_fn(|i| (i * 7 + 1) as u8);
        (SessionKeys::new(&secret), SessionKeys::new(&secret))
    }

    #[test]
    fn a_sealed_datagram_opens_at_the_other_end_only() {
        let (node, rendezvous) = pair();
        let (mut seal, mut node_open) = node.node();
        let (mut open, mut rv_seal) = rendezvous.rendezvous();
        let b: NodeRef = "org-b/n1".parse().unwrap();
        let mut packet = Vec::new();
        seal.seal_into(Kind::Data, peer_id(&b), b"end-to-end bytes", &mut packet);
        assert!(is_sealed(&packet));
        assert_eq!(packet.len(), HEADER + 16);
        assert_eq!(session_of(&packet), Some(node.session));
        assert_eq!(open.open(&packet), Ok((Kind::Data, peer_id(&b))));
        assert_eq!(&packet[HEADER..], b"end-to-end bytes");
        // The peer is not readable on the wire.
        assert!(!packet.windows(8).any(|w| w == peer_id(&b).to_be_bytes()));
        // Keys are per direction: the node's own opener refuses what it sealed.
        let mut again = Vec::new();
        seal.seal_into(Kind::Ping, 0, &[], &mut again);
        assert_eq!(node_open.open(&again), Err(SealError::Forged));
        let mut pong = Vec::new();
        rv_seal.seal_into(Kind::Pong, 0, &[], &mut pong);
        assert_eq!(node_open.open(&pong), Ok((Kind::Pong, 0)));
        // Another session's keys do not open it.
        let other = SessionKeys::new(&[9; SECRET_LEN]);
        let (_, mut other_open) = other.node();
        assert_eq!(other_open.open(&pong), Err(SealError::Session));
    }

    #[test]
    fn tampered_replayed_and_short_headers_are_refused() {
        let (node, rendezvous) = pair();
        let (mut seal, _) = node.node();
        let (mut open, _) = rendezvous.rendezvous();
        let mut packet = Vec::new();
        seal.seal_into(Kind::Data, 42, b"payload", &mut packet);
        for i in [0usize, 9, 16, 17, 24, 25, 40] {
            let mut bad = packet.clone();
            bad[i] ^= 0x01;
            let refused = open.open(&bad).unwrap_err();
            assert!(
                matches!(refused, SealError::Forged | SealError::Kind),
                "byte {i}: {refused}"
            );
        }
        let mut bad = packet.clone();
        bad[1] ^= 1;
        assert_eq!(open.open(&bad), Err(SealError::Session));
        assert_eq!(open.open(&packet[..HEADER - 1]), Err(SealError::Short));
        // The payload is not covered: a changed payload is the end-to-end session's to refuse.
        let mut changed = packet.clone();
        changed[HEADER] ^= 0xff;
        assert_eq!(open.open(&changed), Ok((Kind::Data, 42)));
        assert_eq!(
            open.open(&packet),
            Err(SealError::Replayed),
            "a counter counts once"
        );
    }

    #[test]
    fn the_window_takes_reordered_counters_once_and_refuses_old_ones() {
        let mut w = Window::default();
        for c in [0, 5, 3, 4, 1, 2] {
            assert!(w.fresh(c), "{c}");
            w.mark(c);
            assert!(!w.fresh(c), "{c} again");
        }
        w.mark(5000);
        assert!(!w.fresh(5000 - WINDOW - 1), "too old");
        assert!(w.fresh(5000 - WINDOW + 1), "inside the window, unseen");
        assert!(!w.fresh(5), "long gone");
        // Slots skipped over by a jump are free again for the counters they now stand for.
        w.mark(5000 + 3);
        assert!(w.fresh(5001) && w.fresh(5002));
        assert!(!w.fresh(5003));
        // A jump beyond the window forgets everything below.
        w.mark(100_000);
        assert!(w.fresh(99_999) && !w.fresh(100_000));
    }

    #[test]
    fn quic_packets_are_never_taken_for_sealed_ones() {
        // Long headers have 0x80 set, short headers the fixed bit 0x40.
        for first in 0x40..=0xffu8 {
            assert!(!is_sealed(&[first, 0, 0]));
        }
        assert!(!is_sealed(&[]));
    }
}
