//! Batch state in SQLite (WAL, synchronous FULL): each batch and each item's state. An
//! item is `done` only after its files were renamed into place, so a crash at any point
//! leaves it pending (and it runs again) or done (and it never runs again).
//!
//! `--local` keeps one file per shard in the output folder; the daemon keeps one file in
//! its state directory for all batches. Each batch row carries its item counts and bytes
//! (kept current with each item, `schema`), so nothing that lists batches reads
//! their items; [`Store::admit`] checks a uid's [`Quota`] and stores a new batch in one
//! transaction.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};

use super::manifest::Item;
use super::quota::{self, Quota, QuotaError, Usage};
use super::schema;

/// A batch's number (the daemon's object path ends with it; `--local` uses 1).
pub type BatchId = u64;

/// Why the state could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("batch state {path}: {source}")]
pub struct StoreError {
    /// The database file.
    pub path: String,
    /// SQLite's error.
    #[source]
    pub source: rusqlite::Error,
}

/// A batch's state, as the `State` property spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchState {
    /// Items are waiting or running.
    Running,
    /// Stopped by an output error (disk full, unwritable folder); resumes on request.
    Paused,
    /// Every item ended, none failed.
    Succeeded,
    /// Every item ended, some failed.
    Failed,
    /// Cancelled by its owner.
    Cancelled,
}

impl BatchState {
    /// The wire and database name.
    pub fn as_str(self) -> &'static str {
        match self {
            BatchState::Running => "running",
            BatchState::Paused => "paused",
            BatchState::Succeeded => "succeeded",
            BatchState::Failed => "failed",
            BatchState::Cancelled => "cancelled",
        }
    }

    fn parse(s: &str) -> BatchState {
        match s {
            "paused" => BatchState::Paused,
            "succeeded" => BatchState::Succeeded,
            "failed" => BatchState::Failed,
            "cancelled" => BatchState::Cancelled,
            _ => BatchState::Running,
        }
    }

    /// Whether the batch has ended.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            BatchState::Succeeded | BatchState::Failed | BatchState::Cancelled
        )
    }
}

/// A batch as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchRow {
    /// Its number.
    pub id: BatchId,
    /// The uid that submitted it.
    pub owner: u32,
    /// The manifest's identity ([`super::manifest::Manifest::identity`]).
    pub identity: String,
    /// What the submitter called it (its output folder, for `batch list`).
    pub label: String,
    /// The base seed of lines without one.
    pub base_seed: u64,
    /// Its state.
    pub state: BatchState,
    /// Why it paused or failed, when it did.
    pub error: String,
    /// Unix seconds when every image had been fetched, once it has.
    pub fetched_at: Option<u64>,
    /// Unix seconds when it ended (succeeded, failed or cancelled), once it has.
    pub ended_at: Option<u64>,
}

/// Item counts of a batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Items in the batch.
    pub total: u64,
    /// Items with their files written.
    pub done: u64,
    /// Items that failed.
    pub failed: u64,
    /// Images still to make (pending items).
    pub images_left: u64,
    /// Images made (done items).
    pub images_done: u64,
    /// Bytes the batch takes in the state: its files, plus its rows in the database
    /// (estimated from their lengths, [`quota::item_bytes`]).
    pub bytes: u64,
}

/// An item still to run.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingItem {
    /// Its line index.
    pub index: usize,
    /// Its name.
    pub name: String,
    /// Its canonical JSON line ([`Item::canonical`]).
    pub request: String,
}

/// A finished item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    /// Its name.
    pub name: String,
    /// Its files (empty when it failed).
    pub files: Vec<String>,
    /// Why it failed ("" when it succeeded).
    pub error: String,
}

/// The state database.
pub struct Store {
    conn: Connection,
    path: String,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl Store {
    /// Opens (creating, or upgrading) the database at `path`.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let shown = path.display().to_string();
        let wrap = |source| StoreError {
            path: shown.clone(),
            source,
        };
        let mut conn = Connection::open(path).map_err(wrap)?;
        schema::prepare(&mut conn).map_err(wrap)?;
        Ok(Store { conn, path: shown })
    }

