//! Validation of rendered objects against Istio's own CRD schemas, as strictly as the API
//! server would.
//!
//! [`Schemas::from_crds`] reads a CRD bundle (multi-document YAML) and builds, for every served
//! version of every CRD, one JSON Schema validator from its `openAPIV3Schema` (types, enums,
//! required fields, ranges, patterns) plus a structural tree used for what JSON Schema does not
//! check:
//!
//! - **unknown fields**: CRD schemas are structural and the API server prunes (or, with
//!   `kubectl --validate=strict`, refuses) fields they do not declare, so an undeclared field is
//!   an error here, except below `x-kubernetes-preserve-unknown-fields: true`;
//! - **CEL rules** (`x-kubernetes-validations`): compiled and evaluated by a CEL interpreter
//!   (the `cel` crate: the standard library and the strings extension) at the node that
//!   declares them, with their own messages; what it cannot evaluate is listed by
//!   [`Schemas::unsupported_rules`];
//! - **metadata**: name, namespace, label and annotation syntax (also for core kinds, which have
//!   no CRD).
//!
//! Building the validators takes a while (the bundle is ~1 MB); build [`Schemas`] once and
//! reuse it. [`ISTIO_CRDS`] is the bundle checked into `istio-schema/istio/`.
//!
//! ```
//! use fedmesh_istio_schema::Schemas;
//! use serde_json::json;
//!
//! let schemas = Schemas::istio()?;
//! let se = json!({
//!     "apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
//!     "metadata": {"name": "x", "namespace": "fedmesh"},
//!     "spec": {"hosts": ["*"], "location": "MESH_SOMEWHERE"},
//! });
//! let err = schemas.validate(&se).unwrap_err().to_string();
//! assert!(err.contains("spec.hosts[0]: hostname cannot be wildcard"));
//! assert!(err.contains(r#"spec.location: "MESH_SOMEWHERE" is not one of "MESH_EXTERNAL" or "MESH_INTERNAL""#));
//! # Ok::<(), fedmesh_istio_schema::Error>(())
//! ```

use std::collections::{BTreeMap, BTreeSet};

use jsonschema::{Draft, Validator, paths::LocationSegment};
use serde_json::{Map, Value};

pub use error::{Error, Result, Violation};

use crate::cel::{Rule as Program, Unevaluated};

mod cel;
mod error;

/// Istio's CRD bundle (`crd-all.gen.yaml`, Apache-2.0), as checked into `istio-schema/istio/`.
pub const ISTIO_CRDS: &str = include_str!("../istio/crds.gen.yaml");

/// Validators for every (apiVersion, kind) of a CRD bundle.
pub struct Schemas {
    kinds: BTreeMap<(String, String), KindSchema>,
}

impl std::fmt::Debug for Schemas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Schemas")
            .field("kinds", &self.kinds.keys().collect::<Vec<_>>())
            .finish()
    }
}

struct KindSchema {
    validator: Validator,
    tree: Node,
}

/// The structural skeleton of a schema: what fields exist, and the rules at each node.
#[derive(Default)]
struct Node {
    object: bool,
    preserve_unknown: bool,
    properties: BTreeMap<String, Self>,
    additional: Option<Box<Self>>,
    items: Option<Box<Self>>,
    rules: Vec<Rule>,
}

struct Rule {
    text: String,
    message: String,
    /// The compiled rule, or why it cannot be evaluated here.
    program: std::result::Result<Program, String>,
}

