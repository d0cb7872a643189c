//! The container image recipe (`Containerfile`): multi-stage, the `fedmesh` binary alone on a
//! minimal base, run as the non-root user the charts run it as, built with the toolchain the
//! repository pins, tagged as the charts' default image. The base images come from container
//! registries, which the build machine cannot reach, so the recipe is checked here rather than
//! built.

use fedmesh_tests::repo_root;

fn read(path: &str) -> String {
    std::fs::read_to_string(repo_root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The instructions (comments and blank lines dropped), one per line.
fn instructions(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

/// A value of the charts' `values.yaml`, by path.
fn chart_value(chart: &str, path: &[&str]) -> String {
    let values: serde_json::Value =
        serde_saphyr::from_str(&read(&format!("charts/{chart}/values.yaml"))).unwrap();
    let mut v = &values;
    for key in path {
        v = &v[*key];
    }
    v.as_str().unwrap().to_owned()
}

#[test]
fn the_image_is_the_binary_alone_run_as_non_root() {
    let recipe = read("Containerfile");
    let lines = instructions(&recipe);
    let stages: Vec<usize> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.starts_with("FROM "))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(
        stages.len(),
        2,
        "a build stage and a runtime stage: {lines:#?}"
    );
    let runtime = &lines[stages[1]..];
    assert_eq!(
        runtime,
        [
            "FROM ${RUNTIME_IMAGE}",
            "COPY --from=build /src/target/release/fedmesh /usr/local/bin/fedmesh",
            "USER 65532:65532",
            "ENTRYPOINT [\"/usr/local/bin/fedmesh\"]",
        ],
        "the runtime stage holds the binary and nothing else"
    );
    assert!(
        lines.contains(&"ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot".to_owned()),
        "a minimal base whose default user is not root"
    );
    assert!(
        lines.contains(
            &"RUN cargo build --release --locked -p fedmesh-agent --bin fedmesh".to_owned()
        )
    );

    // The toolchain is the one the repository pins, in both places it is named.
    let toolchain = read("rust-toolchain.toml");
    let pinned = toolchain
        .lines()
        .find_map(|l| l.trim().strip_prefix("channel = "))
        .expect("rust-toolchain.toml names a channel")
        .trim_matches('"');
    assert!(
        lines.contains(&format!(
            "ARG RUST_IMAGE=docker.io/library/rust:{pinned}-slim-bookworm"
        )),
        "{lines:#?}"
    );
    assert!(lines.contains(&format!("ENV RUSTUP_TOOLCHAIN={pinned}")));

    // The build context leaves out what is not source.
    let ignored = instructions(&read(".containerignore"));
    for path in [".git", ".venv", ".tools", "target"] {
        assert!(
            ignored.iter().any(|l| l == path),
            "{path} is in the context"
        );
    }
}

#[test]
fn the_charts_default_image_is_what_the_recipe_builds() {
    let build = "podman build -f Containerfile -t ghcr.io/fedmesh/fedmesh:0.1.0 .";
    assert!(read("Containerfile").contains(build));
    assert!(read("README.md").contains(build));
    for chart in ["fedmesh-agent", "fedmesh-hub"] {
        let repository = chart_value(chart, &["image", "repository"]);
        let chart_yaml: serde_json::Value =
            serde_saphyr::from_str(&read(&format!("charts/{chart}/Chart.yaml"))).unwrap();
        let tag = chart_yaml["appVersion"].as_str().unwrap();
        assert!(
            build.contains(&format!("-t {repository}:{tag} ")),
            "{chart}: {repository}:{tag}"
        );
        // The pod runs as the image's user.
        let deployment = read(&format!("charts/{chart}/templates/deployment.yaml"));
        assert!(deployment.contains("runAsUser: 65532"), "{chart}");
    }
}
