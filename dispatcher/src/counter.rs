//! [`SpreadCounter`]: a count that every command changes and only `Stats` reads.
//!
//! One atomic changed by every command from every worker thread is one cache line passed
//! between cores on every change; under load that costs more than the command's own work.
//! Each thread changes a cell of its own instead, and a reader adds the cells up.

use std::sync::atomic::{AtomicIsize, AtomicUsize, Ordering};

/// Cells per counter: threads beyond this share cells (still correct, merely contended).
const CELLS: usize = 16;

/// One cell on a cache line of its own (128 bytes: adjacent-line prefetching pairs lines).
#[derive(Debug, Default)]
#[repr(align(128))]
struct Cell(AtomicIsize);

/// A count spread over per-thread cells: cheap to change from any thread, summed to read.
#[derive(Debug, Default)]
pub(crate) struct SpreadCounter {
    cells: [Cell; CELLS],
}

thread_local! {
    /// This thread's cell, handed out round-robin as threads first count.
    static CELL: usize = {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        NEXT.fetch_add(1, Ordering::Relaxed) % CELLS
    };
}

impl SpreadCounter {
    /// Adds `delta` (negative to take away).
    pub(crate) fn add(&self, delta: isize) {
        let cell = CELL.with(|cell| *cell);
        self.cells[cell].0.fetch_add(delta, Ordering::Relaxed);
    }

    /// The count: exact once the changes have stopped, and never below zero while they
    /// go on (a decrement may be seen before the increment it follows, on another cell).
    pub(crate) fn get(&self) -> usize {
        let sum: isize = self
            .cells
            .iter()
            .map(|cell| cell.0.load(Ordering::Relaxed))
            .sum();
        sum.max(0) as usize
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::SpreadCounter;

    #[test]
    fn changes_from_many_threads_add_up_wherever_they_are_undone() {
        let counter = Arc::new(SpreadCounter::default());
        let threads: Vec<_> = (0..24)
            .map(|_| {
                let counter = Arc::clone(&counter);
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        counter.add(3);
                        counter.add(-1);
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!(counter.get(), 48_000);
        // Taken away on a thread that added nothing.
        let undo = Arc::clone(&counter);
        std::thread::spawn(move || undo.add(-48_000))
            .join()
            .unwrap();
        assert_eq!(counter.get(), 0);
    }
}
