//! Stable IPv4 addresses for peers, taken from a pool.
//!
//! Istio mode gives every peer a ServiceEntry VIP from `240.241.0.0/16`; the relay gives every
//! peer a loopback address from a `127.x.y.z/n` pool. Both use [`assign`]:
//!
//! - an address assigned before (the `previous` map, persisted by the caller) is kept as long as
//!   the key is still wanted and the address is still a usable address of the pool;
//! - a new key gets the slot its name hashes to (FNV-1a of the key's `Display` form, so the
//!   same name gets the same first choice on every machine and every run), probing upwards
//!   past taken slots;
//! - the network and broadcast addresses are never handed out, and no two keys share one;
//! - when there is no room, the caller gets [`Error::PoolFull`], not a partial answer.
//!
//! ```
//! use std::collections::BTreeMap;
//! use fedmesh_mesh_config::addresses::{assign, Pool};
//!
//! let pool: Pool = "127.0.10.0/24".parse()?;
//! let first = assign(&pool, &BTreeMap::new(), ["org-b/n1", "org-c/n1"])?;
//! // Feeding the result back keeps every address, whatever else joins.
//! let again = assign(&pool, &first, ["org-d/n1", "org-c/n1", "org-b/n1"])?;
//! assert_eq!(first["org-b/n1"], again["org-b/n1"]);
//! assert_eq!(first["org-c/n1"], again["org-c/n1"]);
//! # Ok::<(), fedmesh_mesh_config::Error>(())
//! ```

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::Ipv4Addr,
    str::FromStr,
};

use fedmesh_documents::NodeRef;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// An IPv4 network to hand addresses out of, e.g. `240.241.0.0/16`. At most a `/30`, so there
/// is a usable address between the network and broadcast addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Pool {
    network: Ipv4Addr,
    prefix: u8,
}

impl Pool {
    /// `240.241.0.0/16`, the default ServiceEntry VIP pool (next to Istio's own 240.240.0.0/16).
    pub const DEFAULT_VIPS: Self = Self {
        network: Ipv4Addr::new(240, 241, 0, 0),
        prefix: 16,
    };

    /// The pool `network/prefix`. The host bits of `network` must be zero.
    pub fn new(network: Ipv4Addr, prefix: u8) -> Result<Self> {
        let fail = |reason: String| Error::Pool {
            pool: format!("{network}/{prefix}"),
            reason,
        };
        if !(1..=30).contains(&prefix) {
            return Err(fail(format!(
                "prefix /{prefix} is out of range; use /1 to /30"
            )));
        }
        if u32::from(network) & !mask(prefix) != 0 {
            let base = Ipv4Addr::from(u32::from(network) & mask(prefix));
            return Err(fail(format!(
                "host bits are set; did you mean {base}/{prefix}?"
            )));
        }
        Ok(Self { network, prefix })
    }

    /// The network address.
    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// How many addresses can be handed out (all but the network and broadcast addresses).
    pub fn capacity(&self) -> u64 {
        (1u64 << (32 - u32::from(self.prefix))) - 2
    }

    /// Whether `ip` is one the pool hands out: inside it, and neither network nor broadcast.
    pub fn is_usable(&self, ip: Ipv4Addr) -> bool {
        self.slot_of(ip).is_some()
    }

    /// Whether the two pools share any address.
    pub fn overlaps(&self, other: &Self) -> bool {
        let shorter = self.prefix.min(other.prefix);
        u32::from(self.network) & mask(shorter) == u32::from(other.network) & mask(shorter)
    }

    /// The `slot`-th usable address (0-based); `slot < capacity()`.
    fn address(&self, slot: u64) -> Ipv4Addr {
        // The capacity of a /1 is below 2^31, so slot + 1 always fits a u32.
        let offset = u32::try_from(slot + 1).unwrap_or(u32::MAX);
        Ipv4Addr::from(u32::from(self.network) + offset)
    }

    /// The slot of `ip`, when it is a usable address of the pool.
    fn slot_of(&self, ip: Ipv4Addr) -> Option<u64> {
        let ip = u32::from(ip);
        if ip & mask(self.prefix) != u32::from(self.network) {
            return None;
        }
        let offset = u64::from(ip - u32::from(self.network));
        (1..=self.capacity()).contains(&offset).then(|| offset - 1)
    }
}

fn mask(prefix: u8) -> u32 {
    u32::MAX
        .checked_shl(32 - u32::from(prefix))
        .unwrap_or_default()
}

impl fmt::Display for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl FromStr for Pool {
    type Err = Error;

    /// Parses `a.b.c.d/n`.
    fn from_str(s: &str) -> Result<Self> {
        let fail = |reason: &str| Error::Pool {
            pool: s.to_owned(),
            reason: reason.to_owned(),
        };
        let (ip, prefix) = s
            .split_once('/')
            .ok_or_else(|| fail("expected an IPv4 network like 240.241.0.0/16"))?;
        let ip: Ipv4Addr = ip
            .parse()
            .map_err(|_| fail("the network is not an IPv4 address"))?;
        let prefix: u8 = prefix
            .parse()
            .map_err(|_| fail("the prefix length is not a number"))?;
        Self::new(ip, prefix)
    }
}

