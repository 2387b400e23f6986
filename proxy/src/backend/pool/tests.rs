//! The pool against a stand-in server.

use super::conn::ASK_KERNEL_AFTER;
use super::*;
use crate::net::tls::ServerTls;
use crate::testing::{Answer, StandIn};

fn pool(addr: &HostPort, size: usize, wait: Duration) -> Arc<Pool> {
    Pool::start(
        PoolKey {
            user: "app".into(),
            database: "app".into(),
            addr: addr.clone(),
        },
        Credentials::None,
        PoolSettings {
            size,
            min_idle: 0,
            query_wait_timeout: wait,
            idle_timeout: Duration::ZERO,
            lifetime: Duration::ZERO,
            max_prepared: 10,
        },
        Duration::from_secs(2),
        ServerTls::default(),
        "main",
        false,
    )
}

#[tokio::test]
async fn waiters_are_served_in_order_and_give_up_after_the_wait_timeout() {
    let server = StandIn::start(Answer::Ok).await;
    let p = pool(&server.addr, 1, Duration::from_secs(5));
    // The only connection, opened for real.
    let first = p.checkout().await.unwrap();
    let pid = first.pid;
    // From here on, nothing but timers: tokio's clock is paused.
    tokio::time::pause();
    let started = Instant::now();
    let e = p.checkout().await.unwrap_err();
    assert!(matches!(e, PoolError::WaitTimeout(d, 1) if d == Duration::from_secs(5)));
    // The wait timeout, to the timer's millisecond.
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(5) && waited <= Duration::from_millis(5002),
        "{waited:?}"
    );
    // Two waiters: the connection comes back to the first, then to the second.
    let (p1, p2) = (Arc::clone(&p), Arc::clone(&p));
    let w1 = tokio::spawn(async move { p1.checkout().await });
    tokio::task::yield_now().await;
    let w2 = tokio::spawn(async move { p2.checkout().await });
    tokio::task::yield_now().await;
    p.checkin(first);
    let got = w1.await.unwrap().expect("the first waiter gets it");
    assert_eq!(got.pid, pid, "the same connection, handed over");
    p.checkin(got);
    assert_eq!(w2.await.unwrap().expect("then the second").pid, pid);
}

#[tokio::test]
async fn each_wait_ends_at_its_own_deadline_with_one_timer_for_the_pool() {
    let server = StandIn::start(Answer::Ok).await;
    let p = pool(&server.addr, 1, Duration::from_secs(5));
    let held = p.checkout().await.unwrap();
    tokio::time::pause();
    let started = Instant::now();
    let waiter = |p: &Arc<Pool>| {
        let p = Arc::clone(p);
        tokio::spawn(async move {
            let r = p.checkout().await;
            (r.map(|b| b.pid), Instant::now())
        })
    };
    // Three waits begun 0, 1 and 2 s in; the second gives up by itself at 1.5 s.
    let a = waiter(&p);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let b = waiter(&p);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let c = waiter(&p);
    tokio::time::sleep(Duration::from_millis(500)).await;
    b.abort();
    // Bounded, so that a wait nothing ends fails the test instead of hanging it.
    let (ra, at) = tokio::time::timeout(Duration::from_secs(60), a)
        .await
        .expect("the first wait ended")
        .unwrap();
    assert!(matches!(ra, Err(PoolError::WaitTimeout(..))), "{ra:?}");
    let waited = at - started;
    assert!(
        waited >= Duration::from_secs(5) && waited <= Duration::from_millis(5002),
        "the first wait ended after {waited:?}"
    );
    // The third is served before its deadline (7 s): the connection comes back at 6 s.
    tokio::time::sleep_until(started + Duration::from_secs(6)).await;
    assert_eq!(p.snapshot().waiting, 1, "only the third still waits");
    let pid = held.pid;
    p.checkin(held);
    let (rc, _) = tokio::time::timeout(Duration::from_secs(60), c)
        .await
        .expect("the third wait ended")
        .unwrap();
    assert_eq!(rc.unwrap(), pid, "served, not timed out");
    // Nothing left to time: the expiry task sleeps, and ends with the pool.
    let task = Arc::downgrade(&p);
    drop(p);
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(
        task.upgrade().is_none(),
        "the expiry task keeps no pool alive"
    );
}

#[tokio::test]
async fn a_discarded_connection_frees_its_slot_for_a_new_one() {
    let server = StandIn::start(Answer::Ok).await;
    let p = pool(&server.addr, 1, Duration::from_secs(5));
    let first = p.checkout().await.unwrap();
    let (p1, old) = (Arc::clone(&p), first.pid);
    let waiter = tokio::spawn(async move { p1.checkout().await });
    tokio::task::yield_now().await;
    p.discard(first);
    let next = waiter
        .await
        .unwrap()
        .expect("a new connection in the freed slot");
    assert_ne!(next.pid, old);
}

#[tokio::test]
async fn try_checkout_hands_out_only_a_quiet_idle_connection() {
    let server = StandIn::start(Answer::Ok).await;
    let p = pool(&server.addr, 2, Duration::from_secs(5));
    assert!(p.try_checkout().is_none(), "nothing idle: it opens nothing");
    let first = p.checkout().await.unwrap();
    let pid = first.pid;
    assert!(p.try_checkout().is_none(), "the only connection is out");
    p.checkin(first);
    let again = p.try_checkout().expect("the idle connection");
    assert_eq!(again.pid, pid);
    p.checkin(again);
    server.close_all();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        p.try_checkout().is_none(),
        "a connection the server closed is dropped, not handed out"
    );
}

#[tokio::test]
async fn an_idle_connection_the_server_closed_is_never_handed_out() {
    let server = StandIn::start(Answer::Ok).await;
    let p = pool(&server.addr, 2, Duration::from_secs(5));
    let first = p.checkout().await.unwrap();
    let old = first.pid;
    p.checkin(first);
    server.close_all();
    // Let the close reach our socket.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let next = p.checkout().await.unwrap();
    assert_ne!(
        next.pid, old,
        "the closed connection was evicted, not reused"
    );
}

#[tokio::test]
async fn a_connection_closed_while_the_runtime_looked_away_is_not_handed_out() {
    let server = StandIn::start(Answer::Ok).await;
    let p = pool(&server.addr, 2, Duration::from_secs(5));
    let first = p.checkout().await.unwrap();
    p.checkin(first);
    server.close_all();
    // Blocks this single-threaded runtime: its I/O driver never sees the close, so
    // only the kernel knows the connection is gone.
    std::thread::sleep(ASK_KERNEL_AFTER + Duration::from_millis(50));
    assert!(
        p.try_checkout().is_none(),
        "a connection the server closed was handed out"
    );
}

#[tokio::test]
async fn a_retired_pool_closes_what_comes_back() {
    let server = StandIn::start(Answer::Ok).await;
    let p = pool(&server.addr, 1, Duration::from_secs(5));
    let c = p.checkout().await.unwrap();
    p.retire();
    let old = c.pid;
    p.checkin(c);
    p.retired.store(false, std::sync::atomic::Ordering::Release);
    let next = p.checkout().await.unwrap();
    assert_ne!(
        next.pid, old,
        "the connection was closed at checkin, not kept"
    );
}
