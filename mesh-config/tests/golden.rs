//! The rendered example must match the committed goldens byte for byte.
#![allow(clippy::unwrap_used)]

mod common;

use common::{GOLDEN_NOW, NODES, RENDEZVOUS_NODES, n, now, rendered, rendezvous_example, view};

#[test]
fn rendering_matches_the_goldens() {
    for node in NODES {
        let org = node.split('/').next().unwrap();
        let path = format!("{}/tests/golden/{org}.yaml", env!("CARGO_MANIFEST_DIR"));
        let golden = std::fs::read_to_string(&path).unwrap_or_default();
        let yaml = rendered(&view(node)).to_yaml().unwrap();
        if yaml != golden {
            let line = yaml
                .lines()
                .zip(golden.lines())
                .position(|(a, b)| a != b)
                .map_or_else(|| "its end".to_owned(), |i| format!("line {}", i + 1));
            panic!(
                "rendering for {node} no longer matches {path} (first difference at {line}).\n\
                 If the change is intended, regenerate the goldens from the repository root:\n  \
                 for o in org-a org-b org-c; do cargo run -q -p fedmesh-agent --bin fedmesh -- render \
                 --collab-file examples/collab-three-orgs.yaml --node $o/n1 --now {GOLDEN_NOW} \
                 > mesh-config/tests/golden/$o.yaml; done\n\
                 and review the diff (scripts/drift-check runs the same commands)."
            );
        }
    }
}

#[test]
fn rendering_with_an_outbound_only_member_matches_the_goldens() {
    let example = rendezvous_example();
    for node in RENDEZVOUS_NODES {
        let org = node.split('/').next().unwrap();
        let path = format!(
            "{}/tests/golden/rendezvous-{org}.yaml",
            env!("CARGO_MANIFEST_DIR")
        );
        let golden = std::fs::read_to_string(&path).unwrap_or_default();
        let view = example.view(&n(node), now()).unwrap();
        let yaml = fedmesh_mesh_config::render(&view, &example.options, now())
            .unwrap()
            .to_yaml()
            .unwrap();
        assert!(
            yaml == golden,
            "rendering for {node} no longer matches {path}. If the change is intended, \
             regenerate it from the repository root:\n  cargo run -q -p fedmesh-agent --bin \
             fedmesh -- render --collab-file examples/collab-rendezvous.yaml --node {node} \
             --now {GOLDEN_NOW} > {path}\nand review the diff (scripts/drift-check runs the same)."
        );
    }
}
