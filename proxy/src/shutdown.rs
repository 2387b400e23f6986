//! Graceful shutdown signalling: one watch channel from the proxy handle to every task.

use tokio::sync::watch;

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

/// The sending side, owned by the proxy handle.
#[derive(Debug)]
pub struct Trigger(watch::Sender<Phase>);

/// A task's view of the shutdown phase.
#[derive(Debug, Clone)]
pub struct Signal(watch::Receiver<Phase>);

/// A new trigger and its first signal.
pub fn channel() -> (Trigger, Signal) {
    let (tx, rx) = watch::channel(Phase::Running);
    (Trigger(tx), Signal(rx))
}

impl Trigger {
    /// Moves to `phase` if it is later than the current one.
    pub fn advance(&self, phase: Phase) {
        self.0.send_if_modified(|p| {
            let later = phase > *p;
            if later {
                *p = phase;
            }
            later
        });
    }

    pub fn phase(&self) -> Phase {
        *self.0.borrow()
    }
}

impl Signal {
    pub fn phase(&self) -> Phase {
        *self.0.borrow()
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
