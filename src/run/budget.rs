//! The operator's memory budget, split between its runs.
//!
//! Every part of a run is bounded on its own: the source holds one row (≤ `maxRowBytes`,
//! 1 MiB by default) and a few batches, HTTP bodies and gzip are streamed, Braze requests
//! in flight are at most 8 × 1,000 ids, snapshots are read and written through one zstd
//! window. What grows with the cohort is the external sort's buffer, and that is set here:
//! `--memory-budget-mib` less the process's own share, divided by `--max-concurrent-runs`,
//! less each run's fixed share, is the sort buffer of one run. So the operator's total stays
//! within the budget however many imports there are (runs beyond the limit wait).

use std::sync::atomic::{AtomicUsize, Ordering};

use super::sort::DEFAULT_MEMORY_BUDGET;

const MIB: usize = 1 << 20;
/// The process besides its runs: Kubernetes client and caches, runtime, metrics.
pub const PROCESS_BYTES: usize = 48 * MIB;
/// One run besides its sort buffer, with the default `maxRowBytes`: source row and batches
/// (~3 MiB), HTTP and gzip buffers, Braze bodies in flight, zstd windows for the snapshot
/// read and written, merge buffers of spilled runs.
pub const RUN_FIXED_BYTES: usize = 12 * MIB;
/// The smallest useful sort buffer; below it a budget is refused.
pub const MIN_SORT_BYTES: usize = MIB;

/// The sort buffer of each run so that `runs` runs at once stay within `total` bytes, or
/// why they cannot.
pub fn sort_bytes_within(total: usize, runs: usize) -> Result<usize, String> {
    let runs = runs.max(1);
    let share = total.saturating_sub(PROCESS_BYTES) / runs;
    let sort = share.saturating_sub(RUN_FIXED_BYTES);
    if sort < MIN_SORT_BYTES {
        let needed = (PROCESS_BYTES + runs * (RUN_FIXED_BYTES + MIN_SORT_BYTES)).div_ceil(MIB);
        return Err(format!(
            "--memory-budget-mib {} cannot hold --max-concurrent-runs {runs} (each run needs at least {} MiB, the \
             process {} MiB): raise the budget to {needed} or lower the runs",
            total / MIB,
            (RUN_FIXED_BYTES + MIN_SORT_BYTES) / MIB,
            PROCESS_BYTES / MIB
        ));
    }
    // More than the default buffer does not make sorting faster; leave the rest unused.
    Ok(sort.min(DEFAULT_MEMORY_BUDGET))
}

static SORT_BYTES: AtomicUsize = AtomicUsize::new(DEFAULT_MEMORY_BUDGET);

/// Sets the sort buffer of every run started from now on (the operator does it once, at
/// start, from [`sort_bytes_within`]).
pub fn set_sort_bytes(bytes: usize) {
    SORT_BYTES.store(bytes.max(MIN_SORT_BYTES), Ordering::Relaxed);
}

/// The sort buffer of a run started now.
pub fn sort_bytes() -> usize {
    SORT_BYTES.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_is_split_between_runs_and_refused_when_too_small() {
        // The chart's default: 384 MiB for 16 runs.
        assert_eq!(sort_bytes_within(384 * MIB, 16), Ok(9 * MIB));
        // Few runs: the default buffer, not more.
        assert_eq!(sort_bytes_within(384 * MIB, 2), Ok(DEFAULT_MEMORY_BUDGET));
        let total =
            |runs: usize| PROCESS_BYTES + runs * (RUN_FIXED_BYTES + sort_bytes_within(384 * MIB, runs).unwrap());
        for runs in [1, 4, 16, 25] {
            assert!(total(runs) <= 384 * MIB, "{runs} runs");
        }
        let err = sort_bytes_within(128 * MIB, 16).unwrap_err();
        assert!(err.contains("--max-concurrent-runs 16") && err.contains("raise the budget to 256"), "{err}");
        assert!(sort_bytes_within(0, 0).is_err());
    }
}
