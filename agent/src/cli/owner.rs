//! `fedmesh collab create`, `fedmesh join-token`, `fedmesh node enroll` and `fedmesh link ...`:
//! the owner's and the sysadmins' commands against the hub.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use fedmesh_certs::files;
use fedmesh_documents::{
    CollabPolicy, Decision, Document, LinkRequest, LinkStatus, NodeRef, PortSpec, Signer, TaskRef,
    Verdict, jws,
};

use fedmesh_certs::time::rfc3339;

use crate::output::Format;
use crate::{
    enroll::{self, NodeState},
    hub::{api::JoinToken, client::ClientError},
    output::table,
    owner::{self, HubAddress, NewCollab, Owner},
};

/// `fedmesh collab ...`
#[derive(Debug, Subcommand)]
pub enum CollabCommand {
    /// Create a collaboration: owner key, CA, signed collaboration document, uploaded to the hub.
    Create(CreateArgs),
    /// Sign a checkpoint of everything revoked so far: the hub then drops the revocations it
    /// folds in and every link that can never be in force again (revoking commands make one
    /// every 64 revocations by themselves).
    Checkpoint {
        /// Owner directory.
        #[arg(long)]
        dir: PathBuf,
    },
    /// List the rendezvous servers nodes without inbound connections meet at (replaces the
    /// list; none: clear it).
    Rendezvous(RendezvousArgs),
    /// Write the signed documents a rendezvous server needs (the collaboration document and
    /// the latest revocation list), one per line, for `fedmesh rendezvous --documents`.
    Documents(DocumentsArgs),
    /// Sign a link policy: runs of tasks whose image digest is listed link among the listed
    /// organisations on the listed ports while both runs last, at most `--lifetime` (the same
    /// name again replaces it; `--withdraw` ends it).
    LinkPolicy(LinkPolicyArgs),
}

/// `fedmesh collab link-policy`
#[derive(Debug, Args)]
pub struct LinkPolicyArgs {
    /// Owner directory.
    #[arg(long = "owner-dir", visible_alias = "dir")]
    dir: PathBuf,
    /// The policy's name (a lowercase DNS label).
    #[arg(long)]
    name: String,
    /// An algorithm image digest, `sha256:<64 hex>` (repeatable).
    #[arg(long = "image", required_unless_present = "withdraw")]
    images: Vec<String>,
    /// A port runs may link on, `port[:label]` (repeatable).
    #[arg(long = "port", required_unless_present = "withdraw")]
    ports: Vec<PortSpec>,
    /// An organisation taking part (repeatable, at least two).
    #[arg(long = "org", required_unless_present = "withdraw")]
    orgs: Vec<String>,
    /// Longest a task link lasts (from the later of its two runs' starts).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2h")]
    lifetime: Duration,
    /// When the policy ends (RFC 3339, e.g. 2027-01-01T00:00:00Z; default: 90 days from now).
    #[arg(long, value_parser = humantime::parse_rfc3339_weak)]
    not_after: Option<std::time::SystemTime>,
    /// Withdraw the policy of this name (sign it again ending now).
    #[arg(long, conflicts_with_all = ["images", "ports", "orgs"])]
    withdraw: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    output: Format,
}

async fn run_link_policy(args: LinkPolicyArgs) -> Result<()> {
    let owner = Owner::load(&args.dir)?;
    let policy = if args.withdraw {
        owner.withdraw_link_policy(&args.name).await?
    } else {
        let now = std::time::SystemTime::now();
        let not_after = args
            .not_after
            .unwrap_or(now + Duration::from_secs(90 * 24 * 3600));
        owner
            .link_policy(fedmesh_documents::runs::LinkPolicy {
                collab: String::new(),
                name: args.name.clone(),
                images: args.images,
                ports: args.ports,
                orgs: args.orgs,
                max_lifetime_secs: args.lifetime.as_secs(),
                not_after: jws::unix(not_after),
                issued_at: 0,
            })
            .await?
    };
    if let Some(json) = args.output.render(&policy)? {
        print!("{json}");
        return Ok(());
    }
    if args.withdraw {
        println!("link policy {} withdrawn", policy.name);
    } else {
        println!(
            "link policy {}: {} image(s), ports {}, organisations {}, links last at most {}s, until {}",
            policy.name,
            policy.images.len(),
            policy
                .ports
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(","),
            policy.orgs.join(","),
            policy.max_lifetime_secs,
            rfc3339(fedmesh_certs::time::from_unix(policy.not_after)),
        );
    }
    Ok(())
}