    fn wrap(&self, source: rusqlite::Error) -> StoreError {
        StoreError {
            path: self.path.clone(),
            source,
        }
    }

    /// Records a new batch and its items, all pending, in one transaction (`--local`: no
    /// quota, the caller owns the folder).
    pub fn create(
        &mut self,
        id: BatchId,
        owner: u32,
        identity: &str,
        label: &str,
        base_seed: u64,
        items: &[Item],
    ) -> Result<(), StoreError> {
        let batch = NewBatch {
            id,
            owner,
            identity,
            label,
            base_seed,
            items,
        };
        let path = self.path.clone();
        let tx = self.conn.transaction().map_err(|e| wrap_at(&path, e))?;
        insert(&tx, &batch, &canonical(items)).map_err(|e| wrap_at(&path, e))?;
        tx.commit().map_err(|e| wrap_at(&path, e))
    }

    /// Stores a new batch unless its owner already has one with this identity (returned
    /// instead) or the owner's [`Quota`] refuses it: the check and the insert are one
    /// `BEGIN IMMEDIATE` transaction, so parallel submissions cannot both pass a bound.
    pub fn admit(&mut self, batch: &NewBatch<'_>, quota: &Quota) -> Result<Admitted, StoreError> {
        let path = self.path.clone();
        let wrap = |e| wrap_at(&path, e);
        let lines = canonical(batch.items);
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(wrap)?;
        let existing = tx
            .query_row(
                &format!(
                    "SELECT {} FROM batches WHERE owner = ?1 AND identity = ?2 ORDER BY id DESC LIMIT 1",
                    Self::COLUMNS
                ),
                params![batch.owner, batch.identity],
                Self::row,
            )
            .optional()
            .map_err(wrap)?;
        if let Some(row) = existing {
            return Ok(Admitted::Existing(row));
        }
        let usage = usage(&tx, batch.owner).map_err(wrap)?;
        let adds = new_bytes(batch, &lines);
        if let Err(e) = quota::admit(&usage, adds, quota) {
            return Ok(Admitted::Refused(e));
        }
        insert(&tx, batch, &lines).map_err(wrap)?;
        tx.commit().map_err(wrap)?;
        Ok(Admitted::Created)
    }

    /// What `owner` has stored.
    pub fn usage(&self, owner: u32) -> Result<Usage, StoreError> {
        usage(&self.conn, owner).map_err(|e| self.wrap(e))
    }

    fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<BatchRow> {
        Ok(BatchRow {
            id: r.get::<_, i64>(0)? as u64,
            owner: r.get(1)?,
            identity: r.get(2)?,
            label: r.get(3)?,
            base_seed: r.get::<_, i64>(4)? as u64,
            state: BatchState::parse(&r.get::<_, String>(5)?),
            error: r.get(6)?,
            fetched_at: r.get::<_, Option<i64>>(7)?.map(|t| t as u64),
            ended_at: r.get::<_, Option<i64>>(8)?.map(|t| t as u64),
        })
    }

    const COLUMNS: &'static str =
        "id, owner, identity, label, base_seed, state, error, fetched_at, ended_at";

    /// One batch.
    pub fn batch(&self, id: BatchId) -> Result<Option<BatchRow>, StoreError> {
        self.conn
            .query_row(
                &format!("SELECT {} FROM batches WHERE id = ?1", Self::COLUMNS),
                [id as i64],
                Self::row,
            )
            .optional()
            .map_err(|e| self.wrap(e))
    }

    /// Every batch, oldest first.
    pub fn batches(&self) -> Result<Vec<BatchRow>, StoreError> {
        let mut q = self
            .conn
            .prepare(&format!(
                "SELECT {} FROM batches ORDER BY id",
                Self::COLUMNS
            ))
            .map_err(|e| self.wrap(e))?;
        let rows = q
            .query_map([], Self::row)
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(|e| self.wrap(e))?;
        Ok(rows)
    }

