//! Real MPyC and Flower processes, unmodified, talking through the relay with the addresses
//! fedmesh hands out (the demo's collaboration: three organisations on loopback). The Python
//! packages come from `.venv`, made by `scripts/test-deps`.

use std::time::{Duration, Instant};

use fedmesh_agent::demo::{self, Outcome};
use fedmesh_tests::{python, repo_root};

fn command(script: &str) -> String {
    format!(
        "{} {}",
        python().display(),
        repo_root().join(script).display()
    )
}

fn lines_of<'a>(outcomes: &'a [Outcome], needle: &str) -> Vec<&'a str> {
    outcomes
        .iter()
        .flat_map(|o| o.output.iter())
        .filter(|l| l.contains(needle))
        .map(String::as_str)
        .collect()
}

/// Runs `command` at every organisation of the demo collaboration with `links` approved, and
/// returns what each did.
async fn run_everywhere(
    links: &[demo::DemoLink],
    command: &str,
    timeout: Duration,
) -> Vec<Outcome> {
    fedmesh_tests::subscribe();
    let tmp = tempfile::tempdir().unwrap();
    let mesh = demo::start(tmp.path(), &fedmesh_tests::mesh_options(), links)
        .await
        .unwrap();
    let outcomes = demo::exec(&mesh, command, timeout, true).await.unwrap();
    mesh.shutdown().await.unwrap();
    outcomes
}

/// Asserts every organisation's command exited 0.
fn all_succeeded(outcomes: &[Outcome]) {
    for o in outcomes {
        assert_eq!(o.code, Some(0), "{}: {:?}", o.node, o.output);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mpyc_computes_through_the_relay_and_all_parties_agree() {
    let script = command("examples/mpyc/party.py");
    let outcomes = run_everywhere(&demo::links(), &script, Duration::from_secs(120)).await;
    all_succeeded(&outcomes);
    // Inputs 17, 42 and 8: every party learns the same sum and the index of the largest.
    let mut results = lines_of(&outcomes, "sum=");
    results.sort_unstable();
    assert_eq!(
        results,
        [
            "party 0: sum=67 argmax=1",
            "party 1: sum=67 argmax=1",
            "party 2: sum=67 argmax=1"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mpyc_fails_cleanly_when_a_link_is_not_approved() {
    // Every link but org-b → org-c.
    let links: Vec<_> = demo::links()
        .into_iter()
        .filter(|l| !(l.from == 1 && l.to == 2))
        .collect();
    let script = format!(
        "FEDMESH_MPC_START_TIMEOUT=8 FEDMESH_MPC_TIMEOUT=8 {}",
        command("examples/mpyc/party.py")
    );
    let started = Instant::now();
    let outcomes = run_everywhere(&links, &script, Duration::from_secs(60)).await;
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_secs(30),
        "no hang: finished in {elapsed:?}"
    );
    // org-b cannot reach org-c, so it gives up connecting (3). org-c never hears from org-b and
    // gives up too (3), unless org-a's departure stops MPyC first (5); org-a, connected to both,
    // gives up on the computation (4). Each says why in one line, and nobody computes anything.
    let reasons = [
        "could not connect to every party",
        "did not finish",
        "MPyC failed",
    ];
    for o in &outcomes {
        assert!(
            matches!(o.code, Some(3..=5)),
            "{} must fail with its own code: {:?}",
            o.node,
            o.output
        );
        assert!(
            o.output
                .iter()
                .any(|l| reasons.iter().any(|r| l.contains(r))),
            "{} says why: {:?}",
            o.node,
            o.output
        );
    }
    assert!(
        lines_of(&outcomes, "sum=").is_empty(),
        "no party computed anything"
    );
    assert!(
        outcomes[1]
            .output
            .iter()
            .any(|l| l.contains("could not connect to every party")),
        "org-b, whose link is missing, cannot connect: {:?}",
        outcomes[1].output
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flower_federation_completes_two_rounds_through_the_relay() {
    let script = command("examples/flower/federation.py");
    let outcomes = run_everywhere(&demo::links(), &script, Duration::from_secs(180)).await;
    all_succeeded(&outcomes);
    let summary = lines_of(&outcomes, "server: finished rounds");
    assert_eq!(summary.len(), 1, "{outcomes:?}");
    assert!(
        summary[0].starts_with("server: finished rounds [1, 2]"),
        "{}",
        summary[0]
    );
    assert_eq!(
        lines_of(&outcomes, ": done").len(),
        2,
        "both clients finished"
    );
}
