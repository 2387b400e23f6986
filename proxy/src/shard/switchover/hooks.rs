//! The points where a coordinated switchover stops to talk to the other proxies.

use std::future::Future;

use super::Outcome;
use crate::config::HostPort;
use crate::shard::control;

/// What the proxies' coordination does between the steps of a switchover it runs for
/// all of them (`crate::coord`): tell the others to hold, wait for them, publish each
/// point passed. A hook's error before the promotion rolls the switchover back. The
/// `()` hooks do nothing: a switchover of this proxy alone.
pub(crate) trait Hooks: Send {
    /// After this proxy's buffer step: the others are told to hold too.
    fn holding(&mut self) -> impl Future<Output = Result<(), String>> + Send;
    /// After this proxy's lameduck (what it did is given): waits for the others to
    /// hold. Returns the backend pids of their sessions on the old primary, which the
    /// fence leaves alone.
    fn held(
        &mut self,
        lameduck: control::Lameduck,
    ) -> impl Future<Output = Result<Vec<i32>, String>> + Send;
    /// Before the fence, with the databases it is about to close.
    fn fencing(&mut self, databases: &[String]) -> impl Future<Output = Result<(), String>> + Send;
    /// After the fence, once the target has replayed up to its LSN, before the
    /// promotion: past this point the switchover rolls forward, whoever finishes it.
    fn promoting(
        &mut self,
        lsn: &str,
        databases: &[String],
    ) -> impl Future<Output = Result<(), String>> + Send;
    /// The target is a writable primary; this proxy establishes it next at `epoch`.
    fn promoted(&mut self, to: &HostPort, epoch: u64) -> impl Future<Output = ()> + Send;
    /// How the switchover ended (not called when it was refused before holding).
    fn finished(
        &mut self,
        outcome: Outcome,
        error: Option<&str>,
    ) -> impl Future<Output = ()> + Send;
    /// True when other proxies take part (they must hold before the old primary stops).
    fn coordinated(&self) -> bool {
        false
    }
}

impl Hooks for () {
    async fn holding(&mut self) -> Result<(), String> {
        Ok(())
    }
    async fn held(&mut self, _: control::Lameduck) -> Result<Vec<i32>, String> {
        Ok(Vec::new())
    }
    async fn fencing(&mut self, _: &[String]) -> Result<(), String> {
        Ok(())
    }
    async fn promoting(&mut self, _: &str, _: &[String]) -> Result<(), String> {
        Ok(())
    }
    async fn promoted(&mut self, _: &HostPort, _: u64) {}
    async fn finished(&mut self, _: Outcome, _: Option<&str>) {}
}
