//! `fedmesh render`: the Istio and Kubernetes objects one node needs, from a collaboration file.
//! For GitOps (commit the output, let Argo CD or Flux apply it) and for review before anything
//! is applied. Rendering is pure (`fedmesh-mesh-config`); this module only reads and writes
//! files.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    time::SystemTime,
};

use anyhow::{Context, Result, anyhow};
use clap::Args;
use fedmesh_certs::time::{self, parse_rfc3339};
use fedmesh_documents::NodeRef;
use fedmesh_mesh_config::{
    CollabFile, ObjectKey, Rendered,
    render::{COLLABORATION, MANAGED_BY, to_yaml},
};
use serde_json::Value;

use crate::output::Format;

/// `fedmesh render`
#[derive(Debug, Args)]
pub struct RenderArgs {
    /// The collaboration file (YAML), e.g. examples/collab-three-orgs.yaml.
    #[arg(long)]
    collab_file: PathBuf,
    /// The node to render for, <org>/<node>.
    #[arg(long)]
    node: NodeRef,
    /// Write one file per object into this directory (one directory per node) instead of
    /// printing a YAML stream; files fedmesh wrote there earlier for the same collaboration
    /// that are no longer rendered are removed.
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// Render as of this time (RFC 3339) instead of now; links expired by then are left out.
    #[arg(long, value_parser = parse_now)]
    now: Option<SystemTime>,
    /// Output format: text and yaml print a YAML stream (`---` before each object), json a
    /// JSON array of the objects.
    #[arg(long, value_enum, default_value_t, conflicts_with = "out_dir")]
    output: Format,
}

fn parse_now(s: &str) -> Result<SystemTime, String> {
    parse_rfc3339(s).map(time::from_unix)
}

/// Runs `fedmesh render`.
pub(crate) fn run_render(args: RenderArgs) -> Result<()> {
    let RenderArgs {
        collab_file,
        node,
        out_dir,
        now,
        output,
    } = args;
    let (file, rendered) = render_file(&collab_file, &node, now.unwrap_or_else(SystemTime::now))?;
    for (peer, reason) in &rendered.skipped {
        eprintln!("warning: nothing outbound rendered for {peer}: {reason}");
    }
    match out_dir {
        None if output == Format::Json => print!(
            "{}",
            Format::Json.render(&rendered.objects)?.unwrap_or_default()
        ),
        None => print!("{}", rendered.to_yaml()?),
        Some(dir) => {
            let (written, removed) = write_dir(&dir, &file.collab, &rendered)?;
            println!("wrote {written} objects to {}", dir.display());
            for path in removed {
                println!("removed stale {}", path.display());
            }
        }
    }
    Ok(())
}

/// Reads, validates and renders the collaboration file for `node` at `now`.
fn render_file(path: &Path, node: &NodeRef, now: SystemTime) -> Result<(CollabFile, Rendered)> {
    let text =
        fs::read_to_string(path).with_context(|| format!("failed to read {}", path.display()))?;
    let file = CollabFile::parse(&text).with_context(|| format!("{}", path.display()))?;
    let view = file.view(node, now)?;
    let rendered = fedmesh_mesh_config::render(&view, &file.options, now)?;
    Ok((file, rendered))
}

/// Writes one `<kind>-<namespace>-<name>.yaml` per object and removes the `.yaml` files of
/// objects fedmesh rendered there before for `collab` that are gone now. Returns how many
/// files were written and which were removed.
fn write_dir(dir: &Path, collab: &str, rendered: &Rendered) -> Result<(usize, Vec<PathBuf>)> {
    fs::create_dir_all(dir).with_context(|| format!("failed to create {}", dir.display()))?;
    let mut names = BTreeSet::new();
    for object in &rendered.objects {
        let key = ObjectKey::of(object).ok_or_else(|| anyhow!("rendered an unnamed object"))?;
        let path = dir.join(key.file_name());
        fs::write(&path, to_yaml(object)?)
            .with_context(|| format!("failed to write {}", path.display()))?;
        names.insert(key.file_name());
    }
    let mut removed = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("failed to list {}", dir.display()))? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if !name.ends_with(".yaml") || names.contains(name) {
            continue;
        }
        let Ok(text) = fs::read_to_string(&path) else {
            continue;
        };
        let Ok(object) = serde_saphyr::from_str::<Value>(&text) else {
            continue;
        };
        let labels = &object["metadata"]["labels"];
        if labels[MANAGED_BY] == "fedmesh" && labels[COLLABORATION] == collab {
            fs::remove_file(&path)
                .with_context(|| format!("failed to remove {}", path.display()))?;
            removed.push(path);
        }
    }
    Ok((names.len(), removed))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo(path: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
    }

    fn golden_now() -> SystemTime {
        parse_now("2030-01-01T00:00:00Z").unwrap()
    }

    #[test]
    fn stdout_matches_the_golden() {
        let (_, rendered) = render_file(
            &repo("examples/collab-three-orgs.yaml"),
            &"org-b/n1".parse().unwrap(),
            golden_now(),
        )
        .unwrap();
        let golden = fs::read_to_string(repo("mesh-config/tests/golden/org-b.yaml")).unwrap();
        assert!(
            rendered.to_yaml().unwrap() == golden,
            "see mesh-config/tests/golden.rs"
        );
    }

    #[test]
    fn out_dir_writes_one_file_per_object_and_prunes_stale_ones() {
        let dir = tempfile::tempdir().unwrap();
        let example = fs::read_to_string(repo("examples/collab-three-orgs.yaml")).unwrap();
        let file = dir.path().join("collab.yaml");
        fs::write(&file, &example).unwrap();
        let out = dir.path().join("org-a");
        let node: NodeRef = "org-a/n1".parse().unwrap();
        fs::create_dir(&out).unwrap();
        fs::write(out.join("kustomization.yaml"), "resources: []\n").unwrap();

        let (_, before) = render_file(&file, &node, golden_now()).unwrap();
        let (written, removed) = write_dir(&out, "collab-x", &before).unwrap();
        assert_eq!(written, before.objects.len());
        assert!(removed.is_empty());
        let first = ObjectKey::of(&before.objects[0]).unwrap().file_name();
        assert_eq!(
            fs::read_to_string(out.join(&first)).unwrap(),
            to_yaml(&before.objects[0]).unwrap()
        );

        // Drop the org-a -> org-c link: exactly org-a's outbound objects for org-c go away.
        let without = example.replace(
            "  - {from: org-a/n1, to: org-c/n1, ports: [\"11367:mpc\"], expires: \"2099-01-01T00:00:00Z\"}\n",
            "",
        );
        assert_ne!(without, example);
        fs::write(&file, without).unwrap();
        let (_, after) = render_file(&file, &node, golden_now()).unwrap();
        let (_, removed) = write_dir(&out, "collab-x", &after).unwrap();
        let removed: Vec<String> = removed
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(removed.len(), before.objects.len() - after.objects.len());
        assert!(
            removed
                .iter()
                .all(|f| f.contains("-out-org-c-n1-") || f.contains("-egress-org-c-n1-"))
        );
        assert!(
            out.join("kustomization.yaml").exists(),
            "files fedmesh did not write stay"
        );
    }

    #[test]
    fn bad_input_is_reported_with_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.yaml");
        fs::write(&file, "collaboration: c\nowner: o\nmembers: []\nextra: 1\n").unwrap();
        let err = render_file(&file, &"a/n1".parse().unwrap(), golden_now()).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("c.yaml") && msg.contains("unknown field `extra`"),
            "{msg}"
        );
        assert!(parse_now("tomorrow").unwrap_err().contains("RFC 3339"));
    }
}
