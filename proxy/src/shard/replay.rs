//! Waiting for a standby to replay up to an LSN: the switchover's catch-up, the
//! synchronous target's first wait, and a recovering coordinator's.

use std::time::Duration;

use tokio::time::Instant;
use tokio_postgres::Client;

/// Polls the standby behind `db` every 5 ms until it has replayed up to `lsn`: true when
/// it has, false when `deadline` passed first.
pub(crate) async fn wait_replayed(
    db: &Client,
    lsn: &str,
    deadline: Instant,
) -> Result<bool, tokio_postgres::Error> {
    loop {
        let row = db
            .query_one(
                "SELECT coalesce(pg_wal_lsn_diff(pg_last_wal_replay_lsn(), $1::text::pg_lsn) >= 0, false)",
                &[&lsn],
            )
            .await?;
        if row.get::<_, bool>(0) {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