/// `fedmesh collab rendezvous`
#[derive(Debug, Args)]
pub struct RendezvousArgs {
    /// Owner directory.
    #[arg(long = "owner-dir", visible_alias = "dir")]
    dir: PathBuf,
    /// A rendezvous server: `<host:port>=<sha256 pin>` (the pin `fedmesh rendezvous` prints);
    /// repeatable, in order of preference.
    #[arg(long = "server")]
    servers: Vec<String>,
}

/// `fedmesh collab documents`
#[derive(Debug, Args)]
pub struct DocumentsArgs {
    /// Owner directory.
    #[arg(long = "owner-dir", visible_alias = "dir")]
    dir: PathBuf,
    /// File to write (replaced atomically).
    #[arg(long)]
    out: PathBuf,
}

/// `fedmesh collab create`
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Collaboration id (a lowercase DNS label).
    #[arg(long)]
    id: String,
    /// Owner directory to create (owner key, collaboration document, offline CA).
    #[arg(long = "owner-dir", visible_alias = "dir")]
    dir: PathBuf,
    /// The hub's URL.
    #[arg(long)]
    hub: String,
    /// SHA-256 of the hub's certificate (printed by `fedmesh hub`).
    #[arg(long)]
    hub_pin: String,
    /// Your name, shown as the approver of links.
    #[arg(long, default_value = "owner")]
    owner_name: String,
    /// Let the hub keep the CA and issue certificates at enrollment (default: the CA stays in
    /// the owner directory and the owner signs every certificate).
    #[arg(long)]
    online_ca: bool,
    /// Links are in force only once the receiving node consents.
    #[arg(long)]
    require_consent: bool,
    /// Longest a link may be approved for.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "7d")]
    max_link_ttl: Duration,
}

