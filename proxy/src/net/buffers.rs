//! Relay buffers recycled per thread: an idle client holds no buffer, and an active one
//! does not pay for a fresh allocation at every transaction.
//!
//! A session's task moves between the runtime's threads, so one thread may take
//! buffers that another gives back: each thread keeps a few, and what one has too many
//! of goes to a small shared pool the other takes from, instead of being freed on one
//! side and allocated again on the other (which cost a 16 KiB allocation, its page
//! faults and a free per transaction).

use std::cell::RefCell;
use std::sync::Mutex;

use crate::sync::Locked;
use bytes::BytesMut;

/// Capacity of a pooled buffer.
pub const SIZE: usize = 16 * 1024;
/// Most free buffers kept per thread.
const KEEP: usize = 32;
/// Most free buffers kept in the shared pool.
const SHARED_KEEP: usize = 64;

thread_local! {
    static FREE: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
}

static SHARED: Mutex<Vec<BytesMut>> = Mutex::new(Vec::new());

fn shared() -> std::sync::MutexGuard<'static, Vec<BytesMut>> {
    SHARED.locked()
}

/// A buffer with at least [`SIZE`] bytes of room.
pub fn take() -> BytesMut {
    FREE.with(|f| f.borrow_mut().pop())
        .or_else(|| shared().pop())
        .unwrap_or_else(|| BytesMut::with_capacity(SIZE))
}

/// Gives an empty buffer back; one that grew large, or one that cannot offer [`SIZE`]
/// bytes without a new allocation (a small one, or one whose storage is still shared
/// with bytes in flight), is freed instead. Never allocates: growing a small buffer here
/// and freeing it again when the pool is full cost an allocation, a copy and a free per
/// transaction.
pub fn give(mut buf: BytesMut) {
    if !buf.is_empty() || buf.capacity() == 0 {
        return;
    }
    // Reclaims the space before the read position (no copy: the buffer is empty).
    if !buf.try_reclaim(SIZE) || buf.capacity() > 4 * SIZE {
        return;
    }
    let Some(buf) = FREE.with(|f| {
        let mut f = f.borrow_mut();
        if f.len() < KEEP {
            f.push(buf);
            None
        } else {
            Some(buf)
        }
    }) else {
        return;
    };
    let mut pool = shared();
    if pool.len() < SHARED_KEEP {
        pool.push(buf);
    }
}

/// Makes sure `buf` has room to read into, taking a pooled buffer if it has none.
pub fn ready(buf: &mut BytesMut) {
    if buf.capacity() == 0 {
        *buf = take();
    } else if buf.capacity() - buf.len() < SIZE / 4 {
        buf.reserve(SIZE);
    }
}

/// Returns `buf` to the pool if it is empty, leaving an unallocated buffer behind.
pub fn release(buf: &mut BytesMut) {
    if buf.is_empty() && buf.capacity() > 0 {
        give(std::mem::take(buf));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pooled() -> usize {
        FREE.with(|f| f.borrow().len())
    }

    #[test]
    fn buffers_are_recycled_and_bounded() {
        let mut a = take();
        assert!(a.capacity() >= SIZE);
        a.extend_from_slice(b"abc");
        let ptr = a.as_ptr();
        // Not empty: not pooled.
        release(&mut a);
        assert!(a.capacity() > 0);
        a.clear();
        release(&mut a);
        assert_eq!(a.capacity(), 0);
        let b = take();
        assert_eq!(b.as_ptr(), ptr, "the same allocation comes back");
        let mut big = BytesMut::with_capacity(8 * SIZE);
        release(&mut big);
        let c = take();
        assert!(c.capacity() <= 4 * SIZE, "oversized buffers are not pooled");
        let mut small = BytesMut::with_capacity(64);
        small.extend_from_slice(b"x");
        small.clear();
        let before = pooled();
        release(&mut small);
        assert_eq!(small.capacity(), 0, "released even when not pooled");
        assert_eq!(
            pooled(),
            before,
            "a small buffer is not grown into the pool"
        );
        // A buffer read from and advanced is pooled with its full room back.
        let mut used = take();
        let used_ptr = used.as_ptr();
        used.extend_from_slice(&[7; 100]);
        bytes::Buf::advance(&mut used, 100);
        release(&mut used);
        let e = take();
        assert_eq!(e.as_ptr(), used_ptr);
        assert!(e.capacity() >= SIZE);
        let mut empty = BytesMut::new();
        ready(&mut empty);
        assert!(empty.capacity() >= SIZE);
    }

    #[test]
    fn what_one_thread_gives_back_another_takes() {
        // A thread whose own pool is full passes the buffer on to the shared one.
        let given = std::thread::spawn(|| {
            let bufs: Vec<BytesMut> = (0..=KEEP).map(|_| BytesMut::with_capacity(SIZE)).collect();
            let last = bufs.last().expect("KEEP + 1 buffers").as_ptr() as usize;
            for b in bufs {
                give(b);
            }
            assert_eq!(pooled(), KEEP);
            last
        })
        .join()
        .expect("the giving thread");
        let found = std::thread::spawn(move || {
            assert_eq!(pooled(), 0, "a new thread starts with an empty pool");
            (0..SHARED_KEEP).any(|_| take().as_ptr() as usize == given)
        })
        .join()
        .expect("the taking thread");
        assert!(found, "the other thread took the very buffer given back");
    }
}
