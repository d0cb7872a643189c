//! The vantage6-compatible peer-address API, `GET /vpn/algorithm/addresses`.
//!
//! vantage6 3.x/4.x algorithms asked the server for the addresses of the other runs of their
//! task; vantage6 5 removed that endpoint together with the VPN. The node agent answers it
//! locally, from the links it verified: a run is a (organisation, task, port) that a link with
//! that task makes reachable. Query flags and the response shape are vantage6's:
//!
//! | flag | runs returned |
//! |---|---|
//! | (none) | the caller's task: siblings and self |
//! | `include_children` / `include_parent` | also the subtasks' / the parent task's runs |
//! | `only_children` / `only_parent` | only the subtasks' / the parent task's runs |
//! | `only_siblings` / `only_self` | the caller's task, other organisations / own organisation |
//! | `label=<l>` | only ports labelled `l` |
//!
//! The caller's task and organisation come from its container token (`Authorization: Bearer`,
//! claims `task_id` and `organization_id`, at the top level or under `sub`, as vantage6 4 and 5
//! issue them). The token is decoded, not verified: the agent serves only the containers of its
//! own node, the answer grants nothing, and the links it lists are those the node verified.

use std::collections::BTreeSet;

use axum::{
    Json, Router,
    extract::{Query, State},
    http::{HeaderMap, StatusCode},
    routing::get,
};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use serde::{Deserialize, Serialize};

use super::{Snapshot, admin::AdminState};

/// One reachable run, as vantage6 returned it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Address {
    /// Where to connect.
    pub ip: String,
    /// The port.
    pub port: u16,
    /// The port's label.
    pub label: Option<String>,
    /// The run's organisation id.
    pub organization_id: Option<u64>,
    /// The run's task.
    pub task_id: u64,
    /// The task's parent.
    pub parent_id: Option<u64>,
}

/// The query flags (any non-empty value is true, as in vantage6).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Flags {
    #[serde(default)]
    only_children: Option<String>,
    #[serde(default)]
    only_parent: Option<String>,
    #[serde(default)]
    only_siblings: Option<String>,
    #[serde(default)]
    only_self: Option<String>,
    #[serde(default)]
    include_children: Option<String>,
    #[serde(default)]
    include_parent: Option<String>,
    #[serde(default)]
    label: Option<String>,
}

fn on(flag: &Option<String>) -> bool {
    flag.as_deref().is_some_and(|v| !v.is_empty())
}

/// Every run this node can reach (peers, through their local addresses) or hosts (itself),
/// derived from links that carry a task.
pub fn runs(snap: &Snapshot, own_org: &str) -> Vec<(String, Address)> {
    let mut out = BTreeSet::new();
    for link in &snap.links {
        let Some(task) = &link.terms.task else {
            continue;
        };
        let t = &link.terms;
        let (org, ip) = if t.to.org == own_org {
            // A run of this organisation that peers dial: it listens on its exposed target.
            (t.to.org.clone(), None)
        } else {
            match snap.peers.get(&t.to) {
                Some(view) => (t.to.org.clone(), Some(view.ip.to_string())),
                None => continue,
            }
        };
        for p in &t.ports {
            let ip = ip.clone().unwrap_or_else(|| {
                snap.exposes
                    .iter()
                    .find(|e| e.port == p.port)
                    .and_then(|e| e.target.rsplit_once(':').map(|(h, _)| h.to_owned()))
                    .unwrap_or_else(|| "127.0.0.1".to_owned())
            });
            let port = if t.to.org == own_org {
                snap.exposes
                    .iter()
                    .find(|e| e.port == p.port)
                    .and_then(|e| {
                        e.target
                            .rsplit_once(':')
                            .and_then(|(_, port)| port.parse().ok())
                    })
                    .unwrap_or(p.port)
            } else {
                p.port
            };
            out.insert((
                org.clone(),
                Address {
                    ip,
                    port,
                    label: p.label.clone(),
                    organization_id: snap.organization_ids.get(&org).copied(),
                    task_id: task.task_id,
                    parent_id: task.parent_id,
                },
            ));
        }
    }
    out.into_iter().collect()
}

/// Selects the runs vantage6 would have returned for a caller of `own_org` running `task`.
pub fn select(
    runs: &[(String, Address)],
    own_org: &str,
    task: u64,
    flags: &Flags,
) -> Result<Vec<Address>, String> {
    let only = [
        on(&flags.only_children),
        on(&flags.only_parent),
        on(&flags.only_siblings),
        on(&flags.only_self),
    ];
    if only.iter().filter(|f| **f).count() > 1 {
        return Err("You can only specify one of the only_<...> parameters!".into());
    }
    let [only_children, only_parent, only_siblings, only_self] = only;
    let (include_children, include_parent) =
        (on(&flags.include_children), on(&flags.include_parent));
    let clash = (include_children && (only_parent || only_siblings || only_self))
        || (include_parent && (only_children || only_siblings || only_self));
    if clash {
        return Err(
            "You cannot combine include_<...> with an only_<...> parameter of another level!"
                .into(),
        );
    }
    let parent = runs
        .iter()
        .find(|(_, a)| a.task_id == task)
        .and_then(|(_, a)| a.parent_id);
    let same_task = |a: &Address| a.task_id == task;
    let child = |a: &Address| a.parent_id == Some(task);
    let of_parent = |a: &Address| parent.is_some_and(|p| a.task_id == p);
    let selected = runs.iter().filter(|(org, a)| {
        let keep = if only_children {
            child(a)
        } else if only_parent {
            of_parent(a)
        } else if only_siblings {
            same_task(a) && org != own_org
        } else if only_self {
            same_task(a) && org == own_org
        } else {
            same_task(a) || (include_children && child(a)) || (include_parent && of_parent(a))
        };
        keep && flags
            .label
            .as_deref()
            .is_none_or(|l| a.label.as_deref() == Some(l))
    });
    Ok(selected.map(|(_, a)| a.clone()).collect())
}

