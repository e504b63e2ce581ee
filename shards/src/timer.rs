//! A hashed timer wheel with lazy deadlines, for per-connection and per-session timeouts.
//!
//! Entries are small tokens (the owner's enum of what a timer is for); a fired token only
//! means "look at this object's deadline now".
//! The owner re-checks the real deadline and re-schedules if it moved, so activity on a
//! connection never touches the wheel (keep-alive is refreshed by writing one integer).

/// Granularity of the wheel in milliseconds.
pub const TICK_MS: u64 = 50;
const SLOTS: usize = 1024;

/// Tokens bucketed by the tick at which to look at them.
pub struct TimerWheel<T = u64> {
    slots: Vec<Vec<T>>,
    /// Next tick to fire.
    tick: u64,
}

impl<T> TimerWheel<T> {
    /// A wheel whose first tick is at `now_ms`.
    pub fn new(now_ms: u64) -> TimerWheel<T> {
        TimerWheel {
            slots: (0..SLOTS).map(|_| Vec::new()).collect(),
            tick: now_ms / TICK_MS,
        }
    }

    /// Looks at `token` again at `at_ms` (or up to one wheel turn earlier for far deadlines;
    /// the owner re-schedules).
    pub fn schedule(&mut self, at_ms: u64, token: T) {
        let t = (at_ms / TICK_MS).max(self.tick);
        let t = t.min(self.tick + SLOTS as u64 - 1);
        self.slots[(t % SLOTS as u64) as usize].push(token);
    }

    /// Moves every token due by `now_ms` into `out`.
    pub fn advance(&mut self, now_ms: u64, out: &mut Vec<T>) {
        let target = now_ms / TICK_MS;
        while self.tick <= target {
            out.append(&mut self.slots[(self.tick % SLOTS as u64) as usize]);
            self.tick += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_fire_at_their_tick_not_before() {
        let mut w = TimerWheel::new(1000);
        w.schedule(1000 + 3 * TICK_MS, 7);
        w.schedule(1000, 8);
        let mut out = Vec::new();
        w.advance(1000 + TICK_MS, &mut out);
        assert_eq!(out, [8]);
        out.clear();
        w.advance(1000 + 3 * TICK_MS, &mut out);
        assert_eq!(out, [7]);
    }

    #[test]
    fn far_deadlines_fire_early_within_one_turn() {
        let mut w = TimerWheel::new(0);
        w.schedule(10 * SLOTS as u64 * TICK_MS, 1);
        let mut out = Vec::new();
        w.advance(SLOTS as u64 * TICK_MS, &mut out);
        assert_eq!(out, [1], "owner sees it and re-schedules");
    }
}
