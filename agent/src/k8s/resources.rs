//! The kinds fedmesh writes, and the namespaces it writes each in: the `PeerLink` resource and
//! each mesh backend's kinds ([`super::backend`]). These tables are the whole of what the
//! controller lists, applies and prunes; the Helm chart's Roles grant exactly them.

use kube::discovery::ApiResource;
use serde_json::Value;

use super::{Error, Result, Settings};

/// Which namespace a kind is written in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    /// The agent's namespace (gateways, credentials, Services, PeerLinks).
    Agent,
    /// The algorithm pods' namespace (their sidecars' policy).
    Algorithm,
}

/// A kind fedmesh writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kind {
    /// `apiVersion`.
    pub api_version: &'static str,
    /// `kind`.
    pub kind: &'static str,
    /// The resource name in URLs.
    pub plural: &'static str,
    /// Where it is written.
    pub place: Place,
}

/// A [`Kind`] (for the backends' tables).
pub(super) const fn kind(
    api_version: &'static str,
    kind: &'static str,
    plural: &'static str,
    place: Place,
) -> Kind {
    Kind {
        api_version,
        kind,
        plural,
        place,
    }
}

/// The `PeerLink` resource (written in both modes).
pub const PEERLINK: Kind = kind("fedmesh.io/v1alpha1", "PeerLink", "peerlinks", Place::Agent);

/// One kind in one namespace: one list request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scope {
    /// The kind.
    pub kind: Kind,
    /// The namespace.
    pub namespace: String,
}

impl Kind {
    /// The kube-rs description of the resource.
    pub fn resource(&self) -> ApiResource {
        let (group, version) = self
            .api_version
            .split_once('/')
            .unwrap_or(("", self.api_version));
        ApiResource {
            group: group.to_owned(),
            version: version.to_owned(),
            api_version: self.api_version.to_owned(),
            kind: self.kind.to_owned(),
            plural: self.plural.to_owned(),
        }
    }
}

impl Settings {
    /// The namespace of a place.
    pub fn namespace_of(&self, place: Place) -> &str {
        match place {
            Place::Agent => &self.namespace,
            Place::Algorithm => &self.render.algorithm_namespace,
        }
    }

    /// Every (kind, namespace) this mode writes, in listing order.
    pub fn scopes(&self) -> Vec<Scope> {
        self.mode
            .kinds()
            .iter()
            .map(|k| Scope {
                kind: *k,
                namespace: self.namespace_of(k.place).to_owned(),
            })
            .collect()
    }

    /// The scope `object` belongs to, or why fedmesh must not write it: an unknown kind, a
    /// namespace outside the table (Secrets only ever in the agent's namespace).
    pub fn scope_of(&self, object: &Value) -> Result<Scope> {
        let (api_version, kind, namespace) = (
            object["apiVersion"].as_str().unwrap_or_default(),
            object["kind"].as_str().unwrap_or_default(),
            object["metadata"]["namespace"].as_str().unwrap_or_default(),
        );
        self.scopes()
            .into_iter()
            .find(|s| {
                s.kind.api_version == api_version && s.kind.kind == kind && s.namespace == namespace
            })
            .ok_or_else(|| {
                Error::Placement(format!(
                    "refusing to write {kind} {namespace}/{}: fedmesh writes {kind} only in {}",
                    object["metadata"]["name"].as_str().unwrap_or_default(),
                    self.scopes()
                        .iter()
                        .filter(|s| s.kind.kind == kind)
                        .map(|s| s.namespace.as_str())
                        .collect::<Vec<_>>()
                        .join(" and ")
                ))
            })
    }
}

#[cfg(test)]
mod tests {
    use crate::k8s::{Mode, fixtures::settings};
    use serde_json::json;

    #[test]
    fn secrets_are_written_only_in_the_agent_namespace() {
        let s = settings(Mode::Istio);
        let secret = |ns: &str| json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "x", "namespace": ns}});
        assert_eq!(s.scope_of(&secret("fedmesh")).unwrap().namespace, "fedmesh");
        assert_eq!(
            s.scope_of(&secret("vantage6-tasks"))
                .unwrap_err()
                .to_string(),
            "refusing to write Secret vantage6-tasks/x: fedmesh writes Secret only in fedmesh"
        );
        let relay = settings(Mode::Relay);
        assert!(relay.scope_of(&secret("fedmesh")).is_err());
    }

    #[test]
    fn resources_split_group_and_version() {
        let r = Mode::Istio.kinds()[1].resource();
        assert_eq!(
            (r.group.as_str(), r.version.as_str(), r.plural.as_str()),
            ("networking.istio.io", "v1", "serviceentries")
        );
        let core = Mode::Relay.kinds()[0].resource();
        assert_eq!((core.group.as_str(), core.version.as_str()), ("", "v1"));
    }
}
