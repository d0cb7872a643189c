//! Task-lifetime links: an owner's **link policy** and nodes' **run announcements**, and the
//! pure rule that turns them into links in force.
//!
//! vantage6 creates tasks on the fly, so an owner cannot sign a link per task. Instead the owner
//! signs one [`LinkPolicy`]: runs of tasks whose algorithm image digest is listed may link on
//! these ports, among these organisations, each link for at most `max_lifetime_secs`. A node
//! publishes a [`RunAnnouncement`] ("a run of task T, parent P, image D, exposing ports Q,
//! started here at S") and a [`RunEnd`] when the run ends. [`task_links`] then gives, at `now`,
//! a link (task, from, to, ports) for every ordered pair of announced runs of the same task at
//! two nodes the policy admits, on the ports the receiving run exposes and the policy lists,
//! until the earliest of: either run's start plus the lifetime, the policy's end. A run that
//! ended (or a withdrawn announcement) ends its links. The links come out as
//! [`EffectiveLink`]s, so they join the owner-signed ones in the links-in-force computation
//! (where the receiving node's veto and revocations still apply) without any change to the
//! data paths.
//!
//! Everything here is plain data and pure functions; signing, transport and the ledger's
//! relevance rules are the caller's. Every list has a bound, checked by `validate`.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::SystemTime,
};

use serde::{Deserialize, Serialize};

use crate::{EffectiveLink, Error, LinkTerms, NodeRef, PortSpec, Result, TaskRef};

/// Most image digests a policy lists.
pub const MAX_POLICY_IMAGES: usize = 64;
/// Most organisations a policy lists.
pub const MAX_POLICY_ORGS: usize = 256;
/// Most ports a policy or a run lists.
pub const MAX_RUN_PORTS: usize = 32;
/// Longest lifetime a policy may grant a task link: 7 days.
pub const MAX_LIFETIME_SECS: u64 = 7 * 24 * 3600;
/// Most runs one node may have announced and not ended at once.
pub const MAX_RUNS_PER_NODE: usize = 1024;
/// Most link policies a collaboration may hold.
pub const MAX_POLICIES: usize = 64;

/// What the ledger files a run's announcement and end under: `<org>/<node>#<task>`.
pub fn run_key(node: &NodeRef, task_id: u64) -> String {
    format!("{node}#{task_id}")
}

/// The owner's standing permission for task-lifetime links.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkPolicy {
    /// The collaboration.
    pub collab: String,
    /// A name for this policy (a later policy of the same name replaces it).
    pub name: String,
    /// Algorithm image digests (`sha256:<64 hex>`) whose runs may link.
    pub images: Vec<String>,
    /// The ports (and labels) runs may link on; a run's port must be listed here, and when the
    /// policy names a label, the run's label must be that.
    pub ports: Vec<PortSpec>,
    /// The organisations taking part (both ends of every link).
    pub orgs: Vec<String>,
    /// Longest a task link lasts: it ends when either of its two runs has run this long.
    pub max_lifetime_secs: u64,
    /// Unix time after which the policy grants nothing (withdrawing a policy is signing it
    /// again with `not_after` at the signing time).
    pub not_after: u64,
    /// When it was signed; a newer policy of the same name replaces an older one.
    pub issued_at: u64,
}

/// "A run of `task` started at `node`", signed by that node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunAnnouncement {
    /// The collaboration.
    pub collab: String,
    /// The node the run is at (the signer).
    pub node: NodeRef,
    /// The task and its parent.
    pub task: TaskRef,
    /// The run's algorithm image digest (`sha256:<64 hex>`).
    pub image: String,
    /// The ports the run listens on (vantage6: the image's `EXPOSE` and `LABEL p<port>=<label>`).
    pub ports: Vec<PortSpec>,
    /// When it started (Unix seconds).
    pub started_at: u64,
}

/// "The run of `task_id` at `node` has ended", signed by that node; it withdraws the
/// announcement.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunEnd {
    /// The collaboration.
    pub collab: String,
    /// The node the run was at (the signer).
    pub node: NodeRef,
    /// The task.
    pub task_id: u64,
    /// When it ended (Unix seconds).
    pub ended_at: u64,
}

fn invalid(what: &'static str, reason: impl Into<String>) -> Error {
    Error::Invalid {
        what,
        reason: reason.into(),
    }
}

/// Checks an image digest: `sha256:` and 64 lowercase hex digits.
pub fn validate_digest(digest: &str) -> Result<()> {
    let ok = digest.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    });
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "image digest",
            format!("{digest:?} is not sha256:<64 lowercase hex digits>"),
        ))
    }
}

fn validate_ports(what: &'static str, ports: &[PortSpec]) -> Result<()> {
    if ports.len() > MAX_RUN_PORTS {
        return Err(invalid(
            what,
            format!("{} ports; at most {MAX_RUN_PORTS}", ports.len()),
        ));
    }
    for p in ports {
        // Re-parse through the checked constructor: the same rules as link terms.
        p.to_string()
            .parse::<PortSpec>()
            .map_err(|e| invalid(what, e.to_string()))?;
    }
    Ok(())
}

