//! Locks that outlive a panic, a future polled only when it asked to be, and the
//! stripe a thread adds its counts to.
//!
//! A task that panics while holding one of the proxy's standard-library locks poisons
//! it; every lock here guards data kept consistent at each step (no await and no
//! half-made update while held), so the next holder takes the data as it is instead of
//! panicking too. One spelling for that choice, instead of
//! `unwrap_or_else(|p| p.into_inner())` at every use.
//!
//! [`OnWake`] is for the signals every session waits on at once (the proxy's shutdown
//! phase, lameduck's cancellation of a generation): polling tokio's `Notified` while it
//! waits takes the `Notify`'s one lock, so a relay that polled them at every wake-up
//! had both worker threads taking the same two locks for every message of every client.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::task::{Context, Poll, Wake, Waker};

/// `lock()`, poison ignored.
pub(crate) trait Locked<T: ?Sized> {
    fn locked(&self) -> MutexGuard<'_, T>;
}

impl<T: ?Sized> Locked<T> for Mutex<T> {
    fn locked(&self) -> MutexGuard<'_, T> {
        self.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// `read()` and `write()`, poison ignored.
pub(crate) trait ReadWrite<T: ?Sized> {
    fn reading(&self) -> RwLockReadGuard<'_, T>;
    fn writing(&self) -> RwLockWriteGuard<'_, T>;
}

impl<T: ?Sized> ReadWrite<T> for RwLock<T> {
    fn reading(&self) -> RwLockReadGuard<'_, T> {
        self.read().unwrap_or_else(|p| p.into_inner())
    }
    fn writing(&self) -> RwLockWriteGuard<'_, T> {
        self.write().unwrap_or_else(|p| p.into_inner())
    }
}

/// Stripes of a counter that every transaction adds to ([`crate::clients::DbStats`],
/// the relay's histograms): each thread adds to its own stripe and a reader sums them.
/// One shared atomic that both worker threads add to a dozen times a transaction moves
/// its cache line between the cores at each addition.
pub(crate) const STRIPES: usize = 8;

/// This thread's stripe: threads take them in turn as they first count something (the
/// runtime's workers start first, so each has its own).
pub(crate) fn stripe() -> usize {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    thread_local! {
        static MINE: usize = NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES;
    }
    MINE.with(|m| *m)
}

/// A future polled only at its first poll and after its own waker was called: the
/// poll of a task woken for something else returns `Pending` at the cost of a waker
/// comparison and one atomic load, without touching what the future waits on.
pub(crate) struct OnWake<F> {
    fut: F,
    wake: Arc<Woken>,
    /// The waker the future is polled with: it marks `wake` and wakes the task.
    waker: Waker,
    /// The task's waker as last given to `wake`: given again only when the task's
    /// differs (a task's waker does not change between its polls).
    task: Option<Waker>,
}

/// Whether the future's waker was called since its last poll, and the task to wake.
#[derive(Default)]
struct Woken {
    woken: AtomicBool,
    task: atomic_waker::AtomicWaker,
}

impl Wake for Woken {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<F: Future + Unpin> OnWake<F> {
    pub(crate) fn new(fut: F) -> Self {
        let wake = Arc::new(Woken::default());
        Self {
            fut,
            waker: Waker::from(Arc::clone(&wake)),
            wake,
            task: None,
        }
    }
}

impl<F: Future + Unpin> Future for OnWake<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        match &this.task {
            // Not polled since its first poll unless woken.
            Some(task) if task.will_wake(cx.waker()) => {
                if !this.wake.woken.load(Ordering::Acquire)
                    || !this.wake.woken.swap(false, Ordering::AcqRel)
                {
                    return Poll::Pending;
                }
            }
            // The first poll, or another task: given the new waker before the future is
            // polled, so a wake from here on reaches the task that polls now.
            _ => {
                this.wake.task.register(cx.waker());
                this.task = Some(cx.waker().clone());
                this.wake.woken.store(false, Ordering::Release);
            }
        }
        Pin::new(&mut this.fut).poll(&mut Context::from_waker(&this.waker))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts its polls; ready once `go` is set, and then only if woken through the
    /// waker it was last polled with (which it keeps, as a real future does).
    struct Probe {
        polls: Arc<std::sync::atomic::AtomicUsize>,
        go: Arc<AtomicBool>,
        waker: Arc<Mutex<Option<Waker>>>,
    }

