//! How many threads a session's decode steps use: all that are allowed, unless fewer are measured to be faster.
//!
//! On a board whose cores also run other services, one of the forward pass's threads may share its core with a
//! busy process, and a pass is then paced by that thread's share of the core. The worker team already keeps a
//! descheduled helper from holding up a job, but the thread running the pass cannot be replaced, and when it is
//! the one sharing a core, fewer threads are faster: the scheduler then gives it a core of its own. So the
//! session measures: it decodes with the allowed count `n`, now and then runs a few steps with `n - 1`, and
//! keeps whichever had the shorter median step. A probe that confirms the choice by a clear margin makes the next one
//! wait twice as long, so an idle board pays almost nothing for the check.
//!
//! [`ThreadTuner`] is a pure state machine over step times; the session feeds it and obeys it.

use std::time::Duration;

/// Steps between probes at first (and after every change).
const FIRST_PERIOD: u32 = 32;
/// The longest wait between probes.
const MAX_PERIOD: u32 = 512;
/// Timed steps compared on each side; a probe also has one untimed step at each change of count (helpers wake
/// up, the scheduler moves threads).
const SAMPLES: usize = 8;
/// The other count's median step must be this much shorter (relative) to replace the choice: single steps
/// vary by several percent on a busy board, medians of eight much less.
const SWITCH_MARGIN: f64 = 0.05;
/// A probe at least this much slower (relative) confirms the choice and doubles the period.
const CONFIRM_MARGIN: f64 = 0.10;

/// The thread count chooser of one session (see the module docs).
#[derive(Debug, Clone)]
pub struct ThreadTuner {
    allowed: usize,
    /// Whether the current choice is the allowed count (else one fewer).
    full: bool,
    /// The last step times (seconds) at the chosen count, and those of the running probe.
    recent: Vec<f64>,
    probe: Vec<f64>,
    /// Steps until the next probe.
    until_probe: u32,
    period: u32,
    /// Steps left in the running probe (0: not probing).
    probing: u32,
    /// Whether the next step is the first at a new count (not timed).
    settling: bool,
    /// The choice made for other allowances, restored when the allowance comes back (the board's load did not
    /// change because the governor changed the allowance).
    remembered: Vec<(usize, bool)>,
}

impl ThreadTuner {
    /// A tuner for `allowed` threads, starting with all of them.
    pub fn new(allowed: usize) -> ThreadTuner {
        ThreadTuner {
            allowed: allowed.max(1),
            full: true,
            recent: Vec::with_capacity(SAMPLES),
            probe: Vec::with_capacity(SAMPLES),
            until_probe: FIRST_PERIOD,
            period: FIRST_PERIOD,
            probing: 0,
            settling: false,
            remembered: Vec::new(),
        }
    }

    /// The thread count for the next decode step when `allowed` are allowed now. A new allowance (the
    /// governor's) starts the measurements over, from the choice last made for it if there was one.
    pub fn threads(&mut self, allowed: usize) -> usize {
        let allowed = allowed.max(1);
        if allowed != self.allowed {
            let before = self
                .remembered
                .iter()
                .find(|&&(a, _)| a == allowed)
                .map(|&(_, full)| full);
            let mut remembered = std::mem::take(&mut self.remembered);
            remembered.retain(|&(a, _)| a != self.allowed && a != allowed);
            remembered.push((self.allowed, self.full));
            *self = ThreadTuner::new(allowed);
            self.full = before.unwrap_or(true);
            self.remembered = remembered;
        }
        if self.allowed == 1 {
            return 1;
        }
        let full = if self.probing > 0 {
            !self.full
        } else {
            self.full
        };
        self.allowed - usize::from(!full)
    }

    /// A new sequence starts (its steps are shorter than the last one's late steps): forgets the step times,
    /// keeps the choice.
    pub fn new_sequence(&mut self) {
        self.recent.clear();
        self.probe.clear();
        self.probing = 0;
        self.until_probe = self.until_probe.max(SAMPLES as u32 + 1);
        self.settling = true;
    }

    /// The count chosen so far, outside probes: for prompt steps, which are not timed.
    pub fn chosen(&mut self, allowed: usize) -> usize {
        self.threads(allowed);
        self.allowed - usize::from(!self.full && self.allowed > 1)
    }

    /// Records the time of the decode step that ran with `threads` threads.
    pub fn record(&mut self, threads: usize, step: Duration) {
        if self.allowed == 1 || threads + 1 < self.allowed || threads > self.allowed {
            return;
        }
        let probing = self.probing > 0;
        if (threads == self.allowed) != (self.full != probing) {
            // Not the count this state asked for (the allowance moved in between): nothing to learn.
            return;
        }
        if std::mem::take(&mut self.settling) {
            return;
        }
        let s = step.as_secs_f64();
        if probing {
            self.probe.push(s);
            self.probing -= 1;
            if self.probing == 0 {
                self.settling = true;
                self.decide();
            }
            return;
        }
        if self.recent.len() == SAMPLES {
            self.recent.remove(0);
        }
        self.recent.push(s);
        self.until_probe = self.until_probe.saturating_sub(1);
        if self.until_probe == 0 && self.recent.len() == SAMPLES {
            self.probing = SAMPLES as u32;
            self.settling = true;
        }
    }