async fn run_rendezvous(args: RendezvousArgs) -> Result<()> {
    let servers = args
        .servers
        .iter()
        .map(|s| {
            let (address, pin) = s
                .rsplit_once('=')
                .ok_or_else(|| anyhow::anyhow!("--server {s:?} is not <host:port>=<sha256 pin>"))?;
            Ok(fedmesh_documents::RendezvousServer {
                address: address.to_owned(),
                pin_sha256: pin.trim_start_matches("sha256:").to_ascii_lowercase(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let mut owner = Owner::load(&args.dir)?;
    let count = servers.len();
    owner.set_rendezvous(servers).await?;
    println!("collaboration lists {count} rendezvous server(s)");
    Ok(())
}

async fn run_documents(args: DocumentsArgs) -> Result<()> {
    let owner = Owner::load(&args.dir)?;
    let text = owner.rendezvous_documents().await?;
    files::write_public(&args.out, text.as_bytes())?;
    println!("wrote {}", args.out.display());
    Ok(())
}

/// `fedmesh join-token`
#[derive(Debug, Args)]
pub struct JoinTokenArgs {
    /// Owner directory.
    #[arg(long = "owner-dir", visible_alias = "dir")]
    dir: PathBuf,
    /// The node that may join, as <org>/<node>.
    #[arg(long)]
    node: NodeRef,
    /// The organisation's vantage6 id, if any.
    #[arg(long)]
    organization_id: Option<u64>,
    /// How long the token can be used.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "24h")]
    ttl: Duration,
}

/// `fedmesh link ...`
#[derive(Debug, Subcommand)]
pub enum LinkCommand {
    /// Ask for a link: <from> may open TCP connections to <to> on the given ports.
    Request(RequestArgs),
    /// Approve a requested link (owner). With a budget other than the requested one the
    /// approved terms differ, so the link gets a new id (printed).
    Approve {
        /// Link id.
        id: String,
        /// Owner directory.
        #[arg(long = "owner-dir", visible_alias = "dir")]
        dir: PathBuf,
        #[command(flatten)]
        budget: BudgetArgs,
    },
    /// Consent to a link to this node (receiving node).
    Consent(DecideArgs),
    /// Veto a link to this node (receiving node).
    Veto(DecideArgs),
    /// Revoke a link (owner); takes effect at every node within seconds.
    Revoke {
        /// Link id.
        id: String,
        /// Owner directory.
        #[arg(long = "owner-dir", visible_alias = "dir")]
        dir: PathBuf,
    },
    /// List links and their states.
    List {
        #[command(flatten)]
        who: Who,
        /// Output format.
        #[arg(long, value_enum, default_value_t)]
        output: Format,
    },
}

/// Acting as the owner (`--owner-dir`) or as a node (`--state`).
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct Who {
    /// Owner directory.
    #[arg(long = "owner-dir", visible_alias = "dir")]
    dir: Option<PathBuf>,
    /// Node state directory.
    #[arg(long)]
    state: Option<PathBuf>,
}

/// A link's budget, signed into its terms; each end of the link enforces it.
#[derive(Debug, Args)]
pub struct BudgetArgs {
    /// Most bytes the link may carry over its life, both directions together (e.g. 500MiB,
    /// 2GB, 1048576).
    #[arg(long, value_parser = parse_bytes)]
    max_bytes: Option<u64>,
    /// Most streams (TCP connections) the link may carry at once.
    #[arg(long)]
    max_streams: Option<u32>,
}

/// Parses a byte count: a number with an optional unit, `B`, `kB`/`MB`/`GB`/`TB` (powers of
/// 1000) or `KiB`/`MiB`/`GiB`/`TiB` (powers of 1024).
fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a byte count (e.g. 500MiB, 2GB, 1048576)"))?;
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "kB" | "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {s:?} (use B, kB, MB, GB, TB, KiB, MiB, GiB or TiB)"
            ));
        }
    };
    n.checked_mul(scale)
        .ok_or_else(|| format!("{s:?} is more bytes than fedmesh counts"))
}

/// `fedmesh link request`
#[derive(Debug, Args)]
pub struct RequestArgs {
    /// The dialling node, <org>/<node>.
    #[arg(long)]
    from: NodeRef,
    /// The accepting node, <org>/<node>.
    #[arg(long)]
    to: NodeRef,
    /// A port and optional label, e.g. 11365:mpc (repeatable).
    #[arg(long = "port", required = true)]
    ports: Vec<PortSpec>,
    /// How long the link is wanted for.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2h")]
    ttl: Duration,
    /// The vantage6 task the link serves.
    #[arg(long)]
    task: Option<u64>,
    /// The task's parent task.
    #[arg(long, requires = "task")]
    parent: Option<u64>,
    #[command(flatten)]
    budget: BudgetArgs,
    #[command(flatten)]
    who: Who,
}

/// `fedmesh link consent|veto`
#[derive(Debug, Args)]
pub struct DecideArgs {
    /// Link id.
    id: String,
    /// Node state directory of the receiving node.
    #[arg(long)]
    state: PathBuf,
    /// Why (recorded in the signed decision).
    #[arg(long)]
    reason: Option<String>,
}

