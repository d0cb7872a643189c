//! Desired objects against live ones: what to apply, what to delete, and what an audit reports.
//! Pure, so it is tested without a cluster.
//!
//! A live object *matches* a desired one when it contains every field the desired one sets, with
//! the same value: the API server adds fields (`uid`, `resourceVersion`, `managedFields`,
//! defaults such as a Service's `clusterIP`) and other managers may add their own, none of
//! which fedmesh owns. Objects (maps) match field by field; lists must have the same length and
//! match item by item; everything else must be equal. Only objects that do not match are
//! applied, so a pass over an unchanged cluster writes nothing.

use std::collections::{BTreeMap, BTreeSet};

use fedmesh_mesh_config::ObjectKey;
use serde::Serialize;
use serde_json::Value;

/// How the live objects differ from the desired ones.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Diff {
    /// Desired and absent.
    pub missing: Vec<Value>,
    /// Present, but some desired fields differ; with the paths of those fields.
    pub modified: Vec<(Value, Vec<String>)>,
    /// Present (with fedmesh's labels), not desired.
    pub extra: Vec<ObjectKey>,
    /// How many desired objects there are.
    pub desired: usize,
}

/// What a pass writes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    /// Objects to apply, in the desired order.
    pub apply: Vec<Value>,
    /// Objects to delete.
    pub delete: Vec<ObjectKey>,
}

impl Plan {
    /// Whether the pass writes nothing.
    pub fn is_empty(&self) -> bool {
        self.apply.is_empty() && self.delete.is_empty()
    }
}

/// Compares `desired` with `live` (the objects carrying fedmesh's labels). Objects are matched
/// by [`ObjectKey`]; objects without one are ignored.
pub fn diff(desired: &[Value], live: &[Value]) -> Diff {
    let live: BTreeMap<ObjectKey, &Value> = live
        .iter()
        .filter_map(|o| Some((ObjectKey::of(o)?, o)))
        .collect();
    let mut wanted = BTreeSet::new();
    let mut out = Diff {
        desired: desired.len(),
        ..Diff::default()
    };
    for object in desired {
        let Some(key) = ObjectKey::of(object) else {
            continue;
        };
        match live.get(&key) {
            None => out.missing.push(object.clone()),
            Some(current) => {
                let fields = mismatches(object, current);
                if !fields.is_empty() {
                    out.modified.push((object.clone(), fields));
                }
            }
        }
        wanted.insert(key);
    }
    out.extra = live.into_keys().filter(|k| !wanted.contains(k)).collect();
    out
}

impl Diff {
    /// Whether live and desired match.
    pub fn is_empty(&self) -> bool {
        self.missing.is_empty() && self.modified.is_empty() && self.extra.is_empty()
    }

    /// The writes that make live match desired: apply what is missing or modified (in the
    /// desired order), delete what is extra.
    pub fn plan(&self, desired: &[Value]) -> Plan {
        let stale: BTreeSet<Option<ObjectKey>> = self
            .missing
            .iter()
            .chain(self.modified.iter().map(|(o, _)| o))
            .map(ObjectKey::of)
            .collect();
        Plan {
            apply: desired
                .iter()
                .filter(|o| stale.contains(&ObjectKey::of(o)))
                .cloned()
                .collect(),
            delete: self.extra.clone(),
        }
    }

    /// The audit report: one row per object that differs.
    pub fn report(&self) -> Report {
        let row = |status: &'static str, key: ObjectKey, detail: String| Row {
            status,
            kind: key.kind,
            namespace: key.namespace,
            name: key.name,
            detail,
        };
        let mut rows = Vec::new();
        for object in &self.missing {
            if let Some(key) = ObjectKey::of(object) {
                rows.push(row("missing", key, "wanted by a verified link".into()));
            }
        }
        for (object, fields) in &self.modified {
            if let Some(key) = ObjectKey::of(object) {
                rows.push(row("modified", key, fields.join(", ")));
            }
        }
        for key in &self.extra {
            rows.push(row(
                "extra",
                key.clone(),
                "wanted by no verified link".into(),
            ));
        }
        Report {
            matches: rows.is_empty(),
            desired: self.desired,
            differences: rows,
        }
    }
}

/// `fedmesh audit`'s findings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Report {
    /// Whether the cluster holds exactly what the verified links want.
    pub matches: bool,
    /// How many objects the verified links want.
    pub desired: usize,
    /// Every object that differs.
    pub differences: Vec<Row>,
}

