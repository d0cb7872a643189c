//! Cubic (RFC 9438) that leaves slow start before the bottleneck's queue overflows, and can
//! tell random loss from congestion (pure).
//!
//! quinn's Cubic leaves slow start only on a loss: on a long fat path it doubles its window
//! every round trip until the bottleneck's queue overflows, and loses a queue's worth of
//! packets at once (the WAN benchmark's drop timeline: about 3,000 drops, all in the first
//! 500 ms). Doubling sends twice what the bottleneck drains, and an RTT sample tells of a queue
//! only half a round trip after the packet met it, so a test that waits for a queue the size of
//! HyStart's threshold (`clamp(last round's minimum / 8, 4 ms, 16 ms)`) finds it too late for a
//! queue of about 12 ms. Hence two thresholds, as RFC 9406 (HyStart++) has two phases:
//!
//! - 0.5 ms above the last round's minimum (8 samples in a row spread over 1/16 of a round trip,
//!   or a whole round's minimum) starts *conservative slow start*: the window grows by a quarter
//!   of what is acknowledged. A round whose minimum falls back returns to slow start (jitter,
//!   not a queue); after 5 conservative rounds congestion avoidance starts.
//! - The HyStart threshold (8 samples in a row over a quarter of a round trip, or a whole round's
//!   minimum) starts congestion avoidance at once.
//!
//! Three more rules keep a queue that is shallower than the path (a 12 ms buffer on a 20 ms
//! path) from overflowing, without leaving the path half used:
//!
//! - Past half the bandwidth-delay product the node expects (`--link-bandwidth` ×
//!   `--link-rtt`), slow start grows by a quarter a round instead of doubling, and the 0.5 ms
//!   rise ends it. A doubling round that crosses the path's product fills the queue a whole
//!   round trip before its RTT samples come back (the queue is lost by then); a quarter fills
//!   a quarter as fast. The relay's connection to a peer lives as long as its links, so it
//!   slow-starts once.
//! - Leaving slow start on a rising round trip drains the queue slow start built down to 2 ms:
//!   the window keeps (smallest round trip + 2 ms) / recent of itself, at least Cubic's `β`.
//!   Cubic's plateau then sits 2 ms above the path, not a whole queue above it: on the 20 ms,
//!   1 Gbit/s path its growth takes about 13 s to fill the rest of a 12 ms buffer.
//! - After such an exit, and before any loss, a whole round at the path's smallest round trip
//!   (under 0.5 ms above it) says the window is under the path: the exit came from noise, or
//!   the path got faster. Slow start resumes at a quarter a round, until the 0.5 ms rise.
//!
//! Congestion avoidance and the loss response are Cubic's: `W(t) = C·(t − K)³ + W_max` with
//! `C = 0.4`, `β = 0.7`, fast convergence, and the Reno-friendly estimate as a floor.
//!
//! With random loss told from congestion ([`HyStartCubicConfig::tolerating_random_loss`]), a
//! loss keeps the window when the last 8 RTT samples all sit below the path's smallest plus the
//! HyStart threshold (no queue anywhere, so no congestion) and the round's losses stay under 2%
//! of the window, or 2 packets where that is more (BBRv2's bound on loss it accepts; 2% of a
//! slow-start window is less than a packet). A loss behind a queue cuts the window to the
//! path's share of the recent round trip (smallest / recent: what drains the queue), keeping
//! between Cubic's 70% and 90%; a loss over the bound with no queue to show for it (a buffer
//! shallower than the threshold, a policer) cuts to Cubic's 70%. Loss-based Cubic collapses at
//! 0.5% random loss over 40 ms (Mathis: about 5 Mbit/s); with the rule it keeps the path nearly
//! full. The cost: behind a buffer shallower than the threshold, it accepts up to 2% loss
//! before it yields, as BBRv2 does. A path whose base RTT grows (a new route) only looks
//! queued, which makes the rule plain Cubic, the safe side.
//!
//! ```text
//!  slow start ──────── +0.5 ms ────────▶ conservative slow start (×1.25 a round)
//!  ×2 a round; ×1.25 past half the         │   └── the round trip falls back ──▶ slow start
//!  expected product, or once resumed       └── 5 rounds ─────────────┐
//!      └──── +threshold (+0.5 ms when ×1.25) ──────────────────────┴─▶ congestion avoidance
//!                                 (window × (smallest RTT + 2 ms)/recent = W_max)
//!  slow start, resumed ◀── a whole round at the smallest RTT, no loss since ──┘
//!  any phase ── loss ──▶ window × 0.7 (tolerating: × smallest/recent RTT within [0.7, 0.9]
//!                         behind a queue, nothing up to 2% a round without one), avoidance
//! ```

use std::{
    any::Any,
    sync::Arc,
    time::{Duration, Instant},
};

use quinn::congestion::{Controller, ControllerFactory};

