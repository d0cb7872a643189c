//! `fedmesh node`: enroll a node, run the node agent, or print its peer map.
//!
//! On a machine the agent carries links with its relay on loopback addresses. With
//! `--kubernetes` (the Helm chart sets it) it also runs the Kubernetes controller: Istio objects
//! when the cluster serves Istio's APIs (`--mode auto`, the default) or `--mode istio`, else
//! the relay behind one Service per peer.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use clap::{
    Args, Subcommand, ValueEnum,
    builder::{PossibleValue, PossibleValuesParser, TypedValueParser},
};
use fedmesh_certs::files;
use fedmesh_documents::PortSpec;
use fedmesh_mesh_config::{RenderOptions, addresses::Pool};

use super::{
    hub::shutdown_signal,
    owner::{self, EnrollArgs},
};
use crate::{
    enroll,
    k8s::{self, Mode, PortRange},
    node::{self, Expose, NodeOptions},
    output::{Format, table},
    relay::{
        Caps, DEFAULT_LOOPBACK_POOL, RelayOptions, StreamsOver,
        relayed::{
            proxy::ProxySettings,
            tcp::{CarrierMode, CarrierOptions},
        },
        tuning::{Congestion, PathEstimate},
    },
};

/// `--mode`: a mesh backend ([`Mode`]), or `auto` (`None`): in Kubernetes, Istio when the
/// cluster serves its APIs, else the relay; on a machine, the relay.
fn mode_parser() -> impl TypedValueParser<Value = Option<Mode>> {
    let auto = PossibleValue::new("auto")
        .help("In Kubernetes: Istio when the cluster serves its APIs, else the relay");
    let modes = Mode::value_variants()
        .iter()
        .filter_map(ValueEnum::to_possible_value);
    PossibleValuesParser::new(std::iter::once(auto).chain(modes))
        .map(|name| Mode::ALL.into_iter().find(|m| m.as_str() == name))
}

/// Where and how the agent works in a cluster (`fedmesh node --kubernetes`, `fedmesh audit`).
#[derive(Debug, Args)]
pub struct KubeArgs {
    /// How links are carried.
    #[arg(long, env = "FEDMESH_MODE", default_value = "auto", value_parser = mode_parser())]
    pub(crate) mode: AutoMode,
    /// The agent's namespace (credentials, gateway objects, Services, PeerLinks); default: the
    /// pod's own.
    #[arg(long, env = "POD_NAMESPACE")]
    namespace: Option<String>,
    /// Render options for Istio mode (YAML: mesh_namespace, algorithm_namespace, vip_pool,
    /// ingress_gateway, ...); default: the built-in ones.
    #[arg(long, env = "FEDMESH_RENDER_OPTIONS")]
    render_options: Option<PathBuf>,
    /// The agent pod's labels, selected by the per-peer Services (relay mode) and by the
    /// ServiceEntries of peers the agent carries (Istio mode): k=v[,k=v].
    #[arg(
        long,
        env = "FEDMESH_POD_SELECTOR",
        default_value = "app.kubernetes.io/name=fedmesh-agent",
        value_parser = parse_labels
    )]
    pod_selector: BTreeMap<String, String>,
    /// Pod ports for the relay's per-(peer, port) listeners (relay mode; Istio mode: for peers
    /// the agent carries).
    #[arg(long, env = "FEDMESH_POD_PORTS", default_value = "20000-29999")]
    pod_ports: PortRange,
    /// How often the cluster is compared with the links when nothing changed (ledger changes
    /// and PeerLink edits start a pass at once).
    #[arg(
        long,
        env = "FEDMESH_RESYNC",
        value_parser = humantime::parse_duration,
        default_value = "10s"
    )]
    resync: Duration,
}

/// A mode, or none to detect it (`--mode auto`). An alias, so clap reads the argument as one
/// value that is always present (its default is `auto`), not as an optional argument.
type AutoMode = Option<Mode>;

fn parse_labels(s: &str) -> Result<BTreeMap<String, String>, String> {
    s.split(',')
        .map(|pair| {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| format!("{pair:?} is not key=value"))?;
            Ok((k.trim().to_owned(), v.trim().to_owned()))
        })
        .collect()
}

