//! `fedmesh ca init`, `fedmesh ca sign`, `fedmesh csr`, `fedmesh cert inspect`: the offline
//! certificate workflow. The CA key and node keys stay in their files; only CSRs and
//! certificates move.

use std::{
    path::PathBuf,
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use fedmesh_certs::{
    CertInfo, IssuancePolicy, SpiffeId, TrustBundle, files, time::rfc3339, verify::Usage,
};
use rustls::pki_types::{CertificateDer, pem::PemObject};
use serde::Serialize;

use super::Status;
use crate::output::Format;

/// `fedmesh ca ...`
#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create a collaboration CA: <dir>/ca.pem and <dir>/ca-key.pem (0600).
    Init {
        /// Collaboration id (a lowercase DNS label); the trust domain is <collab>.fedmesh.
        #[arg(long)]
        collab: String,
        /// Directory to write the CA into (ca.pem, ca-key.pem).
        #[arg(long = "ca-dir", visible_alias = "dir")]
        dir: PathBuf,
        /// How long the CA is valid.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "365d")]
        validity: Duration,
    },
    /// Sign a node's CSR under the issuance policy.
    Sign {
        /// Directory holding ca.pem and ca-key.pem.
        #[arg(long = "ca-dir", visible_alias = "dir")]
        dir: PathBuf,
        /// The CSR (PEM).
        #[arg(long)]
        csr: PathBuf,
        /// Where to write the certificate (PEM).
        #[arg(long)]
        out: PathBuf,
        /// Certificate lifetime.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "24h")]
        ttl: Duration,
        /// The policy's cap on lifetimes (at most 7d).
        #[arg(long, value_parser = humantime::parse_duration, default_value = "24h")]
        max_ttl: Duration,
    },
}

/// `fedmesh csr`
#[derive(Debug, Args)]
pub struct CsrArgs {
    /// Collaboration id.
    #[arg(long)]
    collab: String,
    /// Organisation.
    #[arg(long)]
    org: String,
    /// Node.
    #[arg(long)]
    node: String,
    /// Private key (PEM); created (0600) if absent.
    #[arg(long)]
    key: PathBuf,
    /// Where to write the CSR (PEM).
    #[arg(long)]
    out: PathBuf,
}

/// `fedmesh cert ...`
#[derive(Debug, Subcommand)]
pub enum CertCommand {
    /// Show a certificate's identity and validity, and verify it against a CA.
    Inspect {
        /// The certificate (PEM).
        cert: PathBuf,
        /// Verify against this collaboration CA (PEM).
        #[arg(long)]
        ca: Option<PathBuf>,
        /// Output format.
        #[arg(long, value_enum, default_value_t)]
        output: Format,
    },
}

pub(crate) fn run_ca(cmd: CaCommand) -> Result<()> {
    match cmd {
        CaCommand::Init {
            collab,
            dir,
            validity,
        } => {
            let ca = files::init_ca(&collab, &dir, SystemTime::now(), validity)?;
            println!(
                "created CA for trust domain {} in {}\nfingerprint sha256:{}",
                ca.trust_domain(),
                dir.display(),
                ca.fingerprint()
            );
        }
        CaCommand::Sign {
            dir,
            csr,
            out,
            ttl,
            max_ttl,
        } => {
            let ca = files::load_ca(&dir)?;
            let policy = IssuancePolicy::with_max_ttl(max_ttl)?;
            let csr_pem = files::read_to_string(&csr)?;
            let issued = ca.sign_csr_pem(&csr_pem, &policy, ttl, SystemTime::now())?;
            files::write_public(&out, issued.pem.as_bytes())?;
            println!(
                "issued {} serial {} valid until {}",
                issued.info.spiffe_id,
                issued.info.serial,
                rfc3339(issued.info.not_after)
            );
        }
    }
    Ok(())
}

pub(crate) fn run_csr(args: CsrArgs) -> Result<()> {
    let CsrArgs {
        collab,
        org,
        node,
        key,
        out,
    } = args;
    let id = SpiffeId::new(&collab, &org, &node)?;
    let node_key = files::load_or_create_key(&key)?;
    let csr = node_key.csr(&id)?;
    files::write_public(&out, csr.pem.as_bytes())?;
    println!("wrote CSR for {id} to {}", out.display());
    Ok(())
}

#[derive(Serialize)]
struct Inspection {
    spiffe_id: String,
    collab: String,
    org: String,
    node: String,
    dns_name: String,
    serial: String,
    not_before: String,
    not_after: String,
    renew_at: String,
    issuer: String,
    subject: String,
    fingerprint: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    verification: Option<Verification>,
}

#[derive(Serialize)]
struct Verification {
    ok: bool,
    trust_domain: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// Exit 1 when `--ca` is given and the certificate does not verify.
pub(crate) fn run_cert(cmd: CertCommand) -> Result<Status> {
    let CertCommand::Inspect { cert, ca, output } = cmd;
    let pem = files::read_to_string(&cert)?;
    let der = CertificateDer::from_pem_slice(pem.as_bytes())
        .with_context(|| format!("{} is not a PEM certificate", cert.display()))?;
    let info = CertInfo::parse(&der)?;
    let verification = match ca {
        Some(ca) => {
            let bundle = TrustBundle::from_pem(&files::read_to_string(&ca)?)?;
            let result =
                bundle.verify(std::slice::from_ref(&der), SystemTime::now(), Usage::Client);
            Some(Verification {
                ok: result.is_ok(),
                trust_domain: bundle.trust_domain().to_string(),
                error: result.err().map(|e| e.to_string()),
            })
        }
        None => None,
    };
    let failed = verification.as_ref().and_then(|v| v.error.clone());
    let report = Inspection {
        spiffe_id: info.spiffe_id.to_string(),
        collab: info.spiffe_id.collab().to_owned(),
        org: info.spiffe_id.org().to_owned(),
        node: info.spiffe_id.node().to_owned(),
        dns_name: info.spiffe_id.dns_name(),
        serial: info.serial.clone(),
        not_before: rfc3339(info.not_before),
        not_after: rfc3339(info.not_after),
        renew_at: rfc3339(info.renew_at()),
        issuer: info.issuer.clone(),
        subject: info.subject.clone(),
        fingerprint: info.fingerprint.clone(),
        verification,
    };
    match output.render(&report)? {
        Some(text) => print!("{text}"),
        None => print_text(&report),
    }
    Ok(match failed {
        Some(error) => Status::Differs(format!("verification failed: {error}")),
        None => Status::Success,
    })
}

fn print_text(r: &Inspection) {
    let rows = [
        ("spiffe id", r.spiffe_id.as_str()),
        ("collab", &r.collab),
        ("org", &r.org),
        ("node", &r.node),
        ("dns name", &r.dns_name),
        ("serial", &r.serial),
        ("not before", &r.not_before),
        ("not after", &r.not_after),
        ("renew at", &r.renew_at),
        ("issuer", &r.issuer),
        ("fingerprint", &r.fingerprint),
    ];
    for (k, v) in rows {
        println!("{k:<12} {v}");
    }
    if let Some(v) = &r.verification {
        match &v.error {
            None => println!(
                "{:<12} ok: chains to the {} CA and is valid now",
                "verified", v.trust_domain
            ),
            Some(e) => println!("{:<12} FAILED: {e}", "verified"),
        }
    }
}
