//! The drivers' own checks through handoff: asyncpg's test suite and the psycopg checks,
//! direct and through handoff in both pool modes (and through PgBouncer when it is
//! installed), compared as `tests/drivers/asyncpg-suite` describes: nothing may fail
//! through handoff that passes direct, beyond what docs/compatibility.md lists.
//!
//! The script is run as it is documented, with `HANDOFF_BIN` naming the binary under
//! test; its own output (one line per target, the failing tests) goes to the terminal.

use std::path::Path;
use std::process::Command;

#[test]
fn asyncpg_suite_and_psycopg_checks_pass_through_handoff_as_directly() {
    // What the script needs from the machine, installed first when missing.
    handoff_tests::PgBin::find().unwrap_or_else(|e| panic!("{e:#}"));
    handoff_tests::setup::ensure_venv_module().unwrap_or_else(|e| panic!("{e:#}"));
    let bin = handoff_tests::handoff_binary();
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("asyncpg-suite");
    let status = Command::new(manifest.join("drivers/asyncpg-suite"))
        .env("HANDOFF_BIN", &bin)
        .env("OUT", &out)
        .status()
        .expect("running tests/drivers/asyncpg-suite");
    assert!(
        status.success(),
        "the drivers' suites failed ({status}): see the comparison printed above; JUnit \
         files and logs in {}",
        out.display()
    );
}