impl TryFrom<String> for Pool {
    type Error = Error;

    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<Pool> for String {
    fn from(p: Pool) -> Self {
        p.to_string()
    }
}

/// Assigns every key in `wanted` an address of `pool`, keeping what `previous` assigned.
///
/// Returns exactly the wanted keys. Keys are compared by `Ord` and hashed by their `Display`
/// form, so use a key whose text names it (`NodeRef` displays as `org/node`). Entries of
/// `previous` that are no longer wanted are dropped (persist the result to remember them);
/// entries outside the pool (the pool changed) are assigned afresh; when two previous keys hold
/// the same address, the smaller key keeps it.
pub fn assign<K, I>(
    pool: &Pool,
    previous: &BTreeMap<K, Ipv4Addr>,
    wanted: I,
) -> Result<BTreeMap<K, Ipv4Addr>>
where
    K: Ord + Clone + fmt::Display,
    I: IntoIterator<Item = K>,
{
    let wanted: BTreeSet<K> = wanted.into_iter().collect();
    let capacity = pool.capacity();
    if u64::try_from(wanted.len()).unwrap_or(u64::MAX) > capacity {
        return Err(Error::PoolFull {
            pool: pool.to_string(),
            wanted: wanted.len(),
            capacity,
        });
    }
    let mut taken = BTreeSet::new();
    let mut out = BTreeMap::new();
    let mut fresh = Vec::new();
    for key in wanted {
        match previous.get(&key).and_then(|ip| pool.slot_of(*ip)) {
            Some(slot) if taken.insert(slot) => {
                out.insert(key, pool.address(slot));
            }
            _ => fresh.push(key),
        }
    }
    for key in fresh {
        let start = fnv1a(key.to_string().as_bytes()) % capacity;
        // There is room (checked above), so probing finds a free slot within `capacity` steps.
        let slot = (0..capacity)
            .map(|step| (start + step) % capacity)
            .find(|slot| !taken.contains(slot))
            .ok_or_else(|| Error::PoolFull {
                pool: pool.to_string(),
                wanted: out.len() + 1,
                capacity,
            })?;
        taken.insert(slot);
        out.insert(key, pool.address(slot));
    }
    Ok(out)
}

/// Pod ports `first-last` (inclusive) the fedmesh agent listens on, one per (peer, port) it
/// carries (relay mode's per-peer Services, Istio mode's ServiceEntries of peers the agent
/// carries lead there).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PortRange {
    first: u16,
    last: u16,
}

impl PortRange {
    /// The default: `20000-29999`.
    pub const DEFAULT: Self = Self {
        first: 20_000,
        last: 29_999,
    };

    fn len(self) -> u32 {
        u32::from(self.last) - u32::from(self.first) + 1
    }
}

impl Default for PortRange {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

impl FromStr for PortRange {
    type Err = String;

    /// Parses `20000-29999`. Ports below 1024 are refused: the agent runs as non-root.
    fn from_str(s: &str) -> Result<Self, String> {
        let (first, last) = s
            .split_once('-')
            .ok_or_else(|| format!("{s:?} is not <first>-<last>, e.g. 20000-29999"))?;
        let port = |p: &str| {
            p.trim()
                .parse::<u16>()
                .map_err(|_| format!("{p:?} is not a port"))
        };
        let (first, last) = (port(first)?, port(last)?);
        if first < 1024 || first > last {
            return Err(format!(
                "{s:?}: need 1024 <= first <= last (the agent runs as non-root)"
            ));
        }
        Ok(Self { first, last })
    }
}

impl TryFrom<String> for PortRange {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<PortRange> for String {
    fn from(r: PortRange) -> Self {
        r.to_string()
    }
}

/// Gives every wanted (peer, port) a pod port of `range`, keeping `previous` allocations while
/// still in the range: deterministic (the `<org>/<node>:<port>` hash picks the first choice)
/// and stable (a newcomer never moves an allocation).
pub fn allocate_ports(
    range: PortRange,
    previous: &BTreeMap<NodeRef, BTreeMap<u16, u16>>,
    wanted: impl IntoIterator<Item = (NodeRef, u16)>,
) -> Result<BTreeMap<NodeRef, BTreeMap<u16, u16>>> {
    let wanted: BTreeSet<(NodeRef, u16)> = wanted.into_iter().collect();
    let size = range.len();
    let full = |wanted: usize| Error::PoolFull {
        pool: format!("pod ports {range}"),
        wanted,
        capacity: u64::from(size),
    };
    if wanted.len() > size as usize {
        return Err(full(wanted.len()));
    }
    let in_range = |p: u16| (range.first..=range.last).contains(&p);
    let mut taken = BTreeSet::new();
    let mut out: BTreeMap<NodeRef, BTreeMap<u16, u16>> = BTreeMap::new();
    let mut fresh = Vec::new();
    for (peer, port) in wanted {
        match previous.get(&peer).and_then(|p| p.get(&port)) {
            Some(pod) if in_range(*pod) && taken.insert(*pod) => {
                out.entry(peer).or_default().insert(port, *pod);
            }
            _ => fresh.push((peer, port)),
        }
    }
    for (peer, port) in fresh {
        let start = (fnv1a(format!("{peer}:{port}").as_bytes()) % u64::from(size)) as u32;
        let pod = (0..size)
            .map(|step| range.first + ((start + step) % size) as u16)
            .find(|p| !taken.contains(p))
            .ok_or_else(|| full(taken.len() + 1))?;
        taken.insert(pod);
        out.entry(peer).or_default().insert(port, pod);
    }
    Ok(out)
}

/// 64-bit FNV-1a: tiny, and the same on every platform and Rust version.
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(s: &str) -> Pool {
        s.parse().unwrap()
    }

