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
    /// Stop accepting; sessions end at their next transaction boundary.
    Draining,
    /// The drain timeout passed: every session ends now.
    Closing,
}

impl Phase {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => Phase::Running,
            1 => Phase::Draining,
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

    #[test]
    fn a_gone_trigger_reads_as_the_final_phase() {
        let (trigger, signal) = channel();
        trigger.advance(Phase::Draining);
        assert_eq!(signal.phase(), Phase::Draining);
        drop(trigger);
        assert_eq!(signal.phase(), Phase::Closing);
    }
}
