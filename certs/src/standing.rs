//! A peer's standing in its collaboration (pure): whether a certificate that chains to the
//! collaboration CA may still complete a handshake. The chain says who the peer is; the standing
//! says whether the owner still lets it in: its certificate serial and its node must not be on
//! the owner's revocation list, and the node must be a member.
//!
//! ```text
//!  verified ledger ──(revoked serials, revoked nodes, members)──▶ Standing
//!  handshake: chain ok ──▶ Standing::check(id, serial) ──▶ accept | Refused(why)
//! ```
//!
//! The caller (the relay) builds a new [`Standing`] whenever its verified ledger changes and hands
//! it to the verifiers through a [`crate::tls::PeerGate`]; nothing here reads files, clocks or
//! sockets.

use std::collections::BTreeSet;

use crate::{Error, Result, SpiffeId};

/// Why a peer with a valid chain is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Refused {
    /// Its certificate serial is on the owner's revocation list.
    SerialRevoked,
    /// Its node is on the owner's revocation list.
    NodeRevoked,
    /// Its node is not a member of the collaboration.
    NotMember,
    /// The members are not known yet (no verified collaboration document).
    MembersUnknown,
}

impl Refused {
    /// A short label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SerialRevoked => "revoked_serial",
            Self::NodeRevoked => "revoked_node",
            Self::NotMember => "not_member",
            Self::MembersUnknown => "members_unknown",
        }
    }
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::SerialRevoked => "its certificate serial is revoked",
            Self::NodeRevoked => "its node is revoked",
            Self::NotMember => "its node is not a member of the collaboration",
            Self::MembersUnknown => {
                "the collaboration's members are not known yet (no verified collaboration document)"
            }
        })
    }
}

/// Who may complete a handshake besides a valid chain. The default knows no members, so it
/// refuses everyone: default deny until a verified collaboration document says otherwise.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Standing {
    revoked_serials: BTreeSet<String>,
    revoked_nodes: BTreeSet<(String, String)>,
    members: Option<BTreeSet<(String, String)>>,
}

impl Standing {
    /// The standing under a collaboration with `members` (`(org, node)`), and an owner's
    /// revocation list of `revoked_nodes` (`(org, node)`) and `revoked_serials` (hex, any case,
    /// with or without `:` separators).
    pub fn new(
        members: impl IntoIterator<Item = (String, String)>,
        revoked_nodes: impl IntoIterator<Item = (String, String)>,
        revoked_serials: impl IntoIterator<Item = String>,
    ) -> Self {
        Self {
            members: Some(members.into_iter().collect()),
            revoked_nodes: revoked_nodes.into_iter().collect(),
            revoked_serials: revoked_serials
                .into_iter()
                .map(|s| normalize_serial(&s))
                .collect(),
        }
    }

    /// Whether the peer `id`, presenting a certificate with serial `serial` (hex), may complete a
    /// handshake.
    pub fn check(&self, id: &SpiffeId, serial: &str) -> Result<()> {
        let refuse = |why: Refused| {
            Err(Error::PeerRefused {
                id: id.to_string(),
                serial: serial.to_owned(),
                why,
            })
        };
        if self.revoked_serials.contains(&normalize_serial(serial)) {
            return refuse(Refused::SerialRevoked);
        }
        self.check_node(id.org(), id.node()).or_else(refuse)
    }
}

impl Standing {
    /// The members (`(org, node)`) the collaboration document lists, revoked or not.
    pub fn members(&self) -> impl Iterator<Item = (&str, &str)> {
        self.members
            .iter()
            .flatten()
            .map(|(org, node)| (org.as_str(), node.as_str()))
    }

    /// Whether the node `org/node` stands, whatever certificate it presents: a member, not
    /// revoked. For a party that never sees the node's certificate (a rendezvous replica handed
    /// a datagram by another replica, which checked the serial); serials are checked where the
    /// certificate is seen, with [`Standing::check`].
    pub fn check_node(&self, org: &str, node: &str) -> std::result::Result<(), Refused> {
        let node = (org.to_owned(), node.to_owned());
        if self.revoked_nodes.contains(&node) {
            return Err(Refused::NodeRevoked);
        }
        match &self.members {
            None => Err(Refused::MembersUnknown),
            Some(members) if !members.contains(&node) => Err(Refused::NotMember),
            Some(_) => Ok(()),
        }
    }
}

/// Serials compare as lower-case hex without separators or leading zeros.
fn normalize_serial(serial: &str) -> String {
    let hex: String = serial
        .chars()
        .filter(|c| *c != ':')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    match hex.trim_start_matches('0') {
        "" => "0".to_owned(),
        rest => rest.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(org: &str) -> SpiffeId {
        SpiffeId::new("c", org, "n1").unwrap()
    }

    fn pair(org: &str) -> (String, String) {
        (org.to_owned(), "n1".to_owned())
    }

    fn why(result: Result<()>) -> Refused {
        match result {
            Err(Error::PeerRefused { why, .. }) => why,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn nothing_known_refuses_everyone() {
        assert_eq!(
            why(Standing::default().check(&id("a"), "01")),
            Refused::MembersUnknown
        );
    }

    #[test]
    fn members_pass_unless_their_serial_or_node_is_revoked() {
        let s = Standing::new(
            [pair("a"), pair("b"), pair("c")],
            [pair("b")],
            ["0A:BC".to_owned()],
        );
        assert!(s.check(&id("a"), "1234").is_ok());
        assert_eq!(why(s.check(&id("a"), "abc")), Refused::SerialRevoked);
        assert_eq!(
            why(s.check(&id("a"), "00:0a:bc")),
            Refused::SerialRevoked,
            "serials compare without case, separators or leading zeros"
        );
        assert_eq!(why(s.check(&id("b"), "1234")), Refused::NodeRevoked);
        assert_eq!(why(s.check(&id("z"), "1234")), Refused::NotMember);
    }

    #[test]
    fn refusals_name_the_peer_and_its_serial() {
        let s = Standing::new([pair("a")], [], ["ff".to_owned()]);
        let err = s.check(&id("a"), "ff").unwrap_err().to_string();
        assert_eq!(
            err,
            "peer spiffe://c.fedmesh/org/a/node/n1 (certificate serial ff) is refused: \
             its certificate serial is revoked"
        );
    }
}
