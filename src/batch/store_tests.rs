//! Tests of the batch store on real SQLite files: items from pending to done or failed,
//! the counters in each batch row, per-uid quotas under parallel submissions, space given
//! back after removals, and the upgrade of a database an earlier release wrote.

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
    let rows: u64 = items()
        .iter()
        .map(|i| quota::item_bytes(&i.name, &i.canonical()))
        .sum();
    let state = quota::BATCH_OVERHEAD
        + "/out".len() as u64
        + "abc".len() as u64
        + rows
        + "model 'x' failed to load".len() as u64;
    assert_eq!(
        counts,
        Counts {
            total: 3,
            done: 1,
            failed: 1,
            images_left: 2,
            images_done: 2,
            bytes: 1234 + state
        },
        "the images and the estimated rows"
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

/// `n` text items named `00000`, `00001`, ... with a prompt of `prompt_bytes` bytes.
fn many(n: usize, prompt_bytes: usize) -> Vec<Item> {
    let line = format!("{}\n", "x".repeat(prompt_bytes));
    let options = Options {
        format: Format::Text,
        defaults: GenerateRequest::default(),
        base_seed: 1,
        shard: Shard::ALL,
        max_items: n,
        base_dir: None,
    };
    manifest::parse(line.repeat(n).as_bytes(), &options)
        .unwrap()
        .items
}

fn new_batch<'a>(id: BatchId, owner: u32, identity: &'a str, items: &'a [Item]) -> NewBatch<'a> {
    NewBatch {
        id,
        owner,
        identity,
        label: "/out",
        base_seed: 1,
        items,
    }
}

/// The counts as the items say (what `counts` computed before the counters).
fn counted(store: &Store, id: BatchId) -> (u64, u64, u64, u64, u64) {
    store
        .conn
        .query_row(
            "SELECT COUNT(*), COALESCE(SUM(state = 'done'), 0), COALESCE(SUM(state = 'failed'), 0),
                    COALESCE(SUM(CASE WHEN state = 'pending' THEN images ELSE 0 END), 0),
                    COALESCE(SUM(bytes), 0)
             FROM items WHERE batch = ?1",
            [id as i64],
            |r| {
                Ok((
                    r.get::<_, i64>(0)? as u64,
                    r.get::<_, i64>(1)? as u64,
                    r.get::<_, i64>(2)? as u64,
                    r.get::<_, i64>(3)? as u64,
                    r.get::<_, i64>(4)? as u64,
                ))
            },
        )
        .unwrap()
}

#[test]
fn the_counters_in_each_batch_row_follow_its_items() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(&dir.path().join("s.sqlite")).unwrap();
    store.create(1, 5, "a", "/out", 1, &items()).unwrap();
    store.mark_done(1, 0, 100).unwrap();
    store.mark_done(1, 0, 100).unwrap();
    store.mark_failed(1, 0, "again").unwrap();
    store.mark_failed(1, 1, "no").unwrap();
    let c = store.counts(1).unwrap();
    let (total, done, failed, images_left, image_bytes) = counted(&store, 1);
    assert_eq!(
        (c.total, c.done, c.failed, c.images_left),
        (total, done, failed, images_left),
        "an item ends once, and is counted once"
    );
    assert_eq!((done, failed, image_bytes), (1, 1, 100));
    let listed = store.listing().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].1, c, "the listing reads the same counters");
    assert_eq!(
        store.counts(99).unwrap(),
        Counts::default(),
        "no such batch"
    );
}

