//! The rendezvous datagram frame (pure): one QUIC datagram on the node↔rendezvous connection.
//!
//! ```text
//!  ┌──────┬──────────────────────┬───────────────────────────────────────┐
//!  │ len  │ node (`org/node`)    │ payload: one datagram of the end-to-end│
//!  │ 1 B  │ len bytes, UTF-8     │ node-to-node QUIC session (opaque)     │
//!  └──────┴──────────────────────┴───────────────────────────────────────┘
//! ```
//!
//! From a node, `node` is the receiver; from the rendezvous, the sender (the rendezvous writes
//! it from the sender's verified certificate, never from what the sender claims).

use bytes::{BufMut, Bytes, BytesMut};
use fedmesh_documents::NodeRef;

/// The longest `org/node` (two 63-character labels and the slash).
pub const MAX_NODE_LEN: usize = 127;

/// Why a frame was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// Shorter than its header says.
    Truncated,
    /// The node is not `org/node` of valid labels.
    BadNode,
    /// No payload.
    Empty,
    /// Longer than the bound.
    TooLarge {
        /// Its length.
        len: usize,
        /// The bound.
        max: usize,
    },
}

impl FrameError {
    /// A short label for metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Truncated => "truncated",
            Self::BadNode => "bad_node",
            Self::Empty => "empty",
            Self::TooLarge { .. } => "oversized",
        }
    }
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Truncated => f.write_str("frame shorter than its header"),
            Self::BadNode => f.write_str("frame names no valid org/node"),
            Self::Empty => f.write_str("frame carries no datagram"),
            Self::TooLarge { len, max } => write!(f, "frame of {len} bytes; at most {max}"),
        }
    }
}

/// Frames `payload` for `node`.
pub fn encode(node: &NodeRef, payload: &[u8]) -> Bytes {
    let name = node.to_string();
    debug_assert!(name.len() <= MAX_NODE_LEN);
    let mut out = BytesMut::with_capacity(1 + name.len() + payload.len());
    out.put_u8(name.len() as u8);
    out.put_slice(name.as_bytes());
    out.put_slice(payload);
    out.freeze()
}

/// Reads a frame of at most `max` bytes: the node it names and the payload (sharing `frame`'s
/// memory).
pub fn decode(frame: &Bytes, max: usize) -> Result<(NodeRef, Bytes), FrameError> {
    if frame.len() > max {
        return Err(FrameError::TooLarge {
            len: frame.len(),
            max,
        });
    }
    let len = usize::from(*frame.first().ok_or(FrameError::Truncated)?);
    if len == 0 || len > MAX_NODE_LEN {
        return Err(FrameError::BadNode);
    }
    let name = frame.get(1..1 + len).ok_or(FrameError::Truncated)?;
    let node = std::str::from_utf8(name)
        .ok()
        .and_then(|s| s.parse::<NodeRef>().ok())
        .ok_or(FrameError::BadNode)?;
    let payload = frame.slice(1 + len..);
    if payload.is_empty() {
        return Err(FrameError::Empty);
    }
    Ok((node, payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_bad_frames_are_named() {
        let node: NodeRef = "org-b/n1".parse().unwrap();
        let frame = encode(&node, b"quic bytes");
        assert_eq!(frame[0] as usize, "org-b/n1".len());
        let (back, payload) = decode(&frame, 2048).unwrap();
        assert_eq!((back, &payload[..]), (node.clone(), &b"quic bytes"[..]));

        assert_eq!(
            decode(&frame, 8).unwrap_err().to_string(),
            "frame of 19 bytes; at most 8"
        );
        assert_eq!(decode(&Bytes::new(), 2048), Err(FrameError::Truncated));
        assert_eq!(
            decode(&Bytes::from_static(b"\x20org"), 2048),
            Err(FrameError::Truncated)
        );
        assert_eq!(
            decode(&Bytes::from_static(b"\x00x"), 2048),
            Err(FrameError::BadNode)
        );
        assert_eq!(
            decode(&Bytes::from_static(b"\x03a/Bxx"), 2048),
            Err(FrameError::BadNode),
            "labels are checked"
        );
        assert_eq!(
            decode(&Bytes::from_static(b"\x03a/b"), 2048),
            Err(FrameError::Empty)
        );
        assert_eq!(
            decode(&Bytes::from_static(b"\x03\xff/b\x00"), 2048),
            Err(FrameError::BadNode),
            "not UTF-8"
        );
    }
}