/// `fedmesh node enroll`
#[derive(Debug, Args)]
pub struct EnrollArgs {
    /// A file holding the join token from the owner (fmjoin1...); without it, the token is
    /// read from the environment variable FEDMESH_JOIN_TOKEN. Never on the command line, where
    /// every local user can read it.
    #[arg(long, env = "FEDMESH_JOIN_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// State directory to create (node key 0600, certificate, CA, node.json).
    #[arg(long)]
    state: PathBuf,
    /// Enroll with a certificate the owner signed offline (for the key in <state>/node-key.pem)
    /// instead of sending a CSR to an online CA.
    #[arg(long)]
    cert: Option<PathBuf>,
}

pub(crate) async fn run_collab(cmd: CollabCommand) -> Result<()> {
    let args = match cmd {
        CollabCommand::Create(args) => args,
        CollabCommand::Checkpoint { dir } => {
            let cp = Owner::load(&dir)?.checkpoint().await?;
            println!(
                "checkpoint {} folds revocations 1 to {} ({} links, {} serials, {} nodes revoked)",
                cp.number,
                cp.revocations,
                cp.links.len(),
                cp.serials.len(),
                cp.nodes.len()
            );
            return Ok(());
        }
        CollabCommand::Rendezvous(args) => return run_rendezvous(args).await,
        CollabCommand::Documents(args) => return run_documents(args).await,
        CollabCommand::LinkPolicy(args) => return run_link_policy(args).await,
    };
    let CreateArgs {
        id,
        dir,
        hub,
        hub_pin,
        owner_name,
        online_ca,
        require_consent,
        max_link_ttl,
    } = args;
    let owner = Owner::create(
        &dir,
        HubAddress {
            url: hub,
            pin: hub_pin,
        },
        NewCollab {
            id,
            owner_name,
            online_ca,
            policy: CollabPolicy {
                max_link_ttl_secs: max_link_ttl.as_secs(),
                require_consent,
            },
        },
    )
    .await?;
    println!(
        "created collaboration {} (trust domain {}.fedmesh, {} CA)\nowner pin {}",
        owner.collab.id,
        owner.collab.id,
        if online_ca { "online" } else { "offline" },
        owner.pin()
    );
    Ok(())
}

pub(crate) async fn run_join_token(args: JoinTokenArgs) -> Result<()> {
    let JoinTokenArgs {
        dir,
        node,
        organization_id,
        ttl,
    } = args;
    let mut owner = Owner::load(&dir)?;
    let token = owner.join_token(&node, organization_id, ttl).await?;
    println!("{}", token.encode());
    Ok(())
}

/// The environment variable a join token may come in.
pub const JOIN_TOKEN_ENV: &str = "FEDMESH_JOIN_TOKEN";

/// The join token from `file`, else from [`JOIN_TOKEN_ENV`]; `None` when neither is given.
pub(crate) fn read_join_token(file: Option<&std::path::Path>) -> Result<Option<JoinToken>> {
    let text = match file {
        Some(path) => files::read_to_string(path).context("reading the join token")?,
        None => match std::env::var(JOIN_TOKEN_ENV) {
            Ok(text) if !text.trim().is_empty() => text,
            _ => return Ok(None),
        },
    };
    JoinToken::decode(&text)
        .map(Some)
        .map_err(anyhow::Error::msg)
}

pub(crate) async fn run_enroll(args: EnrollArgs) -> Result<()> {
    let EnrollArgs {
        token_file,
        state,
        cert,
    } = args;
    let token = read_join_token(token_file.as_deref())?.with_context(|| {
        format!("give the join token in a file (--token-file) or in {JOIN_TOKEN_ENV}")
    })?;
    let offline = cert.is_some();
    let cert = cert.map(|p| files::read_to_string(&p)).transpose()?;
    let node = match enroll::enroll(&token, &state, cert).await {
        Ok(node) => node,
        Err(error) if !offline && ca_is_offline(&error) => {
            return Err(error.context(offline_ca_hint(&token, &state)));
        }
        Err(error) => return Err(error),
    };
    let info = node.identity()?.info().clone();
    println!(
        "enrolled {} (certificate {} valid until {})",
        info.spiffe_id,
        info.serial,
        rfc3339(info.not_after)
    );
    Ok(())
}