    #[test]
    fn pools_parse_and_refuse() {
        let p = pool("240.241.0.0/16");
        assert_eq!(p.to_string(), "240.241.0.0/16");
        assert_eq!(p.capacity(), 65_534);
        assert_eq!(pool("127.0.10.0/30").capacity(), 2);
        let err = |s: &str| s.parse::<Pool>().unwrap_err().to_string();
        assert_eq!(
            err("240.241.0.1/16"),
            "address pool 240.241.0.1/16: host bits are set; did you mean 240.241.0.0/16?"
        );
        assert_eq!(
            err("10.0.0.0/31"),
            "address pool 10.0.0.0/31: prefix /31 is out of range; use /1 to /30"
        );
        assert!(err("10.0.0.0").contains("expected an IPv4 network"));
        assert!(err("10.0.0/8").contains("not an IPv4 address"));
        assert!(err("10.0.0.0/x").contains("not a number"));
    }

    #[test]
    fn overlap_is_symmetric_and_exact() {
        let istio = pool("240.240.0.0/16");
        assert!(pool("240.0.0.0/8").overlaps(&istio));
        assert!(istio.overlaps(&pool("240.0.0.0/8")));
        assert!(pool("240.240.128.0/24").overlaps(&istio));
        assert!(!pool("240.241.0.0/16").overlaps(&istio));
    }

    #[test]
    fn network_and_broadcast_are_never_used() {
        let p = pool("10.9.8.0/30");
        let got = assign(&p, &BTreeMap::new(), ["a", "b"]).unwrap();
        let ips: BTreeSet<Ipv4Addr> = got.values().copied().collect();
        assert_eq!(
            ips,
            BTreeSet::from([Ipv4Addr::new(10, 9, 8, 1), Ipv4Addr::new(10, 9, 8, 2)])
        );
        assert!(!p.is_usable(Ipv4Addr::new(10, 9, 8, 0)));
        assert!(!p.is_usable(Ipv4Addr::new(10, 9, 8, 3)));
    }

    #[test]
    fn full_pool_is_an_error() {
        let err = assign(&pool("10.9.8.0/30"), &BTreeMap::new(), ["a", "b", "c"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "address pool 10.9.8.0/30 is full: 3 addresses wanted, 2 usable"
        );
    }

    #[test]
    fn first_choice_is_the_hash_slot() {
        let p = pool("127.0.10.0/24");
        let got = assign(&p, &BTreeMap::new(), ["org-b/n1"]).unwrap();
        let slot = fnv1a(b"org-b/n1") % 254;
        assert_eq!(got["org-b/n1"], p.address(slot));
    }

    #[test]
    fn previous_assignments_are_kept_and_stale_ones_replaced() {
        let p = pool("127.0.10.0/24");
        let previous = BTreeMap::from([
            ("a", Ipv4Addr::new(127, 0, 10, 7)),
            ("b", Ipv4Addr::new(127, 0, 10, 7)), // duplicate: "a" keeps it
            ("c", Ipv4Addr::new(10, 0, 0, 1)),   // outside the pool: reassigned
            ("d", Ipv4Addr::new(127, 0, 10, 255)), // broadcast: reassigned
            ("gone", Ipv4Addr::new(127, 0, 10, 9)),
        ]);
        let got = assign(&p, &previous, ["a", "b", "c", "d"]).unwrap();
        assert_eq!(got.len(), 4);
        assert_eq!(got["a"], Ipv4Addr::new(127, 0, 10, 7));
        for k in ["b", "c", "d"] {
            assert!(p.is_usable(got[k]), "{k}: {}", got[k]);
            assert_ne!(got[k], Ipv4Addr::new(127, 0, 10, 7));
        }
        let unique: BTreeSet<_> = got.values().collect();
        assert_eq!(unique.len(), 4);
    }

    #[test]
    fn probing_fills_a_small_pool_without_sharing() {
        let p = pool("10.0.0.0/28");
        let keys: Vec<String> = (0..14).map(|i| format!("k{i}")).collect();
        let got = assign(&p, &BTreeMap::new(), keys.clone()).unwrap();
        let unique: BTreeSet<_> = got.values().collect();
        assert_eq!(unique.len(), 14);
        assert!(got.values().all(|ip| p.is_usable(*ip)));
        // Order of the wanted keys does not matter.
        let mut reversed = keys;
        reversed.reverse();
        assert_eq!(assign(&p, &BTreeMap::new(), reversed).unwrap(), got);
    }
}
