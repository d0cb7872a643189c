//! How a relay connection uses its path (pure): the congestion controller, and flow-control
//! windows sized from the path's bandwidth-delay product.
//!
//! ```text
//!  bdp = bandwidth × rtt
//!  stream window     = 2 × bdp         clamped to [MIN_STREAM_WINDOW, MAX_STREAM_WINDOW]
//!  connection window = 4 × bdp         clamped to [stream window,    MAX_CONNECTION_WINDOW]
//!  send window       = connection window
//! ```
//!
//! One stream can fill the path with room for a round trip of loss recovery; a few streams fill
//! it together; no connection ever holds more than [`MAX_CONNECTION_WINDOW`] of a peer's unread
//! data, whatever the flags say.

use std::{sync::Arc, time::Duration};

use quinn::congestion::{BbrConfig, ControllerFactory, CubicConfig, NewRenoConfig};

/// The congestion controller of the relay's QUIC connections (`--congestion`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Congestion {
    /// Model-based (bottleneck bandwidth and round-trip time): holds its rate under random
    /// loss, where loss-based controllers collapse.
    Bbr,
    /// Loss-based, the Linux TCP default; leaves slow start only on a loss (quinn's).
    Cubic,
    /// Cubic that leaves slow start before the bottleneck's queue overflows: conservative slow
    /// start from a 0.5 ms rise of the round trip, congestion avoidance from HyStart's
    /// threshold (RFC 9406), doubling only up to half the expected bandwidth-delay product
    /// (`--link-bandwidth` × `--link-rtt`), a quarter a round past it.
    CubicHystart,
    /// `cubic-hystart` that tells random loss from congestion: a loss while the latest round
    /// trips show no queue (none `min / 8`, at least 4 ms, above the path's smallest), and
    /// under 2% of a round's window (at least 2 packets), keeps the window; a loss behind a
    /// queue cuts only what drains it (10-30%). Holds a path that drops at random, where
    /// loss-based controllers collapse; behind a buffer shallower than the threshold it accepts
    /// up to 2% loss, as BBRv2 does. The default: on a 20 ms, 1 Gbit/s link it carried 0.99x
    /// direct TCP without a bottleneck drop (kernel Cubic dropped 102-382 packets), and
    /// 0.98-1.01x kernel BBR at 0.5% random loss over 40 ms (BENCHMARKS.md).
    #[default]
    CubicTolerant,
    /// Loss-based, RFC 9002's reference controller.
    NewReno,
}

impl Congestion {
    /// quinn's factory for this controller, on paths like `path` (the HyStart controllers
    /// double their window in slow start only up to half its bandwidth-delay product).
    pub fn factory(self, path: PathEstimate) -> Arc<dyn ControllerFactory + Send + Sync> {
        use super::cubic::HyStartCubicConfig;
        match self {
            Self::Bbr => Arc::new(BbrConfig::default()),
            Self::Cubic => Arc::new(CubicConfig::default()),
            Self::CubicHystart => {
                Arc::new(HyStartCubicConfig::default().doubling_up_to_half_of(path.bdp()))
            }
            Self::CubicTolerant => Arc::new(
                HyStartCubicConfig::tolerating_random_loss().doubling_up_to_half_of(path.bdp()),
            ),
            Self::NewReno => Arc::new(NewRenoConfig::default()),
        }
    }

    /// The flag value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Bbr => "bbr",
            Self::Cubic => "cubic",
            Self::CubicHystart => "cubic-hystart",
            Self::CubicTolerant => "cubic-tolerant",
            Self::NewReno => "new-reno",
        }
    }
}

/// The path a node expects to its peers (`--link-bandwidth`, `--link-rtt`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PathEstimate {
    /// Bottleneck bandwidth, bits per second.
    pub bits_per_second: u64,
    /// Round-trip time.
    pub rtt: Duration,
}

