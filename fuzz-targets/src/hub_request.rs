//! Request bodies to the hub, through its axum router in-process (the same handlers, the same
//! body limit and JSON rejections as over TLS), and the hub API's own parsers. The hub holds
//! `collab-x` (owner key from `keys/`, a CA made at start so certificates are valid now), a
//! join grant for `org-c/n1` and a link request from `org-a/n1`.
//!
//! The first byte picks the route (`% 5`) and the connection's client certificate (`/ 5 % 3`:
//! none, `org-a/n1`, `org-b/n1`); the rest is the body, or for `GET .../docs`
//! `<query>\n<bearer token>`:
//!
//! | route | request |
//! |---|---|
//! | 0 | `POST /v1/collabs` |
//! | 1 | `POST /v1/collabs/collab-x/docs` |
//! | 2 | `POST /v1/collabs/collab-x/enroll` |
//! | 3 | `POST /v1/collabs/collab-x/renew` |
//! | 4 | `GET /v1/collabs/collab-x/docs?<query>` |
//!
//! The hub never answers a server error, and every refusal is an `ErrorBody` naming the reason.
//! The same bytes also go to `JoinToken::decode` and the API's body types.

use std::{
    sync::OnceLock,
    time::{Duration, SystemTime},
};

use axum::{
    Router,
    body::Body,
    http::{Request, header},
};
use fedmesh_agent::hub::{
    Hub, HubOptions,
    api::{
        DocsPage, DocsQuery, EnrollRequest, Enrolled, ErrorBody, JoinToken, OwnerToken,
        RenewRequest, SubmitDoc, secret_digest,
    },
    limits::Rate,
};
use fedmesh_certs::{CollabCa, IssuancePolicy, NodeKey, SpiffeId};
use fedmesh_documents::{Document, LinkRequest, Signer, jws};
use http_body_util::BodyExt;
use rustls_pki_types::CertificateDer;
use tokio::runtime::Runtime;
use tower::ServiceExt;

use crate::fixed::{COLLAB, fixture};

/// The join token secret of `org-c/n1`'s grant.
pub const GRANT_SECRET: &str = "fuzz-grant-secret";

struct Harness {
    rt: Runtime,
    /// The router as seen without a client certificate, as `org-a/n1`, as `org-b/n1`.
    apps: [Router; 3],
}

fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        // Paused time: a long poll returns as soon as nothing else can happen.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("runtime");
        let dir = tempfile::tempdir().expect("temporary directory");
        // Rates are not what this target explores: a 429 would hide the handlers from it.
        let unlimited = Rate {
            burst: u32::MAX,
            every: Duration::from_nanos(1),
        };
        let mut options = HubOptions::default();
        options.limits.requests_per_ip = unlimited;
        options.limits.writes_per_identity = unlimited;
        let data = dir.path().join("hub");
        Hub::init(&data, &["localhost".into()], &options).expect("hub init");
        let hub = Hub::open(&data, options).expect("hub store");
        // The store stays open; its directory goes now, so no run leaves files behind.
        drop(dir);
        let apps = rt.block_on(setup(&hub));
        Harness { rt, apps }
    })
}