    /// The batch of `owner` with this identity, if there is one.
    pub fn find(&self, owner: u32, identity: &str) -> Result<Option<BatchRow>, StoreError> {
        self.conn
            .query_row(
                &format!(
                    "SELECT {} FROM batches WHERE owner = ?1 AND identity = ?2 ORDER BY id DESC LIMIT 1",
                    Self::COLUMNS
                ),
                params![owner, identity],
                Self::row,
            )
            .optional()
            .map_err(|e| self.wrap(e))
    }

    /// Items still to run, in line order.
    pub fn pending(&self, id: BatchId) -> Result<Vec<PendingItem>, StoreError> {
        let mut q = self
            .conn
            .prepare(
                "SELECT idx, name, request FROM items WHERE batch = ?1 AND state = 'pending' ORDER BY idx",
            )
            .map_err(|e| self.wrap(e))?;
        let rows = q
            .query_map([id as i64], |r| {
                Ok(PendingItem {
                    index: r.get::<_, i64>(0)? as usize,
                    name: r.get(1)?,
                    request: r.get(2)?,
                })
            })
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(|e| self.wrap(e))?;
        Ok(rows)
    }

    /// An item's files are in place. An item already ended is left as it is.
    pub fn mark_done(&self, id: BatchId, index: usize, bytes: u64) -> Result<(), StoreError> {
        self.end_item(
            id,
            index,
            "UPDATE items SET state = 'done', bytes = ?3, error = ''
             WHERE batch = ?1 AND idx = ?2 AND state = 'pending'",
            "UPDATE batches SET done = done + 1, images_done = images_done + ?2, bytes = bytes + ?3
             WHERE id = ?1",
            rusqlite::types::Value::Integer(bytes as i64),
        )
    }

    /// An item failed, for good. An item already ended is left as it is.
    pub fn mark_failed(&self, id: BatchId, index: usize, error: &str) -> Result<(), StoreError> {
        self.end_item(
            id,
            index,
            "UPDATE items SET state = 'failed', error = ?3
             WHERE batch = ?1 AND idx = ?2 AND state = 'pending'",
            "UPDATE batches SET failed = failed + 1, images_failed = images_failed + ?2,
                 state_bytes = state_bytes + length(CAST(?3 AS BLOB))
             WHERE id = ?1",
            rusqlite::types::Value::Text(error.to_string()),
        )
    }

    /// Ends a pending item (`item_sql`) and counts it in its batch's row (`count_sql`, with
    /// the item's images as `?2`), in one transaction.
    fn end_item(
        &self,
        id: BatchId,
        index: usize,
        item_sql: &str,
        count_sql: &str,
        value: rusqlite::types::Value,
    ) -> Result<(), StoreError> {
        let wrap = |e| self.wrap(e);
        let tx = self.conn.unchecked_transaction().map_err(wrap)?;
        let images: Option<i64> = tx
            .query_row(
                "SELECT images FROM items WHERE batch = ?1 AND idx = ?2 AND state = 'pending'",
                params![id as i64, index as i64],
                |r| r.get(0),
            )
            .optional()
            .map_err(wrap)?;
        let Some(images) = images else {
            return Ok(());
        };
        tx.execute(item_sql, params![id as i64, index as i64, value])
            .map_err(wrap)?;
        tx.execute(count_sql, params![id as i64, images, value])
            .map_err(wrap)?;
        tx.commit().map_err(wrap)
    }

    /// Sets the batch's state and error; an ended batch's retention starts
    /// ([`BatchRow::ended_at`]).
    pub fn set_state(&self, id: BatchId, state: BatchState, error: &str) -> Result<(), StoreError> {
        let ended = state.is_final().then(now_secs);
        self.conn
            .execute(
                "UPDATE batches SET state = ?2, error = ?3,
                     ended_at = CASE WHEN ?4 IS NULL THEN NULL ELSE COALESCE(ended_at, ?4) END
                 WHERE id = ?1",
                params![id as i64, state.as_str(), error, ended],
            )
            .map(drop)
            .map_err(|e| self.wrap(e))
    }

    /// Item counts, read from the batch's row (no item is read).
    pub fn counts(&self, id: BatchId) -> Result<Counts, StoreError> {
        self.conn
            .query_row(
                &format!("SELECT {COUNTS} FROM batches WHERE id = ?1"),
                [id as i64],
                counts_of,
            )
            .optional()
            .map(Option::unwrap_or_default)
            .map_err(|e| self.wrap(e))
    }