    /// After a probe: switch if the other count was clearly faster; wait longer if it was clearly slower.
    fn decide(&mut self) {
        let (chosen, other) = (median(&mut self.recent), median(&mut self.probe));
        self.probe.clear();
        if other < chosen * (1.0 - SWITCH_MARGIN) {
            self.full = !self.full;
            self.period = FIRST_PERIOD;
            self.recent.clear();
        } else if other > chosen * (1.0 + CONFIRM_MARGIN) {
            self.period = (self.period * 2).min(MAX_PERIOD);
        }
        self.until_probe = self.period;
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::INFINITY)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `steps` decode steps whose time is `time(threads)` and returns the count of the last one.
    fn drive(
        t: &mut ThreadTuner,
        allowed: usize,
        steps: usize,
        time: impl Fn(usize) -> f64,
    ) -> usize {
        let mut last = 0;
        for _ in 0..steps {
            last = t.threads(allowed);
            t.record(last, Duration::from_secs_f64(time(last)));
        }
        last
    }

    #[test]
    fn all_threads_stay_when_they_are_faster() {
        let mut t = ThreadTuner::new(4);
        let last = drive(&mut t, 4, 1000, |n| 1.0 / n as f64);
        assert_eq!(last, 4);
    }

    #[test]
    fn fewer_threads_win_when_a_core_is_busy() {
        let mut t = ThreadTuner::new(2);
        // Two threads, one of them sharing a core: slower than one thread alone.
        assert_eq!(
            drive(&mut t, 2, 200, |n| if n == 2 { 0.05 } else { 0.04 }),
            1
        );
        // Stays there while it is faster.
        let counts: Vec<usize> = (0..500)
            .map(|_| {
                let n = t.threads(2);
                t.record(n, Duration::from_secs_f64(if n == 2 { 0.05 } else { 0.04 }));
                n
            })
            .collect();
        assert!(counts.iter().filter(|&&n| n == 1).count() > 480);
    }

    #[test]
    fn the_busy_core_freed_brings_the_threads_back() {
        let mut t = ThreadTuner::new(2);
        drive(&mut t, 2, 200, |n| if n == 2 { 0.05 } else { 0.04 });
        assert_eq!(t.threads(2), 1);
        assert_eq!(drive(&mut t, 2, 200, |n| 0.06 / n as f64), 2);
    }

    #[test]
    fn probes_wait_longer_while_the_choice_is_clearly_right() {
        let mut t = ThreadTuner::new(2);
        let probes = |t: &mut ThreadTuner, steps: usize| {
            (0..steps)
                .filter(|_| {
                    let n = t.threads(2);
                    t.record(n, Duration::from_secs_f64(0.06 / n as f64));
                    n == 1
                })
                .count()
        };
        let early = probes(&mut t, 300);
        let late = probes(&mut t, 300);
        assert!(early > late, "{early} probe steps, then {late}");
        // At the longest period, fewer than 3% of the steps probe.
        let settled = probes(&mut t, 3000);
        assert!(settled * 33 < 3000, "{settled} probe steps of 3000");
    }

    #[test]
    fn a_new_allowance_starts_with_all_threads_and_an_old_one_with_its_choice() {
        let mut t = ThreadTuner::new(2);
        drive(&mut t, 2, 200, |n| if n == 2 { 0.05 } else { 0.04 });
        assert_eq!(t.threads(2), 1);
        assert_eq!(t.threads(4), 4);
        assert_eq!(t.threads(1), 1);
        assert_eq!(t.threads(2), 1, "the choice made for 2 comes back with 2");
        assert_eq!(t.threads(4), 4);
    }

    #[test]
    fn a_new_sequence_keeps_the_choice_but_not_the_old_times() {
        let mut t = ThreadTuner::new(2);
        drive(&mut t, 2, 200, |n| if n == 2 { 0.05 } else { 0.04 });
        t.new_sequence();
        assert_eq!(t.threads(2), 1);
        // Short steps of the new sequence are not compared with the long ones of the last.
        assert_eq!(
            drive(&mut t, 2, 100, |n| if n == 2 { 0.05 } else { 0.04 }),
            1
        );
    }

    #[test]
    fn noisy_steps_keep_the_faster_count() {
        let mut t = ThreadTuner::new(2);
        let mut i = 0u64;
        let mut fewer = 0;
        for _ in 0..2000 {
            let n = t.threads(2);
            // All threads 10% faster, single steps ±8% apart.
            i = i
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let noise = ((i >> 33) % 17) as f64 / 100.0 - 0.08;
            let base = if n == 2 { 0.03 } else { 0.033 };
            t.record(n, Duration::from_secs_f64(base * (1.0 + noise)));
            fewer += usize::from(n == 1);
        }
        assert!(fewer < 200, "{fewer} of 2000 steps on fewer threads");
    }

    #[test]
    fn one_allowed_thread_is_never_probed_away() {
        let mut t = ThreadTuner::new(1);
        assert_eq!(drive(&mut t, 1, 100, |_| 0.01), 1);
        assert_eq!(t.threads(0), 1);
    }
}
