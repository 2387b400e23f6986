//! Relay buffers recycled per thread: an idle client holds no buffer, and an active one
//! does not pay for a fresh allocation at every transaction.

use std::cell::RefCell;

use bytes::BytesMut;

/// Capacity of a pooled buffer.
pub const SIZE: usize = 16 * 1024;
/// Most free buffers kept per thread.
const KEEP: usize = 32;

thread_local! {
    static FREE: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
}

/// A buffer with at least [`SIZE`] bytes of room.
pub fn take() -> BytesMut {
    FREE.with(|f| f.borrow_mut().pop())
        .unwrap_or_else(|| BytesMut::with_capacity(SIZE))
}

/// Gives an empty buffer back; one that grew large is freed instead.
pub fn give(mut buf: BytesMut) {
    if !buf.is_empty() || buf.capacity() == 0 {
        return;
    }
    // Reclaims the space before the read position (no copy: the buffer is empty).
    buf.reserve(SIZE);
    if buf.capacity() > 4 * SIZE {
        return;
    }
    FREE.with(|f| {
        let mut f = f.borrow_mut();
        if f.len() < KEEP {
            f.push(buf);
        }
    });
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
        let mut empty = BytesMut::new();
        ready(&mut empty);
        assert!(empty.capacity() >= SIZE);
    }
}