impl Node {
    fn build(schema: &Value) -> Self {
        let rules = schema
            .get("x-kubernetes-validations")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|v| {
                let text = v.get("rule")?.as_str()?.to_owned();
                let message = v
                    .get("message")
                    .and_then(Value::as_str)
                    .map_or_else(|| format!("failed rule: {text}"), str::to_owned);
                Some(Rule {
                    program: Program::compile(&text),
                    text,
                    message,
                })
            })
            .collect();
        Self {
            object: schema.get("type").and_then(Value::as_str) == Some("object"),
            preserve_unknown: schema.get("x-kubernetes-preserve-unknown-fields")
                == Some(&Value::Bool(true)),
            properties: schema
                .get("properties")
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
                .map(|(k, v)| (k.clone(), Self::build(v)))
                .collect(),
            additional: schema
                .get("additionalProperties")
                .filter(|v| v.is_object())
                .map(|v| Box::new(Self::build(v))),
            items: schema
                .get("items")
                .filter(|v| v.is_object())
                .map(|v| Box::new(Self::build(v))),
            rules,
        }
    }

    /// Unknown fields and CEL rules below `value`, which sits at `path`.
    fn walk(&self, value: &Value, path: &str, root: bool, out: &mut Vec<Violation>) {
        for rule in &self.rules {
            let Ok(program) = &rule.program else {
                continue;
            };
            let message = match program.holds(value) {
                Ok(true) => continue,
                Ok(false) | Err(Unevaluated::Failed(_)) => rule.message.clone(),
                Err(Unevaluated::Unsupported(why)) => {
                    format!("{} (the rule could not be evaluated: {why})", rule.message)
                }
            };
            out.push(Violation {
                path: path.to_owned(),
                message,
            });
        }
        match value {
            Value::Object(map) => {
                for (key, child) in map {
                    if root && matches!(key.as_str(), "apiVersion" | "kind" | "metadata") {
                        continue;
                    }
                    let at = join_path(path, key);
                    if let Some(node) = self.properties.get(key).or(self.additional.as_deref()) {
                        node.walk(child, &at, false, out);
                    } else if self.object && !self.preserve_unknown {
                        out.push(Violation {
                            path: at,
                            message: "unknown field".into(),
                        });
                    }
                }
            }
            Value::Array(items) => {
                if let Some(node) = &self.items {
                    for (i, item) in items.iter().enumerate() {
                        node.walk(item, &format!("{path}[{i}]"), false, out);
                    }
                }
            }
            _ => {}
        }
    }

    fn unsupported(&self, out: &mut BTreeSet<String>) {
        out.extend(
            self.rules
                .iter()
                .filter_map(|r| r.program.as_ref().err().map(|e| format!("{}: {e}", r.text))),
        );
        let children = self.properties.values();
        for node in children
            .chain(self.additional.as_deref())
            .chain(self.items.as_deref())
        {
            node.unsupported(out);
        }
    }
}

impl Schemas {
    /// Builds validators from a CRD bundle: one per served version of every CRD in it.
    pub fn from_crds(yaml: &str) -> Result<Self> {
        let documents: Vec<Value> =
            serde_saphyr::from_multiple(yaml).map_err(|e| Error::Crd(e.to_string()))?;
        let mut kinds = BTreeMap::new();
        for crd in documents.iter().filter(|d| !d.is_null()) {
            let text = |pointer: &str| {
                crd.pointer(pointer)
                    .and_then(Value::as_str)
                    .ok_or_else(|| Error::Crd(format!("a CRD has no {pointer}")))
            };
            let group = text("/spec/group")?;
            let kind = text("/spec/names/kind")?;
            let versions = crd
                .pointer("/spec/versions")
                .and_then(Value::as_array)
                .ok_or_else(|| Error::Crd(format!("{kind} has no versions")))?;
            for version in versions {
                let name = version.get("name").and_then(Value::as_str).unwrap_or("");
                let api_version = format!("{group}/{name}");
                let schema = version
                    .pointer("/schema/openAPIV3Schema")
                    .ok_or_else(|| Error::Crd(format!("{api_version} {kind} has no schema")))?;
                let validator = jsonschema::options()
                    .with_draft(Draft::Draft4)
                    .build(schema)
                    .map_err(|e| Error::Crd(format!("{api_version} {kind}: {e}")))?;
                let entry = KindSchema {
                    validator,
                    tree: Node::build(schema),
                };
                kinds.insert((api_version, kind.to_owned()), entry);
            }
        }
        if kinds.is_empty() {
            return Err(Error::Crd("the bundle holds no CRD".into()));
        }
        Ok(Self { kinds })
    }

    /// Validators for [`ISTIO_CRDS`].
    pub fn istio() -> Result<Self> {
        Self::from_crds(ISTIO_CRDS)
    }

    /// Every (apiVersion, kind) there is a schema for.
    pub fn kinds(&self) -> impl Iterator<Item = (&str, &str)> {
        self.kinds.keys().map(|(v, k)| (v.as_str(), k.as_str()))
    }

    /// Whether there is a schema for this kind.
    pub fn knows(&self, api_version: &str, kind: &str) -> bool {
        self.kinds
            .contains_key(&(api_version.to_owned(), kind.to_owned()))
    }

    /// Every violation of `object`'s schema, in path order of discovery; empty when valid.
    /// An error only when there is no schema for its kind.
    pub fn check(&self, object: &Value) -> Result<Vec<Violation>> {
        let (api_version, kind) = type_of(object);
        let schema = self
            .kinds
            .get(&(api_version.to_owned(), kind.to_owned()))
            .ok_or_else(|| Error::NoSchema {
                api_version: api_version.to_owned(),
                kind: kind.to_owned(),
            })?;
        let mut out = check_metadata(object);
        out.extend(schema.validator.iter_errors(object).map(|e| Violation {
            path: kube_path(e.instance_path().iter()),
            message: e.to_string(),
        }));
        schema.tree.walk(object, "", true, &mut out);
        Ok(out)
    }

