//! `fedmesh demo`: an embedded hub and three organisations on loopback (see [`crate::demo`]).

use std::{path::PathBuf, time::Duration};

use anyhow::{Result, bail};
use clap::Args;

use super::hub::shutdown_signal;
use crate::{demo, mesh::MeshOptions};

/// `fedmesh demo`
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Run this shell command once per organisation, with that organisation's peer map in its
    /// environment (FEDMESH_PEERS, FEDMESH_ORG, FEDMESH_PARTY_INDEX, FEDMESH_LISTEN, ...).
    #[arg(long)]
    exec: Option<String>,
    /// Give up on the commands after this long.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10m")]
    exec_timeout: Duration,
    /// Keep the collaboration running until interrupted.
    #[arg(long)]
    keep: bool,
    /// Keep the collaboration's state (hub data, owner, node states) here instead of in a
    /// temporary directory.
    #[arg(long = "state-dir", visible_alias = "dir")]
    dir: Option<PathBuf>,
}

pub(crate) async fn run(args: DemoArgs) -> Result<()> {
    let DemoArgs {
        exec,
        exec_timeout,
        keep,
        dir,
    } = args;
    let tmp = tempfile::tempdir()?;
    let dir = dir.unwrap_or_else(|| tmp.path().to_owned());
    let links = demo::links();
    let mesh = demo::start(&dir, &MeshOptions::default(), &links).await?;
    demo::print_overview(&mesh).await?;
    demo::prove_traffic(&mesh, &links).await?;

    let mut failed = false;
    if let Some(command) = exec {
        println!("\nrunning {command:?} at every organisation:");
        let outcomes = demo::exec(&mesh, &command, exec_timeout, false).await?;
        println!();
        for demo::Outcome { node, code, .. } in outcomes {
            match code {
                Some(0) => println!("  {node}: exit 0"),
                Some(c) => {
                    println!("  {node}: exit {c}");
                    failed = true;
                }
                None => {
                    println!("  {node}: killed after {exec_timeout:?}");
                    failed = true;
                }
            }
        }
    }
    if keep {
        println!("\nrunning until interrupted (state in {})", dir.display());
        shutdown_signal().await;
    }
    mesh.shutdown().await?;
    if failed {
        bail!("a command failed at one or more organisations");
    }
    println!("\ndemo finished: every link carried traffic");
    Ok(())
}