const BETA: f64 = 0.7;
const C: f64 = 0.4;
/// RTT samples a round needs before its minimum is compared.
const MIN_SAMPLES: u32 = 8;
const MIN_THRESHOLD: Duration = Duration::from_millis(4);
const MAX_THRESHOLD: Duration = Duration::from_millis(16);
/// A rise that starts conservative slow start.
const CSS_THRESHOLD: Duration = Duration::from_micros(500);
/// Conservative slow start grows the window by a quarter of what is acknowledged...
const CSS_GROWTH_DIVISOR: u64 = 4;
/// ...for at most this many rounds, then congestion avoidance starts (RFC 9406's values).
const CSS_ROUNDS: u32 = 5;
/// The queue left standing when slow start ends on a rising round trip: well above the
/// [`CSS_THRESHOLD`] under which a round counts as having none (which resumes slow start).
const STANDING_QUEUE: Duration = Duration::from_millis(2);

/// The share of a round's window that may be lost at random, with no queue on the path,
/// before a loss counts as congestion anyway (BBRv2's loss threshold)...
const LOSS_TOLERANCE: f64 = 0.02;
/// ...but at least this many packets: 2% of a slow-start window is less than one.
const LOSS_TOLERANCE_PACKETS: u64 = 2;
/// Recent RTT samples whose smallest says whether the path holds a queue.
const RECENT: usize = 8;
/// The least a cut takes when tolerating random loss (Cubic's `β` is the most).
const MAX_BETA: f64 = 0.9;

/// Builds [`HyStartCubic`] controllers.
#[derive(Clone, Debug)]
pub struct HyStartCubicConfig {
    initial_window: u64,
    tolerate_random_loss: bool,
    doubling_limit: u64,
}

impl HyStartCubicConfig {
    /// Cubic with HyStart that also tells random loss from congestion (see [`HyStartCubic`]).
    pub fn tolerating_random_loss() -> Self {
        Self {
            tolerate_random_loss: true,
            ..Self::default()
        }
    }

    /// Slow start doubles only up to half of `bdp`, the bandwidth-delay product the node expects
    /// of its paths; past it, it grows by a quarter a round (see [`HyStartCubic`]).
    pub fn doubling_up_to_half_of(self, bdp: u64) -> Self {
        Self {
            doubling_limit: bdp / 2,
            ..self
        }
    }
}

impl Default for HyStartCubicConfig {
    /// quinn's Cubic's initial window (10 packets of 1200 bytes, at most 14,720 bytes).
    fn default() -> Self {
        Self {
            initial_window: 14_720u64.clamp(2 * 1200, 10 * 1200),
            tolerate_random_loss: false,
            doubling_limit: u64::MAX,
        }
    }
}

impl ControllerFactory for HyStartCubicConfig {
    fn build(self: Arc<Self>, _now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        let mut cc = HyStartCubic::new(self.initial_window, current_mtu);
        cc.tolerance = self.tolerate_random_loss.then(Tolerance::default);
        cc.doubling_limit = self.doubling_limit;
        Box::new(cc)
    }
}

/// What telling random loss from congestion needs: the path's smallest round trip, the latest
/// samples, and what this round lost.
#[derive(Clone, Debug)]
struct Tolerance {
    min_rtt: Option<Duration>,
    recent: [Duration; RECENT],
    next: usize,
    /// Bytes lost in this round without a window cut.
    lost: u64,
}

impl Default for Tolerance {
    /// No samples yet: every loss is congestion until 8 have come.
    fn default() -> Self {
        Self {
            min_rtt: None,
            recent: [Duration::MAX; RECENT],
            next: 0,
            lost: 0,
        }
    }
}

impl Tolerance {
    fn sample(&mut self, rtt: Duration) {
        self.min_rtt = Some(self.min_rtt.map_or(rtt, |m| m.min(rtt)));
        self.recent[self.next] = rtt;
        self.next = (self.next + 1) % RECENT;
    }

    /// Whether the latest samples all sit a HyStart threshold above the path's minimum: a
    /// queue is building somewhere, so a loss now is congestion.
    fn queue(&self) -> bool {
        match (self.min_rtt, self.recent()) {
            (Some(min), Some(recent)) => recent >= min + threshold(min),
            _ => true,
        }
    }

    /// The smallest of the last [`RECENT`] samples, once there are that many.
    fn recent(&self) -> Option<Duration> {
        match self.recent.contains(&Duration::MAX) {
            true => None,
            false => self.recent.iter().min().copied(),
        }
    }

    /// What a cut keeps of the window: the path's share of the recent round trip (what drains
    /// the queue and no more), within [`BETA`, [`MAX_BETA`]].
    fn beta(&self) -> f64 {
        match (self.min_rtt, self.recent()) {
            (Some(min), Some(recent)) if !recent.is_zero() => {
                (min.as_secs_f64() / recent.as_secs_f64()).clamp(BETA, MAX_BETA)
            }
            _ => BETA,
        }
    }
}

