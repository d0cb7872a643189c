//! The relay's stream protocol (pure): what the dialling agent sends first on every QUIC stream,
//! and the one answer it waits for before any application byte flows.
//!
//! ```text
//! request  = version:u8 (=1)  len:u16  port:u16  label_len:u8  label[label_len]
//!            └─ len counts the bytes after it; at most MAX_HEADER
//! response = status:u8  reason_len:u8  reason[reason_len]
//!            status 0 = the target is connected, bytes may flow; anything else = refused
//! ```
//!
//! The answer comes only once the receiving agent holds a TCP connection to its target (it
//! retries the target until a deadline), so the dialling side never accepts a client and then
//! resets it for lack of a backend.

use std::fmt;

/// The protocol version this agent speaks.
pub const VERSION: u8 = 1;
/// The ALPN protocol id of the relay.
pub const ALPN: &[u8] = b"fedmesh/1";
/// Largest header body accepted (after the version and length).
pub const MAX_HEADER: usize = 256;
/// Longest port label.
pub const MAX_LABEL: usize = 63;

/// What the dialling agent asks for: a port on the receiving node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// The destination port (as approved in the link).
    pub port: u16,
    /// The port's label, informational.
    pub label: Option<String>,
}

/// Why a stream was refused. The numeric codes are part of the protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Refusal {
    /// No effective link covers (source, this node, port).
    NoLink = 1,
    /// The local target did not accept a connection before the deadline.
    TargetUnreachable = 2,
    /// The header could not be parsed.
    BadHeader = 3,
    /// The header's version is not spoken here.
    BadVersion = 4,
    /// The header is larger than [`MAX_HEADER`].
    HeaderTooLarge = 5,
    /// The link was revoked or expired while the stream was open.
    Revoked = 6,
    /// The link has carried all the bytes its budget allows.
    BudgetSpent = 7,
    /// The link already carries as many streams as its budget allows.
    StreamLimit = 8,
    /// The connection's certificates (either end's) have expired: no new stream on it; the
    /// dialling agent opens the stream again on a connection made with current certificates.
    Expired = 9,
}

impl Refusal {
    /// The code on the wire.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// Parses a code from the wire.
    pub fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            1 => Self::NoLink,
            2 => Self::TargetUnreachable,
            3 => Self::BadHeader,
            4 => Self::BadVersion,
            5 => Self::HeaderTooLarge,
            6 => Self::Revoked,
            7 => Self::BudgetSpent,
            8 => Self::StreamLimit,
            9 => Self::Expired,
            _ => return None,
        })
    }

    /// A short label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoLink => "no_link",
            Self::TargetUnreachable => "target_unreachable",
            Self::BadHeader => "bad_header",
            Self::BadVersion => "bad_version",
            Self::HeaderTooLarge => "header_too_large",
            Self::Revoked => "revoked",
            Self::BudgetSpent => "budget_spent",
            Self::StreamLimit => "stream_limit",
            Self::Expired => "certificate_expired",
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Request {
    /// Encodes the request.
    pub fn encode(&self) -> Vec<u8> {
        let label = self.label.as_deref().unwrap_or("").as_bytes();
        let label = &label[..label.len().min(MAX_LABEL)];
        let body_len = 2 + 1 + label.len();
        let mut out = Vec::with_capacity(3 + body_len);
        out.push(VERSION);
        out.extend_from_slice(&(body_len as u16).to_be_bytes());
        out.extend_from_slice(&self.port.to_be_bytes());
        out.push(label.len() as u8);
        out.extend_from_slice(label);
        out
    }

    /// Checks the fixed prefix (version, length) and returns the body length to read next.
    pub fn body_len(prefix: [u8; 3]) -> Result<usize, Refusal> {
        if prefix[0] != VERSION {
            return Err(Refusal::BadVersion);
        }
        let len = usize::from(u16::from_be_bytes([prefix[1], prefix[2]]));
        if len > MAX_HEADER {
            return Err(Refusal::HeaderTooLarge);
        }
        Ok(len)
    }

    /// Parses the body that follows the prefix.
    pub fn decode_body(body: &[u8]) -> Result<Self, Refusal> {
        let [p0, p1, label_len, rest @ ..] = body else {
            return Err(Refusal::BadHeader);
        };
        let port = u16::from_be_bytes([*p0, *p1]);
        if port == 0 || usize::from(*label_len) != rest.len() || rest.len() > MAX_LABEL {
            return Err(Refusal::BadHeader);
        }
        let label = match rest {
            [] => None,
            bytes => Some(String::from_utf8(bytes.to_vec()).map_err(|_| Refusal::BadHeader)?),
        };
        Ok(Self { port, label })
    }
}

