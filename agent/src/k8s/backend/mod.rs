//! Mesh backends: what carries the links in force in a cluster. Each backend is one module that
//! names the kinds it writes (the controller lists, applies and prunes exactly those, and the
//! Helm chart's Roles grant exactly those) and renders the objects the links want:
//!
//! | [`Mode`] | module | carries links with | peers' addresses |
//! |---|---|---|---|
//! | `istio` | [`istio`] | mesh-config's Istio objects and the gateways' credentials Secret | a VIP per peer |
//! | `relay` | [`relay`] | fedmesh's QUIC relay, one `Service` per peer in front of the agent pod | the Service's ClusterIP |
//!
//! Adding a backend (Linkerd, Cilium) is one module with its `KINDS` and its render, one
//! [`Mode`] variant dispatched here, and its rules in the chart (`crdgen rbac` writes them from
//! `KINDS`; `scripts/drift-check` keeps the chart in step). Nothing else matches on the mode.

pub mod istio;
pub mod relay;

use std::{collections::BTreeMap, fmt, net::IpAddr};

use fedmesh_documents::NodeRef;
use fedmesh_mesh_config::{ObjectKey, RenderOptions};
use serde_json::Value;

use super::{
    Result, Settings,
    desired::{Desired, Inputs, Memory},
    resources::{Kind, Place},
};

/// How the links are carried in the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, clap::ValueEnum)]
pub enum Mode {
    /// Istio objects rendered by mesh-config.
    Istio,
    /// fedmesh's QUIC relay, one Service per peer in front of the agent pod.
    Relay,
}

impl Mode {
    /// Every backend, in the order detection prefers them.
    pub const ALL: [Self; 2] = [Self::Istio, Self::Relay];

