//! DNS queries to the node's peer-name server: bytes as they arrive on its UDP socket, parsed by
//! hickory the way its server parses them, and answered by fedmesh's handler.
//!
//! The answer must be a well-formed DNS response to the same id; a name outside `.fedmesh` is
//! refused and never answered with an address.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex, OnceLock},
};

use fedmesh_agent::dns::{NameMap, PeerDns};
use hickory_server::{
    net::{NetError, runtime::TokioTime, xfer::Protocol},
    proto::{
        op::{Message, MessageType, ResponseCode},
        rr::Record,
        serialize::binary::BinEncoder,
    },
    server::{Request, RequestHandler, ResponseHandler, ResponseInfo},
    zone_handler::MessageResponse,
};
use tokio::{runtime::Runtime, sync::watch};

struct Harness {
    rt: Runtime,
    dns: PeerDns,
    _names: watch::Sender<Arc<NameMap>>,
}

fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let mut names = NameMap::new();
        let v4 = IpAddr::V4(Ipv4Addr::new(127, 77, 0, 2));
        let v6 = IpAddr::V6(Ipv6Addr::LOCALHOST);
        names.insert("org-b.collab-x.fedmesh".into(), vec![v4, v6]);
        names.insert("n1.org-b.collab-x.fedmesh".into(), vec![v4]);
        let (tx, rx) = watch::channel(Arc::new(names));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        Harness {
            rt,
            dns: PeerDns::new(rx),
            _names: tx,
        }
    })
}

/// Keeps the encoded response instead of sending it.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Option<Vec<u8>>>>);

#[async_trait::async_trait]
impl ResponseHandler for Capture {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, NetError> {
        let mut bytes = Vec::with_capacity(512);
        let info = response.destructive_emit(&mut BinEncoder::new(&mut bytes))?;
        *self.0.lock().expect("capture") = Some(bytes);
        Ok(info)
    }
}

/// One datagram.
pub fn run(data: &[u8]) {
    let src = SocketAddr::from((Ipv4Addr::LOCALHOST, 53000));
    // The server drops what it cannot read a header from, answers FORMERR to what it cannot
    // parse, and ignores responses; only the rest reaches the handler.
    let Ok(request) = Request::from_bytes(data.to_vec(), src, Protocol::Udp) else {
        return;
    };
    if request.metadata.message_type == MessageType::Response {
        return;
    }
    let h = harness();
    let capture = Capture::default();
    h.rt.block_on(
        h.dns
            .handle_request::<_, TokioTime>(&request, capture.clone()),
    );
    let bytes = capture.0.lock().expect("capture").take();
    let bytes = bytes.expect("every query gets an answer");
    let answer = Message::from_vec(&bytes)
        .unwrap_or_else(|e| panic!("the answer does not parse ({e}): {bytes:?}"));
    assert_eq!(answer.metadata.id, request.metadata.id);
    assert_eq!(answer.metadata.message_type, MessageType::Response);
    let outside = request.request_info().is_ok_and(|info| {
        let name = info.query.name().to_ascii().to_ascii_lowercase();
        let name = name.trim_end_matches('.');
        !(name == "fedmesh" || name.ends_with(".fedmesh"))
    });
    if outside {
        assert_eq!(answer.metadata.response_code, ResponseCode::Refused);
        assert!(answer.answers.is_empty());
    }
}
