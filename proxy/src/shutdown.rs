//! Graceful shutdown signalling: one watch channel from the proxy handle to every task.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;

use tokio::sync::{watch, Notify};

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
pub struct Trigger(watch::Sender<Phase>, Arc<State>);

/// A task's view of the shutdown phase. [`Signal::phase`] is a plain atomic load (every
/// session checks it on every pass of its loop); waiting uses the watch channel, or
/// (for the many parked clients, whose wait should be small) [`Signal::past`].
#[derive(Debug, Clone)]
pub struct Signal(watch::Receiver<Phase>, Arc<State>);

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
    let (tx, rx) = watch::channel(Phase::Running);
    let state = Arc::new(State::default());
    (Trigger(tx, Arc::clone(&state)), Signal(rx, state))
}

impl Trigger {
    /// Moves to `phase` if it is later than the current one.
    pub fn advance(&self, phase: Phase) {
        let moved = self.0.send_if_modified(|p| {
            let later = phase > *p;
            if later {
                *p = phase;
                self.1.phase.store(phase as u8, Ordering::Release);
            }
            later
        });
        if moved {
            self.1.moved.notify_waiters();
        }
    }

    pub fn phase(&self) -> Phase {
        *self.0.borrow()
    }
}

impl Drop for Trigger {
    fn drop(&mut self) {
        self.1.gone.store(true, Ordering::Release);
        self.1.moved.notify_waiters();
    }
}

impl Signal {
    pub fn phase(&self) -> Phase {
        Phase::from_u8(self.1.phase.load(Ordering::Acquire))
    }

    /// Resolves when the phase reaches at least `phase` (or the trigger is gone), as
    /// [`Signal::reached`] does, with a smaller future: a notification, not the watch
    /// channel's wait.
    ///
    /// # Cancel safety
    /// Cancel-safe: dropping it loses nothing; a later call sees the current phase.
    pub async fn past(&self, phase: Phase) {
        loop {
            let moved = self.1.moved.notified();
            tokio::pin!(moved);
            // Registered before the check: a move between the check and the wait wakes it.
            moved.as_mut().enable();
            if self.phase() >= phase || self.1.gone.load(Ordering::Acquire) {
                return;
            }
            moved.await;
        }
    }

    /// Resolves when the phase reaches at least `phase`.
    ///
    /// # Cancel safety
    /// Cancel-safe: dropping it loses nothing; a later call sees the current phase.
    pub async fn reached(&mut self, phase: Phase) {
        // An error means the trigger is gone, which only happens once the proxy is torn
        // down: treat it as the final phase.
        let _ = self.0.wait_for(|p| *p >= phase).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn past_waits_for_the_phase_and_ends_with_the_trigger() {
        let (trigger, signal) = channel();
        let waiting = {
            let signal = signal.clone();
            tokio::spawn(async move { signal.past(Phase::Draining).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "resolved while running");
        trigger.advance(Phase::Draining);
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("woken by the move")
            .unwrap();
        // Already past: at once.
        tokio::time::timeout(Duration::from_secs(5), signal.past(Phase::Draining))
            .await
            .expect("already past");
        // A later phase: only when the trigger moves there, or is gone.
        let later = {
            let signal = signal.clone();
            tokio::spawn(async move { signal.past(Phase::Closing).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!later.is_finished(), "resolved before Closing");
        drop(trigger);
        tokio::time::timeout(Duration::from_secs(5), later)
            .await
            .expect("woken by the trigger's end")
            .unwrap();
    }
}