impl KubeArgs {
    /// The controller's options.
    pub(crate) fn options(&self) -> Result<k8s::Options> {
        let render = match &self.render_options {
            Some(path) => serde_saphyr::from_str::<RenderOptions>(&files::read_to_string(path)?)
                .with_context(|| format!("{} is not valid render options", path.display()))?,
            None => RenderOptions::default(),
        };
        Ok(k8s::Options {
            mode: self.mode,
            namespace: self.namespace.clone(),
            render,
            pod_labels: self.pod_selector.clone(),
            pod_ports: self.pod_ports,
            resync: self.resync,
        })
    }
}

/// `fedmesh node`
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct NodeArgs {
    #[command(subcommand)]
    command: Option<NodeCommand>,
    #[command(flatten)]
    run: Box<RunArgs>,
}

/// `fedmesh node ...`
#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Enroll with a join token: make the node key here, get a certificate.
    Enroll(EnrollArgs),
    /// Print this node's peer map (FEDMESH_PEERS: name -> IP:ports), as the running agent last
    /// wrote it.
    Peers {
        /// Node state directory.
        #[arg(long, env = "FEDMESH_STATE")]
        state: PathBuf,
        /// Output format (text: one line per peer name; json: the FEDMESH_PEERS value).
        #[arg(long, value_enum, default_value_t)]
        output: Format,
    },
    /// Announce a run of a task to the running agent (or end it with `--end`), through its run
    /// announce listener (`--v6-announce-listen`): what a vantage6 4 node's operator wires into
    /// task start and stop.
    Announce(AnnounceArgs),
}

/// `fedmesh node announce`
#[derive(Debug, Args)]
pub struct AnnounceArgs {
    /// The agent's run announce listener (`host:port`).
    #[arg(long)]
    at: SocketAddr,
    /// The task.
    #[arg(long)]
    task: u64,
    /// The task's parent, for subtasks.
    #[arg(long)]
    parent: Option<u64>,
    /// The address the run's container connects from.
    #[arg(long, required_unless_present = "end")]
    source: Option<std::net::IpAddr>,
    /// A port the run listens on, `port[:label]` (repeatable).
    #[arg(long = "port")]
    ports: Vec<PortSpec>,
    /// The run's image digest, `sha256:<64 hex>` (without it the run is not announced to peers).
    #[arg(long)]
    image: Option<String>,
    /// End the run at `--source` (or, without it, every run of the task).
    #[arg(long)]
    end: bool,
}

/// Posts a run announcement or end to the agent's announce listener.
async fn announce(args: AnnounceArgs) -> Result<()> {
    let (path, body) = if args.end {
        let body = match args.source {
            Some(source) => serde_json::json!({"source": source}),
            None => serde_json::json!({"task_id": args.task}),
        };
        ("runs/end", body)
    } else {
        let ports: Vec<String> = args.ports.iter().map(ToString::to_string).collect();
        let body = serde_json::json!({"task_id": args.task, "parent_id": args.parent,
            "source": args.source, "ports": ports, "image": args.image});
        ("runs", body)
    };
    let resp = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()?
        .post(format!("http://{}/{path}", args.at))
        .json(&body)
        .send()
        .await
        .with_context(|| format!("reaching the agent's announce listener at {}", args.at))?;
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    let msg = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v["msg"].as_str().map(str::to_owned))
        .unwrap_or(text);
    if !status.is_success() {
        bail!("the agent refused ({status}): {msg}");
    }
    println!("{msg}");
    Ok(())
}

