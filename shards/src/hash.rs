//! The hash maps of the core, keyed per thread: every map a thread creates gets its own
//! keys derived from that thread's seed, so that a peer or client cannot predict collisions
//! (hash flooding), while the simulator, which seeds its thread, replays a run exactly (the
//! iteration order of a map decides the order of some messages).
//!
//! A thread that never called [`seed_thread`] is seeded from the OS on first use.

use std::cell::Cell;
use std::hash::BuildHasher;

thread_local! {
    /// (seed, maps created so far) of this thread; the seed is drawn on first use.
    static STATE: Cell<Option<(u64, u64)>> = const { Cell::new(None) };
}

/// Seeds this thread's maps from now on (the simulator, once per run).
pub fn seed_thread(seed: u64) {
    STATE.with(|s| s.set(Some((seed, 0))));
}

fn next_keys() -> [u64; 4] {
    STATE.with(|s| {
        let (seed, n) = s.get().unwrap_or_else(|| {
            // std's keys come from the OS, fresh per thread.
            let seed = std::collections::hash_map::RandomState::new().hash_one(0u8);
            (seed, 0)
        });
        s.set(Some((seed, n + 1)));
        let mut x = seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut next = || {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        [next(), next(), next(), next()]
    })
}

/// A `BuildHasher` (aHash) with keys from this thread's seed.
#[derive(Clone)]
pub struct SeededState(ahash::RandomState);

impl Default for SeededState {
    fn default() -> Self {
        let [a, b, c, d] = next_keys();
        SeededState(ahash::RandomState::with_seeds(a, b, c, d))
    }
}

impl BuildHasher for SeededState {
    type Hasher = ahash::AHasher;
    fn build_hasher(&self) -> ahash::AHasher {
        self.0.build_hasher()
    }
}

/// The core's hash map.
pub type Map<K, V> = std::collections::HashMap<K, V, SeededState>;
/// The core's hash set.
pub type Set<K> = std::collections::HashSet<K, SeededState>;

#[cfg(test)]
mod tests {
    use super::*;

    fn order() -> Vec<u32> {
        let mut m: Map<u32, ()> = Map::default();
        for i in 0..64 {
            m.insert(i, ());
        }
        m.keys().copied().collect()
    }

    #[test]
    fn a_seeded_thread_iterates_its_maps_in_the_same_order_every_time() {
        seed_thread(5);
        let a = order();
        seed_thread(5);
        assert_eq!(order(), a);
        seed_thread(6);
        assert_ne!(order(), a, "another seed, other keys");
    }
}