impl Default for PathEstimate {
    /// 1 Gbit/s over 32 ms: a 4 MB product (about what the relay's windows were sized for
    /// before they were configurable).
    fn default() -> Self {
        Self {
            bits_per_second: 1_000_000_000,
            rtt: Duration::from_millis(32),
        }
    }
}

impl PathEstimate {
    /// The bandwidth-delay product in bytes (saturating).
    pub fn bdp(self) -> u64 {
        let bits = u128::from(self.bits_per_second) * self.rtt.as_micros() / 1_000_000;
        u64::try_from(bits / 8).unwrap_or(u64::MAX)
    }
}

/// Smallest stream window: one that small stalls even a slow path.
pub const MIN_STREAM_WINDOW: u32 = 256 * 1024;
/// Largest stream window.
pub const MAX_STREAM_WINDOW: u32 = 32 * 1024 * 1024;
/// Largest connection window: the most unread data one peer connection can make this node
/// hold.
pub const MAX_CONNECTION_WINDOW: u32 = 64 * 1024 * 1024;

/// Flow-control windows of a linked connection, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Windows {
    /// Per stream, what the peer may send ahead of the reader.
    pub stream: u32,
    /// Per connection, over all streams.
    pub connection: u32,
    /// Per connection, what this node buffers unacknowledged.
    pub send: u32,
}

impl Windows {
    /// Windows for `path` (see the module table).
    pub fn for_path(path: PathEstimate) -> Self {
        let bdp = path.bdp();
        let clamp = |v: u64, lo: u32, hi: u32| {
            u32::try_from(v.clamp(u64::from(lo), u64::from(hi))).unwrap_or(hi)
        };
        let stream = clamp(bdp.saturating_mul(2), MIN_STREAM_WINDOW, MAX_STREAM_WINDOW);
        let connection = clamp(bdp.saturating_mul(4), stream, MAX_CONNECTION_WINDOW);
        Self {
            stream,
            connection,
            send: connection,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_path_keeps_the_former_windows() {
        let w = Windows::for_path(PathEstimate::default());
        assert_eq!(w.stream, 8_000_000);
        assert_eq!(w.connection, 16_000_000);
        assert_eq!(w.send, w.connection);
    }

    #[test]
    fn windows_follow_the_bdp_between_their_bounds() {
        // 200 Mbit/s × 40 ms = 1 MB.
        let w = Windows::for_path(PathEstimate {
            bits_per_second: 200_000_000,
            rtt: Duration::from_millis(40),
        });
        assert_eq!((w.stream, w.connection), (2_000_000, 4_000_000));
        // A LAN: the floor.
        let lan = Windows::for_path(PathEstimate {
            bits_per_second: 10_000_000_000,
            rtt: Duration::from_micros(100),
        });
        assert_eq!(lan.stream, MIN_STREAM_WINDOW);
        assert_eq!(lan.connection, 500_000);
        // Absurd flags: the caps.
        let huge = Windows::for_path(PathEstimate {
            bits_per_second: u64::MAX,
            rtt: Duration::from_secs(3600),
        });
        assert_eq!(huge.stream, MAX_STREAM_WINDOW);
        assert_eq!(huge.connection, MAX_CONNECTION_WINDOW);
        // Nothing at all: still the floor.
        let zero = Windows::for_path(PathEstimate {
            bits_per_second: 0,
            rtt: Duration::ZERO,
        });
        assert_eq!(
            (zero.stream, zero.connection),
            (MIN_STREAM_WINDOW, MIN_STREAM_WINDOW)
        );
    }

    #[test]
    fn every_controller_has_a_factory_and_a_name() {
        for c in [
            Congestion::Bbr,
            Congestion::Cubic,
            Congestion::CubicHystart,
            Congestion::CubicTolerant,
            Congestion::NewReno,
        ] {
            let _ = c.factory(PathEstimate::default());
            assert!(!c.as_str().is_empty());
        }
    }
}
