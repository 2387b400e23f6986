//! Graceful shutdown signalling: one phase and its notification, from the proxy handle to
//! every task.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

/// The phases of a shutdown, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Normal operation.
    Running,
    /// A successor process is taking over (`handoff --takeover`): the listener stops
    /// accepting and each session is handed over at its next transaction boundary. The
    /// only phase that can be left again ([`Trigger::retreat`]): a successor lost before
    /// it took everything leaves this process serving.
    HandingOver,
    /// Stop accepting; sessions end at their next transaction boundary.
    Draining,
    /// The drain timeout passed: every session ends now.
    Closing,
}

impl Phase {
    /// The phase after this one (`Closing` stays): what a loop that sees this one
    /// waits for next.
    pub fn next(self) -> Self {
        match self {
            Phase::Running => Phase::HandingOver,
            Phase::HandingOver => Phase::Draining,
            Phase::Draining | Phase::Closing => Phase::Closing,
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            0 => Phase::Running,
            1 => Phase::HandingOver,
            2 => Phase::Draining,
            _ => Phase::Closing,
        }
    }
}

/// The sending side, owned by the proxy handle.
#[derive(Debug)]
pub struct Trigger(Arc<State>);

/// A task's view of the shutdown phase. [`Signal::phase`] is a plain atomic load (every
/// session checks it on every pass of its loop); [`Signal::reached`] waits on a
/// notification, a small future (every parked client holds one).
#[derive(Debug, Clone)]
pub struct Signal(Arc<State>);

/// The phase as an atomic, and a notification of each move (or of the trigger's end).
#[derive(Debug, Default)]
struct State {
    phase: AtomicU8,
    /// The trigger is gone: read as the final phase.
    gone: AtomicBool,
    moved: Notify,
}

/// A new trigger and its first signal.
pub fn channel() -> (Trigger, Signal) {
    let state = Arc::new(State::default());
    (Trigger(Arc::clone(&state)), Signal(state))
}

impl Trigger {
    /// Moves to `phase` if it is later than the current one.
    pub fn advance(&self, phase: Phase) {
        let before = self.0.phase.fetch_max(phase as u8, Ordering::AcqRel);
        if before < phase as u8 {
            self.0.moved.notify_waiters();
        }
    }

    pub fn phase(&self) -> Phase {
        Phase::from_u8(self.0.phase.load(Ordering::Acquire))
    }

    /// Back from [`Phase::HandingOver`] to [`Phase::Running`] (the successor was lost);
    /// any other phase stays. Returns whether it moved.
    pub fn retreat(&self) -> bool {
        let moved = self
            .0
            .phase
            .compare_exchange(
                Phase::HandingOver as u8,
                Phase::Running as u8,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok();
        if moved {
            self.0.moved.notify_waiters();
        }
        moved
    }
}

impl Drop for Trigger {
    fn drop(&mut self) {
        self.0.gone.store(true, Ordering::Release);
        self.0.moved.notify_waiters();
    }
}

impl Signal {
    /// The current phase; `Closing` once the trigger is gone (the proxy torn down), as
    /// [`Signal::reached`] reads it too. A loop that waits with `reached` for the phase
    /// after the one it sees would otherwise find the wait over at once, forever.
    pub fn phase(&self) -> Phase {
        if self.0.gone.load(Ordering::Acquire) {
            return Phase::Closing;
        }
        Phase::from_u8(self.0.phase.load(Ordering::Acquire))
    }

    /// The next move of the phase (or the trigger's end), for a wait that keeps less
    /// state than [`Signal::reached`]: enable it, then check [`Signal::phase`], then
    /// await it — a move between the check and the wait still wakes it.
    pub fn next_move(&self) -> tokio::sync::futures::Notified<'_> {
        self.0.moved.notified()
    }

    /// Resolves when the phase reaches at least `phase`, or when the trigger is gone
    /// (which only happens once the proxy is torn down: read as the final phase).
    ///
    /// # Cancel safety
    /// Cancel-safe: dropping it loses nothing; a later call sees the current phase.
    pub async fn reached(&self, phase: Phase) {
        loop {
            let moved = self.0.moved.notified();
            tokio::pin!(moved);
            // Registered before the check: a move between the check and the wait wakes it.
            moved.as_mut().enable();
            if self.phase() >= phase || self.0.gone.load(Ordering::Acquire) {
                return;
            }
            moved.await;
        }
    }
}

impl Signal {
    /// Resolves once the phase is no longer `phase` (or the trigger is gone).
    ///
    /// # Cancel safety
    /// Cancel-safe, as [`Signal::reached`].
    pub async fn left(&self, phase: Phase) {
        loop {
            let moved = self.0.moved.notified();
            tokio::pin!(moved);
            moved.as_mut().enable();
            if self.phase() != phase {
                return;
            }
            moved.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn reached_waits_for_the_phase_and_ends_with_the_trigger() {
        let (trigger, signal) = channel();
        let waiting = {
            let signal = signal.clone();
            tokio::spawn(async move { signal.reached(Phase::Draining).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "resolved while running");
        trigger.advance(Phase::Draining);
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("woken by the move")
            .unwrap();
        // Already past: at once.
        tokio::time::timeout(Duration::from_secs(5), signal.reached(Phase::Draining))
            .await
            .expect("already past");
        // A later phase: only when the trigger moves there, or is gone.
        let later = {
            let signal = signal.clone();
            tokio::spawn(async move { signal.reached(Phase::Closing).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!later.is_finished(), "resolved before Closing");
        drop(trigger);
        tokio::time::timeout(Duration::from_secs(5), later)
            .await
            .expect("woken by the trigger's end")
            .unwrap();
    }

    #[tokio::test]
    async fn handing_over_can_be_left_again_but_nothing_later() {
        let (trigger, signal) = channel();
        trigger.advance(Phase::HandingOver);
        assert_eq!(signal.phase(), Phase::HandingOver);
        tokio::time::timeout(Duration::from_secs(5), signal.reached(Phase::HandingOver))
            .await
            .expect("reached");
        assert!(trigger.retreat());
        assert_eq!(signal.phase(), Phase::Running);
        assert!(!trigger.retreat(), "nothing to leave");
        trigger.advance(Phase::Draining);
        assert!(!trigger.retreat(), "a drain is never undone");
        assert_eq!(signal.phase(), Phase::Draining);
    }

    #[test]
    fn a_gone_trigger_reads_as_the_final_phase() {
        let (trigger, signal) = channel();
        trigger.advance(Phase::Draining);
        assert_eq!(signal.phase(), Phase::Draining);
        drop(trigger);
        assert_eq!(signal.phase(), Phase::Closing);
    }
}