#[test]
fn quotas_refuse_by_their_key_and_an_existing_batch_is_returned_whatever_the_quota() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(&dir.path().join("s.sqlite")).unwrap();
    let quota = Quota {
        unfinished: 1,
        batches: 2,
        bytes: u64::MAX,
    };
    let its = items();
    let admit = |store: &mut Store, id, identity: &str, quota: &Quota| {
        store
            .admit(&new_batch(id, 5, identity, &its), quota)
            .unwrap()
    };
    assert_eq!(admit(&mut store, 1, "a", &quota), Admitted::Created);
    assert!(matches!(
        admit(&mut store, 2, "b", &quota),
        Admitted::Refused(QuotaError::Unfinished { have: 1, limit: 1 })
    ));
    assert!(
        matches!(admit(&mut store, 2, "a", &quota), Admitted::Existing(ref r) if r.id == 1),
        "the same manifest again: the batch it made"
    );
    store.set_state(1, BatchState::Cancelled, "").unwrap();
    assert_eq!(admit(&mut store, 3, "c", &quota), Admitted::Created);
    store.set_state(3, BatchState::Succeeded, "").unwrap();
    assert!(matches!(
        admit(&mut store, 4, "d", &quota),
        Admitted::Refused(QuotaError::Stored { have: 2, limit: 2 })
    ));
    let usage = store.usage(5).unwrap();
    assert_eq!((usage.batches, usage.unfinished), (2, 0));
    let tight = Quota {
        bytes: usage.bytes + 10,
        ..Quota::UNBOUNDED
    };
    assert!(matches!(
        admit(&mut store, 4, "d", &tight),
        Admitted::Refused(QuotaError::Bytes { .. })
    ));
    assert_eq!(store.usage(6).unwrap(), Usage::default(), "another uid");
    assert!(
        store.batch(4).unwrap().is_none(),
        "nothing stored when refused"
    );
    assert!(store.batch(1).unwrap().unwrap().ended_at.is_some());
}

#[test]
fn parallel_admissions_on_separate_connections_cannot_pass_a_bound_together() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.sqlite");
    drop(Store::open(&path).unwrap());
    let quota = Quota {
        unfinished: 3,
        ..Quota::UNBOUNDED
    };
    let its = many(2000, 20);
    let barrier = std::sync::Barrier::new(12);
    let created = std::thread::scope(|s| {
        let handles: Vec<_> = (0..12u64)
            .map(|n| {
                let (path, its, barrier) = (&path, &its, &barrier);
                s.spawn(move || {
                    let mut store = Store::open(path).unwrap();
                    barrier.wait();
                    let identity = format!("m{n}");
                    store
                        .admit(&new_batch(n + 1, 7, &identity, its), &quota)
                        .unwrap()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .filter(|a| *a == Admitted::Created)
            .count()
    });
    assert_eq!(created, 3);
    let store = Store::open(&path).unwrap();
    assert_eq!(store.usage(7).unwrap().unfinished, 3);
}

#[test]
fn a_cancelled_batch_and_a_removed_one_give_their_space_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.sqlite");
    let mut store = Store::open(&path).unwrap();
    let its = many(20_000, 200);
    store.create(1, 5, "a", "/out", 1, &its).unwrap();
    store.mark_done(1, 0, 10).unwrap();
    schema::reclaim(&store.conn).unwrap();
    let full = store.file_bytes();
    assert!(full > 4 << 20, "{full} bytes for 20000 items");
    let before = store.counts(1).unwrap();

    store.set_state(1, BatchState::Cancelled, "").unwrap();
    store.prune_cancelled(1).unwrap();
    let pruned = store.file_bytes();
    assert!(
        pruned < full / 10,
        "a cancelled batch keeps its finished items only: {full} -> {pruned} bytes"
    );
    let after = store.counts(1).unwrap();
    assert_eq!((after.total, after.done), (before.total, before.done));
    assert!(
        after.bytes < before.bytes / 100,
        "{} -> {}",
        before.bytes,
        after.bytes
    );
    assert_eq!(store.finished(1).unwrap().len(), 1, "the done item stays");

    store.create(2, 5, "b", "/out", 1, &its).unwrap();
    assert!(store.file_bytes() > full / 2);
    store.remove(2).unwrap();
    assert!(
        store.file_bytes() < full / 10,
        "removed: {} bytes",
        store.file_bytes()
    );
}

#[test]
fn a_database_of_the_earlier_layout_is_upgraded_and_converted_to_auto_vacuum() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.sqlite");
    {
        // The layout and pragmas of the release before schema version 1.
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        conn.execute_batch(
            "CREATE TABLE batches (id INTEGER PRIMARY KEY, owner INTEGER NOT NULL,
                 identity TEXT NOT NULL, label TEXT NOT NULL, base_seed INTEGER NOT NULL,
                 state TEXT NOT NULL, error TEXT NOT NULL DEFAULT '', created INTEGER NOT NULL,
                 fetched_at INTEGER);
             CREATE TABLE items (batch INTEGER NOT NULL REFERENCES batches(id) ON DELETE CASCADE,
                 idx INTEGER NOT NULL, name TEXT NOT NULL, request TEXT NOT NULL,
                 images INTEGER NOT NULL, state TEXT NOT NULL DEFAULT 'pending',
                 error TEXT NOT NULL DEFAULT '', bytes INTEGER NOT NULL DEFAULT 0,
                 fetched INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (batch, idx));
             CREATE INDEX items_state ON items(batch, state);
             INSERT INTO batches VALUES (1, 5, 'a', '/a', 1, 'running', '', 0, NULL);
             INSERT INTO batches VALUES (2, 5, 'b', '/b', 1, 'cancelled', '', 0, NULL);
             INSERT INTO items VALUES (1, 0, 'x', '{}', 2, 'done', '', 300, 0);
             INSERT INTO items VALUES (1, 1, 'y', '{}', 2, 'failed', 'e', 0, 0);
             INSERT INTO items VALUES (1, 2, 'z', '{}', 2, 'pending', '', 0, 0);
             INSERT INTO items VALUES (2, 0, 'x', '{}', 1, 'done', '', 50, 0);
             INSERT INTO items VALUES (2, 1, 'y', '{}', 1, 'pending', '', 0, 0);",
        )
        .unwrap();
        let av: i64 = conn
            .query_row("PRAGMA auto_vacuum", [], |r| r.get(0))
            .unwrap();
        assert_eq!(av, 0, "the earlier release made no auto-vacuum database");
    }
    let store = Store::open(&path).unwrap();
    let pragma = |name: &str| -> i64 {
        store
            .conn
            .query_row(&format!("PRAGMA {name}"), [], |r| r.get(0))
            .unwrap()
    };
    assert_eq!(pragma("auto_vacuum"), 2, "incremental");
    assert_eq!(pragma("user_version"), schema::VERSION);
    let c = store.counts(1).unwrap();
    assert_eq!(
        (c.total, c.done, c.failed, c.images_left, c.images_done),
        (3, 1, 1, 2, 2)
    );
    assert!(c.bytes > 300, "images and rows: {}", c.bytes);
    let cancelled = store.counts(2).unwrap();
    assert_eq!((cancelled.total, cancelled.done), (2, 1));
    assert_eq!(
        counted(&store, 2).0,
        1,
        "the cancelled batch's pending item is gone"
    );
    assert!(store.batch(2).unwrap().unwrap().ended_at.is_some());
    assert!(store.batch(1).unwrap().unwrap().ended_at.is_none());
    assert_eq!(
        store.pending(1).unwrap().len(),
        1,
        "the running one resumes"
    );
    drop(store);
    Store::open(&path).unwrap();
}