impl LinkPolicy {
    /// Checks every field and bound.
    pub fn validate(&self) -> Result<()> {
        if self.name.is_empty()
            || self.name.len() > 63
            || !self
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(invalid(
                "link policy name",
                format!("{:?} is not a lowercase DNS label", self.name),
            ));
        }
        if self.images.is_empty() || self.images.len() > MAX_POLICY_IMAGES {
            return Err(invalid(
                "link policy images",
                format!(
                    "{} image digests; give 1..={MAX_POLICY_IMAGES}",
                    self.images.len()
                ),
            ));
        }
        for d in &self.images {
            validate_digest(d)?;
        }
        if self.ports.is_empty() {
            return Err(invalid("link policy ports", "name at least one port"));
        }
        validate_ports("link policy ports", &self.ports)?;
        if self.orgs.len() < 2 || self.orgs.len() > MAX_POLICY_ORGS {
            return Err(invalid(
                "link policy organisations",
                format!(
                    "{} organisations; give 2..={MAX_POLICY_ORGS}",
                    self.orgs.len()
                ),
            ));
        }
        if self.max_lifetime_secs == 0 || self.max_lifetime_secs > MAX_LIFETIME_SECS {
            return Err(invalid(
                "link policy lifetime",
                format!(
                    "{} s; give 1..={MAX_LIFETIME_SECS} s",
                    self.max_lifetime_secs
                ),
            ));
        }
        Ok(())
    }
}

impl RunAnnouncement {
    /// Checks every field and bound.
    pub fn validate(&self) -> Result<()> {
        validate_digest(&self.image)?;
        validate_ports("run ports", &self.ports)
    }
}

/// The runs in force: the latest announcement per (node, task), less those a [`RunEnd`] at or
/// after their start withdrew.
pub fn live_runs<'a>(
    announcements: &'a [RunAnnouncement],
    ends: &[RunEnd],
) -> Vec<&'a RunAnnouncement> {
    let mut latest: BTreeMap<(&NodeRef, u64), &RunAnnouncement> = BTreeMap::new();
    for a in announcements {
        let key = (&a.node, a.task.task_id);
        if latest
            .get(&key)
            .is_none_or(|b| a.started_at >= b.started_at)
        {
            latest.insert(key, a);
        }
    }
    let ended: BTreeMap<(&NodeRef, u64), u64> = ends
        .iter()
        .map(|e| ((&e.node, e.task_id), e.ended_at))
        .collect();
    latest
        .into_iter()
        .filter(|(key, a)| ended.get(key).is_none_or(|at| *at < a.started_at))
        .map(|(_, a)| a)
        .collect()
}

