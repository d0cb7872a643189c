//! Cubic (RFC 9438) that leaves slow start when the round trip starts to grow (pure).
//!
//! quinn's Cubic leaves slow start only on a loss: on a long fat path it doubles its window
//! every round trip until the bottleneck's queue overflows, and loses a queue's worth of
//! packets at once (the WAN benchmark counted 3,500 drops per run where kernel TCP's Cubic
//! dropped a few hundred). Linux's Cubic avoids that with HyStart's delay-increase test
//! (RFC 9406 uses the same one): in slow start, once a round trip's smallest RTT sample is
//! `clamp(previous round's / 8, 4 ms, 16 ms)` above the previous round's, the queue is filling,
//! and congestion avoidance starts from the current window. That test looks at whole rounds,
//! and in the round where the window first exceeds the path the queue fills from empty: its
//! smallest sample is still the base RTT while the doubling overflows a shallow queue. So the
//! same threshold also applies to every sample: samples all above it for a quarter of the last
//! round's RTT (at least 8 of them, spread in time, so a burst of acknowledgements that waited
//! for a descheduled process does not count) end slow start within the round. Congestion avoidance and the loss
//! response are Cubic's: `W(t) = C·(t − K)³ + W_max` with `C = 0.4`, `β = 0.7`, fast
//! convergence, and the Reno-friendly estimate as a floor.
//!
//! ```text
//!  slow start ── RTT grew by the threshold ──▶ congestion avoidance (W_max = window)
//!       └──────── loss ────────────────────────▶ window × 0.7, congestion avoidance
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

/// Builds [`HyStartCubic`] controllers.
#[derive(Clone, Debug)]
pub struct HyStartCubicConfig {
    initial_window: u64,
}

impl Default for HyStartCubicConfig {
    /// quinn's Cubic's initial window (10 packets of 1200 bytes, at most 14,720 bytes).
    fn default() -> Self {
        Self {
            initial_window: 14_720u64.clamp(2 * 1200, 10 * 1200),
        }
    }
}

impl ControllerFactory for HyStartCubicConfig {
    fn build(self: Arc<Self>, _now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(HyStartCubic::new(self.initial_window, current_mtu))
    }
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
    /// Since when, and how many, consecutive samples were above the threshold.
    above_since: Option<Instant>,
    above: u32,
}

/// Cubic with HyStart's delay-increase exit from slow start.
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
        if app_limited || self.epoch.is_some_and(|epoch| sent <= epoch) {
            return;
        }
        if self.in_slow_start() {
            let sample = now.saturating_duration_since(sent);
            let r = &mut self.rounds;
            r.min = Some(r.min.map_or(sample, |m| m.min(sample)));
            r.samples += 1;
            if let (Some(min), Some(last)) = (r.min, r.last_min) {
                let threshold = last + (last / 8).clamp(MIN_THRESHOLD, MAX_THRESHOLD);
                match sample >= threshold {
                    true => {
                        r.above_since.get_or_insert(now);
                        r.above += 1;
                    }
                    false => (r.above_since, r.above) = (None, 0),
                }
                let round = r.samples >= MIN_SAMPLES && min >= threshold;
                let lately = r.above >= MIN_SAMPLES
                    && r.above_since
                        .is_some_and(|since| now.saturating_duration_since(since) >= last / 4);
                if round || lately {
                    // The queue is filling: congestion avoidance from here.
                    self.ssthresh = self.window;
                    return;
                }
            }
            self.window += bytes;
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
            if r.samples > 0 {
                r.last_min = r.min;
            }
            r.min = None;
            r.samples = 0;
            r.end = Some(r.last_sent);
        }
    }

    fn congestion(&mut self, now: Instant, sent: Instant, persistent: bool) {
        if self.epoch.is_some_and(|epoch| sent <= epoch) {
            return;
        }
        self.epoch = Some(now);
        let window = self.window as f64;
        // Fast convergence: a flow that lost before reaching its last W_max yields some.
        self.w_max = match window < self.w_max {
            true => window * (1.0 + BETA) / 2.0,
            false => window,
        };
        self.ssthresh = ((window * BETA) as u64).max(self.minimum_window());
        self.window = self.ssthresh;
        self.k = (self.w_max / self.mtu as f64 * (1.0 - BETA) / C).cbrt();
        self.owed = (self.owed as f64 * BETA) as u64;
        if persistent {
            self.epoch = None;
            self.w_max = self.window as f64;
            self.owed = 0;
            self.window = self.minimum_window();
            self.rounds = Rounds::default();
        }
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
        _lost_bytes: u64,
    ) {
        self.congestion(now, sent, is_persistent_congestion);
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
        // The round whose RTT grew by 5 ms (above 20/8 → the 4 ms floor) stopped doubling; the
        // rounds after it grow by at most a packet per acknowledgement, far below doubling.
        assert_eq!(cc.ssthresh, w[3] + 7 * u64::from(MTU), "{w:?}");
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
            "3-4 ms over 40 ms is under the 5 ms threshold"
        );
    }

    #[test]
    fn a_loss_cuts_the_window_by_beta_and_cubic_grows_it_back() {
        let mut cc = HyStartCubic::new(100 * u64::from(MTU), MTU);
        let start = Instant::now();
        let before = cc.window;
        cc.congestion(start, start, false);
        assert_eq!(cc.window, (before as f64 * BETA) as u64);
        let reduced = cc.window;
        // A loss of a packet sent before the reduction does not cut again.
        cc.congestion(start + Duration::from_millis(5), start, false);
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
        );
        assert_eq!(cc.window, 2 * u64::from(MTU));
        assert!(cc.in_slow_start());
    }
}
