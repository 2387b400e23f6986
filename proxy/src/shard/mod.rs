//! Shards: which server is each shard's primary, and everything that changes it — the
//! state machine and its generations, the events that move it (revoke, lameduck,
//! establish, abort), failure detection and discovery, switchovers, the fence on an old
//! primary, the split-brain watchdog and the demote command.

pub(crate) mod control;
pub(crate) mod demote;
pub(crate) mod fence;
pub(crate) mod health;
mod state;
pub(crate) mod switchover;
pub(crate) mod watchdog;

pub use state::*;