/// The task links `policy` grants at `now` between the live runs: one per ordered pair of runs
/// of the same task at two different nodes of listed organisations with listed images, on the
/// ports the receiving run exposes that the policy allows (all the policy's ports when the run
/// lists none). Each ends at the earliest of either
/// run's start plus the policy's lifetime and the policy's own end; links already ended are
/// left out.
pub fn task_links(
    policy: &LinkPolicy,
    runs: &[&RunAnnouncement],
    now: SystemTime,
) -> Vec<EffectiveLink> {
    let now = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let orgs: BTreeSet<&str> = policy.orgs.iter().map(String::as_str).collect();
    let images: BTreeSet<&str> = policy.images.iter().map(String::as_str).collect();
    let admitted: Vec<&&RunAnnouncement> = runs
        .iter()
        .filter(|r| {
            r.collab == policy.collab
                && orgs.contains(r.node.org.as_str())
                && images.contains(r.image.as_str())
        })
        .collect();
    let allowed = |p: &PortSpec| {
        policy
            .ports
            .iter()
            .any(|q| q.port == p.port && (q.label.is_none() || q.label == p.label))
    };
    let mut out = Vec::new();
    for from in &admitted {
        for to in &admitted {
            if from.node == to.node || from.task.task_id != to.task.task_id {
                continue;
            }
            // A run that lists no ports (vantage6 5 declares none on its pods) is taken to
            // listen on the policy's: the owner named them for runs of these images.
            let ports: Vec<PortSpec> = if to.ports.is_empty() {
                policy.ports.clone()
            } else {
                to.ports.iter().filter(|p| allowed(p)).cloned().collect()
            };
            if ports.is_empty() {
                continue;
            }
            let not_after = (from.started_at.saturating_add(policy.max_lifetime_secs))
                .min(to.started_at.saturating_add(policy.max_lifetime_secs))
                .min(policy.not_after);
            if now >= not_after {
                continue;
            }
            let Ok(terms) = LinkTerms::new(
                &policy.collab,
                from.node.clone(),
                to.node.clone(),
                ports,
                not_after,
                Some(to.task.clone()),
            ) else {
                continue;
            };
            out.push(EffectiveLink {
                terms,
                approved_by: format!("link policy {}", policy.name),
                approved_at: from.started_at.max(to.started_at),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const IMG: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const OTHER: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    fn n(s: &str) -> NodeRef {
        s.parse().unwrap()
    }

    fn policy() -> LinkPolicy {
        LinkPolicy {
            collab: "c".into(),
            name: "mpc".into(),
            images: vec![IMG.into()],
            ports: vec!["11366:mpc".parse().unwrap()],
            orgs: vec!["a".into(), "b".into(), "c".into()],
            max_lifetime_secs: 100,
            not_after: 10_000,
            issued_at: 1,
        }
    }

    fn run(node: &str, task: u64, image: &str, started_at: u64) -> RunAnnouncement {
        RunAnnouncement {
            collab: "c".into(),
            node: n(node),
            task: TaskRef {
                task_id: task,
                parent_id: Some(1),
            },
            image: image.into(),
            ports: vec!["11366:mpc".parse().unwrap(), "9000:other".parse().unwrap()],
            started_at,
        }
    }

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn pairs(links: &[EffectiveLink]) -> Vec<(String, String, u64)> {
        let mut v: Vec<_> = links
            .iter()
            .map(|l| {
                (
                    l.terms.from.to_string(),
                    l.terms.to.to_string(),
                    l.terms.not_after,
                )
            })
            .collect();
        v.sort();
        v
    }

    #[test]
    fn runs_of_a_task_link_pairwise_on_allowed_ports_until_the_lifetime() {
        let runs = [
            run("a/n1", 7, IMG, 10),
            run("b/n1", 7, IMG, 20),
            run("c/n1", 8, IMG, 20),
        ];
        let live = live_runs(&runs, &[]);
        let links = task_links(&policy(), &live, at(30));
        assert_eq!(
            pairs(&links),
            vec![
                ("a/n1".into(), "b/n1".into(), 110),
                ("b/n1".into(), "a/n1".into(), 110)
            ]
        );
        // Only the policy's port, with the task, approved by the policy.
        for l in &links {
            assert_eq!(l.terms.ports, vec!["11366:mpc".parse().unwrap()]);
            assert_eq!(l.terms.task.as_ref().unwrap().task_id, 7);
            assert_eq!(l.approved_by, "link policy mpc");
        }
        // A receiving run that lists no ports gets the policy's.
        let mut bare = run("b/n1", 7, IMG, 20);
        bare.ports.clear();
        let runs = [run("a/n1", 7, IMG, 10), bare];
        let to_b: Vec<_> = task_links(&policy(), &live_runs(&runs, &[]), at(30))
            .into_iter()
            .filter(|l| l.terms.to == n("b/n1"))
            .collect();
        assert_eq!(to_b[0].terms.ports, policy().ports);
        // The lifetime passes: no links.
        assert!(task_links(&policy(), &live, at(110)).is_empty());
        // The policy ends first.
        let short = LinkPolicy {
            not_after: 50,
            ..policy()
        };
        assert_eq!(task_links(&short, &live, at(30))[0].terms.not_after, 50);
    }

    #[test]
    fn unlisted_images_orgs_and_ended_runs_get_no_link() {
        let runs = [
            run("a/n1", 7, IMG, 10),
            run("b/n1", 7, OTHER, 10),
            run("z/n1", 7, IMG, 10),
        ];
        assert!(task_links(&policy(), &live_runs(&runs, &[]), at(20)).is_empty());

        let runs = [run("a/n1", 7, IMG, 10), run("b/n1", 7, IMG, 10)];
        let end = RunEnd {
            collab: "c".into(),
            node: n("b/n1"),
            task_id: 7,
            ended_at: 15,
        };
        assert!(
            task_links(
                &policy(),
                &live_runs(&runs, std::slice::from_ref(&end)),
                at(20)
            )
            .is_empty()
        );
        // A new run of the task at b after the end links again.
        let runs = [
            run("a/n1", 7, IMG, 10),
            run("b/n1", 7, IMG, 10),
            run("b/n1", 7, IMG, 16),
        ];
        assert_eq!(
            task_links(&policy(), &live_runs(&runs, &[end]), at(20)).len(),
            2
        );
    }

    #[test]
    fn bounds_and_shapes_are_checked() {
        policy().validate().unwrap();
        run("a/n1", 7, IMG, 1).validate().unwrap();
        assert!(run("a/n1", 7, "latest", 1).validate().is_err());
        assert!(run("a/n1", 7, &IMG.to_uppercase(), 1).validate().is_err());
        let mut p = policy();
        p.images = vec![IMG.into(); MAX_POLICY_IMAGES + 1];
        assert!(p.validate().is_err());
        let mut p = policy();
        p.max_lifetime_secs = MAX_LIFETIME_SECS + 1;
        assert!(p.validate().is_err());
        let mut p = policy();
        p.orgs = vec!["a".into()];
        assert!(p.validate().is_err());
        let mut r = run("a/n1", 7, IMG, 1);
        r.ports = vec!["1".parse().unwrap(); MAX_RUN_PORTS + 1];
        assert!(r.validate().is_err());
        // Unknown fields are refused at parse time.
        let mut v = serde_json::to_value(policy()).unwrap();
        v["extra"] = serde_json::json!(1);
        assert!(serde_json::from_value::<LinkPolicy>(v).is_err());
    }
}