/// The collaboration with a CA valid now, a grant, and a request, each through the router.
async fn setup(hub: &Hub) -> [Router; 3] {
    let now = SystemTime::now();
    let day = Duration::from_secs(86_400);
    let ca = CollabCa::generate(COLLAB, now - day, 365 * day).expect("CA");
    let f = fixture();
    let mut collab = f.collab.clone();
    collab.ca_pem = ca.cert_pem().to_owned();
    collab.issued_at = jws::unix(now);
    let owner = Signer::Owner(&f.owner);
    let issue = |node: &str| {
        let node: fedmesh_documents::NodeRef = node.parse().expect("node");
        let key = NodeKey::generate().expect("key");
        let csr = key
            .csr(&SpiffeId::new(COLLAB, &node.org, &node.node).expect("id"))
            .expect("csr");
        let issued = ca
            .sign_csr_pem(&csr.pem, &IssuancePolicy::default(), day, now)
            .expect("issue");
        let chain = vec![CertificateDer::from(issued.der.to_vec())];
        (
            chain.clone(),
            fedmesh_documents::NodeSigner::new(chain, key),
        )
    };
    let (a_chain, a_signer) = issue("org-a/n1");
    let (b_chain, _) = issue("org-b/n1");
    let apps = [
        hub.router_for_peer(None),
        hub.router_for_peer(Some(a_chain)),
        hub.router_for_peer(Some(b_chain)),
    ];
    let grant: Document = serde_json::from_value(serde_json::json!({
        "kind": "join_grant",
        "collab": COLLAB,
        "node": "org-c/n1",
        "secret_sha256": secret_digest(GRANT_SECRET),
        "not_after": jws::unix(now + 365 * day),
    }))
    .expect("grant");
    let terms = f.terms("org-a/n1", "org-b/n1", &["11365:mpc"], 300 * day);
    let request = Document::LinkRequest(LinkRequest {
        requested_by: terms.from.to_string(),
        terms,
        requested_at: jws::unix(now),
    });
    let submit = |jws: String| serde_json::to_vec(&SubmitDoc { jws }).expect("json");
    let steps = [
        (
            0,
            "/v1/collabs",
            submit(jws::sign(&Document::Collaboration(collab), &owner).expect("sign")),
        ),
        (
            0,
            "/v1/collabs/collab-x/docs",
            submit(jws::sign(&grant, &owner).expect("sign")),
        ),
        (
            1,
            "/v1/collabs/collab-x/docs",
            submit(jws::sign(&request, &Signer::Node(&a_signer)).expect("sign")),
        ),
    ];
    for (app, path, body) in steps {
        let response = apps[app]
            .clone()
            .oneshot(post(path, body))
            .await
            .expect("infallible");
        assert!(
            response.status().is_success(),
            "hub setup: {path}: {}",
            response.status()
        );
    }
    apps
}

fn post(path: &str, body: Vec<u8>) -> Request<Body> {
    Request::post(path)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body))
        .expect("request")
}

/// One input.
pub fn run(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    parsers(rest);
    let route = selector % 5;
    let request = if route == 4 {
        let (query, token) = match rest.iter().position(|b| *b == b'\n') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, &[][..]),
        };
        let Ok(query) = std::str::from_utf8(query) else {
            return;
        };
        let mut bearer = b"Bearer ".to_vec();
        bearer.extend_from_slice(token);
        match Request::get(format!("/v1/collabs/{COLLAB}/docs?{query}"))
            .header(header::AUTHORIZATION, bearer)
            .body(Body::empty())
        {
            Ok(r) => r,
            // Not a request an HTTP server would have parsed.
            Err(_) => return,
        }
    } else {
        let path = match route {
            0 => "/v1/collabs".to_owned(),
            1 => format!("/v1/collabs/{COLLAB}/docs"),
            2 => format!("/v1/collabs/{COLLAB}/enroll"),
            _ => format!("/v1/collabs/{COLLAB}/renew"),
        };
        post(&path, rest.to_vec())
    };
    let h = harness();
    let app = h.apps[usize::from(selector / 5 % 3)].clone();
    let (status, body) = h.rt.block_on(async {
        let response = app.oneshot(request).await.expect("infallible");
        let status = response.status();
        let body = response.into_body().collect().await.expect("body");
        (status, body.to_bytes())
    });
    assert!(!status.is_server_error(), "{status}: {body:?}");
    if status.is_success() {
        match route {
            4 => drop(serde_json::from_slice::<DocsPage>(&body).expect("a page")),
            2 | 3 => drop(serde_json::from_slice::<Enrolled>(&body).expect("an enrollment")),
            _ => {}
        }
    } else {
        let error = serde_json::from_slice::<ErrorBody>(&body)
            .unwrap_or_else(|e| panic!("{status} without an error body ({e}): {body:?}"));
        assert!(!error.error.is_empty());
    }
}

/// The API's parsers on their own.
fn parsers(bytes: &[u8]) {
    if let Ok(text) = std::str::from_utf8(bytes)
        && let Ok(token) = JoinToken::decode(text)
    {
        assert_eq!(JoinToken::decode(&token.encode()), Ok(token));
    }
    let _ = serde_json::from_slice::<SubmitDoc>(bytes);
    let _ = serde_json::from_slice::<EnrollRequest>(bytes);
    let _ = serde_json::from_slice::<RenewRequest>(bytes);
    let _ = serde_json::from_slice::<DocsQuery>(bytes);
    let _ = serde_json::from_slice::<OwnerToken>(bytes);
}