    /// `Ok` when `object` is valid, else every violation in one [`Error::Invalid`].
    pub fn validate(&self, object: &Value) -> Result<()> {
        let violations = self.check(object)?;
        if violations.is_empty() {
            return Ok(());
        }
        Err(Error::Invalid {
            object: describe(object),
            violations,
        })
    }

    /// Validates a rendered set: objects of CRD kinds against their schema, objects of core
    /// Kubernetes kinds (`v1`, `*.k8s.io`), which have no CRD, by their metadata only. Any other
    /// kind without a schema is an error.
    pub fn validate_all<'a>(&self, objects: impl IntoIterator<Item = &'a Value>) -> Result<()> {
        for object in objects {
            let (api_version, kind) = type_of(object);
            let group = api_version.rsplit_once('/').map_or("", |(g, _)| g);
            if self.knows(api_version, kind) {
                self.validate(object)?;
            } else if group.is_empty() || group.ends_with(".k8s.io") {
                let violations = check_metadata(object);
                if !violations.is_empty() {
                    return Err(Error::Invalid {
                        object: describe(object),
                        violations,
                    });
                }
            } else {
                return Err(Error::NoSchema {
                    api_version: api_version.to_owned(),
                    kind: kind.to_owned(),
                });
            }
        }
        Ok(())
    }

    /// The CEL rules in a kind's schema that cannot be evaluated here (they do not compile, or
    /// refer to `oldSelf`), each with why; they are not checked.
    pub fn unsupported_rules(&self, api_version: &str, kind: &str) -> Vec<String> {
        let mut out = BTreeSet::new();
        if let Some(schema) = self.kinds.get(&(api_version.to_owned(), kind.to_owned())) {
            schema.tree.unsupported(&mut out);
        }
        out.into_iter().collect()
    }
}

fn type_of(object: &Value) -> (&str, &str) {
    let s = |k: &str| object.get(k).and_then(Value::as_str).unwrap_or("");
    (s("apiVersion"), s("kind"))
}

/// `Kind namespace/name`, for messages.
fn describe(object: &Value) -> String {
    let (_, kind) = type_of(object);
    let meta = |k: &str| {
        object
            .pointer(&format!("/metadata/{k}"))
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_owned()
    };
    format!("{kind} {}/{}", meta("namespace"), meta("name"))
}

fn join_path(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

/// `spec.ports[0].name` from a JSON pointer's segments.
fn kube_path<'a>(segments: impl Iterator<Item = LocationSegment<'a>>) -> String {
    let mut out = String::new();
    for segment in segments {
        match segment {
            LocationSegment::Index(i) => out.push_str(&format!("[{i}]")),
            LocationSegment::Property(p) => out = join_path(&out, &p),
        }
    }
    out
}

/// The ObjectMeta fields a manifest may carry.
const METADATA_FIELDS: &[&str] = &[
    "name",
    "generateName",
    "namespace",
    "labels",
    "annotations",
    "ownerReferences",
    "finalizers",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "managedFields",
];

/// What the API server checks of any object's metadata: a DNS subdomain name, a DNS label
/// namespace, qualified-name label and annotation keys, and label values.
pub fn check_metadata(object: &Value) -> Vec<Violation> {
    let mut out = Vec::new();
    let mut bad = |path: String, message: String| out.push(Violation { path, message });
    let Some(meta) = object.get("metadata").and_then(Value::as_object) else {
        bad("metadata".into(), "required object is missing".into());
        return out;
    };
    for key in meta.keys() {
        if !METADATA_FIELDS.contains(&key.as_str()) {
            bad(format!("metadata.{key}"), "unknown field".into());
        }
    }
    match meta.get("name").and_then(Value::as_str) {
        Some(name) if is_subdomain(name) => {}
        Some(name) => bad(
            "metadata.name".into(),
            format!("{name:?} is not a lowercase DNS subdomain of at most 253 characters"),
        ),
        None => bad("metadata.name".into(), "is required".into()),
    }
    if let Some(ns) = meta.get("namespace")
        && !ns.as_str().is_some_and(is_dns_label)
    {
        bad(
            "metadata.namespace".into(),
            format!("{ns} is not a lowercase DNS label"),
        );
    }
    let map = |k: &str| meta.get(k).and_then(Value::as_object).cloned();
    for (key, value) in map("labels").unwrap_or_else(Map::new) {
        let at = format!("metadata.labels.{key}");
        if !is_qualified_name(&key) {
            bad(
                at.clone(),
                "key is not a qualified name ([prefix/]name)".into(),
            );
        }
        match value.as_str() {
            Some(v) if v.is_empty() || (v.len() <= 63 && is_name_part(v)) => {}
            _ => bad(
                at,
                format!(
                    "value {value} must be at most 63 characters of [A-Za-z0-9._-], \
                     starting and ending alphanumeric"
                ),
            ),
        }
    }
    for (key, value) in map("annotations").unwrap_or_else(Map::new) {
        let at = format!("metadata.annotations.{key}");
        if !is_qualified_name(&key) {
            bad(
                at.clone(),
                "key is not a qualified name ([prefix/]name)".into(),
            );
        }
        if !value.is_string() {
            bad(at, "value must be a string".into());
        }
    }
    out
}

fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b.first().is_some_and(u8::is_ascii_alphanumeric)
        && b.last().is_some_and(u8::is_ascii_alphanumeric)
}

fn is_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// `[A-Za-z0-9._-]`, starting and ending alphanumeric.
fn is_name_part(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
        && b.first().is_some_and(u8::is_ascii_alphanumeric)
        && b.last().is_some_and(u8::is_ascii_alphanumeric)
}

/// A label or annotation key: `[prefix/]name`, prefix a DNS subdomain, name at most 63.
fn is_qualified_name(key: &str) -> bool {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    prefix.is_none_or(is_subdomain) && name.len() <= 63 && is_name_part(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn metadata_rules() {
        let obj = json!({"metadata": {
            "name": "Bad_Name", "namespace": "ns", "colour": "blue",
            "labels": {"fedmesh.io/peer": "org-a/n1", "ok": "", "x/y/z": "v"},
            "annotations": {"fedmesh.io/purpose": 7},
        }});
        let got: Vec<String> = check_metadata(&obj).iter().map(|v| v.to_string()).collect();
        assert_eq!(
            got,
            [
                "metadata.colour: unknown field",
                "metadata.name: \"Bad_Name\" is not a lowercase DNS subdomain of at most 253 characters",
                "metadata.labels.fedmesh.io/peer: value \"org-a/n1\" must be at most 63 characters of [A-Za-z0-9._-], starting and ending alphanumeric",
                "metadata.labels.x/y/z: key is not a qualified name ([prefix/]name)",
                "metadata.annotations.fedmesh.io/purpose: value must be a string",
            ]
        );
    }

    #[test]
    fn at_most_one_family_and_paths() {
        let crd = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
spec:
  group: example.io
  names: {kind: Thing}
  versions:
  - name: v1
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            x-kubernetes-validations:
            - {rule: "(has(self.a) ? 1 : 0) + (has(self.b) ? 1 : 0) <= 1", message: only one of a or b}
            - {rule: "self == oldSelf", message: never checked on create}
            - {rule: "self.list.all(i, i.n <= 2)", message: items up to 2}
            properties:
              a: {type: string}
              b: {type: string}
              free: {type: object, x-kubernetes-preserve-unknown-fields: true}
              list:
                type: array
                items: {type: object, properties: {n: {type: integer, maximum: 3}}}
"#;
        let s = Schemas::from_crds(crd).unwrap();
        assert_eq!(s.kinds().collect::<Vec<_>>(), [("example.io/v1", "Thing")]);
        assert_eq!(
            s.unsupported_rules("example.io/v1", "Thing"),
            ["self == oldSelf: a transition rule (oldSelf): the API server runs it on update only"]
        );
        let obj = json!({
            "apiVersion": "example.io/v1", "kind": "Thing",
            "metadata": {"name": "t", "namespace": "ns"},
            "spec": {"a": "x", "b": "y", "free": {"any": 1}, "list": [{"n": 1}, {"n": 4, "m": 0}]},
        });
        let got: Vec<String> = s
            .check(&obj)
            .unwrap()
            .iter()
            .map(|v| v.to_string())
            .collect();
        assert_eq!(
            got,
            [
                "spec.list[1].n: 4 is greater than the maximum of 3",
                "spec: only one of a or b",
                "spec: items up to 2",
                "spec.list[1].m: unknown field",
            ]
        );
        let err = s
            .check(&json!({"apiVersion": "v1", "kind": "Secret"}))
            .unwrap_err();
        assert_eq!(err.to_string(), "no schema for v1 Secret");
    }
}