/// The receiving agent's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Response {
    /// The target is connected; bytes flow from now on.
    Connected,
    /// Refused, with a reason in words.
    Refused(Refusal, String),
}

impl Response {
    /// Encodes the response.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Self::Connected => vec![0, 0],
            Self::Refused(r, reason) => {
                let text = &reason.as_bytes()[..reason.len().min(255)];
                let mut out = vec![r.code(), text.len() as u8];
                out.extend_from_slice(text);
                out
            }
        }
    }

    /// Parses the two-byte prefix: `Ok(None)` for connected, else the refusal and the reason
    /// length still to read.
    pub fn decode_prefix(prefix: [u8; 2]) -> Result<Option<(Refusal, usize)>, String> {
        match prefix[0] {
            0 => Ok(None),
            code => Refusal::from_code(code)
                .map(|r| Some((r, usize::from(prefix[1]))))
                .ok_or_else(|| format!("unknown refusal code {code}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(bytes: &[u8]) -> Result<Request, Refusal> {
        let len = Request::body_len([bytes[0], bytes[1], bytes[2]])?;
        Request::decode_body(bytes.get(3..3 + len).ok_or(Refusal::BadHeader)?)
    }

    #[test]
    fn request_round_trips() {
        let r = Request {
            port: 11365,
            label: Some("mpc".into()),
        };
        let bytes = r.encode();
        assert_eq!(bytes, [1, 0, 6, 0x2c, 0x65, 3, b'm', b'p', b'c']);
        assert_eq!(decode(&bytes).unwrap(), r);
        let plain = Request {
            port: 80,
            label: None,
        };
        assert_eq!(decode(&plain.encode()).unwrap(), plain);
    }

    #[test]
    fn bad_headers_are_refused_with_their_own_reason() {
        assert_eq!(decode(&[2, 0, 3, 0, 80, 0]), Err(Refusal::BadVersion));
        assert_eq!(decode(&[1, 1, 1, 0, 80, 0]), Err(Refusal::HeaderTooLarge));
        assert_eq!(
            decode(&[1, 0, 3, 0, 0, 0]),
            Err(Refusal::BadHeader),
            "port 0"
        );
        assert_eq!(
            decode(&[1, 0, 3, 0, 80, 5]),
            Err(Refusal::BadHeader),
            "label length lies"
        );
        assert_eq!(decode(&[1, 0, 1, 0]), Err(Refusal::BadHeader), "truncated");
        assert_eq!(
            decode(&[1, 0, 5, 0, 80, 2, 0xff, 0xfe]),
            Err(Refusal::BadHeader),
            "not UTF-8"
        );
    }

    #[test]
    fn responses_round_trip() {
        assert_eq!(Response::Connected.encode(), [0, 0]);
        let r = Response::Refused(Refusal::NoLink, "no link".into()).encode();
        assert_eq!(r, [1, 7, b'n', b'o', b' ', b'l', b'i', b'n', b'k']);
        assert_eq!(
            Response::decode_prefix([1, 7]).unwrap(),
            Some((Refusal::NoLink, 7))
        );
        assert_eq!(Response::decode_prefix([0, 0]).unwrap(), None);
        assert!(Response::decode_prefix([99, 0]).is_err());
        assert_eq!(
            Response::decode_prefix([7, 0]).unwrap(),
            Some((Refusal::BudgetSpent, 0))
        );
        assert_eq!(Refusal::StreamLimit.as_str(), "stream_limit");
        assert_eq!(Refusal::Expired.as_str(), "certificate_expired");
        for code in 1..=9 {
            assert_eq!(Refusal::from_code(code).unwrap().code(), code);
        }
    }
}
