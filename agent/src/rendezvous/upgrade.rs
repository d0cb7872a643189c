//! The HTTP/1.1 opening of the TLS/TCP carrier, and of HTTP CONNECT proxies on the way to it.
//!
//! ```text
//!  node ──TCP──▶ [proxy: CONNECT rv.example:443 HTTP/1.1  ◀── HTTP/1.1 200]
//!       ──TLS (server pinned, node's collaboration certificate)──▶
//!       GET /fedmesh/rendezvous HTTP/1.1            ◀── HTTP/1.1 101 Switching Protocols
//!       Upgrade: fedmesh-rendezvous/1                   Upgrade: fedmesh-rendezvous/1
//!       Connection: Upgrade
//!       then length-prefixed frames both ways (see [`super::tcp`])
//! ```
//!
//! The texts and their parsers are pure; [`read_head`] reads one head from a stream, bounded in
//! size (the caller bounds it in time).

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};

/// The `Upgrade:` token of the carrier.
pub const PROTOCOL: &str = "fedmesh-rendezvous/1";
/// The request path of the carrier (L7 load balancers may route by it).
pub const PATH: &str = "/fedmesh/rendezvous";
/// The largest HTTP head read, request or response.
pub const MAX_HEAD: usize = 8 * 1024;
/// Most header lines parsed in one head.
const MAX_HEADERS: usize = 32;

/// What is wrong with an HTTP head.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    /// The head did not end within the bound.
    #[error("HTTP head longer than {max} bytes")]
    TooLarge {
        /// The bound.
        max: usize,
    },
    /// The stream ended before the head did.
    #[error("connection closed before a complete HTTP head ({got} bytes)")]
    Closed {
        /// Bytes read.
        got: usize,
    },
    /// Not HTTP/1.1 text.
    #[error("not an HTTP/1.1 head: {0}")]
    Malformed(String),
    /// A well-formed request that is not the carrier's upgrade.
    #[error("{0}")]
    NotUpgrade(&'static str),
    /// The stream failed.
    #[error("reading the HTTP head: {0}")]
    Io(String),
}

impl HeadError {
    /// A short label for metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::TooLarge { .. } => "head_too_large",
            Self::Closed { .. } | Self::Io(_) => "head_closed",
            Self::Malformed(_) => "head_malformed",
            Self::NotUpgrade(_) => "not_upgrade",
        }
    }
}

/// The node's upgrade request (`host` is the rendezvous's listed `host:port`).
pub fn upgrade_request(host: &str) -> String {
    format!(
        "GET {PATH} HTTP/1.1\r\nHost: {host}\r\nUpgrade: {PROTOCOL}\r\nConnection: Upgrade\r\n\r\n"
    )
}

/// The rendezvous's answer to a good upgrade request.
pub const SWITCHING: &str = concat!(
    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: ",
    "fedmesh-rendezvous/1",
    "\r\nConnection: Upgrade\r\n\r\n"
);

/// The rendezvous's refusal: `status` with `reason` as the body, then it closes.
pub fn refusal(status: u16, title: &str, reason: &str) -> String {
    format!(
        "HTTP/1.1 {status} {title}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{reason}\n",
        reason.len() + 1
    )
}

/// A CONNECT request for `target` (`host:port`), with `Proxy-Authorization: Basic` when the
/// proxy URL carried credentials (`basic` is already base64).
pub fn connect_request(target: &str, basic: Option<&str>) -> String {
    let auth = basic
        .map(|b| format!("Proxy-Authorization: Basic {b}\r\n"))
        .unwrap_or_default();
    format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{auth}\r\n")
}

fn header<'a>(headers: &'a [httparse::Header<'a>], name: &str) -> Option<&'a [u8]> {
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value)
}

fn has_token(value: Option<&[u8]>, token: &str) -> bool {
    value
        .and_then(|v| std::str::from_utf8(v).ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

/// Checks a request head (through its blank line) is the carrier's upgrade: `GET` of
/// [`PATH`], HTTP/1.1, `Upgrade: fedmesh-rendezvous/1`, `Connection: Upgrade`.
pub fn check_upgrade_request(head: &[u8]) -> Result<(), HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(head) {
        Ok(httparse::Status::Complete(n)) if n == head.len() => {}
        Ok(httparse::Status::Complete(_)) => {
            return Err(HeadError::Malformed("bytes after the head".into()));
        }
        Ok(httparse::Status::Partial) => return Err(HeadError::Malformed("incomplete".into())),
        Err(e) => return Err(HeadError::Malformed(e.to_string())),
    }
    if request.version != Some(1) {
        return Err(HeadError::NotUpgrade("HTTP/1.1 only"));
    }
    if request.method != Some("GET") {
        return Err(HeadError::NotUpgrade("only GET upgrades the carrier"));
    }
    if request.path != Some(PATH) {
        return Err(HeadError::NotUpgrade("unknown path"));
    }
    if !has_token(header(request.headers, "upgrade"), PROTOCOL) {
        return Err(HeadError::NotUpgrade("no `Upgrade: fedmesh-rendezvous/1`"));
    }
    if !has_token(header(request.headers, "connection"), "upgrade") {
        return Err(HeadError::NotUpgrade("no `Connection: Upgrade`"));
    }
    Ok(())
}

/// A response's status and whether it upgrades to the carrier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub code: u16,
    /// The reason phrase (for errors).
    pub reason: String,
    /// Whether it carries `Upgrade: fedmesh-rendezvous/1`.
    pub upgrades: bool,
}

