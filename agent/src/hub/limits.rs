//! What the hub bounds: connections (see [`crate::serve`]), request rates per source address and
//! per identity, storage per member and per collaboration, and collaborations being created.
//!
//! | bound | default | refused with |
//! |---|---|---|
//! | requests per source IP | 50/s, bursts of 200 | 429 |
//! | stored documents per identity (node or owner) | 2/s, bursts of 120 | 429 |
//! | storage per member node | 1024 documents, 4 MiB | 403 naming the quota |
//! | storage per collaboration | 100000 documents, 256 MiB | 403 naming the quota |
//! | online CAs waiting for their collaboration | 64, each for 1 h | 503 |

use std::{num::NonZeroU32, time::Duration};

use governor::{DefaultKeyedRateLimiter, Quota};

use crate::serve::Bounds;

/// A rate: `burst` at once, then one more every `every`.
#[derive(Clone, Copy, Debug)]
pub struct Rate {
    /// Requests allowed at once.
    pub burst: u32,
    /// Time to earn one more.
    pub every: Duration,
}

/// A storage quota.
#[derive(Clone, Copy, Debug)]
pub struct StorageQuota {
    /// Documents stored.
    pub docs: usize,
    /// Bytes of signed documents stored.
    pub bytes: usize,
}

/// Everything the hub bounds.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections and request reading.
    pub connections: Bounds,
    /// Requests per source IP address.
    pub requests_per_ip: Rate,
    /// Documents stored per identity (a node, or an owner).
    pub writes_per_identity: Rate,
    /// Storage per member node.
    pub member_quota: StorageQuota,
    /// Storage per collaboration.
    pub collab_quota: StorageQuota,
    /// Online CAs made before their collaboration document arrived, at most.
    pub max_pending_cas: usize,
    /// How long such a CA waits for its collaboration document.
    pub pending_ca_ttl: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            connections: Bounds {
                max_body_bytes: super::api::MAX_BODY_BYTES,
                ..Bounds::default()
            },
            requests_per_ip: Rate {
                burst: 200,
                every: Duration::from_millis(20),
            },
            writes_per_identity: Rate {
                burst: 120,
                every: Duration::from_millis(500),
            },
            member_quota: StorageQuota {
                docs: 1024,
                bytes: 4 << 20,
            },
            collab_quota: StorageQuota {
                docs: 100_000,
                bytes: 256 << 20,
            },
            max_pending_cas: 64,
            pending_ca_ttl: Duration::from_secs(3600),
        }
    }
}

/// Most keys a limiter tracks; past that, new keys share one.
const MAX_KEYS: usize = 16_384;

/// A rate limiter per key (an IP address, an identity), with bounded memory.
pub(crate) struct Limiter {
    limiter: DefaultKeyedRateLimiter<String>,
}

impl Limiter {
    pub(crate) fn new(rate: Rate) -> Self {
        let burst = NonZeroU32::new(rate.burst.max(1)).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::with_period(rate.every.max(Duration::from_nanos(1)))
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
            .allow_burst(burst);
        Self {
            limiter: DefaultKeyedRateLimiter::keyed(quota),
        }
    }

    /// `Ok` to go ahead, or how long until `key` may try again.
    pub(crate) fn check(&self, key: &str) -> Result<(), Duration> {
        let mut key = key.to_owned();
        if self.limiter.len() >= MAX_KEYS {
            self.limiter.retain_recent();
            if self.limiter.len() >= MAX_KEYS {
                key = crate::throttle::OVERFLOW.to_owned();
            }
        }
        self.limiter.check_key(&key).map_err(|not_until| {
            not_until.wait_time_from(governor::clock::Clock::now(
                &governor::clock::DefaultClock::default(),
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate() {
        let l = Limiter::new(Rate {
            burst: 3,
            every: Duration::from_secs(60),
        });
        for _ in 0..3 {
            l.check("a").unwrap();
        }
        let wait = l.check("a").unwrap_err();
        assert!(wait > Duration::from_secs(50), "{wait:?}");
        l.check("b").unwrap();
    }
}
