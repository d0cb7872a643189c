//! Admission (pure): which (peer, port) pairs the effective links allow, in each direction, and
//! how many streams a peer's links let it open at once.

use std::collections::BTreeMap;

use fedmesh_documents::{EffectiveLink, NodeRef};

/// The link behind an admitted (peer, port).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    /// The link id.
    pub link_id: String,
    /// The port's label.
    pub label: Option<String>,
    /// Unix expiry.
    pub not_after: u64,
    /// The link's byte budget, if it has one.
    pub max_bytes: Option<u64>,
    /// The link's concurrent-stream budget, if it has one.
    pub max_streams: Option<u32>,
}

/// What this node may dial and what it must accept, by (peer, port).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    outbound: BTreeMap<(NodeRef, u16), Grant>,
    inbound: BTreeMap<(NodeRef, u16), Grant>,
}

impl Policy {
    /// The policy of node `local` under `links` (links not touching `local` are ignored; when
    /// two links cover the same pair, the one that lasts longer wins).
    pub fn new(local: &NodeRef, links: &[EffectiveLink]) -> Self {
        let mut policy = Self::default();
        for link in links {
            let t = &link.terms;
            let (map, peer) = if t.from == *local {
                (&mut policy.outbound, &t.to)
            } else if t.to == *local {
                (&mut policy.inbound, &t.from)
            } else {
                continue;
            };
            for p in &t.ports {
                let grant = Grant {
                    link_id: t.id.clone(),
                    label: p.label.clone(),
                    not_after: t.not_after,
                    max_bytes: t.max_bytes,
                    max_streams: t.max_streams,
                };
                let key = (peer.clone(), p.port);
                if map.get(&key).is_none_or(|g| g.not_after < grant.not_after) {
                    map.insert(key, grant);
                }
            }
        }
        policy
    }

    /// Whether `from` may open a stream to this node's `port`.
    pub fn admits_inbound(&self, from: &NodeRef, port: u16) -> Option<&Grant> {
        self.inbound.get(&(from.clone(), port))
    }

    /// Whether this node may open a stream to `to`'s `port`.
    pub fn admits_outbound(&self, to: &NodeRef, port: u16) -> Option<&Grant> {
        self.outbound.get(&(to.clone(), port))
    }

    /// Every (peer, port) this node may dial.
    pub fn outbound(&self) -> impl Iterator<Item = (&NodeRef, u16, &Grant)> {
        self.outbound.iter().map(|((n, p), g)| (n, *p, g))
    }

    /// Every (peer, port) that may dial this node.
    pub fn inbound(&self) -> impl Iterator<Item = (&NodeRef, u16, &Grant)> {
        self.inbound.iter().map(|((n, p), g)| (n, *p, g))
    }

    /// How many streams `peer` may open to this node at once under its links (the sum of their
    /// stream budgets, a link without one counting as `ceiling`, at most `ceiling`), or `None`
    /// when no link joins this node and `peer` in either direction.
    pub fn inbound_streams(&self, peer: &NodeRef, ceiling: u32) -> Option<u32> {
        let mut linked = self.outbound.keys().any(|(p, _)| p == peer);
        let mut seen = std::collections::BTreeSet::new();
        let mut sum: u32 = 0;
        for ((p, _), g) in &self.inbound {
            if p != peer {
                continue;
            }
            linked = true;
            if seen.insert(g.link_id.as_str()) {
                sum = sum.saturating_add(g.max_streams.unwrap_or(ceiling));
            }
        }
        linked.then_some(sum.min(ceiling))
    }

    /// Every grant, both directions.
    pub fn grants(&self) -> impl Iterator<Item = &Grant> {
        self.outbound.values().chain(self.inbound.values())
    }

    /// Number of distinct links in force.
    pub fn link_count(&self) -> usize {
        let ids: std::collections::BTreeSet<&str> = self
            .outbound
            .values()
            .chain(self.inbound.values())
            .map(|g| g.link_id.as_str())
            .collect();
        ids.len()
    }
}

#[cfg(test)]
mod tests {
    use fedmesh_documents::LinkTerms;

    use super::*;

    fn link(from: &str, to: &str, ports: &[&str], not_after: u64) -> EffectiveLink {
        EffectiveLink {
            terms: LinkTerms::new(
                "c",
                from.parse().unwrap(),
                to.parse().unwrap(),
                ports.iter().map(|p| p.parse().unwrap()).collect(),
                not_after,
                None,
            )
            .unwrap(),
            approved_by: "owner".into(),
            approved_at: 0,
        }
    }

    #[test]
    fn directions_are_kept_apart() {
        let a: NodeRef = "a/n".parse().unwrap();
        let b: NodeRef = "b/n".parse().unwrap();
        let c: NodeRef = "c/n".parse().unwrap();
        let links = [
            link("a/n", "b/n", &["11366:mpc"], 100),
            link("c/n", "a/n", &["8080"], 100),
            link("b/n", "c/n", &["1"], 100),
        ];
        let p = Policy::new(&a, &links);
        assert!(p.admits_outbound(&b, 11366).is_some());
        assert!(
            p.admits_inbound(&b, 11366).is_none(),
            "a link does not open the way back"
        );
        assert!(
            p.admits_outbound(&b, 11367).is_none(),
            "only the approved port"
        );
        assert!(p.admits_inbound(&c, 8080).is_some());
        assert!(
            p.admits_outbound(&c, 1).is_none(),
            "other nodes' links do not count"
        );
        assert_eq!(p.link_count(), 2);
        assert_eq!(p.outbound().count(), 1);
    }

    #[test]
    fn a_peers_streams_are_the_sum_of_its_inbound_link_budgets() {
        let a: NodeRef = "a/n".parse().unwrap();
        let with_budget = |from: &str, to: &str, port: &str, streams: Option<u32>| {
            let mut l = link(from, to, &[port], 100);
            l.terms = l.terms.with_budget(None, streams).unwrap();
            l
        };
        let links = [
            with_budget("b/n", "a/n", "1", Some(3)),
            with_budget("b/n", "a/n", "2", Some(4)),
            with_budget("a/n", "c/n", "3", Some(5)),
            with_budget("d/n", "a/n", "4", None),
        ];
        let p = Policy::new(&a, &links);
        let n = |s: &str| s.parse::<NodeRef>().unwrap();
        assert_eq!(p.inbound_streams(&n("b/n"), 100), Some(7));
        assert_eq!(
            p.inbound_streams(&n("c/n"), 100),
            Some(0),
            "an outbound link only: the peer opens nothing"
        );
        assert_eq!(
            p.inbound_streams(&n("d/n"), 100),
            Some(100),
            "no budget: the ceiling"
        );
        assert_eq!(p.inbound_streams(&n("e/n"), 100), None, "no link");
        assert_eq!(p.grants().count(), 4);
    }

    #[test]
    fn longest_lasting_grant_wins() {
        let a: NodeRef = "a/n".parse().unwrap();
        let b: NodeRef = "b/n".parse().unwrap();
        let links = [
            link("a/n", "b/n", &["1"], 50),
            link("a/n", "b/n", &["1", "2"], 90),
        ];
        let p = Policy::new(&a, &links);
        assert_eq!(p.admits_outbound(&b, 1).unwrap().not_after, 90);
        assert_eq!(p.link_count(), 1);
    }
}