    /// The name on the command line and in the chart's `mode` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Istio => "istio",
            Self::Relay => "relay",
        }
    }

    /// The kinds this backend writes, in the order they are listed.
    pub fn kinds(self) -> &'static [Kind] {
        match self {
            Self::Istio => istio::KINDS,
            Self::Relay => relay::KINDS,
        }
    }

    /// Whether fedmesh's relay carries every link and the node advertises a relay address
    /// (otherwise its gateway, and the relay carries only the links of peers the gateways
    /// cannot reach: [`Placement::carried`](super::Placement::carried)).
    pub fn relay_carries(self) -> bool {
        match self {
            Self::Istio => false,
            Self::Relay => true,
        }
    }

    /// Whether the render needs this node's certificate and key (for gateways).
    pub fn needs_credentials(self) -> bool {
        match self {
            Self::Istio => true,
            Self::Relay => false,
        }
    }

    /// The backend the cluster supports, given the API groups it serves (name, versions):
    /// Istio when its groups are served, else the relay.
    pub fn detect(groups: &[(String, Vec<String>)]) -> Self {
        if istio::served(groups) {
            Self::Istio
        } else {
            Self::Relay
        }
    }

    /// Checks the options this backend depends on against the agent's namespace.
    pub fn check(self, render: &RenderOptions, namespace: &str) -> Result<()> {
        match self {
            Self::Istio => istio::check(render, namespace),
            Self::Relay => Ok(()),
        }
    }

    /// Renders the objects the links in force want into `desired` (objects, and what the
    /// backend remembers and reports).
    pub(super) fn render(
        self,
        settings: &Settings,
        inputs: &Inputs<'_>,
        memory: &Memory,
        desired: &mut Desired,
    ) -> Result<()> {
        match self {
            Self::Istio => istio::render(settings, inputs, memory, desired),
            Self::Relay => relay::render(settings, memory, inputs.node, desired),
        }
    }

    /// Where algorithm pods reach each peer, once the objects are served.
    pub(super) fn addresses(
        self,
        desired: &Desired,
        served: &BTreeMap<ObjectKey, Value>,
    ) -> BTreeMap<NodeRef, IpAddr> {
        match self {
            Self::Istio => istio::addresses(desired),
            Self::Relay => relay::addresses(desired, served),
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One RBAC rule a backend needs: these resources of one API group, in one place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// Where.
    pub place: Place,
    /// The API group (`""` for the core group).
    pub group: &'static str,
    /// The resources, sorted.
    pub resources: Vec<&'static str>,
}

/// The verbs the controller uses on every kind it writes: list (compare and prune), create and
/// patch (server-side apply), delete (prune).
pub const VERBS: [&str; 4] = ["create", "delete", "list", "patch"];

/// The RBAC rules `mode` needs: its kinds grouped by place and API group.
pub fn rules(mode: Mode) -> Vec<Rule> {
    let mut grouped: BTreeMap<(u8, &str), Vec<&str>> = BTreeMap::new();
    for kind in mode.kinds() {
        let place = match kind.place {
            Place::Agent => 0,
            Place::Algorithm => 1,
        };
        let group = kind.api_version.split_once('/').map_or("", |(g, _)| g);
        let resources = grouped.entry((place, group)).or_default();
        if !resources.contains(&kind.plural) {
            resources.push(kind.plural);
        }
    }
    grouped
        .into_iter()
        .map(|((place, group), mut resources)| {
            resources.sort_unstable();
            Rule {
                place: if place == 0 {
                    Place::Agent
                } else {
                    Place::Algorithm
                },
                group,
                resources,
            }
        })
        .collect()
}

/// The chart's generated RBAC rules (`charts/fedmesh-agent/templates/_rbac-rules.tpl`): one
/// named template per (backend, place), included by the chart's `rbac.yaml`.
pub fn chart_rules() -> String {
    let mut out = String::from(
        "{{- /* Generated by `cargo run -q -p fedmesh-agent --bin crdgen -- rbac` from the kinds \
         each mesh backend writes (agent/src/k8s/backend/); do not edit. */ -}}\n",
    );
    let verbs = VERBS.map(|v| format!("{v:?}")).join(", ");
    for mode in Mode::ALL {
        let rules = rules(mode);
        for (place, name) in [(Place::Agent, "agent"), (Place::Algorithm, "algorithm")] {
            let here: Vec<&Rule> = rules.iter().filter(|r| r.place == place).collect();
            if here.is_empty() {
                continue;
            }
            out.push_str(&format!(
                "{{{{- define \"fedmesh-agent.rules.{mode}.{name}\" -}}}}\n"
            ));
            for rule in here {
                let resources = rule
                    .resources
                    .iter()
                    .map(|r| format!("{r:?}"))
                    .collect::<Vec<_>>()
                    .join(", ");
                out.push_str(&format!(
                    "- apiGroups: [{:?}]\n  resources: [{resources}]\n  verbs: [{verbs}]\n",
                    rule.group
                ));
            }
            out.push_str("{{- end }}\n");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detection_needs_every_istio_group_at_v1() {
        let groups = |names: &[(&str, &str)]| -> Vec<(String, Vec<String>)> {
            names
                .iter()
                .map(|(n, v)| ((*n).to_owned(), vec![(*v).to_owned()]))
                .collect()
        };
        let both = groups(&[("networking.istio.io", "v1"), ("security.istio.io", "v1")]);
        assert_eq!(Mode::detect(&both), Mode::Istio);
        let beta = groups(&[
            ("networking.istio.io", "v1beta1"),
            ("security.istio.io", "v1"),
        ]);
        assert_eq!(Mode::detect(&beta), Mode::Relay);
        assert_eq!(Mode::detect(&groups(&[("apps", "v1")])), Mode::Relay);
    }

    #[test]
    fn rules_group_each_backend_s_kinds() {
        assert_eq!(
            rules(Mode::Relay),
            [Rule {
                place: Place::Agent,
                group: "",
                resources: vec!["services"],
            }]
        );
        let istio = rules(Mode::Istio);
        assert_eq!(
            istio
                .iter()
                .map(|r| (r.place, r.group, r.resources.join(",")))
                .collect::<Vec<_>>(),
            [
                (Place::Agent, "", "secrets".to_owned()),
                (
                    Place::Agent,
                    "networking.istio.io",
                    "destinationrules,gateways,serviceentries,virtualservices".to_owned()
                ),
                (
                    Place::Agent,
                    "security.istio.io",
                    "authorizationpolicies".to_owned()
                ),
                (
                    Place::Algorithm,
                    "networking.istio.io",
                    "sidecars".to_owned()
                ),
                (
                    Place::Algorithm,
                    "networking.k8s.io",
                    "networkpolicies".to_owned()
                ),
                (
                    Place::Algorithm,
                    "security.istio.io",
                    "authorizationpolicies,peerauthentications".to_owned()
                ),
            ]
        );
        for mode in Mode::ALL {
            assert_eq!(mode.to_string(), mode.as_str());
        }
    }
}
