//! Batch state in SQLite (WAL, synchronous FULL): each batch and each item's state. An
//! item is `done` only after its files were renamed into place, so a crash at any point
//! leaves it pending (and it runs again) or done (and it never runs again).
//!
//! `--local` keeps one file per shard in the output folder; the daemon keeps one file in
//! its state directory for all batches.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};

use super::manifest::Item;

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
    /// Bytes of the batch's files.
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

const SCHEMA: &str = "
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

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl Store {
    /// Opens (creating) the database at `path`.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let shown = path.display().to_string();
        let wrap = |source| StoreError {
            path: shown.clone(),
            source,
        };
        let conn = Connection::open(path).map_err(wrap)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(wrap)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(wrap)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(wrap)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(wrap)?;
        conn.execute_batch(SCHEMA).map_err(wrap)?;
        Ok(Store { conn, path: shown })
    }

    fn wrap(&self, source: rusqlite::Error) -> StoreError {
        StoreError {
            path: self.path.clone(),
            source,
        }
    }

    /// Records a new batch and its items, all pending, in one transaction.
    pub fn create(
        &mut self,
        id: BatchId,
        owner: u32,
        identity: &str,
        label: &str,
        base_seed: u64,
        items: &[Item],
    ) -> Result<(), StoreError> {
        let path = self.path.clone();
        let wrap = |source| StoreError {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(wrap)?;
        tx.execute(
            "INSERT INTO batches (id, owner, identity, label, base_seed, state, created)
             VALUES (?1, ?2, ?3, ?4, ?5, 'running', ?6)",
            params![
                id as i64,
                owner,
                identity,
                label,
                base_seed as i64,
                now_secs()
            ],
        )
        .map_err(wrap)?;
        {
            let mut insert = tx
                .prepare(
                    "INSERT INTO items (batch, idx, name, request, images) VALUES (?1, ?2, ?3, ?4, ?5)",
                )
                .map_err(wrap)?;
            for item in items {
                insert
                    .execute(params![
                        id as i64,
                        item.index as i64,
                        item.name,
                        item.canonical(),
                        item.images() as i64
                    ])
                    .map_err(wrap)?;
            }
        }
        tx.commit().map_err(wrap)
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
        })
    }

    const COLUMNS: &'static str = "id, owner, identity, label, base_seed, state, error, fetched_at";

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

    /// An item's files are in place.
    pub fn mark_done(&self, id: BatchId, index: usize, bytes: u64) -> Result<(), StoreError> {
        self.conn
            .execute(
                "UPDATE items SET state = 'done', bytes = ?3, error = '' WHERE batch = ?1 AND idx = ?2",
                params![id as i64, index as i64, bytes as i64],
            )
            .map(drop)
            .map_err(|e| self.wrap(e))
    }

    /// An item failed, for good.
    pub fn mark_failed(&self, id: BatchId, index: usize, error: &str) -> Result<(), StoreError> {
        self.conn
            .execute(
                "UPDATE items SET state = 'failed', error = ?3 WHERE batch = ?1 AND idx = ?2",
                params![id as i64, index as i64, error],
            )
            .map(drop)
            .map_err(|e| self.wrap(e))
    }

    /// Sets the batch's state and error.
    pub fn set_state(&self, id: BatchId, state: BatchState, error: &str) -> Result<(), StoreError> {
        self.conn
            .execute(
                "UPDATE batches SET state = ?2, error = ?3 WHERE id = ?1",
                params![id as i64, state.as_str(), error],
            )
            .map(drop)
            .map_err(|e| self.wrap(e))
    }

    /// Item counts.
    pub fn counts(&self, id: BatchId) -> Result<Counts, StoreError> {
        self.conn
            .query_row(
                "SELECT COUNT(*),
                        COALESCE(SUM(state = 'done'), 0),
                        COALESCE(SUM(state = 'failed'), 0),
                        COALESCE(SUM(CASE WHEN state = 'pending' THEN images ELSE 0 END), 0),
                        COALESCE(SUM(CASE WHEN state = 'done' THEN images ELSE 0 END), 0),
                        COALESCE(SUM(bytes), 0)
                 FROM items WHERE batch = ?1",
                [id as i64],
                |r| {
                    Ok(Counts {
                        total: r.get::<_, i64>(0)? as u64,
                        done: r.get::<_, i64>(1)? as u64,
                        failed: r.get::<_, i64>(2)? as u64,
                        images_left: r.get::<_, i64>(3)? as u64,
                        images_done: r.get::<_, i64>(4)? as u64,
                        bytes: r.get::<_, i64>(5)? as u64,
                    })
                },
            )
            .map_err(|e| self.wrap(e))
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

    /// Forgets a batch and its items.
    pub fn remove(&self, id: BatchId) -> Result<(), StoreError> {
        self.conn
            .execute("DELETE FROM batches WHERE id = ?1", [id as i64])
            .map(drop)
            .map_err(|e| self.wrap(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::manifest::{self, Format, Options, Shard};
    use crate::request::GenerateRequest;

    fn items() -> Vec<Item> {
        let text = "a\nb\nc\n";
        let options = Options {
            format: Format::Text,
            defaults: GenerateRequest {
                num_images: Some(2),
                ..Default::default()
            },
            base_seed: 1,
            shard: Shard::ALL,
            max_items: 10,
            base_dir: None,
        };
        manifest::parse(text.as_bytes(), &options).unwrap().items
    }

    #[test]
    fn items_move_from_pending_to_done_or_failed_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.sqlite");
        let mut store = Store::open(&path).unwrap();
        store
            .create(7, 1000, "abc", "/out", u64::MAX, &items())
            .unwrap();
        assert_eq!(store.pending(7).unwrap().len(), 3);
        store.mark_done(7, 0, 1234).unwrap();
        store.mark_failed(7, 2, "model 'x' failed to load").unwrap();
        drop(store);

        let store = Store::open(&path).unwrap();
        let pending = store.pending(7).unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].name, "00001");
        assert!(pending[0].request.contains("\"prompt\":\"b\""));
        let counts = store.counts(7).unwrap();
        assert_eq!(
            counts,
            Counts {
                total: 3,
                done: 1,
                failed: 1,
                images_left: 2,
                images_done: 2,
                bytes: 1234
            }
        );
        let row = store.batch(7).unwrap().unwrap();
        assert_eq!(row.base_seed, u64::MAX, "stored as its bits");
        assert_eq!(row.state, BatchState::Running);
        assert_eq!(store.find(1000, "abc").unwrap().map(|r| r.id), Some(7));
        assert_eq!(store.find(1001, "abc").unwrap(), None);
        let finished = store.finished(7).unwrap();
        assert_eq!(finished[0].files, ["00000-0.png", "00000-1.png"]);
        assert!(finished[1].files.is_empty());
        assert_eq!(finished[1].error, "model 'x' failed to load");

        assert!(!store.mark_fetched(7, "00000").unwrap(), "one item pending");
        store.mark_done(7, 1, 10).unwrap();
        assert!(
            !store.mark_fetched(7, "00000").unwrap(),
            "00001 not fetched"
        );
        assert!(store.mark_fetched(7, "00001").unwrap());
        assert!(store.batch(7).unwrap().unwrap().fetched_at.is_some());
        store.set_state(7, BatchState::Failed, "").unwrap();
        assert_eq!(store.batches().unwrap()[0].state, BatchState::Failed);
        store.remove(7).unwrap();
        assert!(store.batch(7).unwrap().is_none());
        assert!(store.pending(7).unwrap().is_empty(), "items go with it");
    }
}