    impl Future for Probe {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::SeqCst);
            if self.go.load(Ordering::SeqCst) {
                return Poll::Ready(());
            }
            *self.waker.locked() = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    #[tokio::test]
    async fn a_future_on_wake_is_polled_only_when_its_own_waker_was_called() {
        let polls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let go = Arc::new(AtomicBool::new(false));
        let waker = Arc::new(Mutex::new(None::<Waker>));
        let mut f = OnWake::new(Probe {
            polls: Arc::clone(&polls),
            go: Arc::clone(&go),
            waker: Arc::clone(&waker),
        });
        let task_woken = Arc::new(AtomicBool::new(false));
        struct Flag(Arc<AtomicBool>);
        impl Wake for Flag {
            fn wake(self: Arc<Self>) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let task = Waker::from(Arc::new(Flag(Arc::clone(&task_woken))));
        let mut cx = Context::from_waker(&task);
        assert!(Pin::new(&mut f).poll(&mut cx).is_pending());
        assert_eq!(polls.load(Ordering::SeqCst), 1, "the first poll reaches it");
        // The task is polled for other reasons: the future is not.
        go.store(true, Ordering::SeqCst);
        for _ in 0..3 {
            assert!(Pin::new(&mut f).poll(&mut cx).is_pending());
        }
        assert_eq!(polls.load(Ordering::SeqCst), 1, "not polled unwoken");
        assert!(!task_woken.load(Ordering::SeqCst));
        // Its own waker: the task is woken and the next poll reaches it.
        waker.locked().take().expect("it kept its waker").wake();
        assert!(task_woken.load(Ordering::SeqCst), "the task was woken");
        assert!(Pin::new(&mut f).poll(&mut cx).is_ready());
        assert_eq!(polls.load(Ordering::SeqCst), 2);
        // Moved to another task: polled at once there, and that task is the one woken.
        go.store(false, Ordering::SeqCst);
        let mut g = OnWake::new(Probe {
            polls: Arc::clone(&polls),
            go: Arc::clone(&go),
            waker: Arc::clone(&waker),
        });
        assert!(Pin::new(&mut g).poll(&mut cx).is_pending());
        let other_woken = Arc::new(AtomicBool::new(false));
        let other = Waker::from(Arc::new(Flag(Arc::clone(&other_woken))));
        assert!(Pin::new(&mut g)
            .poll(&mut Context::from_waker(&other))
            .is_pending());
        assert_eq!(polls.load(Ordering::SeqCst), 4, "the new task's first poll");
        task_woken.store(false, Ordering::SeqCst);
        waker.locked().take().expect("it kept its waker").wake();
        assert!(other_woken.load(Ordering::SeqCst), "the new task was woken");
        assert!(!task_woken.load(Ordering::SeqCst), "not the old one");
    }

    #[tokio::test]
    async fn a_shutdown_move_reaches_a_session_waiting_on_wake() {
        let (trigger, signal) = crate::shutdown::channel();
        let mut f = OnWake::new(Box::pin(async move {
            signal.reached(crate::shutdown::Phase::Draining).await
        }));
        let waited = tokio::spawn(async move {
            (&mut f).await;
        });
        tokio::task::yield_now().await;
        assert!(!waited.is_finished());
        trigger.advance(crate::shutdown::Phase::Draining);
        tokio::time::timeout(std::time::Duration::from_secs(5), waited)
            .await
            .expect("woken by the move")
            .unwrap();
    }

    #[test]
    fn a_poisoned_lock_still_hands_out_its_data() {
        let m = std::sync::Arc::new(Mutex::new(1));
        let rw = std::sync::Arc::new(RwLock::new(2));
        let (m2, rw2) = (m.clone(), rw.clone());
        let _ = std::thread::spawn(move || {
            let _a = m2.lock().unwrap();
            let _b = rw2.write().unwrap();
            panic!("poisons both");
        })
        .join();
        assert!(m.is_poisoned() && rw.is_poisoned());
        *m.locked() += 1;
        *rw.writing() += 1;
        assert_eq!((*m.locked(), *rw.reading()), (2, 3));
    }
}