/// How far above `base` a round trip shows a queue: `base / 8` within [4 ms, 16 ms].
fn threshold(base: Duration) -> Duration {
    (base / 8).clamp(MIN_THRESHOLD, MAX_THRESHOLD)
}

/// Slow start's round trips: the smallest RTT sample of this round and of the last.
#[derive(Clone, Debug, Default)]
struct Rounds {
    /// The packet number whose acknowledgement ends this round.
    end: Option<u64>,
    last_sent: u64,
    min: Option<Duration>,
    samples: u32,
    last_min: Option<Duration>,
    /// The smallest sample since the controller started: the path without a queue.
    base: Option<Duration>,
    /// Consecutive samples above the threshold that ends slow start.
    high: Streak,
    /// Consecutive samples above the one that starts conservative slow start.
    low: Streak,
    css: Option<Css>,
}

/// Conservative slow start (RFC 9406): the round trip rose a little; grow slower until it
/// falls back or a few rounds pass.
#[derive(Clone, Copy, Debug)]
struct Css {
    /// The last round's minimum when it began.
    baseline: Duration,
    rounds: u32,
}

/// Consecutive RTT samples above a threshold, and since when.
#[derive(Clone, Debug, Default)]
struct Streak {
    since: Option<Instant>,
    count: u32,
}

impl Streak {
    /// Counts a sample taken at `now`; true once at least [`MIN_SAMPLES`] in a row, spread over
    /// at least `span`, were above.
    fn push(&mut self, now: Instant, above: bool, span: Duration) -> bool {
        if !above {
            *self = Self::default();
            return false;
        }
        let since = *self.since.get_or_insert(now);
        self.count += 1;
        self.count >= MIN_SAMPLES && now.saturating_duration_since(since) >= span
    }
}

/// Cubic with HyStart++'s two-phase exit from slow start, optionally telling random loss from
/// congestion (module docs).
#[derive(Clone, Debug)]
pub struct HyStartCubic {
    initial_window: u64,
    window: u64,
    ssthresh: u64,
    mtu: u64,
    /// When congestion avoidance (or recovery) began: the `t` of `W(t)`.
    epoch: Option<Instant>,
    w_max: f64,
    k: f64,
    /// Bytes of window growth owed, paid one packet at a time.
    owed: u64,
    rounds: Rounds,
    /// Present when random loss is told from congestion.
    tolerance: Option<Tolerance>,
    /// The window past which slow start grows by a quarter a round instead of doubling.
    doubling_limit: u64,
    /// Congestion avoidance began on a rising round trip, not a loss, and no loss came since:
    /// a round without a queue means the window is under the path, and slow start resumes.
    left_on_delay: bool,
    /// Slow start resumed from congestion avoidance: it grows by a quarter a round.
    probing: bool,
}

impl HyStartCubic {
    fn new(initial_window: u64, mtu: u16) -> Self {
        Self {
            initial_window,
            window: initial_window,
            ssthresh: u64::MAX,
            mtu: u64::from(mtu),
            epoch: None,
            w_max: 0.0,
            k: 0.0,
            owed: 0,
            rounds: Rounds::default(),
            tolerance: None,
            doubling_limit: u64::MAX,
            left_on_delay: false,
            probing: false,
        }
    }

    fn in_slow_start(&self) -> bool {
        self.window < self.ssthresh
    }

    fn minimum_window(&self) -> u64 {
        2 * self.mtu
    }