    /// Every batch with its counts, oldest first: one row each, no item is read.
    pub fn listing(&self) -> Result<Vec<(BatchRow, Counts)>, StoreError> {
        let mut q = self
            .conn
            .prepare(&format!(
                "SELECT {}, {COUNTS} FROM batches ORDER BY id",
                Self::COLUMNS
            ))
            .map_err(|e| self.wrap(e))?;
        let rows = q
            .query_map([], |r| {
                let counts = Counts {
                    total: r.get::<_, i64>(9)? as u64,
                    done: r.get::<_, i64>(10)? as u64,
                    failed: r.get::<_, i64>(11)? as u64,
                    images_left: r.get::<_, i64>(12)? as u64,
                    images_done: r.get::<_, i64>(13)? as u64,
                    bytes: r.get::<_, i64>(14)? as u64,
                };
                Ok((Self::row(r)?, counts))
            })
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(|e| self.wrap(e))?;
        Ok(rows)
    }

    /// Bytes the database takes on disk (its file, WAL and index).
    pub fn file_bytes(&self) -> u64 {
        schema::file_bytes(Path::new(&self.path))
    }

    /// Finished items (done or failed), in line order.
    pub fn finished(&self, id: BatchId) -> Result<Vec<Finished>, StoreError> {
        let mut q = self
            .conn
            .prepare(
                "SELECT name, images, state, error FROM items
                 WHERE batch = ?1 AND state != 'pending' ORDER BY idx",
            )
            .map_err(|e| self.wrap(e))?;
        let rows = q
            .query_map([id as i64], |r| {
                let name: String = r.get(0)?;
                let images = r.get::<_, i64>(1)? as usize;
                let done = r.get::<_, String>(2)? == "done";
                Ok(Finished {
                    files: if done {
                        super::manifest::file_names(&name, images)
                    } else {
                        Vec::new()
                    },
                    name,
                    error: r.get(3)?,
                })
            })
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(|e| self.wrap(e))?;
        Ok(rows)
    }

    /// Records that a file of the batch was handed out; when every item's files have
    /// been, the batch is fetched (and its retention time starts). Returns whether the
    /// batch is now fetched.
    pub fn mark_fetched(&self, id: BatchId, name: &str) -> Result<bool, StoreError> {
        let wrap = |e| self.wrap(e);
        self.conn
            .execute(
                "UPDATE items SET fetched = 1 WHERE batch = ?1 AND name = ?2",
                params![id as i64, name],
            )
            .map_err(wrap)?;
        let unfetched: i64 = self
            .conn
            .query_row(
                "SELECT COUNT(*) FROM items WHERE batch = ?1 AND (state = 'pending' OR (state = 'done' AND fetched = 0))",
                [id as i64],
                |r| r.get(0),
            )
            .map_err(wrap)?;
        if unfetched > 0 {
            return Ok(false);
        }
        self.conn
            .execute(
                "UPDATE batches SET fetched_at = COALESCE(fetched_at, ?2) WHERE id = ?1",
                params![id as i64, now_secs()],
            )
            .map_err(wrap)?;
        Ok(true)
    }

    /// Forgets a batch and its items, and gives the space back.
    pub fn remove(&self, id: BatchId) -> Result<(), StoreError> {
        self.conn
            .execute("DELETE FROM batches WHERE id = ?1", [id as i64])
            .map_err(|e| self.wrap(e))?;
        schema::reclaim(&self.conn).map_err(|e| self.wrap(e))
    }

    /// Deletes a cancelled batch's pending items (they never run: a cancelled batch does
    /// not resume) and gives the space back; its counts stay.
    pub fn prune_cancelled(&self, id: BatchId) -> Result<(), StoreError> {
        let wrap = |e| self.wrap(e);
        let tx = self.conn.unchecked_transaction().map_err(wrap)?;
        let deleted = tx
            .execute(
                "DELETE FROM items WHERE batch = ?1 AND state = 'pending'
                 AND (SELECT state FROM batches WHERE id = ?1) = 'cancelled'",
                [id as i64],
            )
            .map_err(wrap)?;
        if deleted == 0 {
            return Ok(());
        }
        tx.execute(&schema::state_bytes_update("b.id = ?1"), [id as i64])
            .map_err(wrap)?;
        tx.commit().map_err(wrap)?;
        schema::reclaim(&self.conn).map_err(wrap)
    }
}