/// One object that differs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Row {
    /// `missing`, `modified` or `extra`.
    pub status: &'static str,
    /// Its kind.
    pub kind: String,
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// The differing fields, or why it is missing or extra.
    pub detail: String,
}

/// The paths of the fields of `desired` that `live` does not contain with the same value
/// (empty: `live` matches).
pub fn mismatches(desired: &Value, live: &Value) -> Vec<String> {
    let mut out = Vec::new();
    walk(desired, live, &mut String::new(), &mut out);
    out
}

fn walk(desired: &Value, live: &Value, path: &mut String, out: &mut Vec<String>) {
    match (desired, live) {
        (Value::Object(want), Value::Object(have)) => {
            for (key, value) in want {
                let len = path.len();
                if key.contains(['.', '/']) {
                    path.push_str(&format!("[{key}]"));
                } else {
                    if !path.is_empty() {
                        path.push('.');
                    }
                    path.push_str(key);
                }
                match have.get(key) {
                    Some(current) => walk(value, current, path, out),
                    None => out.push(path.clone()),
                }
                path.truncate(len);
            }
        }
        (Value::Array(want), Value::Array(have)) if want.len() == have.len() => {
            for (i, (value, current)) in want.iter().zip(have).enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                walk(value, current, path, out);
                path.truncate(len);
            }
        }
        _ if desired == live => {}
        _ => out.push(path.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn se(name: &str, port: u16) -> Value {
        json!({
            "apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
            "metadata": {"name": name, "namespace": "fedmesh",
                         "labels": {"app.kubernetes.io/managed-by": "fedmesh"}},
            "spec": {"hosts": ["b.c.fedmesh"], "ports": [{"number": port, "name": "tcp-mpc"}]},
        })
    }

    /// What an API server returns for an applied object: the same, plus its own fields.
    fn served(mut object: Value) -> Value {
        object["metadata"]["uid"] = json!("0f1e");
        object["metadata"]["resourceVersion"] = json!("42");
        object["metadata"]["managedFields"] = json!([{"manager": "fedmesh"}]);
        object["spec"]["ports"][0]["protocol"] = json!("TCP");
        object["status"] = json!({"addresses": []});
        object
    }

    #[test]
    fn server_added_fields_do_not_count_as_changes() {
        let desired = vec![se("a", 1), se("b", 2)];
        let live: Vec<Value> = desired.iter().cloned().map(served).collect();
        let d = diff(&desired, &live);
        assert!(d.is_empty(), "{d:?}");
        assert!(d.plan(&desired).is_empty());
        assert_eq!(
            d.report(),
            Report {
                matches: true,
                desired: 2,
                differences: vec![]
            }
        );
    }

    #[test]
    fn missing_modified_and_extra_are_told_apart() {
        let desired = vec![se("a", 1), se("b", 2), se("c", 3)];
        let mut changed = served(se("b", 2));
        changed["spec"]["ports"][0]["number"] = json!(9999);
        changed["metadata"]["labels"]
            .as_object_mut()
            .unwrap()
            .remove("app.kubernetes.io/managed-by");
        let live = vec![served(se("a", 1)), changed, served(se("z", 4))];
        let d = diff(&desired, &live);
        let plan = d.plan(&desired);
        assert_eq!(plan.apply, vec![se("b", 2), se("c", 3)]);
        assert_eq!(
            plan.delete
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["ServiceEntry fedmesh/z"]
        );
        let report = d.report();
        let rows: Vec<(&str, &str, &str)> = report
            .differences
            .iter()
            .map(|r| (r.status, r.name.as_str(), r.detail.as_str()))
            .collect();
        assert_eq!(
            rows,
            [
                ("missing", "c", "wanted by a verified link"),
                (
                    "modified",
                    "b",
                    "metadata.labels[app.kubernetes.io/managed-by], spec.ports[0].number"
                ),
                ("extra", "z", "wanted by no verified link"),
            ]
        );
    }

    #[test]
    fn lists_must_keep_their_length() {
        let want = json!({"spec": {"hosts": ["a"]}});
        assert_eq!(
            mismatches(&want, &json!({"spec": {"hosts": ["a", "b"]}})),
            ["spec.hosts"]
        );
        assert!(mismatches(&want, &json!({"spec": {"hosts": ["a"], "x": 1}})).is_empty());
        assert_eq!(
            mismatches(&json!({"data": {"k": "v"}}), &json!({})),
            ["data"]
        );
    }
}