    /// `bytes` sent at `sent` were acknowledged at `now`; `srtt` is the smoothed round trip.
    fn ack(&mut self, now: Instant, sent: Instant, bytes: u64, app_limited: bool, srtt: Duration) {
        let sample = now.saturating_duration_since(sent);
        if let Some(t) = &mut self.tolerance {
            t.sample(sample);
        }
        let slow_start = self.in_slow_start();
        let r = &mut self.rounds;
        r.base = Some(r.base.map_or(sample, |m| m.min(sample)));
        if app_limited || self.epoch.is_some_and(|epoch| sent <= epoch) {
            return;
        }
        r.min = Some(r.min.map_or(sample, |m| m.min(sample)));
        r.samples += 1;
        if slow_start {
            // Growing by a quarter a round already: past the doubling limit, or resumed.
            let past_limit = self.probing || self.window >= self.doubling_limit;
            if let (Some(min), Some(last)) = (r.min, r.last_min) {
                let (high, low) = (last + threshold(last), last + CSS_THRESHOLD);
                let whole_round = r.samples >= MIN_SAMPLES;
                if r.high.push(now, sample >= high, last / 4) || (whole_round && min >= high) {
                    // The queue is filling: congestion avoidance from here. The round's earlier
                    // samples predate the queue: they no longer count.
                    (r.min, r.samples) = (None, 0);
                    self.leave_slow_start(sample);
                    return;
                }
                if r.css.is_none()
                    && (r.low.push(now, sample >= low, last / 16) || (whole_round && min >= low))
                {
                    if past_limit {
                        // A queue while growing by a quarter: the path is full.
                        (r.min, r.samples) = (None, 0);
                        self.leave_slow_start(sample);
                        return;
                    }
                    r.css = Some(Css {
                        baseline: last,
                        rounds: 0,
                    });
                }
            }
            self.window += match past_limit || r.css.is_some() {
                true => bytes / CSS_GROWTH_DIVISOR,
                false => bytes,
            };
            return;
        }
        let epoch = *self.epoch.get_or_insert_with(|| {
            // Congestion avoidance without a loss (HyStart's exit): W_max is this window.
            self.w_max = self.window as f64;
            self.k = 0.0;
            now
        });
        let mtu = self.mtu as f64;
        let t = now.saturating_duration_since(epoch).as_secs_f64();
        let rtt = srtt.as_secs_f64().max(1e-6);
        let w_max = self.w_max / mtu;
        let cubic = (C * (t + rtt - self.k).powi(3) + w_max) * mtu;
        let friendly = (w_max * BETA + 3.0 * (1.0 - BETA) / (1.0 + BETA) * t / rtt) * mtu;
        let current = self.window as f64;
        let target = if cubic < friendly {
            friendly.max(current)
        } else if current < cubic {
            current + (cubic - current) / current * mtu
        } else {
            current
        };
        self.owed = self.owed.saturating_add((target - current).max(0.0) as u64);
        // At most one packet of growth per acknowledgement (RFC 9002 §7.3.3).
        if self.owed >= self.mtu {
            self.window += self.mtu;
            self.owed = 0;
        }
    }

    fn sent(&mut self, packet_number: u64) {
        self.rounds.last_sent = packet_number;
        self.rounds.end.get_or_insert(packet_number);
    }

    fn end_acks(&mut self, largest_acked: Option<u64>) {
        let r = &mut self.rounds;
        if let (Some(acked), Some(end)) = (largest_acked, r.end)
            && acked >= end
        {
            if let Some(css) = &mut r.css {
                css.rounds += 1;
                let (rounds, baseline) = (css.rounds, css.baseline);
                if r.min.is_some_and(|m| m < baseline + CSS_THRESHOLD) {
                    // The rise was noise: slow start again.
                    (r.css, r.low) = (None, Streak::default());
                } else if rounds >= CSS_ROUNDS && self.window < self.ssthresh {
                    r.css = None;
                    let recent = r.min.unwrap_or(baseline);
                    self.leave_slow_start(recent);
                }
            }
            let slow_start = self.in_slow_start();
            let r = &mut self.rounds;
            let no_queue = matches!((r.min, r.base),
                (Some(min), Some(base)) if min < base + CSS_THRESHOLD);
            if self.left_on_delay && !slow_start && r.samples >= MIN_SAMPLES && no_queue {
                // A whole round at the path's round trip: the window is under the path (the
                // exit was early, or the path got faster). Slow start again, gently.
                (r.css, r.high, r.low) = (None, Streak::default(), Streak::default());
                self.ssthresh = u64::MAX;
                self.epoch = None;
                self.probing = true;
            }
            if r.samples > 0 {
                r.last_min = r.min;
            }
            r.min = None;
            r.samples = 0;
            r.end = Some(r.last_sent);
            if let Some(t) = &mut self.tolerance {
                t.lost = 0;
            }
        }
    }

    /// Packets sent at `sent`, `lost` bytes of them, were declared lost at `now`.
    fn congestion(&mut self, now: Instant, sent: Instant, persistent: bool, lost: u64) {
        if self.epoch.is_some_and(|epoch| sent <= epoch) {
            return;
        }
        let allowance =
            (self.window as f64 * LOSS_TOLERANCE).max((LOSS_TOLERANCE_PACKETS * self.mtu) as f64);
        if let Some(t) = &mut self.tolerance
            && !persistent
            && !t.queue()
            && (t.lost + lost) as f64 <= allowance
        {
            // No queue behind the loss and little of it: the path drops at random, and a
            // loss-based cut would only shrink the window below what the path carries.
            t.lost += lost;
            return;
        }
        self.epoch = Some(now);
        self.rounds.css = None;
        (self.left_on_delay, self.probing) = (false, false);
        // Behind a queue, tolerating random loss drains the queue; otherwise (not tolerating,
        // or over 2% lost with no queue to show for it: a shallow buffer or a policer) Cubic's.
        let beta = match &self.tolerance {
            Some(t) if t.queue() => t.beta(),
            _ => BETA,
        };
        let window = self.window as f64;
        // Fast convergence: a flow that lost before reaching its last W_max yields some.
        self.w_max = match window < self.w_max {
            true => window * (1.0 + beta) / 2.0,
            false => window,
        };
        self.ssthresh = ((window * beta) as u64).max(self.minimum_window());
        self.window = self.ssthresh;
        // The time Cubic takes back to W_max from the reduced window.
        let short = (self.w_max - self.window as f64).max(0.0) / self.mtu as f64;
        self.k = (short / C).cbrt();
        self.owed = (self.owed as f64 * beta) as u64;
        if persistent {
            self.epoch = None;
            self.w_max = self.window as f64;
            self.owed = 0;
            self.window = self.minimum_window();
            self.rounds = Rounds::default();
        }
    }

