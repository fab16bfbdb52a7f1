//! What one uid may keep in the daemon's batch state, and how long an ended batch stays:
//! pure functions over the numbers [`super::store::Store::admit`] gathers inside the
//! transaction that stores a new batch, so parallel submissions cannot both pass.
//!
//! Every refusal names the config key that set the bound.

/// What one uid has stored, as the store counts it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Stored batches, whatever their state.
    pub batches: u64,
    /// Batches not ended yet (running or paused).
    pub unfinished: u64,
    /// Bytes of those batches: their images and their rows in the database.
    pub bytes: u64,
}

/// The per-uid bounds (`[limits]` in the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    /// Most unfinished batches (`limits.max_batches_per_caller`).
    pub unfinished: u64,
    /// Most stored batches, ended ones included (`limits.max_stored_batches_per_caller`).
    pub batches: u64,
    /// Most bytes of stored batches (`limits.max_stored_bytes_per_caller`).
    pub bytes: u64,
}

impl Quota {
    /// No bounds (for `--local`, where the caller owns the folder).
    pub const UNBOUNDED: Quota = Quota {
        unfinished: u64::MAX,
        batches: u64::MAX,
        bytes: u64::MAX,
    };
}

/// Why a new batch was refused; each names its key and what frees room.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum QuotaError {
    /// Too many unfinished batches.
    #[error(
        "you have {have} unfinished batches, the most allowed (limits.max_batches_per_caller = {limit}); wait for one, or cancel it"
    )]
    Unfinished {
        /// The uid's unfinished batches.
        have: u64,
        /// The bound.
        limit: u64,
    },
    /// Too many stored batches.
    #[error(
        "you have {have} stored batches, the most allowed (limits.max_stored_batches_per_caller = {limit}); remove one (diffusionctl batch remove N), or wait until an ended one expires"
    )]
    Stored {
        /// The uid's stored batches.
        have: u64,
        /// The bound.
        limit: u64,
    },
    /// Too many bytes stored.
    #[error(
        "your batches take {have} bytes of the daemon's state and this one would add {adds}, past limits.max_stored_bytes_per_caller = {limit}; remove batches you no longer need (diffusionctl batch remove N)"
    )]
    Bytes {
        /// Bytes the uid's batches take.
        have: u64,
        /// Bytes the new batch's rows take (estimated).
        adds: u64,
        /// The bound.
        limit: u64,
    },
}

/// Whether a uid with `usage` may store one more batch whose rows take `adds` bytes.
pub fn admit(usage: &Usage, adds: u64, quota: &Quota) -> Result<(), QuotaError> {
    if usage.unfinished >= quota.unfinished {
        return Err(QuotaError::Unfinished {
            have: usage.unfinished,
            limit: quota.unfinished,
        });
    }
    if usage.batches >= quota.batches {
        return Err(QuotaError::Stored {
            have: usage.batches,
            limit: quota.batches,
        });
    }
    if usage.bytes.saturating_add(adds) > quota.bytes {
        return Err(QuotaError::Bytes {
            have: usage.bytes,
            adds,
            limit: quota.bytes,
        });
    }
    Ok(())
}

/// Bytes one stored item takes in the database besides its name and request: the row's
/// header and integers, and its entries in the primary-key and state indexes. Measured:
/// 100,000 items of ~155 bytes took ~223 bytes each (docs/memory.md, "Batch state on disk").
pub const ITEM_OVERHEAD: u64 = 72;

/// Bytes a batch's own row takes besides its label, identity and error.
pub const BATCH_OVERHEAD: u64 = 256;

/// The estimated bytes of one item's rows.
pub fn item_bytes(name: &str, request: &str) -> u64 {
    ITEM_OVERHEAD + name.len() as u64 + request.len() as u64
}

/// How long ended batches stay (`[jobs]` in the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Seconds after its last file was fetched (`jobs.batch_retention_secs`).
    pub fetched_secs: u64,
    /// Seconds after it ended, for a batch whose files were never all fetched: cancelled,
    /// failed, or never collected (`jobs.unfetched_batch_retention_secs`).
    pub unfetched_secs: u64,
}

/// When (Unix seconds) a batch is removed: `None` while it is unfinished; `fetched_secs`
/// after every file was fetched; else `unfetched_secs` after it ended.
pub fn expires_at(
    ended_at: Option<u64>,
    fetched_at: Option<u64>,
    retention: &Retention,
) -> Option<u64> {
    let ended = ended_at?;
    Some(match fetched_at {
        Some(t) => t.saturating_add(retention.fetched_secs),
        None => ended.saturating_add(retention.unfetched_secs),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const QUOTA: Quota = Quota {
        unfinished: 2,
        batches: 3,
        bytes: 1000,
    };

    #[test]
    fn each_bound_refuses_by_its_key() {
        let ok = Usage {
            batches: 2,
            unfinished: 1,
            bytes: 400,
        };
        assert_eq!(admit(&ok, 600, &QUOTA), Ok(()), "exactly at the byte bound");
        let e = admit(
            &Usage {
                unfinished: 2,
                ..ok
            },
            0,
            &QUOTA,
        )
        .unwrap_err();
        assert!(
            e.to_string().contains(
                "2 unfinished batches, the most allowed (limits.max_batches_per_caller = 2)"
            ),
            "{e}"
        );
        let e = admit(&Usage { batches: 3, ..ok }, 0, &QUOTA).unwrap_err();
        assert!(
            e.to_string()
                .contains("(limits.max_stored_batches_per_caller = 3)"),
            "{e}"
        );
        let e = admit(&ok, 601, &QUOTA).unwrap_err();
        assert_eq!(
            e,
            QuotaError::Bytes {
                have: 400,
                adds: 601,
                limit: 1000
            }
        );
        assert!(
            e.to_string()
                .contains("past limits.max_stored_bytes_per_caller = 1000"),
            "{e}"
        );
        assert_eq!(admit(&ok, u64::MAX, &Quota::UNBOUNDED), Ok(()));
    }

    #[test]
    fn ended_batches_expire_by_the_first_rule_that_applies() {
        let r = Retention {
            fetched_secs: 100,
            unfetched_secs: 1000,
        };
        assert_eq!(expires_at(None, None, &r), None, "unfinished: never");
        assert_eq!(expires_at(Some(50), None, &r), Some(1050), "never fetched");
        assert_eq!(expires_at(Some(50), Some(60), &r), Some(160), "fetched");
        assert_eq!(
            expires_at(Some(50), Some(2000), &r),
            Some(2100),
            "a fetch keeps the promise of jobs.batch_retention_secs"
        );
        assert_eq!(
            expires_at(Some(u64::MAX), None, &r),
            Some(u64::MAX),
            "no overflow"
        );
    }

    #[test]
    fn item_estimates_grow_with_the_text() {
        assert_eq!(item_bytes("", ""), ITEM_OVERHEAD);
        assert_eq!(item_bytes("ab", "{}"), ITEM_OVERHEAD + 4);
    }
}