/// Running the agent.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Node state directory (made by `fedmesh node enroll`).
    #[arg(long, env = "FEDMESH_STATE")]
    state: Option<PathBuf>,
    /// Enroll into --state first, when it holds no node yet, with the join token in this file
    /// (or in the environment variable FEDMESH_JOIN_TOKEN). Never on the command line, where
    /// every local user can read it.
    #[arg(long, env = "FEDMESH_JOIN_TOKEN_FILE")]
    join_token_file: Option<PathBuf>,
    /// Run in the Kubernetes cluster of this pod (or of the kubeconfig).
    #[arg(long, env = "FEDMESH_KUBERNETES")]
    kubernetes: bool,
    #[command(flatten)]
    kube: KubeArgs,
    /// UDP address of the QUIC relay.
    #[arg(long, default_value = "0.0.0.0:4433")]
    relay_listen: SocketAddr,
    /// Where peers reach this node (host:port): the relay's address (default: the bound one),
    /// or in Istio mode the fedmesh ingress gateway's.
    #[arg(long, conflicts_with = "outbound_only")]
    advertise: Option<String>,
    /// This site accepts no inbound connections: advertise no direct endpoint; peers reach
    /// this node through the rendezvous servers the collaboration lists (in Istio mode too:
    /// the agent's relay then carries every link).
    #[arg(long)]
    outbound_only: bool,
    /// How this node reaches the collaboration's rendezvous servers: `auto` (QUIC over UDP,
    /// TLS over TCP when UDP does not answer), `udp` or `tcp` (TLS over TCP only, an HTTP/1.1
    /// upgrade on the listed host:port; through the proxy when one applies).
    #[arg(long, value_enum, default_value_t = CarrierMode::Auto)]
    rendezvous_carrier: CarrierMode,
    /// HTTP CONNECT proxy for the TLS/TCP carrier (http://[user:password@]host:port); default:
    /// HTTPS_PROXY or https_proxy. NO_PROXY / no_proxy lists hosts reached without it.
    /// Credentials here are visible to local users: put them in HTTPS_PROXY instead.
    #[arg(long)]
    proxy: Option<String>,
    /// Pool of local addresses for peers (one per peer).
    #[arg(long, default_value = DEFAULT_LOOPBACK_POOL)]
    loopback_pool: Pool,
    /// A port exposed to peers: <port>[:<label>][=<target host:port>] (repeatable).
    #[arg(long = "expose")]
    exposes: Vec<Expose>,
    /// DNS server for peer names (e.g. 127.0.0.1:5353).
    #[arg(long)]
    dns_listen: Option<SocketAddr>,
    /// Admin HTTP server: /healthz, /readyz, /metrics, /peers.
    #[arg(long, default_value = "127.0.0.1:9464")]
    admin_listen: SocketAddr,
    /// Serve vantage6's address API (GET {API_PATH}/vpn/algorithm/addresses) here, for the
    /// algorithm containers (e.g. the Docker bridge address); off unless given.
    #[arg(long)]
    v6_listen: Option<SocketAddr>,
    /// vantage6's API_PATH the address API also answers under.
    #[arg(long, default_value = "", requires = "v6_listen")]
    v6_api_path: String,
    /// Forward every other request on --v6-listen unchanged to the vantage6 node proxy
    /// (http://host:port), so algorithms keep HOST/PORT as the node sets them.
    #[arg(long, requires = "v6_listen")]
    v6_upstream: Option<String>,
    /// Where the node's operator announces and ends algorithm runs (POST /runs, POST /runs/end).
    #[arg(long, default_value = "127.0.0.1:9465")]
    v6_announce_listen: SocketAddr,
    /// vantage6 5's task namespace: its running algorithm pods (of Jobs annotated `task_id`)
    /// become runs the address API answers, verified by pod IP (needs --kubernetes).
    #[arg(long, env = "FEDMESH_V6_TASK_NAMESPACE", requires = "v6_listen")]
    v6_task_namespace: Option<String>,
    /// Largest UDP payload QUIC path MTU discovery may reach. The default fits a 1500-byte
    /// Ethernet MTU; raise it where the path carries more (8952 on 9000-byte jumbo frames).
    #[arg(long, default_value_t = 1452)]
    max_udp_payload: u16,
    /// Congestion controller of the relay's QUIC connections.
    #[arg(long, value_enum, default_value_t = Congestion::default())]
    congestion: Congestion,
    /// Bottleneck bandwidth expected to peers, in Mbit/s: with --link-rtt, sizes the relay's
    /// flow-control windows from the bandwidth-delay product (bounded per connection), and
    /// the HyStart controllers' slow start doubles only up to half of it.
    #[arg(long, default_value_t = PathEstimate::default().bits_per_second / 1_000_000,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    link_bandwidth: u64,
    /// Round-trip time expected to peers (with --link-bandwidth).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "32ms")]
    link_rtt: Duration,
    /// What carries each relayed connection to its peer: a stream of the peer's QUIC
    /// connection; an mTLS TCP connection of its own (the node then also takes TCP on its QUIC
    /// port; peers that take none get QUIC); or `auto`: TLS where the peer's round trip is under
    /// 2 ms (a LAN, where TLS over kernel TCP costs half the CPU per byte), QUIC elsewhere.
    #[arg(long, value_enum, default_value_t = StreamsOver::default())]
    streams_over: StreamsOver,
    #[command(flatten)]
    caps: RelayCaps,
}