#[test]
fn an_unfinished_batch_is_recounted_from_its_items_when_the_store_opens() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.sqlite");
    let mut store = Store::open(&path).unwrap();
    store.create(1, 5, "a", "/out", 1, &items()).unwrap();
    store.create(2, 5, "b", "/out", 1, &items()).unwrap();
    for id in [1, 2] {
        for index in 0..3 {
            store.mark_done(id, index, 10).unwrap();
        }
    }
    store.set_state(2, BatchState::Succeeded, "").unwrap();
    let before = store.counts(1).unwrap();
    // What a crash between an item's files and its "done" leaves, written by hand; and a
    // change to an ended batch's items, which the open does not read.
    store
        .conn
        .execute_batch(
            "UPDATE items SET state = 'pending', bytes = 0 WHERE batch = 1 AND idx = 2;
             UPDATE items SET bytes = 999 WHERE batch = 2;",
        )
        .unwrap();
    let ended = store.counts(2).unwrap();
    drop(store);
    let store = Store::open(&path).unwrap();
    let c = store.counts(1).unwrap();
    assert_eq!((c.done, c.images_left), (2, 2), "running: recounted");
    assert_eq!(c.bytes, before.bytes - 10);
    assert_eq!(
        store.counts(2).unwrap(),
        ended,
        "an ended batch is not read at open"
    );
}
