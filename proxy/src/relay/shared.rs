//! Values many transaction-mode sessions hold equal copies of — the pool target (user,
//! server database, credentials) and the startup parameters — kept once and shared.
//!
//! Thousands of clients of one application log in as the same user to the same
//! database with the same parameters. Each kept its own copy (two maps of parameters,
//! two strings and the credentials, for as long as it stays connected). A session now
//! holds a pointer to a copy shared with every session that has an equal one, and a
//! server connection whose applied parameters are that same copy is known to be in
//! step with the client without comparing the maps (one pointer comparison per
//! transaction).
//!
//! The table is small and bounded: a login looks through at most [`KEPT`] values and
//! adds its own when none is equal. When the table is full, an entry no session holds
//! any more makes room; if every entry is in use, the new value is used unshared —
//! correct, only not deduplicated.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};

use crate::sync::Locked;

/// Most distinct values kept for sharing, per kind.
const KEPT: usize = 64;

/// A client's startup parameters (name → value), shared between the sessions that have
/// equal ones; changed copy-on-write (`Arc::make_mut`) when a client's own `SET` of a
/// tracked parameter changes them.
pub(crate) type Params = Arc<HashMap<String, String>>;

/// The empty parameter set, shared by everyone who has none.
pub(crate) fn no_params() -> Params {
    static EMPTY: LazyLock<Params> = LazyLock::new(Params::default);
    Arc::clone(&EMPTY)
}

/// One kind of shared value: equal values given out as one allocation.
pub(crate) struct Interner<T> {
    kept: Mutex<Vec<Arc<T>>>,
}

/// Only how many are kept: a pool target holds credentials.
impl<T> std::fmt::Debug for Interner<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Interner")
            .field("kept", &self.kept.locked().len())
            .finish()
    }
}

impl<T> Default for Interner<T> {
    fn default() -> Self {
        Self {
            kept: Mutex::new(Vec::new()),
        }
    }
}

impl<T: PartialEq> Interner<T> {
    /// The shared copy of `value`: an equal value already kept, or `value` itself, kept
    /// from now on if there is room.
    pub fn share(&self, value: T) -> Arc<T> {
        let mut kept = self.kept.locked();
        if let Some(found) = kept.iter().find(|k| ***k == value) {
            return Arc::clone(found);
        }
        let new = Arc::new(value);
        if kept.len() < KEPT {
            kept.push(Arc::clone(&new));
        } else if let Some(unused) = kept.iter_mut().find(|k| Arc::strong_count(k) == 1) {
            *unused = Arc::clone(&new);
        }
        new
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.kept.locked().len()
    }
}

/// Which pool a client's transactions use: the user and server database are fixed,
/// the address follows the shard's primary. One copy for every session with an equal
/// one (see the module's note).
#[derive(PartialEq)]
pub(crate) struct PoolTarget {
    pub user: String,
    pub database: String,
    /// What the pool's connections log in with.
    pub credentials: crate::backend::login::Credentials,
    /// The primary, a standby (`@replica`), or either (`@any`).
    pub target: crate::config::Target,
}

/// What the relays share between sessions.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    /// Pool targets: the user, server database and credentials of a client's pools.
    pub targets: Interner<PoolTarget>,
    /// Startup parameters.
    pub params: Interner<HashMap<String, String>>,
}

impl Shared {
    /// The shared copy of a client's startup parameters (the one empty set for none).
    pub fn params(&self, params: HashMap<String, String>) -> Params {
        if params.is_empty() {
            no_params()
        } else {
            self.params.share(params)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn equal_values_share_one_copy_and_different_ones_do_not() {
        let shared = Shared::default();
        let a = shared.params(map(&[("application_name", "app"), ("DateStyle", "ISO")]));
        let b = shared.params(map(&[("DateStyle", "ISO"), ("application_name", "app")]));
        let c = shared.params(map(&[("application_name", "other")]));
        assert!(Arc::ptr_eq(&a, &b), "equal maps are one copy");
        assert!(!Arc::ptr_eq(&a, &c));
        assert_eq!(c.get("application_name").map(String::as_str), Some("other"));
        // No parameters at all: the one empty set, not kept in the table.
        assert!(Arc::ptr_eq(
            &shared.params(HashMap::new()),
            &shared.params(HashMap::new())
        ));
        assert_eq!(shared.params.len(), 2);
    }

    #[test]
    fn a_change_copies_and_leaves_the_shared_value_alone() {
        let shared = Shared::default();
        let mut mine = shared.params(map(&[("search_path", "a")]));
        let theirs = shared.params(map(&[("search_path", "a")]));
        Arc::make_mut(&mut mine).insert("search_path".into(), "b".into());
        assert_eq!(theirs["search_path"], "a");
        assert_eq!(mine["search_path"], "b");
        assert!(Arc::ptr_eq(
            &theirs,
            &shared.params(map(&[("search_path", "a")]))
        ));
    }

    #[test]
    fn a_full_table_reuses_unheld_entries_and_otherwise_hands_out_unshared_copies() {
        let interner = Interner::<u32>::default();
        let held: Vec<Arc<u32>> = (0..KEPT as u32).map(|i| interner.share(i)).collect();
        assert_eq!(interner.len(), KEPT);
        // Every entry is held: a new value is correct but not kept.
        let extra = interner.share(1000);
        assert_eq!(*extra, 1000);
        assert!(!Arc::ptr_eq(&extra, &interner.share(1000)));
        assert_eq!(interner.len(), KEPT);
        // One entry let go: the next new value takes its place and is shared.
        drop(held);
        let kept = interner.share(2000);
        assert!(Arc::ptr_eq(&kept, &interner.share(2000)));
        assert_eq!(interner.len(), KEPT);
    }
}