/// What the relay holds for peers and unauthenticated sources.
#[derive(Debug, Args)]
pub struct RelayCaps {
    /// Most relay connections (established and in handshake) from all sources together.
    #[arg(long, default_value_t = Caps::default().connections)]
    relay_max_connections: u32,
    /// Most relay connections (established and in handshake) from one source address.
    #[arg(long, default_value_t = Caps::default().connections_per_source)]
    relay_max_connections_per_source: u32,
    /// Most relay handshakes in flight from all sources together.
    #[arg(long, default_value_t = Caps::default().handshakes)]
    relay_max_handshakes: u32,
    /// Most relay handshakes in flight from one source address.
    #[arg(long, default_value_t = Caps::default().handshakes_per_source)]
    relay_max_handshakes_per_source: u32,
    /// Most relay connections one peer node may hold, whatever its addresses.
    #[arg(long, default_value_t = Caps::default().connections_per_peer)]
    relay_max_connections_per_peer: u32,
    /// How long a relay connection is kept while its peer has no link with this node.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "15s")]
    relay_unlinked_idle: Duration,
}

impl RelayCaps {
    fn options(&self, max_udp_payload: u16) -> RelayOptions {
        let Self {
            relay_max_connections,
            relay_max_connections_per_source,
            relay_max_handshakes,
            relay_max_handshakes_per_source,
            relay_max_connections_per_peer,
            relay_unlinked_idle,
        } = *self;
        RelayOptions {
            max_udp_payload,
            caps: Caps {
                connections: relay_max_connections,
                connections_per_source: relay_max_connections_per_source,
                handshakes: relay_max_handshakes,
                handshakes_per_source: relay_max_handshakes_per_source,
                connections_per_peer: relay_max_connections_per_peer,
            },
            unlinked_idle: relay_unlinked_idle,
            ..RelayOptions::default()
        }
    }
}

pub(crate) async fn run(args: NodeArgs) -> Result<()> {
    match args.command {
        Some(NodeCommand::Enroll(args)) => owner::run_enroll(args).await,
        Some(NodeCommand::Peers { state, output }) => print_peers(&state, output),
        Some(NodeCommand::Announce(args)) => announce(args).await,
        None => run_agent(*args.run).await,
    }
}

/// Prints `peers.json`, or says why there is none yet.
fn print_peers(state: &Path, output: Format) -> Result<()> {
    let path = state.join("peers.json");
    if !path.exists() {
        if !state.join("node.json").exists() {
            bail!(
                "{} is not a node state directory; enroll first: `fedmesh node enroll --token \
                 <token> --state {}`",
                state.display(),
                state.display()
            );
        }
        bail!(
            "no peer map in {} yet: the agent writes it once it has synced with the hub; start \
             it with `fedmesh node --state {}`",
            state.display(),
            state.display()
        );
    }
    let peers: BTreeMap<String, Vec<String>> = serde_json::from_str(&files::read_to_string(&path)?)
        .with_context(|| format!("{} is not a peer map", path.display()))?;
    match output.render(&peers)? {
        Some(text) => print!("{text}"),
        None if peers.is_empty() => println!("no peers: no link in force lets this node dial one"),
        None => {
            let rows: Vec<[String; 2]> = peers
                .into_iter()
                .map(|(name, addrs)| [name, addrs.join(", ")])
                .collect();
            print!("{}", table(&["PEER NAME", "ADDRESS"], &rows));
        }
    }
    Ok(())
}