    /// Congestion avoidance from here, on a round trip risen to `recent`: the window keeps what
    /// leaves [`STANDING_QUEUE`] of it queued (the rest of the queue slow start built drains),
    /// at least Cubic's `β`.
    fn leave_slow_start(&mut self, recent: Duration) {
        let share = match self.rounds.base {
            Some(base) if !recent.is_zero() => {
                let kept = base + STANDING_QUEUE;
                (kept.as_secs_f64() / recent.as_secs_f64()).clamp(BETA, 1.0)
            }
            _ => 1.0,
        };
        self.window = ((self.window as f64 * share) as u64).max(self.minimum_window());
        self.ssthresh = self.window;
        (self.left_on_delay, self.probing) = (true, false);
    }
}

impl Controller for HyStartCubic {
    fn on_sent(&mut self, _now: Instant, _bytes: u64, last_packet_number: u64) {
        self.sent(last_packet_number);
    }

    fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        rtt: &quinn_proto::RttEstimator,
    ) {
        self.ack(now, sent, bytes, app_limited, rtt.get());
    }

    fn on_end_acks(
        &mut self,
        _now: Instant,
        _in_flight: u64,
        _app_limited: bool,
        largest_packet_num_acked: Option<u64>,
    ) {
        self.end_acks(largest_packet_num_acked);
    }

    fn on_congestion_event(
        &mut self,
        now: Instant,
        sent: Instant,
        is_persistent_congestion: bool,
        lost_bytes: u64,
    ) {
        self.congestion(now, sent, is_persistent_congestion, lost_bytes);
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.mtu = u64::from(new_mtu);
        self.window = self.window.max(self.minimum_window());
    }

    fn window(&self) -> u64 {
        self.window
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(self.clone())
    }

    fn initial_window(&self) -> u64 {
        self.initial_window
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MTU: u16 = 1452;

    /// Runs whole rounds of `window` bytes in packets of `MTU`, each acknowledged after the
    /// `rtt` the round's closure gives; returns the window after each round.
    fn rounds(cc: &mut HyStartCubic, start: Instant, rtts: &[Duration]) -> Vec<u64> {
        let mut pn = 0;
        let mut now = start;
        let mut windows = Vec::new();
        for rtt in rtts {
            let packets = cc.window / u64::from(MTU);
            let sent_at = now;
            for _ in 0..packets {
                cc.sent(pn);
                pn += 1;
            }
            now += *rtt;
            for _ in 0..packets {
                cc.ack(now, sent_at, u64::from(MTU), false, *rtt);
            }
            cc.end_acks(Some(pn - 1));
            windows.push(cc.window);
        }
        windows
    }

    #[test]
    fn slow_start_doubles_while_the_round_trip_holds() {
        let mut cc = HyStartCubic::new(10 * u64::from(MTU), MTU);
        let w = rounds(&mut cc, Instant::now(), &[Duration::from_millis(20); 6]);
        for pair in w.windows(2) {
            assert_eq!(pair[1], 2 * pair[0], "{w:?}");
        }
        assert!(cc.in_slow_start());
    }

    #[test]
    fn slow_start_grows_by_a_quarter_past_half_the_expected_path() {
        let mtu = u64::from(MTU);
        let mut cc = HyStartCubic::new(10 * mtu, MTU);
        cc.doubling_limit = 100 * mtu;
        let w = rounds(&mut cc, Instant::now(), &[Duration::from_millis(20); 8]);
        assert_eq!(
            &w[..3],
            &[20 * mtu, 40 * mtu, 80 * mtu],
            "doubling below the limit"
        );
        for pair in w.windows(2).filter(|p| p[0] >= cc.doubling_limit) {
            assert_eq!(pair[1], pair[0] + pair[0] / mtu * (mtu / 4), "{w:?}");
        }
        assert!(cc.in_slow_start(), "no queue: still slow start");
        // Past the limit, a rise of 1 ms (under HyStart's 4) ends slow start.
        rounds(
            &mut cc,
            Instant::now() + Duration::from_secs(1),
            &[Duration::from_millis(21)],
        );
        assert!(!cc.in_slow_start());
    }

    /// A controller that left slow start on a 5 ms rise after four rounds at 20 ms, and when
    /// its next round starts.
    fn left_on_a_rise() -> (HyStartCubic, Instant) {
        let ms = Duration::from_millis;
        let mut cc = HyStartCubic::new(10 * u64::from(MTU), MTU);
        let start = Instant::now();
        rounds(&mut cc, start, &[ms(20), ms(20), ms(20), ms(20), ms(25)]);
        assert!(!cc.in_slow_start());
        // The rounds helper sends each round at the last one's acknowledgements: the first
        // round after the exit was sent before congestion avoidance began, and does not count.
        (cc, start + ms(105))
    }

    #[test]
    fn a_round_without_a_queue_after_an_early_exit_resumes_slow_start_gently() {
        let (mtu, ms) = (u64::from(MTU), Duration::from_millis);
        let (mut cc, next) = left_on_a_rise();
        // The rise was not this flow's queue: the round trip is back at 20 ms.
        let w = rounds(&mut cc, next, &[ms(20); 5]);
        let packets = |w: u64| w / mtu;
        assert!(
            cc.in_slow_start(),
            "a whole round at the path's round trip: {w:?}"
        );
        assert!(cc.probing);
        for k in 2..4 {
            assert_eq!(
                w[k + 1],
                w[k] + packets(w[k]) * (mtu / 4),
                "a quarter a round: {w:?}"
            );
        }
        // A queue ends it again.
        rounds(&mut cc, next + ms(100), &[ms(26)]);
        assert!(!cc.in_slow_start());
        assert!(!cc.probing);
    }

    #[test]
    fn after_a_loss_a_round_without_a_queue_keeps_congestion_avoidance() {
        let (mtu, ms) = (u64::from(MTU), Duration::from_millis);
        let (mut cc, next) = left_on_a_rise();
        // A packet sent in congestion avoidance is lost.
        cc.congestion(next + ms(21), next + ms(1), false, mtu);
        let cut = cc.window;
        let w = rounds(&mut cc, next + ms(22), &[ms(20); 5]);
        assert!(!cc.in_slow_start(), "{w:?}");
        assert!(
            w[4] < cut + cut / 4,
            "Cubic's growth, not slow start's: {w:?}"
        );
    }

    #[test]
    fn a_growing_round_trip_ends_slow_start_without_a_loss() {
        let mut cc = HyStartCubic::new(10 * u64::from(MTU), MTU);
        let ms = Duration::from_millis;
        let w = rounds(
            &mut cc,
            Instant::now(),
            &[
                ms(20),
                ms(20),
                ms(20),
                ms(20),
                ms(25),
                ms(25),
                ms(25),
                ms(25),
            ],
        );
        assert!(!cc.in_slow_start(), "{w:?}");
        // The round whose RTT grew by 5 ms (above 20/8 → the 4 ms floor) stopped doubling at
        // its 8th acknowledgement, and kept 22/25 of the window (the queue drains to 2 ms); the
        // rounds after it grow by at most a packet per acknowledgement, far below doubling.
        let exit = w[3] + 7 * u64::from(MTU);
        assert_eq!(cc.ssthresh, (exit as f64 * share(22, 25)) as u64, "{w:?}");
        assert!(w[7] < 2 * w[4], "{w:?}");
    }

    #[test]
    fn a_queue_building_within_a_round_ends_slow_start_in_that_round() {
        let mut cc = HyStartCubic::new(10 * u64::from(MTU), MTU);
        let start = Instant::now();
        let ms = Duration::from_millis;
        rounds(&mut cc, start, &[ms(20); 4]);
        let before = cc.window;
        // The next round: acknowledgements spread over 20 ms, the later half 6 ms late (the
        // queue filling behind them).
        let packets = before / u64::from(MTU);
        let sent = start + ms(200);
        for k in 0..packets {
            let delay = if k < packets / 2 { ms(20) } else { ms(26) };
            let at =
                sent + delay + ms(20) * u32::try_from(k).unwrap() / u32::try_from(packets).unwrap();
            cc.ack(at, sent, u64::from(MTU), false, ms(20));
        }
        assert!(!cc.in_slow_start(), "left slow start within the round");
        assert!(
            cc.window < 2 * before,
            "did not double: {} of {before}",
            cc.window
        );
    }

    #[test]
    fn a_burst_of_late_acknowledgements_at_one_moment_does_not_end_slow_start() {
        let mut cc = HyStartCubic::new(10 * u64::from(MTU), MTU);
        let start = Instant::now();
        let ms = Duration::from_millis;
        rounds(&mut cc, start, &[ms(20); 4]);
        // Acknowledgements on time, then a process descheduled for 10 ms handles 20 at once.
        let sent = start + ms(200);
        for k in 0..10 {
            cc.ack(
                sent + ms(k) + ms(20),
                sent + ms(k),
                u64::from(MTU),
                false,
                ms(20),
            );
        }
        for _ in 0..20 {
            cc.ack(sent + ms(30), sent, u64::from(MTU), false, ms(20));
        }
        assert!(cc.in_slow_start());
    }

    #[test]
    fn a_slight_rise_slows_slow_start_until_it_falls_back() {
        let mut cc = HyStartCubic::new(10 * u64::from(MTU), MTU);
        let us = Duration::from_micros;
        // 1 ms above the last round: under the 4 ms that ends slow start, above the 0.5 ms
        // that makes it conservative.
        let w = rounds(
            &mut cc,
            Instant::now(),
            &[
                us(20_000),
                us(20_000),
                us(21_000),
                us(21_000),
                us(20_000),
                us(20_000),
            ],
        );
        assert_eq!(w[1], 2 * w[0], "{w:?}");
        // The 8th acknowledgement of the risen round starts conservative slow start: a quarter
        // of what is acknowledged from there, the next round too, and the round that brings
        // the round trip back (it ends conservative slow start at its end).
        let mtu = u64::from(MTU);
        let packets = |w: u64| w / mtu;
        assert_eq!(
            w[2],
            w[1] + 7 * mtu + (packets(w[1]) - 7) * (mtu / 4),
            "{w:?}"
        );
        assert_eq!(w[3], w[2] + packets(w[2]) * (mtu / 4), "{w:?}");
        assert_eq!(w[4], w[3] + packets(w[3]) * (mtu / 4), "{w:?}");
        // Back at 20 ms: doubling again.
        assert_eq!(w[5], w[4] + packets(w[4]) * mtu, "{w:?}");
        assert!(cc.in_slow_start());
    }

    #[test]
    fn five_conservative_rounds_end_slow_start() {
        let mut cc = HyStartCubic::new(10 * u64::from(MTU), MTU);
        let us = Duration::from_micros;
        let mut rtts = vec![us(20_000); 3];
        // A queue that grows 1 ms a round: each round under the 4 ms over the last that ends
        // slow start at once.
        rtts.extend((1..=6).map(|k| us(20_000 + 1_000 * k)));
        let w = rounds(&mut cc, Instant::now(), &rtts);
        assert!(!cc.in_slow_start(), "{w:?}");
        assert_eq!(
            cc.ssthresh, w[7],
            "CA from the 5th conservative round: {w:?}"
        );
        assert!(w[8] < w[7] + w[7] / 4, "{w:?}");
    }

    #[test]
    fn a_small_wobble_does_not_end_slow_start() {
        let mut cc = HyStartCubic::new(10 * u64::from(MTU), MTU);
        let ms = Duration::from_millis;
        rounds(
            &mut cc,
            Instant::now(),
            &[ms(40), ms(40), ms(43), ms(41), ms(44)],
        );
        assert!(
            cc.in_slow_start(),
            "3-4 ms over 40 ms is under the 5 ms threshold (conservative slow start is still \
             slow start)"
        );
    }

    /// `base` ms of `recent` ms, as the controller computes it.
    fn share(base: u64, recent: u64) -> f64 {
        Duration::from_millis(base).as_secs_f64() / Duration::from_millis(recent).as_secs_f64()
    }

    /// [`RECENT`] RTT samples of `rtt` (acknowledgements carrying no window growth), from
    /// packets sent 1 ms apart from `sent` on.
    fn samples(cc: &mut HyStartCubic, sent: Instant, rtt: Duration) {
        for k in 0..RECENT as u64 {
            let at = sent + Duration::from_millis(k);
            cc.ack(at + rtt, at, 0, true, rtt);
        }
    }

    fn tolerant(packets: u64) -> HyStartCubic {
        let mut cc = HyStartCubic::new(packets * u64::from(MTU), MTU);
        cc.tolerance = Some(Tolerance::default());
        cc
    }

    #[test]
    fn random_loss_without_a_queue_keeps_the_window_up_to_two_percent_a_round() {
        let mut cc = tolerant(10);
        let start = Instant::now();
        let ms = Duration::from_millis;
        rounds(&mut cc, start, &[ms(20); 5]);
        // 320 packets in flight: 2% is 6.4 packets' bytes.
        let window = cc.window;
        let at = start + ms(200);
        for k in 0..6 {
            cc.congestion(at + ms(k), at, false, u64::from(MTU));
            assert_eq!(cc.window, window, "loss {k} is tolerated");
        }
        cc.congestion(at + ms(7), at, false, u64::from(MTU));
        assert_eq!(cc.window, (window as f64 * BETA) as u64, "the 7th is not");
    }

    #[test]
    fn a_small_window_may_lose_two_packets_a_round() {
        let mut cc = tolerant(10);
        let start = Instant::now();
        let ms = Duration::from_millis;
        rounds(&mut cc, start, &[ms(20); 2]);
        // 40 packets: 2% is under one packet, the floor is two.
        let window = cc.window;
        let at = start + ms(50);
        cc.congestion(at + ms(1), at, false, u64::from(MTU));
        cc.congestion(at + ms(2), at, false, u64::from(MTU));
        assert_eq!(cc.window, window);
        cc.congestion(at + ms(3), at, false, u64::from(MTU));
        assert_eq!(cc.window, (window as f64 * BETA) as u64);
    }

    #[test]
    fn the_allowance_is_per_round() {
        let mut cc = tolerant(10);
        let start = Instant::now();
        let ms = Duration::from_millis;
        rounds(&mut cc, start, &[ms(20); 5]);
        let window = cc.window;
        cc.congestion(start + ms(101), start + ms(100), false, 6 * u64::from(MTU));
        assert_eq!(cc.window, window);
        // A round later the window has doubled (slow start) and the allowance is new: 12
        // packets fit 2% of 640, but not with the last round's 6 on top.
        rounds(&mut cc, start + ms(110), &[ms(20)]);
        let window = cc.window;
        assert_eq!(window, 640 * u64::from(MTU));
        cc.congestion(start + ms(140), start + ms(131), false, 12 * u64::from(MTU));
        assert_eq!(cc.window, window);
    }

    #[test]
    fn a_loss_behind_a_queue_is_congestion() {
        let mut cc = tolerant(10);
        let start = Instant::now();
        let ms = Duration::from_millis;
        rounds(&mut cc, start, &[ms(20); 4]);
        let window = cc.window;
        // The latest acknowledgements came 5 ms late (above the 4 ms threshold over 20 ms).
        let sent = start + ms(100);
        samples(&mut cc, sent, ms(25));
        cc.congestion(sent + ms(40), sent, false, u64::from(MTU));
        // The cut drains the queue: 20 of 25 ms.
        assert_eq!(cc.window, (window as f64 * share(20, 25)) as u64);
        // One sample back at the minimum (the queue drained) makes the next loss random again.
        cc.ack(sent + ms(60), sent + ms(40), 0, true, ms(20));
        let cut = cc.window;
        cc.congestion(sent + ms(70), sent + ms(45), false, u64::from(MTU));
        assert_eq!(cc.window, cut);
    }

    #[test]
    fn a_cut_drains_the_queue_within_cubics_bounds() {
        let ms = Duration::from_millis;
        // (smallest RTT, recent RTT, what the cut keeps)
        for (base, recent, kept) in [
            (40, 45, share(40, 45)),
            (20, 40, BETA),
            (200, 217, MAX_BETA),
        ] {
            let mut cc = tolerant(10);
            let start = Instant::now();
            rounds(&mut cc, start, &[ms(base); 4]);
            let window = cc.window;
            let sent = start + ms(10 * base);
            samples(&mut cc, sent, ms(recent));
            cc.congestion(sent + ms(2 * recent), sent, false, 20 * u64::from(MTU));
            assert_eq!(
                cc.window,
                (window as f64 * kept) as u64,
                "{base}/{recent} ms"
            );
        }
    }

    #[test]
    fn losses_before_eight_samples_are_congestion() {
        let mut cc = tolerant(10);
        let start = Instant::now();
        let ms = Duration::from_millis;
        for k in 0..7 {
            cc.ack(
                start + ms(20 + k),
                start + ms(k),
                u64::from(MTU),
                false,
                ms(20),
            );
        }
        let window = cc.window;
        cc.congestion(start + ms(30), start + ms(8), false, u64::from(MTU));
        assert_eq!(cc.window, (window as f64 * BETA) as u64);
    }

    #[test]
    fn persistent_congestion_is_never_tolerated() {
        let mut cc = tolerant(10);
        let start = Instant::now();
        rounds(&mut cc, start, &[Duration::from_millis(20); 4]);
        cc.congestion(
            start + Duration::from_secs(1),
            start + Duration::from_millis(900),
            true,
            u64::from(MTU),
        );
        assert_eq!(cc.window, 2 * u64::from(MTU));
    }

    #[test]
    fn a_loss_cuts_the_window_by_beta_and_cubic_grows_it_back() {
        let mut cc = HyStartCubic::new(100 * u64::from(MTU), MTU);
        let start = Instant::now();
        let before = cc.window;
        cc.congestion(start, start, false, u64::from(MTU));
        assert_eq!(cc.window, (before as f64 * BETA) as u64);
        let reduced = cc.window;
        // A loss of a packet sent before the reduction does not cut again.
        cc.congestion(
            start + Duration::from_millis(5),
            start,
            false,
            u64::from(MTU),
        );
        assert_eq!(cc.window, reduced);
        let w = rounds(
            &mut cc,
            start + Duration::from_millis(1),
            &[Duration::from_millis(20); 100],
        );
        assert!(
            w[99] > reduced && w[99] > before,
            "grows back past W_max: {w:?}"
        );
        // Persistent congestion: the minimum window and slow start again.
        cc.congestion(
            start + Duration::from_secs(10),
            start + Duration::from_secs(9),
            true,
            u64::from(MTU),
        );
        assert_eq!(cc.window, 2 * u64::from(MTU));
        assert!(cc.in_slow_start());
    }
}
