//! The relay's stream header: what a dialling peer sends first on every QUIC stream, read the
//! way the receiving agent reads it (3-byte prefix, then at most `MAX_HEADER` bytes of body),
//! and the one-line answer the dialling agent reads back.

use fedmesh_agent::relay::proto::{MAX_HEADER, Request, Response};

/// One header, then one response, from the same bytes.
pub fn run(data: &[u8]) {
    if let Some(&[v, l0, l1]) = data.get(..3)
        && let Ok(len) = Request::body_len([v, l0, l1])
    {
        assert!(len <= MAX_HEADER);
        if let Some(Ok(request)) = data.get(3..3 + len).map(Request::decode_body) {
            // What was accepted encodes back to the same request.
            let bytes = request.encode();
            let again = Request::body_len([bytes[0], bytes[1], bytes[2]])
                .and_then(|n| Request::decode_body(&bytes[3..3 + n]));
            assert_eq!(again, Ok(request));
        }
    }
    if let Some(&[status, reason_len]) = data.get(..2)
        && let Ok(Some((refusal, len))) = Response::decode_prefix([status, reason_len])
    {
        assert_eq!(refusal.code(), status);
        let reason = data.get(2..2 + len).unwrap_or(&data[2..]);
        let text = String::from_utf8_lossy(reason).into_owned();
        let bytes = Response::Refused(refusal, text).encode();
        assert!(bytes.len() <= 2 + 255);
        assert_eq!(
            Response::decode_prefix([bytes[0], bytes[1]]),
            Ok(Some((refusal, bytes.len() - 2)))
        );
    }
}