/// The caller's task from its container token (a JWT; decoded, not verified).
fn caller_task(headers: &HeaderMap) -> Result<u64, String> {
    let token = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or("missing container token (Authorization: Bearer)")?;
    let payload = token
        .split('.')
        .nth(1)
        .ok_or("container token is not a JWT")?;
    let json = URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|_| "container token is not a JWT")?;
    let claims: serde_json::Value =
        serde_json::from_slice(&json).map_err(|_| "container token claims are not JSON")?;
    let task = claims
        .get("task_id")
        .or_else(|| claims.get("sub").and_then(|s| s.get("task_id")))
        .and_then(serde_json::Value::as_u64)
        .ok_or("container token carries no task_id")?;
    Ok(task)
}

#[derive(Serialize)]
struct Addresses {
    addresses: Vec<Address>,
}

#[derive(Serialize)]
struct Msg {
    msg: String,
}

async fn addresses(
    State(s): State<AdminState>,
    headers: HeaderMap,
    query: Result<Query<Flags>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Addresses>, (StatusCode, Json<Msg>)> {
    let bad = |code, msg: String| (code, Json(Msg { msg }));
    let Query(flags) = query.map_err(|e| bad(StatusCode::BAD_REQUEST, e.body_text()))?;
    let task = caller_task(&headers).map_err(|m| bad(StatusCode::UNAUTHORIZED, m))?;
    let snap = s.snapshot.borrow().clone();
    let own_org = s.node.org.clone();
    let all = runs(&snap, &own_org);
    let addresses =
        select(&all, &own_org, task, &flags).map_err(|m| bad(StatusCode::BAD_REQUEST, m))?;
    Ok(Json(Addresses { addresses }))
}

/// The vantage6 route.
pub fn router() -> Router<AdminState> {
    Router::new().route("/vpn/algorithm/addresses", get(addresses))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The caller is a run of task 10 at org-a; task 10's parent is 5; task 20 is its child.
    fn fixture() -> Vec<(String, Address)> {
        let run = |org: &str, port, label: &str, task_id, parent_id| {
            (
                org.to_owned(),
                Address {
                    ip: format!("127.0.0.{}", port % 250),
                    port,
                    label: Some(label.to_owned()),
                    organization_id: Some(u64::from(org.as_bytes()[4] - b'a' + 1)),
                    task_id,
                    parent_id,
                },
            )
        };
        vec![
            run("org-a", 21366, "mpc", 10, Some(5)),
            run("org-b", 11366, "mpc", 10, Some(5)),
            run("org-c", 11367, "mpc", 10, Some(5)),
            run("org-b", 9000, "other", 10, Some(5)),
            run("org-b", 8000, "agg", 5, None),
            run("org-c", 7000, "child", 20, Some(10)),
        ]
    }

    fn ports(query: &str) -> Result<Vec<u16>, String> {
        let flags: Flags = serde_json::from_value(
            query
                .split('&')
                .filter(|kv| !kv.is_empty())
                .map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, "1"));
                    (k.to_owned(), serde_json::Value::String(v.to_owned()))
                })
                .collect(),
        )
        .unwrap();
        let mut ports: Vec<u16> = select(&fixture(), "org-a", 10, &flags)?
            .iter()
            .map(|a| a.port)
            .collect();
        ports.sort_unstable();
        Ok(ports)
    }

    #[test]
    fn every_flag_selects_what_vantage6_did() {
        assert_eq!(ports(""), Ok(vec![9000, 11366, 11367, 21366]));
        assert_eq!(ports("only_siblings=1"), Ok(vec![9000, 11366, 11367]));
        assert_eq!(ports("only_self=1"), Ok(vec![21366]));
        assert_eq!(ports("only_children=1"), Ok(vec![7000]));
        assert_eq!(ports("only_parent=1"), Ok(vec![8000]));
        assert_eq!(
            ports("include_children=1"),
            Ok(vec![7000, 9000, 11366, 11367, 21366])
        );
        assert_eq!(
            ports("include_parent=1"),
            Ok(vec![8000, 9000, 11366, 11367, 21366])
        );
        assert_eq!(
            ports("include_children=1&include_parent=1"),
            Ok(vec![7000, 8000, 9000, 11366, 11367, 21366])
        );
        assert_eq!(ports("only_children=1&include_children=1"), Ok(vec![7000]));
        // Any non-empty value is true; an empty one is not.
        assert_eq!(ports("only_self=yes"), Ok(vec![21366]));
        assert_eq!(ports("only_self="), Ok(vec![9000, 11366, 11367, 21366]));
    }

    #[test]
    fn label_filters() {
        assert_eq!(ports("label=mpc"), Ok(vec![11366, 11367, 21366]));
        assert_eq!(ports("only_siblings=1&label=other"), Ok(vec![9000]));
        assert_eq!(ports("label=nothing"), Ok(vec![]));
    }

    #[test]
    fn conflicting_flags_are_refused() {
        assert_eq!(
            ports("only_self=1&only_siblings=1"),
            Err("You can only specify one of the only_<...> parameters!".into())
        );
        assert!(
            ports("only_siblings=1&include_parent=1")
                .unwrap_err()
                .contains("cannot combine")
        );
        assert!(
            ports("only_parent=1&include_children=1")
                .unwrap_err()
                .contains("cannot combine")
        );
    }
}