/// Parses a response head (through its blank line).
pub fn parse_response(head: &[u8]) -> Result<Response, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    match response.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(HeadError::Malformed("incomplete".into())),
        Err(e) => return Err(HeadError::Malformed(e.to_string())),
    }
    let reason: String = response
        .reason
        .unwrap_or_default()
        .chars()
        .filter(|c| !c.is_control())
        .take(80)
        .collect();
    Ok(Response {
        code: response.code.unwrap_or_default(),
        reason,
        upgrades: has_token(header(response.headers, "upgrade"), PROTOCOL),
    })
}

/// Where the head in `buf` ends (just past its blank line), if it does.
pub fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// Reads one HTTP head of at most `max` bytes from `reader`: the head (through its blank line)
/// and whatever followed it in the same reads (the start of the next protocol).
pub async fn read_head<R: AsyncRead + Unpin>(
    reader: &mut R,
    max: usize,
) -> Result<(Vec<u8>, BytesMut), HeadError> {
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        // Only the new bytes (and the three before them) can complete the blank line.
        let from = buf.len().saturating_sub(3);
        let n = reader
            .read_buf(&mut buf)
            .await
            .map_err(|e| HeadError::Io(e.to_string()))?;
        if let Some(end) = head_end(&buf[from..]).map(|e| e + from) {
            if end > max {
                return Err(HeadError::TooLarge { max });
            }
            let rest = buf.split_off(end);
            return Ok((buf.to_vec(), rest));
        }
        if buf.len() > max {
            return Err(HeadError::TooLarge { max });
        }
        if n == 0 {
            return Err(HeadError::Closed { got: buf.len() });
        }
        // Reads stay small: the buffer grows to about the bound at most.
        if buf.capacity() - buf.len() < 512 {
            buf.reserve(1024);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_upgrade_request_is_checked_field_by_field() {
        let good = upgrade_request("rv.example:443");
        check_upgrade_request(good.as_bytes()).unwrap();
        let lower = good
            .replace("Upgrade: fedmesh", "upgrade: FEDMESH")
            .replace("Connection: Upgrade", "connection: keep-alive, upgrade");
        check_upgrade_request(lower.as_bytes()).unwrap();
        let bad = |text: &str| check_upgrade_request(text.as_bytes()).unwrap_err();
        assert_eq!(
            bad(&good.replace("GET", "POST")),
            HeadError::NotUpgrade("only GET upgrades the carrier")
        );
        assert_eq!(
            bad(&good.replace(PATH, "/")),
            HeadError::NotUpgrade("unknown path")
        );
        assert_eq!(
            bad(&good.replace("HTTP/1.1", "HTTP/1.0")),
            HeadError::NotUpgrade("HTTP/1.1 only")
        );
        assert_eq!(
            bad(&good.replace("fedmesh-rendezvous/1", "websocket")),
            HeadError::NotUpgrade("no `Upgrade: fedmesh-rendezvous/1`")
        );
        assert_eq!(
            bad(&good.replace("Connection: Upgrade", "Connection: close")),
            HeadError::NotUpgrade("no `Connection: Upgrade`")
        );
        assert!(matches!(
            bad("\x16\x03\x01garbage\r\n\r\n"),
            HeadError::Malformed(_)
        ));
        assert!(matches!(
            bad(&format!("{good}extra")),
            HeadError::Malformed(_)
        ));
    }

    #[test]
    fn responses_name_their_status() {
        let up = parse_response(SWITCHING.as_bytes()).unwrap();
        assert_eq!((up.code, up.upgrades), (101, true));
        let refused = parse_response(refusal(403, "Forbidden", "revoked").as_bytes()).unwrap();
        assert_eq!(
            refused,
            Response {
                code: 403,
                reason: "Forbidden".into(),
                upgrades: false
            }
        );
        let proxy = parse_response(b"HTTP/1.0 200 Connection established\r\n\r\n").unwrap();
        assert_eq!(proxy.code, 200);
        assert!(parse_response(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
        assert_eq!(
            connect_request("rv.example:443", Some("dTpw")),
            "CONNECT rv.example:443 HTTP/1.1\r\nHost: rv.example:443\r\n\
             Proxy-Authorization: Basic dTpw\r\n\r\n"
        );
    }

    #[tokio::test]
    async fn heads_are_read_within_their_bound_and_keep_what_follows() {
        let mut input: &[u8] = b"HTTP/1.1 101 X\r\n\r\n\x00\x05hello";
        let (head, rest) = read_head(&mut input, 64).await.unwrap();
        assert_eq!(head, b"HTTP/1.1 101 X\r\n\r\n");
        assert_eq!(&rest[..], b"\x00\x05hello");

        let long = vec![b'a'; 10_000];
        let mut input: &[u8] = &long;
        assert_eq!(
            read_head(&mut input, MAX_HEAD).await.unwrap_err(),
            HeadError::TooLarge { max: MAX_HEAD }
        );
        let mut input: &[u8] = b"GET / HTTP/1.1\r\n";
        assert_eq!(
            read_head(&mut input, MAX_HEAD).await.unwrap_err(),
            HeadError::Closed { got: 16 }
        );
        // A blank line past the bound is still too large.
        let mut late = vec![b'a'; 100];
        late.extend_from_slice(b"\r\n\r\n");
        let mut input: &[u8] = &late;
        assert_eq!(
            read_head(&mut input, 64).await.unwrap_err(),
            HeadError::TooLarge { max: 64 }
        );
    }
}
