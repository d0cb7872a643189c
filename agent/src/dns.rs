//! Peer names over DNS (hickory): `<org>.<collab>.fedmesh` and `<node>.<org>.<collab>.fedmesh`
//! answer the peer's local address. Unknown names under `.fedmesh` get NXDOMAIN; the server is
//! authoritative for fedmesh names only and refuses everything else (it is not a resolver).

use std::{
    collections::BTreeMap,
    future::Future,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result};
use fedmesh_certs::id::TRUST_DOMAIN_SUFFIX;
use hickory_server::{
    Server,
    net::runtime::Time,
    proto::{
        op::{Metadata, ResponseCode},
        rr::{Name, RData, Record, RecordType, rdata},
    },
    server::{Request, RequestHandler, ResponseHandler, ResponseInfo},
    zone_handler::MessageResponseBuilder,
};
use tokio::{
    net::{TcpListener, UdpSocket},
    sync::watch,
};
use tracing::warn;

/// Names (lowercase, no trailing dot) and the addresses they answer.
pub type NameMap = BTreeMap<String, Vec<IpAddr>>;

/// TTL of answers: short, so a revoked peer's name goes away quickly.
const TTL: u32 = 5;

/// The DNS request handler over a live name map.
#[derive(Clone)]
pub struct PeerDns {
    names: watch::Receiver<Arc<NameMap>>,
}

impl PeerDns {
    /// A handler answering from `names`.
    pub fn new(names: watch::Receiver<Arc<NameMap>>) -> Self {
        Self { names }
    }

    /// What a query for `name` (any case, trailing dot optional) and `rtype` answers:
    /// `Ok(addresses)` or the response code to send.
    pub fn lookup(&self, name: &str, rtype: RecordType) -> Result<Vec<IpAddr>, ResponseCode> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let under_fedmesh = name
            .strip_suffix(TRUST_DOMAIN_SUFFIX)
            .is_some_and(|head| head.is_empty() || head.ends_with('.'));
        if !under_fedmesh {
            return Err(ResponseCode::Refused);
        }
        let names = self.names.borrow();
        let Some(ips) = names.get(&name) else {
            return Err(ResponseCode::NXDomain);
        };
        Ok(ips
            .iter()
            .copied()
            .filter(|ip| match rtype {
                RecordType::A => ip.is_ipv4(),
                RecordType::AAAA => ip.is_ipv6(),
                RecordType::ANY => true,
                _ => false,
            })
            .collect())
    }
}

#[async_trait::async_trait]
impl RequestHandler for PeerDns {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response: R,
    ) -> ResponseInfo {
        let builder = MessageResponseBuilder::from_message_request(request);
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.authoritative = true;
        metadata.recursion_available = false;
        let Ok(info) = request.request_info() else {
            let msg = builder.error_msg(&request.metadata, ResponseCode::FormErr);
            return send(&mut response, msg, &request.metadata).await;
        };
        let qname: Name = info.query.name().into();
        match self.lookup(&qname.to_ascii(), info.query.query_type()) {
            Ok(ips) => {
                let records: Vec<Record> = ips
                    .into_iter()
                    .map(|ip| {
                        let rdata = match ip {
                            IpAddr::V4(v4) => RData::A(rdata::A(v4)),
                            IpAddr::V6(v6) => RData::AAAA(rdata::AAAA(v6)),
                        };
                        Record::from_rdata(qname.clone(), TTL, rdata)
                    })
                    .collect();
                let msg = builder.build(metadata, records.iter(), [], [], []);
                send(&mut response, msg, &request.metadata).await
            }
            Err(code) => {
                let msg = builder.error_msg(&request.metadata, code);
                send(&mut response, msg, &request.metadata).await
            }
        }
    }
}

async fn send<'a, R: ResponseHandler>(
    response: &mut R,
    msg: hickory_server::zone_handler::MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
    request: &Metadata,
) -> ResponseInfo {
    match response.send_response(msg).await {
        Ok(info) => info,
        Err(error) => {
            warn!(%error, "DNS response failed");
            let mut m = Metadata::response_from_request(request);
            m.response_code = ResponseCode::ServFail;
            hickory_server::proto::op::Header {
                metadata: m,
                counts: Default::default(),
            }
            .into()
        }
    }
}

/// Binds the DNS sockets: UDP and TCP on the same address. For port 0 it looks for a port free
/// for both (a TCP port can be held in TIME_WAIT while the UDP one is free).
pub async fn bind(addr: SocketAddr) -> Result<(UdpSocket, TcpListener)> {
    let attempts = if addr.port() == 0 { 20 } else { 1 };
    let mut last = None;
    for _ in 0..attempts {
        let udp = UdpSocket::bind(addr)
            .await
            .with_context(|| format!("binding DNS on udp/{addr}"))?;
        let local = udp.local_addr()?;
        match TcpListener::bind(local).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) => last = Some((local, e)),
        }
    }
    let (local, e) = last.context("no DNS bind attempt")?;
    Err(anyhow::Error::new(e).context(format!("binding DNS on tcp/{local}")))
}

/// Serves `names` on the bound sockets until `shutdown` completes.
pub async fn serve(
    (udp, tcp): (UdpSocket, TcpListener),
    names: watch::Receiver<Arc<NameMap>>,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let mut server = Server::new(PeerDns::new(names));
    server.register_socket(udp);
    server.register_listener(tcp, Duration::from_secs(5), 4096);
    shutdown.await;
    let _ = server.shutdown_gracefully().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn answers_only_known_fedmesh_names() {
        let mut map = NameMap::new();
        let ip = IpAddr::V4(Ipv4Addr::new(127, 77, 0, 2));
        map.insert("org-b.collab-x.fedmesh".into(), vec![ip]);
        let (_tx, rx) = watch::channel(Arc::new(map));
        let dns = PeerDns::new(rx);
        assert_eq!(
            dns.lookup("ORG-B.collab-x.fedmesh.", RecordType::A),
            Ok(vec![ip])
        );
        assert_eq!(
            dns.lookup("org-b.collab-x.fedmesh", RecordType::AAAA),
            Ok(vec![])
        );
        assert_eq!(
            dns.lookup("org-z.collab-x.fedmesh", RecordType::A),
            Err(ResponseCode::NXDomain)
        );
        assert_eq!(
            dns.lookup("example.com", RecordType::A),
            Err(ResponseCode::Refused)
        );
    }
}