/// A batch for [`Store::admit`].
#[derive(Debug, Clone, Copy)]
pub struct NewBatch<'a> {
    /// Its number.
    pub id: BatchId,
    /// The uid that submits it.
    pub owner: u32,
    /// The manifest's identity.
    pub identity: &'a str,
    /// Its label.
    pub label: &'a str,
    /// The base seed of lines without one.
    pub base_seed: u64,
    /// Its items (the selected shard).
    pub items: &'a [Item],
}

/// What [`Store::admit`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Admitted {
    /// Stored.
    Created,
    /// The owner's batch with the same identity, stored before.
    Existing(BatchRow),
    /// A bound of the owner's quota; nothing was stored.
    Refused(QuotaError),
}

/// The columns of a batch row's [`Counts`].
const COUNTS: &str = "total, done, failed, images - images_done - images_failed, images_done,
    bytes + state_bytes";

fn counts_of(r: &rusqlite::Row<'_>) -> rusqlite::Result<Counts> {
    Ok(Counts {
        total: r.get::<_, i64>(0)? as u64,
        done: r.get::<_, i64>(1)? as u64,
        failed: r.get::<_, i64>(2)? as u64,
        images_left: r.get::<_, i64>(3)? as u64,
        images_done: r.get::<_, i64>(4)? as u64,
        bytes: r.get::<_, i64>(5)? as u64,
    })
}

fn wrap_at(path: &str, source: rusqlite::Error) -> StoreError {
    StoreError {
        path: path.to_string(),
        source,
    }
}

fn canonical(items: &[Item]) -> Vec<String> {
    items.iter().map(Item::canonical).collect()
}

/// The estimated bytes of a new batch's rows.
fn new_bytes(batch: &NewBatch<'_>, lines: &[String]) -> u64 {
    let items: u64 = batch
        .items
        .iter()
        .zip(lines)
        .map(|(item, line)| quota::item_bytes(&item.name, line))
        .sum();
    quota::BATCH_OVERHEAD + batch.label.len() as u64 + batch.identity.len() as u64 + items
}

fn usage(conn: &Connection, owner: u32) -> rusqlite::Result<Usage> {
    conn.query_row(
        "SELECT COUNT(*),
                COALESCE(SUM(state NOT IN ('succeeded', 'failed', 'cancelled')), 0),
                COALESCE(SUM(bytes + state_bytes), 0)
         FROM batches WHERE owner = ?1",
        [owner],
        |r| {
            Ok(Usage {
                batches: r.get::<_, i64>(0)? as u64,
                unfinished: r.get::<_, i64>(1)? as u64,
                bytes: r.get::<_, i64>(2)? as u64,
            })
        },
    )
}

fn insert(conn: &Connection, batch: &NewBatch<'_>, lines: &[String]) -> rusqlite::Result<()> {
    let images: u64 = batch.items.iter().map(|i| i.images() as u64).sum();
    conn.execute(
        "INSERT INTO batches (id, owner, identity, label, base_seed, state, created,
                              total, images, state_bytes)
         VALUES (?1, ?2, ?3, ?4, ?5, 'running', ?6, ?7, ?8, ?9)",
        params![
            batch.id as i64,
            batch.owner,
            batch.identity,
            batch.label,
            batch.base_seed as i64,
            now_secs(),
            batch.items.len() as i64,
            images as i64,
            new_bytes(batch, lines) as i64,
        ],
    )?;
    let mut insert = conn.prepare(
        "INSERT INTO items (batch, idx, name, request, images) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    for (item, line) in batch.items.iter().zip(lines) {
        insert.execute(params![
            batch.id as i64,
            item.index as i64,
            item.name,
            line,
            item.images() as i64
        ])?;
    }
    Ok(())
}

#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;
