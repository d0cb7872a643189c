//! The vantage6 peer-address API (`GET /vpn/algorithm/addresses`) through its router
//! in-process, asked from the address of an announced run: query flags and the container token
//! that names the caller's task.
//!
//! | byte % 2 | rest of the input |
//! |---|---|
//! | 0 | `<query>\n<token>`: the raw query string and `Authorization: Bearer` value |
//! | 1 | `<query>\n<claims>`: the token is `<HS256 header>.<base64url(claims)>.s`, so the claims are fuzzed as JSON |
//!
//! Whatever the input, the answer is 200 with addresses, or 400, 401 or 403 with a `msg`:
//! never a server error.

use std::sync::{Arc, OnceLock};

use axum::{
    Extension, Router,
    body::Body,
    http::{Request, StatusCode, header},
};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use fedmesh_agent::{
    node::{
        Snapshot,
        v6::{self, LocalRun, Registry, V6State},
    },
    serve::Peer,
};
use fedmesh_documents::{EffectiveLink, LinkTerms, PortSpec, TaskRef};
use http_body_util::BodyExt;
use tokio::{runtime::Runtime, sync::watch};
use tower::ServiceExt;

use crate::fixed::{COLLAB, fixed};

/// Where the caller connects from.
const CALLER: std::net::SocketAddr = std::net::SocketAddr::new(
    std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 1, 0, 7)),
    40_000,
);
/// `{"alg":"HS256"}`: a header the API takes as signed (it cannot check vantage6's key).
const HS256: &str = "eyJhbGciOiJIUzI1NiJ9";

struct Harness {
    rt: Runtime,
    app: Router,
    /// Kept so the router reads a live snapshot.
    _snapshot: watch::Sender<Arc<Snapshot>>,
}

fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let f = fixed();
        // org-a runs task 10 (parent 5) with org-b and org-c; task 20 is its child.
        let link = |from: &str, to: &str, port: &str, task_id, parent_id| {
            let ports = vec![port.parse::<PortSpec>().expect("port")];
            let task = Some(TaskRef { task_id, parent_id });
            let not_after = fedmesh_documents::jws::unix(f.now) + 3600;
            EffectiveLink {
                terms: LinkTerms::new(
                    COLLAB,
                    from.parse().expect("from"),
                    to.parse().expect("to"),
                    ports,
                    not_after,
                    task,
                )
                .expect("terms"),
                approved_by: "owner@example.org".into(),
                approved_at: fedmesh_documents::jws::unix(f.now),
            }
        };
        let snapshot = Snapshot {
            links: vec![
                link("org-b/n1", "org-a/n1", "21366:mpc", 10, Some(5)),
                link("org-c/n1", "org-a/n1", "21367:mpc", 10, Some(5)),
                link("org-b/n1", "org-a/n1", "8000:agg", 5, None),
                link("org-c/n1", "org-a/n1", "7000:child", 20, Some(10)),
            ],
            organization_ids: [("org-a".to_owned(), 1), ("org-b".to_owned(), 2)].into(),
            synced: true,
            ..Snapshot::default()
        };
        let (tx, rx) = watch::channel(Arc::new(snapshot));
        // The caller: org-a's run of task 10, at the address every request comes from.
        let registry = Registry::new();
        registry
            .announce(LocalRun {
                task_id: 10,
                parent_id: Some(5),
                source: CALLER.ip(),
                ports: vec!["21366:mpc".parse().expect("port")],
                host: None,
                image: None,
            })
            .expect("run");
        // The forwarding client needs a provider even though no upstream is set here.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let state = V6State {
            node: "org-a/n1".parse().expect("node"),
            snapshot: rx,
            registry,
            upstream: None,
            http: reqwest::Client::new(),
        };
        let app = v6::router(state, "").layer(Extension(Peer {
            remote: CALLER,
            certs: None,
        }));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        Harness {
            rt,
            app,
            _snapshot: tx,
        }
    })
}

/// One input.
pub fn run(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let (query, token) = match rest.iter().position(|b| *b == b'\n') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let Ok(query) = std::str::from_utf8(query) else {
        return;
    };
    let token = if mode % 2 == 0 {
        token.to_vec()
    } else {
        format!("{HS256}.{}.c2ln", URL_SAFE_NO_PAD.encode(token)).into_bytes()
    };
    let mut bearer = b"Bearer ".to_vec();
    bearer.extend_from_slice(&token);
    let Ok(request) = Request::get(format!("/vpn/algorithm/addresses?{query}"))
        .header(header::AUTHORIZATION, bearer)
        .body(Body::empty())
    else {
        // Not a request an HTTP server would have parsed.
        return;
    };
    let h = harness();
    let (status, body) = h.rt.block_on(async {
        let response = h.app.clone().oneshot(request).await.expect("infallible");
        let status = response.status();
        let body = response.into_body().collect().await.expect("body");
        (status, body.to_bytes())
    });
    let json: serde_json::Value = serde_json::from_slice(&body)
        .unwrap_or_else(|e| panic!("{status} answer is not JSON ({e}): {body:?}"));
    match status {
        StatusCode::OK => assert!(json["addresses"].is_array(), "{json}"),
        StatusCode::BAD_REQUEST | StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
            assert!(json["msg"].is_string(), "{json}");
        }
        other => panic!("unexpected status {other}: {json}"),
    }
}
