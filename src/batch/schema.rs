//! The batch database's layout and its upgrades: pragmas, tables, indexes, and the step
//! that brings a database of an earlier release up to date.
//!
//! Version 1 (`PRAGMA user_version`) keeps each batch's item counts and bytes in its own
//! row, kept current by the store in the transaction that changes an item, so listing
//! batches (and starting the daemon) reads one row per batch, never its items. The
//! database uses `auto_vacuum = INCREMENTAL`: pages freed by a removal go back to the file
//! system ([`reclaim`]). SQLite only takes that setting before the first table exists, or
//! with a `VACUUM`: an older database is converted once, when it is first opened.

use rusqlite::Connection;

use super::quota::{BATCH_OVERHEAD, ITEM_OVERHEAD};

/// The layout this release writes.
pub const VERSION: i64 = 1;

const TABLES: &str = "
CREATE TABLE IF NOT EXISTS batches (
    id INTEGER PRIMARY KEY,
    owner INTEGER NOT NULL,
    identity TEXT NOT NULL,
    label TEXT NOT NULL,
    base_seed INTEGER NOT NULL,
    state TEXT NOT NULL,
    error TEXT NOT NULL DEFAULT '',
    created INTEGER NOT NULL,
    fetched_at INTEGER
);
CREATE TABLE IF NOT EXISTS items (
    batch INTEGER NOT NULL REFERENCES batches(id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    name TEXT NOT NULL,
    request TEXT NOT NULL,
    images INTEGER NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    error TEXT NOT NULL DEFAULT '',
    bytes INTEGER NOT NULL DEFAULT 0,
    fetched INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (batch, idx)
);
CREATE INDEX IF NOT EXISTS items_state ON items(batch, state);
";

/// Columns version 1 adds to `batches` (all but `ended_at` count items or bytes).
const COUNTERS: &[&str] = &[
    "total",
    "images",
    "done",
    "failed",
    "images_done",
    "images_failed",
    "bytes",
    "state_bytes",
];

/// The SQL expression of a batch row's estimated own bytes (`b` is the row).
fn batch_row_bytes() -> String {
    format!(
        "{BATCH_OVERHEAD} + length(CAST(b.label AS BLOB)) + length(CAST(b.identity AS BLOB)) + length(CAST(b.error AS BLOB))"
    )
}

/// The SQL that recomputes `state_bytes` of the batches `filter` selects (a condition on
/// `b`): the batch's row and the rows of the items it still has.
pub fn state_bytes_update(filter: &str) -> String {
    format!(
        "UPDATE batches AS b SET state_bytes = {} + COALESCE((
             SELECT SUM({ITEM_OVERHEAD} + length(CAST(i.name AS BLOB)) + length(CAST(i.request AS BLOB))
                        + length(CAST(i.error AS BLOB)))
             FROM items AS i WHERE i.batch = b.id), 0)
         WHERE {filter}",
        batch_row_bytes()
    )
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Sets the pragmas, creates or upgrades the tables.
pub fn prepare(conn: &mut Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    let empty: i64 = conn.query_row("SELECT COUNT(*) FROM sqlite_master", [], |r| r.get(0))?;
    if empty == 0 {
        // Before any table: the only time SQLite takes this without a VACUUM.
        conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")?;
    }
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // The WAL shrinks back to this after a checkpoint (a large removal grows it).
    conn.pragma_update(None, "journal_size_limit", 64i64 << 20)?;
    conn.execute_batch(TABLES)?;
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version < VERSION {
        upgrade(conn)?;
    }
    recount_unfinished(conn)?;
    let auto_vacuum: i64 = conn.query_row("PRAGMA auto_vacuum", [], |r| r.get(0))?;
    if auto_vacuum == 0 {
        // A database made before version 1: converted once, which rewrites the file.
        tracing::info!("converting the batch database to incremental auto-vacuum");
        conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")?;
        conn.execute_batch("VACUUM")?;
    }
    Ok(())
}

