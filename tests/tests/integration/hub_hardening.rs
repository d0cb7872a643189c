//! The hub against an attacker and against faults, with the real `fedmesh hub` process where it
//! matters: keys at rest, store faults, one-time join tokens, slow clients under a low file
//! limit, storage growth from replays and strangers, quotas, rate limits, refusal logs, and
//! node documents signed with certificates that are not valid now.

use std::{
    io::{BufRead, BufReader},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use fedmesh_agent::{
    enroll::{self, NodeState},
    hub::{
        HubOptions,
        api::{CA_REQUEST_AUDIENCE, CaRequest, JoinToken, OWNER_TOKEN_AUDIENCE, OwnerToken},
        client::{ClientError, HubClient},
    },
    owner::{HubAddress, NewCollab, Owner},
};
use fedmesh_documents::{
    Advertisement, Approval, CollabPolicy, Document, Exposure, JoinGrant, NodeRef, OwnerKey,
    Signer, jws,
};
use fedmesh_tests::{TestHub, fedmesh_bin};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn n(s: &str) -> NodeRef {
    s.parse().unwrap()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// A `fedmesh hub` process.
struct HubProcess {
    child: Child,
    url: String,
    pin: String,
    log: PathBuf,
}

impl HubProcess {
    /// Starts `fedmesh hub --data <data> <args>` on a free port (under `prlimit` when given);
    /// `Err(stderr)` when it exits instead of serving.
    fn start(data: &Path, args: &[&str], prlimit: Option<&str>) -> Result<Self, String> {
        Self::start_on("127.0.0.1:0", data, args, prlimit)
    }

    /// Like [`HubProcess::start`], listening on `listen`.
    fn start_on(
        listen: &str,
        data: &Path,
        args: &[&str],
        prlimit: Option<&str>,
    ) -> Result<Self, String> {
        let log = data.with_extension(format!("{}.log", std::process::id()));
        let mut command = match prlimit {
            Some(limit) => {
                let mut c = Command::new("prlimit");
                c.arg(limit).arg(fedmesh_bin());
                c
            }
            None => Command::new(fedmesh_bin()),
        };
        let mut child = command
            .args(["hub", "--listen", listen, "--data"])
            .arg(data)
            .args(args)
            .env("FEDMESH_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start fedmesh hub");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let banner = lines.next().and_then(Result::ok);
        let Some(url) = banner.and_then(|l| l.strip_prefix("hub listening on ").map(str::to_owned))
        else {
            let _ = child.wait();
            return Err(std::fs::read_to_string(&log).unwrap());
        };
        let pin = lines.next().unwrap().unwrap();
        Ok(Self {
            child,
            url,
            pin: pin.trim_start_matches("hub pin ").to_owned(),
            log,
        })
    }

    fn address(&self) -> HubAddress {
        HubAddress {
            url: self.url.clone(),
            pin: self.pin.clone(),
        }
    }

    fn anonymous(&self) -> HubClient {
        HubClient::new(&self.url, &self.pin, None).unwrap()
    }

    /// What it logged, without terminal colours.
    fn log(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap();
        let mut plain = String::with_capacity(text.len());
        let mut chars = text.chars();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                chars.by_ref().find(|c| c.is_ascii_alphabetic());
            } else {
                plain.push(c);
            }
        }
        plain
    }

    fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for HubProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a hub that must start.
fn hub(data: &Path, args: &[&str]) -> HubProcess {
    HubProcess::start(data, args, None).unwrap_or_else(|log| panic!("hub did not start:\n{log}"))
}

/// Starts a hub that must refuse to start; returns what it said.
fn refused(data: &Path, args: &[&str]) -> String {
    match HubProcess::start(data, args, None) {
        Ok(_) => panic!("the hub started with {} {args:?}", data.display()),
        Err(log) => log,
    }
}

fn new_collab(id: &str) -> NewCollab {
    NewCollab {
        id: id.into(),
        owner_name: "alice@org-a".into(),
        online_ca: true,
        policy: CollabPolicy::default(),
    }
}

/// An owner of `collab-x` (online CA) with enrolled nodes.
async fn collab(address: HubAddress, dir: &Path, nodes: &[&str]) -> (Owner, Vec<NodeState>) {
    let mut owner = Owner::create(&dir.join("owner"), address, new_collab("collab-x"))
        .await
        .unwrap();
    let mut states = Vec::new();
    for node in nodes {
        let token = owner
            .join_token(&n(node), None, Duration::from_secs(600))
            .await
            .unwrap();
        let state = dir.join(node.replace('/', "-"));
        states.push(enroll::enroll(&token, &state, None).await.unwrap());
    }
    (owner, states)
}

fn owner_key(dir: &Path) -> OwnerKey {
    OwnerKey::from_pem(&std::fs::read_to_string(dir.join("owner/owner-key.pem")).unwrap()).unwrap()
}

/// A client reading as the owner.
fn owner_reader(url: &str, pin: &str, key: &OwnerKey) -> HubClient {
    let claims = OwnerToken {
        collab: "collab-x".into(),
        aud: OWNER_TOKEN_AUDIENCE.into(),
        exp: jws::unix(SystemTime::now()) + 300,
    };
    let token = jws::sign_claims(&claims, &Signer::Owner(key)).unwrap();
    HubClient::new(url, pin, None)
        .unwrap()
        .with_owner_token(token)
}

fn refusal<T: std::fmt::Debug>(result: Result<T, ClientError>) -> (u16, String) {
    match result {
        Err(ClientError::Refused { status, message }) => (status, message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_at_rest_are_private_and_sealed() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("hub");
    let process = hub(&data, &["--init"]);
    let listen = process.url.trim_start_matches("https://").to_owned();
    collab(process.address(), tmp.path(), &["org-a/n1"]).await;
    process.stop();

    let store = data.join("hub.redb");
    assert_eq!(mode(&data), 0o700, "data directory");
    for file in ["hub.redb", "hub-key.pem", "ca.key"] {
        assert_eq!(mode(&data.join(file)), 0o600, "{file}");
    }
    // No private key in the clear in the store: the online CA's key is sealed.
    let bytes = std::fs::read(&store).unwrap();
    let text = String::from_utf8_lossy(&bytes);
    assert!(!text.contains("PRIVATE KEY"), "a private key in the clear");
    assert!(text.contains("ciphertext"));

    // Opened to others: refused, naming the file and the fix.
    std::fs::set_permissions(&store, std::fs::Permissions::from_mode(0o644)).unwrap();
    let log = refused(&data, &[]);
    assert!(
        log.contains("hub.redb") && log.contains("chmod 600"),
        "{log}"
    );
    std::fs::set_permissions(&store, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    let log = refused(&data, &[]);
    assert!(log.contains("chmod 700"), "{log}");
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();

    // The CA key kept elsewhere (recommended): without it, or with another key, no start.
    let key = tmp.path().join("keys/ca.key");
    std::fs::create_dir_all(key.parent().unwrap()).unwrap();
    std::fs::rename(data.join("ca.key"), &key).unwrap();
    let log = refused(&data, &[]);
    assert!(
        log.contains("ca.key is missing") && log.contains("--ca-key-file"),
        "{log}"
    );
    let other = tmp.path().join("keys/other.key");
    fedmesh_agent::hub::keys::CaKey::create(&other).unwrap();
    let log = refused(&data, &["--ca-key-file", other.to_str().unwrap()]);
    assert!(
        log.contains("sealed with CA key") && log.contains("other.key"),
        "{log}"
    );

    // With the right key the online CA still signs: a new node enrolls.
    let process = HubProcess::start_on(
        &listen,
        &data,
        &["--ca-key-file", key.to_str().unwrap()],
        None,
    )
    .unwrap_or_else(|log| panic!("hub did not start:\n{log}"));
    let mut owner = Owner::load(&tmp.path().join("owner")).unwrap();
    let token = owner
        .join_token(&n("org-b/n1"), None, Duration::from_secs(600))
        .await
        .unwrap();
    enroll::enroll(&token, &tmp.path().join("b"), None)
        .await
        .unwrap();
    drop(owner);
    process.stop();
}

/// Copies the hub's data directory (for one fault each).
fn copy_of(data: &Path, name: &str) -> PathBuf {
    let copy = data.with_file_name(name);
    let ok = Command::new("cp")
        .arg("-a")
        .arg(data)
        .arg(&copy)
        .status()
        .unwrap()
        .success();
    assert!(ok);
    copy
}

#[tokio::test(flavor = "multi_thread")]
async fn store_faults_stop_the_hub_with_a_message_naming_them() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("hub");
    // No data directory and no --init: nothing is made.
    let log = refused(&data, &[]);
    assert!(
        log.contains("is missing") && log.contains("--init"),
        "{log}"
    );
    assert!(!data.exists());
    // --init works.
    let process = hub(&data, &["--init"]);
    let pin = process.pin.clone();
    let (_owner, _) = collab(process.address(), tmp.path(), &["org-a/n1"]).await;
    let collab_jws = owner_reader(&process.url, &pin, &owner_key(tmp.path()))
        .docs("collab-x", 0, Duration::ZERO)
        .await
        .unwrap()
        .collab_jws;
    process.stop();
    let mut cases = 0;

    // 1. A 0-byte store.
    let d = copy_of(&data, "empty");
    std::fs::write(d.join("hub.redb"), b"").unwrap();
    let log = refused(&d, &["--init"]);
    assert!(log.contains("hub.redb is empty (0 bytes)"), "{log}");
    cases += 1;
    // 2. A deleted store (with --init too: the directory is not empty, so nothing is made).
    let d = copy_of(&data, "deleted");
    std::fs::remove_file(d.join("hub.redb")).unwrap();
    let log = refused(&d, &["--init"]);
    assert!(log.contains("hub.redb is missing"), "{log}");
    assert!(!d.join("hub.redb").exists());
    cases += 1;
    // 3. A bit flipped inside a stored document (every copy of it in the file).
    let d = copy_of(&data, "flipped");
    let store = d.join("hub.redb");
    let mut bytes = std::fs::read(&store).unwrap();
    let payload = collab_jws.split('.').nth(1).unwrap();
    let needle = &payload.as_bytes()[20..60];
    let mut flipped = 0;
    for i in 0..bytes.len().saturating_sub(needle.len()) {
        if &bytes[i..i + needle.len()] == needle {
            bytes[i + 10] ^= 0x01;
            flipped += 1;
        }
    }
    assert!(flipped >= 1);
    std::fs::write(&store, bytes).unwrap();
    // redb's own page checksums catch it when it repairs a store after a crash; the record
    // checksums catch it otherwise (store::tests::a_flipped_bit_is_found_by_the_record_checksum).
    let log = refused(&d, &[]);
    assert!(
        log.contains("hub.redb") && log.to_lowercase().contains("corrupted"),
        "{log}"
    );
    cases += 1;
    // 4. A deleted hub certificate: refused, and no new key is made over the old one.
    let d = copy_of(&data, "nocert");
    let key_before = std::fs::read(d.join("hub-key.pem")).unwrap();
    std::fs::remove_file(d.join("hub-cert.pem")).unwrap();
    let log = refused(&d, &["--init"]);
    assert!(log.contains("hub-cert.pem is missing"), "{log}");
    assert_eq!(std::fs::read(d.join("hub-key.pem")).unwrap(), key_before);
    assert!(!d.join("hub-cert.pem").exists());
    cases += 1;
    // 5. A deleted hub key.
    let d = copy_of(&data, "nokey");
    std::fs::remove_file(d.join("hub-key.pem")).unwrap();
    let log = refused(&d, &[]);
    assert!(log.contains("hub-key.pem is missing"), "{log}");
    cases += 1;
    // 6. Another hub's certificate in place of this one's.
    let d = copy_of(&data, "othercert");
    let other = tmp.path().join("other");
    drop(hub(&other, &["--init"]));
    for f in ["hub-cert.pem", "hub-key.pem"] {
        std::fs::copy(other.join(f), d.join(f)).unwrap();
    }
    let log = refused(&d, &[]);
    assert!(
        log.contains("is not the certificate this hub's store was made with"),
        "{log}"
    );
    cases += 1;
    assert_eq!(cases, 6);

    // The untouched original still starts, with the pin every node trusts.
    let process = hub(&data, &["--init"]);
    assert_eq!(process.pin, pin);
}

#[tokio::test(flavor = "multi_thread")]
async fn join_tokens_work_once() {
    let hub = TestHub::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let (mut owner, _) = collab(hub.address(), tmp.path(), &[]).await;
    let key = owner_key(tmp.path());
    let anonymous = HubClient::new(&hub.url, &hub.pin, None).unwrap();
    // Admit the node (the owner's own token is not used here).
    owner
        .join_token(&n("org-a/n1"), None, Duration::from_secs(600))
        .await
        .unwrap();
    let grant = |secret: &str, ttl: u64| {
        let doc = Document::JoinGrant(JoinGrant {
            collab: "collab-x".into(),
            node: n("org-a/n1"),
            secret_sha256: fedmesh_agent::hub::api::secret_digest(secret),
            not_after: jws::unix(SystemTime::now()) + ttl,
        });
        jws::sign(&doc, &Signer::Owner(&key)).unwrap()
    };
    let token = |secret: &str| JoinToken {
        hub: hub.url.clone(),
        hub_pin: hub.pin.clone(),
        collab: "collab-x".into(),
        owner_pin: owner.pin(),
        node: n("org-a/n1"),
        secret: secret.into(),
    };
    let signed = grant("secret-one", 600);
    anonymous.submit("collab-x", signed.clone()).await.unwrap();

    // Two enrollments at once with the same token: exactly one gets a certificate.
    let (d1, d2) = (tmp.path().join("e1"), tmp.path().join("e2"));
    let (t1, t2) = (token("secret-one"), token("secret-one"));
    let (r1, r2) = tokio::join!(
        enroll::enroll(&t1, &d1, None),
        enroll::enroll(&t2, &d2, None)
    );
    assert_eq!(r1.is_ok() as u8 + r2.is_ok() as u8, 1, "{r1:?} {r2:?}");

    // The same signed grant again changes nothing: the token stays used.
    for _ in 0..3 {
        anonymous.submit("collab-x", signed.clone()).await.unwrap();
    }
    let err = enroll::enroll(&token("secret-one"), &tmp.path().join("e3"), None)
        .await
        .unwrap_err()
        .downcast::<ClientError>()
        .unwrap();
    assert_eq!(err.status(), Some(409), "{err}");
    assert!(err.to_string().contains("already used"), "{err}");

    // A new grant (signed again, later expiry) for the used secret is refused.
    let (status, message) = refusal(anonymous.submit("collab-x", grant("secret-one", 900)).await);
    assert_eq!(status, 409);
    assert!(message.contains("already used"), "{message}");

    // A grant replaced before it was used is void: its secret cannot come back.
    let two = grant("secret-two", 600);
    anonymous.submit("collab-x", two.clone()).await.unwrap();
    anonymous
        .submit("collab-x", grant("secret-three", 600))
        .await
        .unwrap();
    let (status, message) = refusal(anonymous.submit("collab-x", two).await);
    assert_eq!(status, 409);
    assert!(message.contains("replaced by a newer grant"), "{message}");
    let err = enroll::enroll(&token("secret-two"), &tmp.path().join("e4"), None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("wrong join token secret"), "{err}");
    enroll::enroll(&token("secret-three"), &tmp.path().join("e5"), None)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_reads_its_join_token_from_a_file_not_its_arguments() {
    let hub = TestHub::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let (mut owner, _) = collab(hub.address(), tmp.path(), &[]).await;
    let token = owner
        .join_token(&n("org-a/n1"), None, Duration::from_secs(600))
        .await
        .unwrap();
    let encoded = token.encode();
    let state = tmp.path().join("state");
    let token_file = tmp.path().join("token");
    std::fs::write(&token_file, &encoded).unwrap();

    // A token on the command line is not accepted.
    let (ok, _, stderr) = fedmesh_tests::fedmesh(
        tmp.path(),
        &["node", "--state", "x", "--join-token", &encoded],
    );
    assert!(
        !ok && stderr.contains("unexpected argument '--join-token'"),
        "{stderr}"
    );

    let mut agent = Command::new(fedmesh_bin())
        .args(["node", "--state"])
        .arg(&state)
        .arg("--join-token-file")
        .arg(&token_file)
        .args([
            "--relay-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--loopback-pool",
            "127.231.1.0/24",
        ])
        .env_remove("FEDMESH_JOIN_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(agent.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert_eq!(first, "enrolled org-a/n1");
    let running = lines.next().unwrap().unwrap();
    assert!(
        running.starts_with("node agent org-a/n1 running"),
        "{running}"
    );
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", agent.id())).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline);
    assert!(!cmdline.contains(&token.secret) && !cmdline.contains("fmjoin1"));
    assert!(state.join("node.json").exists());
    let _ = agent.kill();
    let _ = agent.wait();
}

/// Opens a connection to `addr` from `source` that never finishes what it started: a TLS
/// handshake (`tls` false: one byte of a ClientHello) or a request's headers.
async fn slow_client(
    addr: std::net::SocketAddr,
    source: std::net::IpAddr,
    tls: Option<(
        tokio_rustls::TlsConnector,
        rustls::pki_types::ServerName<'static>,
    )>,
) -> Option<Box<dyn SlowConn>> {
    let socket = tokio::net::TcpSocket::new_v4().ok()?;
    socket.bind((source, 0).into()).ok()?;
    let mut tcp = socket.connect(addr).await.ok()?;
    match tls {
        None => {
            tcp.write_all(&[0x16]).await.ok()?;
            Some(Box::new(tcp))
        }
        Some((connector, name)) => {
            let mut stream =
                tokio::time::timeout(Duration::from_secs(5), connector.connect(name, tcp))
                    .await
                    .ok()?
                    .ok()?;
            stream
                .write_all(b"GET /v1/health HTTP/1.1\r\nHost: hub\r\n")
                .await
                .ok()?;
            stream.flush().await.ok()?;
            Some(Box::new(stream))
        }
    }
}

trait SlowConn: tokio::io::AsyncRead + Unpin + Send {}
impl<T: tokio::io::AsyncRead + Unpin + Send> SlowConn for T {}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_clients_cannot_starve_the_hub_under_a_low_file_limit() {
    fedmesh_tests::subscribe();
    let tmp = tempfile::tempdir().unwrap();
    let process = HubProcess::start(
        &tmp.path().join("hub"),
        &["--init"],
        Some("--nofile=256:256"),
    )
    .unwrap_or_else(|log| panic!("hub did not start:\n{log}"));
    let (_owner, nodes) = collab(process.address(), tmp.path(), &["org-a/n1"]).await;
    let member = nodes[0].hub_client().unwrap();
    let addr: std::net::SocketAddr = process.url.trim_start_matches("https://").parse().unwrap();
    let config = fedmesh_agent::hub::tls::client_config(&process.pin, None, None).unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();

    // 4 addresses x (50 unfinished handshakes + 50 unfinished requests): 400 > the 256 files
    // the hub may open.
    let mut tasks = Vec::new();
    for source in 2..6u8 {
        let source = std::net::IpAddr::from([127, 0, 0, source]);
        for i in 0..100 {
            let tls = (i % 2 == 1).then(|| (connector.clone(), name.clone()));
            tasks.push(tokio::spawn(slow_client(addr, source, tls)));
        }
    }
    let mut held = Vec::new();
    for t in tasks {
        if let Some(c) = t.await.unwrap() {
            held.push(c);
        }
    }
    assert!(
        held.len() >= 100,
        "only {} slow connections opened",
        held.len()
    );

    // While they hang on, the hub answers health checks and members.
    let started = Instant::now();
    let mut answered = 0;
    let anonymous = process.anonymous();
    while started.elapsed() < Duration::from_secs(15) {
        let health = tokio::time::timeout(Duration::from_secs(5), anonymous.health());
        health.await.expect("health check timed out").unwrap();
        let page = tokio::time::timeout(
            Duration::from_secs(5),
            member.docs("collab-x", 0, Duration::ZERO),
        );
        assert!(
            !page
                .await
                .expect("member request timed out")
                .unwrap()
                .docs
                .is_empty()
        );
        answered += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(answered >= 10);

    // The hub has closed the ones it took (handshake and header deadlines of 10 s).
    let mut open = 0;
    for conn in &mut held {
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(2), conn.read(&mut buf)).await;
        if read.is_err() {
            open += 1;
        }
    }
    assert_eq!(
        open, 0,
        "{open} slow connections still open after the deadlines"
    );
    let log = process.log();
    assert!(!log.contains("Too many open files"), "{log}");
    assert!(log.contains("per-IP connection cap reached"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_admin_server_closes_slow_headers_and_bodies() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_tx, rx) = tokio::sync::watch::channel(Arc::new(fedmesh_agent::node::Snapshot::default()));
    tokio::spawn(fedmesh_agent::node::admin::serve(
        listener,
        rx,
        Arc::new(fedmesh_agent::metrics::Metrics::default()),
        std::future::pending(),
    ));
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: a\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(30), slow.read_to_end(&mut buf)).await;
    assert!(
        closed.is_ok(),
        "slow headers held the connection open for 30 s"
    );
    assert!(started.elapsed() < Duration::from_secs(20));
    // A body that never finishes: 408 after the 10 s body deadline.
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"POST /healthz HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n0123456789")
        .await
        .unwrap();
    let started = Instant::now();
    let mut answer = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(30), slow.read(&mut answer))
        .await
        .expect("a slow body held the connection for 30 s")
        .unwrap();
    assert!(
        String::from_utf8_lossy(&answer[..n]).starts_with("HTTP/1.1 408"),
        "{}",
        String::from_utf8_lossy(&answer[..n])
    );
    assert!(started.elapsed() < Duration::from_secs(20));
    // The probes still answer.
    let mut ok = tokio::net::TcpStream::connect(addr).await.unwrap();
    ok.write_all(b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    ok.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

/// The hub's record count and store size.
async fn footprint(reader: &HubClient, store: &Path) -> (usize, u64) {
    let page = reader.docs("collab-x", 0, Duration::ZERO).await.unwrap();
    (page.docs.len(), std::fs::metadata(store).unwrap().len())
}

#[tokio::test(flavor = "multi_thread")]
async fn storage_does_not_grow_from_replays_or_strangers() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("hub");
    let process = hub(&data, &["--init"]);
    let (owner, nodes) = collab(process.address(), tmp.path(), &["org-a/n1", "org-b/n1"]).await;
    let key = owner_key(tmp.path());
    let reader = owner_reader(&process.url, &process.pin, &key);
    let anonymous = process.anonymous();
    let terms = fedmesh_agent::owner::terms(
        "collab-x",
        &n("org-a/n1"),
        &n("org-b/n1"),
        &["7000".parse().unwrap()],
        Duration::from_secs(3600),
        None,
    )
    .unwrap();
    owner.request(terms.clone()).await.unwrap();
    let approval = |at: u64| {
        jws::sign(
            &Document::Approval(Approval {
                terms: terms.clone(),
                approved_by: "alice@org-a".into(),
                approved_at: at,
                revocations: 0,
            }),
            &Signer::Owner(&key),
        )
        .unwrap()
    };
    let now = jws::unix(SystemTime::now());
    let signed = approval(now);
    let seq = anonymous
        .submit("collab-x", signed.clone())
        .await
        .unwrap()
        .seq;
    let store = data.join("hub.redb");
    let before = footprint(&reader, &store).await;

    // 100 exact replays, without credentials: the sequence number the hub has, nothing stored.
    for _ in 0..100 {
        let again = anonymous.submit("collab-x", signed.clone()).await.unwrap();
        assert_eq!(again.seq, seq);
    }
    // The same approval signed again: changes nothing, stores nothing.
    for i in 1..=10 {
        let again = anonymous
            .submit("collab-x", approval(now - i))
            .await
            .unwrap();
        assert_eq!(again.seq, seq);
    }
    // (The hub allows an address 200 requests at once and 50 a second after that.)
    tokio::time::sleep(Duration::from_secs(3)).await;
    // 100 rewrites of the signature as (r, n-s): refused.
    let rewritten = jws::malleate(&signed).unwrap();
    for _ in 0..100 {
        let (status, message) = refusal(anonymous.submit("collab-x", rewritten.clone()).await);
        assert_eq!(status, 403);
        assert!(message.contains("not canonical"), "{message}");
    }
    // A node's advertisement replayed by the node itself.
    let a = &nodes[0];
    let advert = jws::sign(
        &Document::Advertisement(Advertisement {
            collab: "collab-x".into(),
            node: n("org-a/n1"),
            endpoints: vec![fedmesh_documents::Endpoint::Quic {
                address: "127.0.0.1:4433".into(),
            }],
            instance: None,
            exposes: vec![],
            issued_at: now,
        }),
        &Signer::Node(&a.signer().unwrap()),
    )
    .unwrap();
    let member = a.hub_client().unwrap();
    let first = member.submit("collab-x", advert.clone()).await.unwrap().seq;
    let before = (before.0 + 1, footprint(&reader, &store).await.1);
    for _ in 0..20 {
        assert_eq!(
            member.submit("collab-x", advert.clone()).await.unwrap().seq,
            first
        );
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    // 100 strangers asking for online CAs: nothing stored, and the real owner is not locked out.
    let stranger = OwnerKey::generate().unwrap();
    let stranger_request = |id: &str| CaRequest {
        collab: id.into(),
        aud: CA_REQUEST_AUDIENCE.into(),
        exp: jws::unix(SystemTime::now()) + 60,
        owner_key: stranger.public_jwk(),
    };
    for i in 0..100 {
        let path = format!("/v1/collabs/collab-{i}/ca");
        let body = if i % 2 == 0 {
            b"{}".to_vec()
        } else {
            br#"{"jws":"x.y.z"}"#.to_vec()
        };
        let (status, _) = refusal(anonymous.post_raw(&path, body).await);
        assert!(status == 401 || status == 422, "{status}");
    }
    // A request signed for another id is refused too.
    let wrong = jws::sign_claims(&stranger_request("collab-a"), &Signer::Owner(&stranger)).unwrap();
    let (status, message) = refusal(anonymous.create_ca("collab-y", wrong).await);
    assert_eq!(status, 401, "{message}");
    assert_eq!(footprint(&reader, &store).await, before, "storage grew");
    Owner::create(
        &tmp.path().join("owner-y"),
        process.address(),
        new_collab("collab-y"),
    )
    .await
    .unwrap();
    // Once it exists, nobody else gets a CA for it.
    let late = jws::sign_claims(&stranger_request("collab-y"), &Signer::Owner(&stranger)).unwrap();
    let (status, message) = refusal(anonymous.create_ca("collab-y", late).await);
    assert_eq!(status, 409, "{message}");
    drop(owner);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_member_storage_quota_is_enforced() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("hub");
    let process = hub(&data, &["--init", "--member-quota-bytes", "200000"]);
    let (_owner, nodes) = collab(process.address(), tmp.path(), &["org-a/n1", "org-b/n1"]).await;
    let a = &nodes[0];
    let member = a.hub_client().unwrap();
    let signer = a.signer().unwrap();
    // Advertisements of 55 KB, each newer than the last: each replaces the one before, so the
    // member's storage does not grow (the quota is less than four of them).
    let exposes: Vec<Exposure> = (1..=1100)
        .map(|port| Exposure {
            port,
            label: Some("abcdefghijklmno".into()),
        })
        .collect();
    let now = jws::unix(SystemTime::now());
    for i in 0..40u64 {
        let advert = jws::sign(
            &Document::Advertisement(Advertisement {
                collab: "collab-x".into(),
                node: n("org-a/n1"),
                endpoints: vec![fedmesh_documents::Endpoint::Quic {
                    address: "127.0.0.1:4433".into(),
                }],
                instance: None,
                exposes: exposes.clone(),
                issued_at: now - 200 + i,
            }),
            &Signer::Node(&signer),
        )
        .unwrap();
        assert!(advert.len() > 55_000, "{}", advert.len());
        member.submit("collab-x", advert).await.unwrap();
    }
    let page = member.docs("collab-x", 0, Duration::ZERO).await.unwrap();
    let adverts = page
        .docs
        .iter()
        .filter(|e| e.kind == fedmesh_documents::DocKind::Advertisement)
        .count();
    assert_eq!(adverts, 1, "only the latest advertisement is kept");

    // Link requests (each for another link) add up, to the quota.
    let ports: Vec<fedmesh_documents::PortSpec> = (1..=32)
        .map(|p| format!("{p}:abcdefghijklmno").parse().unwrap())
        .collect();
    let mut stored = 0usize;
    let mut refusal_message = None;
    for i in 0..200u64 {
        let terms = fedmesh_documents::LinkTerms::new(
            "collab-x",
            n("org-a/n1"),
            n("org-b/n1"),
            ports.clone(),
            now + 3600 + i,
            None,
        )
        .unwrap();
        let request = jws::sign(
            &Document::LinkRequest(fedmesh_documents::LinkRequest {
                terms,
                requested_by: "org-a/n1".into(),
                requested_at: now,
            }),
            &Signer::Node(&signer),
        )
        .unwrap();
        match member.submit("collab-x", request).await {
            Ok(_) => stored += 1,
            Err(e) => {
                let (status, message) = refusal::<()>(Err(e));
                refusal_message = Some(format!("{status} {message}"));
                break;
            }
        }
    }
    let message = refusal_message.expect("200 link requests were all stored");
    assert!(
        message.starts_with("403")
            && message.contains("storage quota per member exceeded")
            && message.contains("org-a/n1"),
        "{message}"
    );
    assert!(stored >= 10, "only {stored} stored");
    process.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn rates_and_collaboration_quotas_are_limited() {
    let mut options = HubOptions::default();
    options.limits.writes_per_identity.burst = 20;
    options.limits.writes_per_identity.every = Duration::from_secs(60);
    options.limits.requests_per_ip.burst = 400;
    // Slow refill: a loaded machine sending the requests slowly still exhausts the burst.
    options.limits.requests_per_ip.every = Duration::from_secs(1);
    options.limits.collab_quota.docs = 40;
    let hub = TestHub::start_with(options).await;
    let tmp = tempfile::tempdir().unwrap();
    let (owner, nodes) = collab(hub.address(), tmp.path(), &["org-a/n1", "org-b/n1"]).await;
    let request = |node: &NodeState, port: u16| {
        let terms = fedmesh_agent::owner::terms(
            "collab-x",
            &node.config.node,
            &if node.config.node == n("org-a/n1") {
                n("org-b/n1")
            } else {
                n("org-a/n1")
            },
            &[port.to_string().parse().unwrap()],
            Duration::from_secs(3600),
            None,
        )
        .unwrap();
        jws::sign(
            &Document::LinkRequest(fedmesh_documents::LinkRequest {
                terms,
                requested_by: node.config.node.to_string(),
                requested_at: jws::unix(SystemTime::now()),
            }),
            &Signer::Node(&node.signer().unwrap()),
        )
        .unwrap()
    };
    // One member's writes: a burst of 20, then 429 naming it.
    let a = nodes[0].hub_client().unwrap();
    let mut accepted = 0;
    let mut limited = None;
    for port in 1000..1040 {
        match a.submit("collab-x", request(&nodes[0], port)).await {
            Ok(_) => accepted += 1,
            Err(e) => {
                limited = Some(refusal::<()>(Err(e)));
                break;
            }
        }
    }
    let (status, message) = limited.expect("no rate limit");
    assert_eq!(status, 429, "{message}");
    assert!(
        message.contains("collab-x/org-a/n1 is storing documents too fast"),
        "{message}"
    );
    assert!((19..=21).contains(&accepted), "{accepted}");
    // Another member is not held back by it, up to the collaboration's quota of 40 documents.
    let b = nodes[1].hub_client().unwrap();
    let mut quota = None;
    for port in 2000..2020 {
        if let Err(e) = b.submit("collab-x", request(&nodes[1], port)).await {
            quota = Some(refusal::<()>(Err(e)));
            break;
        }
    }
    let (status, message) = quota.expect("no collaboration quota");
    assert_eq!(status, 403, "{message}");
    assert!(
        message.contains("storage quota per collaboration exceeded"),
        "{message}"
    );
    // Requests from one address: 429 past its burst.
    let anonymous = HubClient::new(&hub.url, &hub.pin, None).unwrap();
    let mut too_many = 0;
    for _ in 0..450 {
        if let Err(ClientError::Refused { status: 429, .. }) = anonymous.health().await {
            too_many += 1;
        }
    }
    assert!(too_many >= 20, "{too_many}");
    drop(owner);
}

#[tokio::test(flavor = "multi_thread")]
async fn refusals_are_logged_once_per_reason_and_caller() {
    let tmp = tempfile::tempdir().unwrap();
    let process = hub(&tmp.path().join("hub"), &["--init"]);
    let (_owner, nodes) = collab(process.address(), tmp.path(), &["org-a/n1", "org-b/n1"]).await;
    let anonymous = process.anonymous();
    let f = fedmesh_documents::fixtures::Fixture::new("collab-x", &["org-a/n1", "org-b/n1"]);
    let terms = f.terms("org-a/n1", "org-b/n1", &["9000"], Duration::from_secs(3600));
    // 150 forged approvals from one address.
    for _ in 0..150 {
        let (status, _) = refusal(anonymous.submit("collab-x", f.approval(&terms)).await);
        assert_eq!(status, 403);
    }
    // A member submitting another member's document.
    let from_a = jws::sign(
        &Document::Advertisement(Advertisement {
            collab: "collab-x".into(),
            node: n("org-a/n1"),
            endpoints: Vec::new(),
            instance: None,
            exposes: vec![],
            issued_at: jws::unix(SystemTime::now()),
        }),
        &Signer::Node(&nodes[0].signer().unwrap()),
    )
    .unwrap();
    let b = nodes[1].hub_client().unwrap();
    let (status, _) = refusal(b.submit("collab-x", from_a).await);
    assert_eq!(status, 403);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let log = process.log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("request refused"))
        .collect();
    let forged: Vec<&&str> = lines
        .iter()
        .filter(|l| l.contains("not the owner key"))
        .collect();
    assert_eq!(forged.len(), 1, "{lines:#?}");
    assert!(
        forged[0].contains("WARN") && forged[0].contains("who=127.0.0.1"),
        "{}",
        forged[0]
    );
    let serial = nodes[1].identity().unwrap().info().serial.clone();
    assert!(
        lines.iter().any(
            |l| l.contains("spiffe://collab-x.fedmesh/org/org-b/node/n1")
                && l.contains(&serial)
                && l.contains("submitted by org-b/n1")
        ),
        "{lines:#?}"
    );
    assert!(lines.len() <= 4, "{lines:#?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn documents_signed_with_a_certificate_not_valid_now_are_refused() {
    let hub = TestHub::start().await;
    let tmp = tempfile::tempdir().unwrap();
    // An offline CA, so the test can also make a certificate that has expired.
    let owner_dir = tmp.path().join("owner");
    let mut owner = Owner::create(
        &owner_dir,
        hub.address(),
        NewCollab {
            online_ca: false,
            ..new_collab("collab-x")
        },
    )
    .await
    .unwrap();
    let ca = fedmesh_certs::CollabCa::from_pem(
        &std::fs::read_to_string(owner_dir.join("ca.pem")).unwrap(),
        &std::fs::read_to_string(owner_dir.join("ca-key.pem")).unwrap(),
    )
    .unwrap();
    let token = owner
        .join_token(&n("org-a/n1"), None, Duration::from_secs(600))
        .await
        .unwrap();
    let state = tmp.path().join("a");
    let key = fedmesh_certs::files::load_or_create_key(&state.join("node-key.pem")).unwrap();
    let id = fedmesh_certs::SpiffeId::new("collab-x", "org-a", "n1").unwrap();
    let csr = key.csr(&id).unwrap();
    let policy = fedmesh_certs::IssuancePolicy::default();
    let hour = Duration::from_secs(3600);
    let current = ca
        .sign_csr_pem(&csr.pem, &policy, hour, SystemTime::now())
        .unwrap();
    let a = enroll::enroll(&token, &state, Some(current.pem))
        .await
        .unwrap();
    // The same key, certified two days ago for an hour.
    let two_days_ago = SystemTime::now() - Duration::from_secs(2 * 86_400);
    let old = ca
        .sign_csr_pem(&csr.pem, &policy, hour, two_days_ago)
        .unwrap();
    let chain: Vec<rustls::pki_types::CertificateDer<'static>> =
        rustls::pki_types::pem::PemObject::pem_slice_iter(old.pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
    let signer = fedmesh_documents::NodeSigner::new(chain, key);
    // Signed back then: a node verifying history accepts it; the hub does not take it now.
    let advert = jws::sign(
        &Document::Advertisement(Advertisement {
            collab: "collab-x".into(),
            node: n("org-a/n1"),
            endpoints: vec![fedmesh_documents::Endpoint::Quic {
                address: "127.0.0.1:4433".into(),
            }],
            instance: None,
            exposes: vec![],
            issued_at: jws::unix(two_days_ago) + 60,
        }),
        &Signer::Node(&signer),
    )
    .unwrap();
    let member = a.hub_client().unwrap();
    let mut ledger = fedmesh_documents::Ledger::new(&a.config.owner_pin);
    let page = member.docs("collab-x", 0, Duration::ZERO).await.unwrap();
    for env in &page.docs {
        ledger.ingest(env, SystemTime::now()).unwrap();
    }
    ledger.ingest_jws(&advert, SystemTime::now()).unwrap();
    let (status, message) = refusal(member.submit("collab-x", advert).await);
    assert_eq!(status, 422, "{message}");
    assert!(
        message.contains("not valid now") && message.contains("expired"),
        "{message}"
    );
}

/// The kinds of the documents the hub serves from the start, counted.
async fn kinds(reader: &HubClient) -> std::collections::BTreeMap<String, usize> {
    let page = reader.docs("collab-x", 0, Duration::ZERO).await.unwrap();
    let mut counts = std::collections::BTreeMap::new();
    for env in &page.docs {
        *counts.entry(env.kind.to_string()).or_default() += 1;
    }
    counts
}

#[tokio::test(flavor = "multi_thread")]
async fn the_history_is_compacted_and_readers_agree() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("hub");
    let process = hub(&data, &["--init"]);
    let (owner, nodes) = collab(
        process.address(),
        tmp.path(),
        &["org-a/n1", "org-b/n1", "org-c/n1"],
    )
    .await;
    let key = owner_key(tmp.path());
    let reader = owner_reader(&process.url, &process.pin, &key);
    // Every node advertises five times, each newer than the last.
    let now = jws::unix(SystemTime::now());
    for node in &nodes {
        for i in 0..5 {
            let advert = Document::Advertisement(Advertisement {
                collab: "collab-x".into(),
                node: node.config.node.clone(),
                endpoints: vec![fedmesh_documents::Endpoint::Quic {
                    address: format!("127.0.0.1:{}", 4000 + i),
                }],
                instance: None,
                exposes: Vec::new(),
                issued_at: now - 10 + i,
            });
            let signed = jws::sign(&advert, &Signer::Node(&node.signer().unwrap())).unwrap();
            node.hub_client()
                .unwrap()
                .submit("collab-x", signed)
                .await
                .unwrap();
        }
    }
    // Twelve links, six of them revoked one at a time, one expiring at once.
    let mut ids = Vec::new();
    for port in 0..12u16 {
        let ttl = Duration::from_secs(if port == 11 { 2 } else { 3600 });
        let terms = fedmesh_agent::owner::terms(
            "collab-x",
            &n("org-a/n1"),
            &n("org-b/n1"),
            &[(7000 + port).to_string().parse().unwrap()],
            ttl,
            None,
        )
        .unwrap();
        owner.request(terms.clone()).await.unwrap();
        owner.approve(&terms.id).await.unwrap();
        ids.push(terms.id);
    }
    for id in &ids[..6] {
        owner
            .revoke(std::slice::from_ref(id), &[], &[])
            .await
            .unwrap();
    }
    // Four collaboration versions (one per member added), one kept; one advertisement each.
    let expect = |pairs: &[(&str, usize)]| -> std::collections::BTreeMap<String, usize> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
    };
    assert_eq!(
        kinds(&reader).await,
        expect(&[
            ("collaboration", 1),
            ("advertisement", 3),
            ("link request", 12),
            ("approval", 12),
            ("revocation", 6),
        ])
    );

    // A checkpoint that leaves out a revoked link is refused: the revocation would be lost.
    let ledger = owner.ledger().await.unwrap();
    let mut partial = fedmesh_documents::Checkpoint {
        collab: "collab-x".into(),
        number: 1,
        revocations: ledger.revocations_through(),
        links: ids[1..6].to_vec(),
        issued_at: jws::unix(SystemTime::now()),
        ..Default::default()
    };
    let (status, message) = refusal(
        reader
            .submit(
                "collab-x",
                jws::sign(&Document::Checkpoint(partial.clone()), &Signer::Owner(&key)).unwrap(),
            )
            .await,
    );
    assert_eq!(status, 422, "{message}");
    assert!(
        message.contains(&format!("leaves out link {}", ids[0])),
        "{message}"
    );

    // The owner's checkpoint: revocations and the links they ended are dropped, and so is the
    // link that expired.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let cp = owner.checkpoint().await.unwrap();
    assert_eq!((cp.number, cp.revocations, cp.links.len()), (1, 6, 6));
    let after = expect(&[
        ("collaboration", 1),
        ("advertisement", 3),
        ("link request", 5),
        ("approval", 5),
        ("checkpoint", 1),
    ]);
    assert_eq!(kinds(&reader).await, after);
    // A second checkpoint under the same number names the real cause.
    partial.links = cp.links.clone();
    let (status, message) = refusal(
        reader
            .submit(
                "collab-x",
                jws::sign(&Document::Checkpoint(partial), &Signer::Owner(&key)).unwrap(),
            )
            .await,
    );
    assert_eq!(status, 409, "{message}");
    assert!(message.contains("another owner command"), "{message}");

    // A reader from the start gets the checkpoint first and computes what the owner has.
    let fresh = fedmesh_agent::owner::fetch_ledger(&reader, "collab-x", &owner.pin())
        .await
        .unwrap();
    let kept = owner.ledger().await.unwrap();
    let t = SystemTime::now();
    assert_eq!(fresh.links(t), kept.links(t));
    assert_eq!(fresh.revocation().links, kept.revocation().links);
    assert_eq!(fresh.withheld(), None);
    let page = nodes[0]
        .hub_client()
        .unwrap()
        .docs("collab-x", 0, Duration::ZERO)
        .await
        .unwrap();
    assert!(page.checkpoint.is_some(), "served first below it");

    // Across a restart the hub holds the same, and readers still agree.
    process.stop();
    let process = hub(&data, &[]);
    let reader = owner_reader(&process.url, &process.pin, &key);
    assert_eq!(kinds(&reader).await, after);
    let again = fedmesh_agent::owner::fetch_ledger(&reader, "collab-x", &owner.pin())
        .await
        .unwrap();
    assert_eq!(again.links(t), kept.links(t));
    process.stop();
}

/// `--allow-owner` limits who may create collaborations; online CAs waiting for their
/// collaboration document are capped, reserve their id for the requesting owner key (the same
/// owner gets the same CA again), and are forgotten after their time so the id is free again.
#[tokio::test(flavor = "multi_thread")]
async fn online_cas_are_for_allowed_owners_capped_and_reserved_for_a_while() {
    let allowed = OwnerKey::generate().unwrap();
    let other = OwnerKey::generate().unwrap();
    let mut options = HubOptions::default();
    options
        .allowed_owners
        .insert(jws::thumbprint(&allowed.public_jwk()));
    options.limits.max_pending_cas = 2;
    options.limits.pending_ca_ttl = Duration::from_secs(2);
    let hub = TestHub::start_with(options).await;
    let anonymous = HubClient::new(&hub.url, &hub.pin, None).unwrap();
    let request = |key: &OwnerKey, id: &str| {
        let claims = CaRequest {
            collab: id.into(),
            aud: CA_REQUEST_AUDIENCE.into(),
            exp: jws::unix(SystemTime::now()) + 60,
            owner_key: key.public_jwk(),
        };
        jws::sign_claims(&claims, &Signer::Owner(key)).unwrap()
    };

    // An owner key not on the list: 403 naming the key and the flag.
    let (status, message) = refusal(anonymous.create_ca("c-1", request(&other, "c-1")).await);
    assert_eq!(status, 403, "{message}");
    assert!(message.contains("--allow-owner"), "{message}");
    assert!(
        message.contains(&jws::thumbprint(&other.public_jwk())),
        "{message}"
    );
    let tmp = tempfile::tempdir().unwrap();
    let Err(err) = Owner::create(
        &tmp.path().join("owner-other"),
        hub.address(),
        new_collab("c-9"),
    )
    .await
    else {
        panic!("an owner not on the list created a collaboration");
    };
    assert!(format!("{err:#}").contains("--allow-owner"), "{err:#}");

    // The allowed owner: the same request twice gets the same CA (the id is reserved for it).
    let first = anonymous
        .create_ca("c-1", request(&allowed, "c-1"))
        .await
        .unwrap();
    let again = anonymous
        .create_ca("c-1", request(&allowed, "c-1"))
        .await
        .unwrap();
    assert_eq!(first.ca_pem, again.ca_pem);
    anonymous
        .create_ca("c-2", request(&allowed, "c-2"))
        .await
        .unwrap();
    // Two CAs wait for their collaboration: a third is refused until one is used or expires.
    let (status, message) = refusal(anonymous.create_ca("c-3", request(&allowed, "c-3")).await);
    assert_eq!(status, 503, "{message}");
    assert!(
        message.contains("waiting for their collaboration"),
        "{message}"
    );

    // After their time the waiting CAs are dropped: the cap frees up and a new CA is made for
    // the same id (the old reservation is gone, so is its key).
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    let fresh = anonymous
        .create_ca("c-3", request(&allowed, "c-3"))
        .await
        .unwrap();
    let renewed = anonymous
        .create_ca("c-1", request(&allowed, "c-1"))
        .await
        .unwrap();
    assert_ne!(
        renewed.ca_pem, first.ca_pem,
        "an expired reservation came back"
    );
    assert_ne!(fresh.ca_pem, first.ca_pem);
}

/// Node-signed run documents at the hub: only the node a run is at may announce or end it; an
/// end replaces its announcement in the store; the announcement replayed (re-signed with its
/// old start) after its end is refused, also after a restart; a run older than any lifetime
/// is refused.
#[tokio::test(flavor = "multi_thread")]
async fn run_documents_are_the_announcing_nodes_and_an_end_replaces_its_run() {
    use fedmesh_documents::{
        TaskRef,
        runs::{LinkPolicy, RunAnnouncement, RunEnd},
    };
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("hub");
    let process = hub(&data, &["--init"]);
    let (owner, nodes) = collab(
        process.address(),
        tmp.path(),
        &["org-a/n1", "org-b/n1", "org-c/n1"],
    )
    .await;
    let key = owner_key(tmp.path());
    let image = format!("sha256:{}", "cd".repeat(32));
    let now = jws::unix(SystemTime::now());
    owner
        .link_policy(LinkPolicy {
            collab: String::new(),
            name: "mpc".into(),
            images: vec![image.clone()],
            ports: vec!["11366:mpc".parse().unwrap()],
            orgs: vec!["org-a".into(), "org-b".into(), "org-c".into()],
            max_lifetime_secs: 3600,
            not_after: now + 3600,
            issued_at: 0,
        })
        .await
        .unwrap();
    let announcement = |node: &str, started_at: u64| {
        Document::RunAnnouncement(RunAnnouncement {
            collab: "collab-x".into(),
            node: n(node),
            task: TaskRef {
                task_id: 7,
                parent_id: None,
            },
            image: image.clone(),
            ports: vec!["11366:mpc".parse().unwrap()],
            started_at,
        })
    };
    let submit = |i: usize, doc: Document| {
        let signed = jws::sign(&doc, &Signer::Node(&nodes[i].signer().unwrap())).unwrap();
        let client = nodes[i].hub_client().unwrap();
        async move { client.submit("collab-x", signed).await }
    };
    submit(0, announcement("org-a/n1", now)).await.unwrap();
    submit(1, announcement("org-b/n1", now)).await.unwrap();
    // org-c announcing (or ending) org-b's run.
    let (status, message) = refusal(submit(2, announcement("org-b/n1", now)).await);
    assert_eq!(status, 403, "{message}");
    assert!(
        message.contains("signed by org-c/n1 but speaks for org-b/n1"),
        "{message}"
    );
    let end_b = |ended_at| {
        Document::RunEnd(RunEnd {
            collab: "collab-x".into(),
            node: n("org-b/n1"),
            task_id: 7,
            ended_at,
        })
    };
    let (status, _) = refusal(submit(2, end_b(now)).await);
    assert_eq!(status, 403);
    let reader = owner_reader(&process.url, &process.pin, &key);
    let before = kinds(&reader).await;
    assert_eq!(before.get("run announcement"), Some(&2), "{before:?}");

    // org-b's run ends: the end replaces the announcement in the store.
    submit(1, end_b(now)).await.unwrap();
    let after = kinds(&reader).await;
    assert_eq!(
        (after.get("run announcement"), after.get("run end")),
        (Some(&1), Some(&1)),
        "{after:?}"
    );
    // The ended run announced again with its old start: refused, nothing stored.
    let (status, message) = refusal(submit(1, announcement("org-b/n1", now)).await);
    assert_eq!(status, 409, "{message}");
    assert!(message.contains("ended"), "{message}");
    // A run said to have started longer ago than any lifetime allows: refused.
    let (status, message) = refusal(submit(1, announcement("org-b/n1", now - 8 * 86_400)).await);
    assert!(
        status == 403 || status == 409 || status == 422,
        "{status} {message}"
    );
    assert_eq!(kinds(&reader).await, after);

    // After a restart (the hub rebuilds its ledger from the store) the replay is still refused.
    let listen = process.url.trim_start_matches("https://").to_owned();
    process.stop();
    let process = HubProcess::start_on(&listen, &data, &[], None)
        .unwrap_or_else(|log| panic!("hub did not restart:\n{log}"));
    let (status, _) = refusal(submit(1, announcement("org-b/n1", now)).await);
    assert_eq!(status, 409);
    let reader = owner_reader(&process.url, &process.pin, &key);
    assert_eq!(kinds(&reader).await, after);
    process.stop();
}