/// Whether the hub refused an enrollment because the collaboration's CA is offline.
fn ca_is_offline(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<ClientError>(),
            Some(ClientError::Refused { message, .. }) if message.contains("CA is offline")
        )
    })
}

/// How to enroll with an offline CA, for this token and state directory.
fn offline_ca_hint(token: &JoinToken, state: &std::path::Path) -> String {
    let s = state.display();
    format!(
        "the collaboration {collab} keeps its CA offline, so the hub cannot sign a certificate \
         for {node}. Make a CSR for the key now in {s}/node-key.pem: `fedmesh csr --collab \
         {collab} --org {org} --node {name} --key {s}/node-key.pem --out {name}.csr`; have the \
         owner sign it: `fedmesh ca sign --ca-dir <owner dir> --csr {name}.csr --out {name}.pem`; \
         then enroll with it: `fedmesh node enroll --token <token> --state {s} --cert {name}.pem`",
        collab = token.collab,
        node = token.node,
        org = token.node.org,
        name = token.node.node,
    )
}

pub(crate) async fn run_link(cmd: LinkCommand) -> Result<()> {
    match cmd {
        LinkCommand::Request(args) => request(args).await,
        LinkCommand::Approve { id, dir, budget } => {
            let BudgetArgs {
                max_bytes,
                max_streams,
            } = budget;
            let terms = Owner::load(&dir)?
                .approve_with_budget(&id, max_bytes, max_streams)
                .await?;
            println!(
                "approved {} ({} -> {}){}",
                terms.id,
                terms.from,
                terms.to,
                describe_budget(terms.max_bytes, terms.max_streams)
            );
            if terms.id != id {
                println!("(the request {id} asked for other terms; it stays unapproved)");
            }
            Ok(())
        }
        LinkCommand::Consent(args) => decide(args, Verdict::Consent).await,
        LinkCommand::Veto(args) => decide(args, Verdict::Veto).await,
        LinkCommand::Revoke { id, dir } => {
            let number = Owner::load(&dir)?
                .revoke(std::slice::from_ref(&id), &[], &[])
                .await?;
            println!("revoked {id} (revocation {number})");
            Ok(())
        }
        LinkCommand::List { who, output } => {
            let links = match (who.dir, who.state) {
                (Some(dir), _) => Owner::load(&dir)?.links().await?,
                (_, Some(state)) => {
                    let node = NodeState::load(&state)?;
                    let ledger = owner::fetch_ledger(
                        &node.hub_client()?,
                        &node.config.collab,
                        &node.config.owner_pin,
                    )
                    .await?;
                    ledger.links(std::time::SystemTime::now())
                }
                (None, None) => bail!("give --owner-dir (owner) or --state (node)"),
            };
            print_links(&links, output)
        }
    }
}

async fn request(args: RequestArgs) -> Result<()> {
    let RequestArgs {
        from,
        to,
        ports,
        ttl,
        task,
        parent,
        budget,
        who,
    } = args;
    let task = task.map(|task_id| TaskRef {
        task_id,
        parent_id: parent,
    });
    let BudgetArgs {
        max_bytes,
        max_streams,
    } = budget;
    let terms = match (who.dir, who.state) {
        (Some(dir), _) => {
            let owner = Owner::load(&dir)?;
            let terms = owner::terms(&owner.collab.id, &from, &to, &ports, ttl, task)?
                .with_budget(max_bytes, max_streams)?;
            owner.request(terms).await?
        }
        (_, Some(state)) => {
            let node = NodeState::load(&state)?;
            let terms = owner::terms(&node.config.collab, &from, &to, &ports, ttl, task)?
                .with_budget(max_bytes, max_streams)?;
            let doc = Document::LinkRequest(LinkRequest {
                terms: terms.clone(),
                requested_by: node.config.node.to_string(),
                requested_at: jws::unix(std::time::SystemTime::now()),
            });
            let signed = jws::sign(&doc, &Signer::Node(&node.signer()?))?;
            node.hub_client()?
                .submit(&node.config.collab, signed)
                .await?;
            terms
        }
        (None, None) => bail!("give --owner-dir (owner) or --state (node)"),
    };
    println!("{}", terms.id);
    Ok(())
}