async fn run_agent(args: RunArgs) -> Result<()> {
    let RunArgs {
        state,
        join_token_file,
        kubernetes,
        kube,
        relay_listen,
        advertise,
        outbound_only,
        rendezvous_carrier,
        proxy,
        loopback_pool,
        exposes,
        dns_listen,
        admin_listen,
        v6_listen,
        v6_api_path,
        v6_upstream,
        v6_announce_listen,
        v6_task_namespace,
        max_udp_payload,
        congestion,
        link_bandwidth,
        link_rtt,
        streams_over,
        caps,
    } = args;
    if let Some(u) = &v6_upstream
        && !u.starts_with("http://")
        && !u.starts_with("https://")
    {
        bail!("--v6-upstream {u:?}: give the node proxy's URL, http://host:port");
    }
    let Some(state) = state else {
        bail!("give --state <dir> (enroll first with `fedmesh node enroll`)");
    };
    let kubernetes = match (kubernetes, kube.mode) {
        (true, _) => Some(kube.options()?),
        (false, Some(mode)) if !mode.relay_carries() => {
            bail!("--mode {mode} needs --kubernetes")
        }
        (false, _) => None,
    };
    if v6_task_namespace.is_some() && kubernetes.is_none() {
        bail!("--v6-task-namespace needs --kubernetes");
    }
    if !state.join("node.json").exists()
        && let Some(token) = owner::read_join_token(join_token_file.as_deref())?
    {
        let enrolled = enroll::enroll(&token, &state, None).await?;
        println!("enrolled {}", enrolled.config.node);
    }
    let handle = node::start(NodeOptions {
        state,
        relay_listen,
        advertise,
        loopback_pool,
        exposes,
        dns_listen,
        admin_listen: Some(admin_listen),
        v6: v6_listen.map(|listen| node::V6Options {
            listen,
            api_path: v6_api_path,
            upstream: v6_upstream,
            announce_listen: Some(v6_announce_listen),
            task_namespace: v6_task_namespace,
        }),
        relay: RelayOptions {
            congestion,
            path: PathEstimate {
                bits_per_second: link_bandwidth * 1_000_000,
                rtt: link_rtt,
            },
            streams_over,
            ..caps.options(max_udp_payload)
        },
        outbound_only,
        carrier: CarrierOptions {
            mode: rendezvous_carrier,
            proxy: ProxySettings::from_sources(proxy.as_deref(), |name| std::env::var(name).ok())?,
            ..CarrierOptions::default()
        },
        kubernetes,
    })
    .await?;
    println!(
        "node agent {} running: relay {}, admin http://{}{}{}",
        handle.node,
        handle
            .relay_addr
            .map_or_else(|| "off (Istio mode)".to_owned(), |a| format!("udp/{a}")),
        handle.admin_addr.map(|a| a.to_string()).unwrap_or_default(),
        handle
            .v6_addr
            .map(|a| format!(", vantage6 address API http://{a}"))
            .unwrap_or_default(),
        handle
            .dns_addr
            .map(|a| format!(", dns {a}"))
            .unwrap_or_default(),
    );
    handle.run_until(shutdown_signal()).await
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::Cli;

    #[tokio::test]
    async fn istio_mode_needs_a_cluster() {
        let cli = Cli::try_parse_from([
            "fedmesh",
            "node",
            "--state",
            "/nonexistent",
            "--mode",
            "istio",
        ])
        .unwrap();
        let err = cli.run().await.unwrap_err();
        assert_eq!(err.to_string(), "--mode istio needs --kubernetes");
    }

    #[test]
    fn pod_selectors_parse() {
        assert_eq!(
            parse_labels("app.kubernetes.io/name=fedmesh-agent, app.kubernetes.io/instance=r")
                .unwrap(),
            BTreeMap::from([
                ("app.kubernetes.io/instance".into(), "r".into()),
                ("app.kubernetes.io/name".into(), "fedmesh-agent".into()),
            ])
        );
        assert!(parse_labels("app").is_err());
    }
}