/// Version 0 → 1: counters in each batch row, the owner index, and cancelled batches'
/// pending items (which never run) deleted.
fn upgrade(conn: &mut Connection) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let has: Vec<String> = {
        let mut q = tx.prepare("SELECT name FROM pragma_table_info('batches')")?;
        q.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?
    };
    for column in COUNTERS {
        if !has.iter().any(|c| c == column) {
            tx.execute_batch(&format!(
                "ALTER TABLE batches ADD COLUMN {column} INTEGER NOT NULL DEFAULT 0"
            ))?;
        }
    }
    if !has.iter().any(|c| c == "ended_at") {
        tx.execute_batch("ALTER TABLE batches ADD COLUMN ended_at INTEGER")?;
    }
    tx.execute_batch(&recount_update("1"))?;
    // Counted first: a cancelled batch's total is the items it had, not those left.
    tx.execute(
        "DELETE FROM items WHERE state = 'pending'
         AND batch IN (SELECT id FROM batches WHERE state = 'cancelled')",
        [],
    )?;
    tx.execute(&state_bytes_update("1"), [])?;
    tx.execute(
        "UPDATE batches SET ended_at = ?1
         WHERE ended_at IS NULL AND state IN ('succeeded', 'failed', 'cancelled')",
        [now_secs()],
    )?;
    tx.execute_batch(&format!(
        "CREATE INDEX IF NOT EXISTS batches_owner ON batches(owner, identity);
         PRAGMA user_version = {VERSION};"
    ))?;
    tx.commit()
}

/// The SQL that recounts, from their items, the counters of the batches `filter` selects
/// (a condition on `b`).
fn recount_update(filter: &str) -> String {
    format!(
        "UPDATE batches AS b SET (total, images, done, failed, images_done, images_failed, bytes) = (
             SELECT COUNT(*), COALESCE(SUM(images), 0),
                    COALESCE(SUM(state = 'done'), 0), COALESCE(SUM(state = 'failed'), 0),
                    COALESCE(SUM(CASE WHEN state = 'done' THEN images ELSE 0 END), 0),
                    COALESCE(SUM(CASE WHEN state = 'failed' THEN images ELSE 0 END), 0),
                    COALESCE(SUM(bytes), 0)
             FROM items WHERE items.batch = b.id)
         WHERE {filter};"
    )
}

/// Recounts the unfinished batches (running or paused, or with an item still pending) from
/// their items, which a resume reads anyway: their counters stay true to the items whatever
/// changed the file. Other ended batches are not read (one index probe each).
pub fn recount_unfinished(conn: &Connection) -> rusqlite::Result<()> {
    const UNFINISHED: &str = "b.state IN ('running', 'paused') OR EXISTS (
        SELECT 1 FROM items AS p WHERE p.batch = b.id AND p.state = 'pending')";
    let tx = conn.unchecked_transaction()?;
    tx.execute_batch(&recount_update(UNFINISHED))?;
    tx.execute(&state_bytes_update(UNFINISHED), [])?;
    tx.commit()
}

/// Gives freed pages back to the file system: the free list goes, then the WAL is
/// checkpointed into the (now shorter) database and truncated.
pub fn reclaim(conn: &Connection) -> rusqlite::Result<()> {
    // Each step of the pragma frees some pages: step it to the end.
    let mut vacuum = conn.prepare("PRAGMA incremental_vacuum")?;
    let mut rows = vacuum.query([])?;
    while rows.next()?.is_some() {}
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
}

/// Bytes the database takes on disk: the file, its WAL and shared-memory index.
pub fn file_bytes(path: &std::path::Path) -> u64 {
    let len = |suffix: &str| {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        std::fs::metadata(std::path::Path::new(&p)).map_or(0, |m| m.len())
    };
    len("") + len("-wal") + len("-shm")
}
