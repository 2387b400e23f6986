//! Graceful shutdown signalling: one watch channel from the proxy handle to every task.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

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
pub struct Trigger(watch::Sender<Phase>, Arc<AtomicU8>);

/// A task's view of the shutdown phase. [`Signal::phase`] is a plain atomic load (every
/// session checks it on every pass of its loop); waiting uses the watch channel.
#[derive(Debug, Clone)]
pub struct Signal(watch::Receiver<Phase>, Arc<AtomicU8>);

/// A new trigger and its first signal.
pub fn channel() -> (Trigger, Signal) {
    let (tx, rx) = watch::channel(Phase::Running);
    let phase = Arc::new(AtomicU8::new(Phase::Running as u8));
    (Trigger(tx, Arc::clone(&phase)), Signal(rx, phase))
}

impl Trigger {
    /// Moves to `phase` if it is later than the current one.
    pub fn advance(&self, phase: Phase) {
        self.0.send_if_modified(|p| {
            let later = phase > *p;
            if later {
                *p = phase;
                self.1.store(phase as u8, Ordering::Release);
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
        Phase::from_u8(self.1.load(Ordering::Acquire))
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