async fn decide(args: DecideArgs, verdict: Verdict) -> Result<()> {
    let DecideArgs { id, state, reason } = args;
    let node = NodeState::load(&state)?;
    let doc = Document::Decision(Decision {
        collab: node.config.collab.clone(),
        link_id: id.clone(),
        by: node.config.node.clone(),
        verdict,
        reason,
        at: jws::unix(std::time::SystemTime::now()),
    });
    let signed = jws::sign(&doc, &Signer::Node(&node.signer()?))?;
    node.hub_client()?
        .submit(&node.config.collab, signed)
        .await
        .with_context(|| format!("recording the decision on {id}"))?;
    println!("{id}: {verdict:?} recorded by {}", node.config.node);
    Ok(())
}

fn describe_budget(max_bytes: Option<u64>, max_streams: Option<u32>) -> String {
    match (max_bytes, max_streams) {
        (None, None) => String::new(),
        (Some(b), None) => format!(" with a budget of {b} bytes"),
        (None, Some(s)) => format!(" with a budget of {s} concurrent streams"),
        (Some(b), Some(s)) => format!(" with a budget of {b} bytes and {s} concurrent streams"),
    }
}

fn when(t: Option<u64>) -> String {
    t.map_or_else(
        || "-".to_owned(),
        |s| rfc3339(fedmesh_certs::time::from_unix(s)),
    )
}

fn print_links(links: &[LinkStatus], output: Format) -> Result<()> {
    if let Some(text) = output.render(links)? {
        print!("{text}");
        return Ok(());
    }
    let rows: Vec<[String; 9]> = links
        .iter()
        .map(|l| {
            let ports: Vec<String> = l.terms.ports.iter().map(ToString::to_string).collect();
            [
                l.terms.id.clone(),
                l.terms.from.to_string(),
                l.terms.to.to_string(),
                ports.join(","),
                l.state.to_string(),
                when(Some(l.terms.not_after)),
                format!(
                    "{} {}",
                    l.requested_by.as_deref().unwrap_or("-"),
                    when(l.requested_at)
                ),
                format!(
                    "{} {}",
                    l.approved_by.as_deref().unwrap_or("-"),
                    when(l.approved_at)
                ),
                match l.decision {
                    Some(v) => {
                        format!("{} {}", format!("{v:?}").to_lowercase(), when(l.decided_at))
                    }
                    None => "-".to_owned(),
                },
            ]
        })
        .collect();
    let header = [
        "ID",
        "FROM",
        "TO",
        "PORTS",
        "STATE",
        "EXPIRES",
        "REQUESTED",
        "APPROVED",
        "DECIDED",
    ];
    print!("{}", table(&header, &rows));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_counts_parse_with_units_and_refuse_garbage() {
        assert_eq!(parse_bytes("1048576"), Ok(1 << 20));
        assert_eq!(parse_bytes("500MiB"), Ok(500 << 20));
        assert_eq!(parse_bytes("2GB"), Ok(2_000_000_000));
        assert_eq!(parse_bytes("3 kB"), Ok(3_000));
        assert!(parse_bytes("1.5GiB").unwrap_err().contains("unknown unit"));
        assert!(parse_bytes("GiB").unwrap_err().contains("not a byte count"));
        assert!(
            parse_bytes("99999999TiB")
                .unwrap_err()
                .contains("more bytes")
        );
    }
}
