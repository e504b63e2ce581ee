//! A set of shard ids, the value of every route-replica entry.
//!
//! One word covers shards 0..64 inline; ids up to [`SHARDS_MAX`] spill into a boxed tail that
//! only nodes with more than 64 shards ever allocate. Route entries exist per filter per shard,
//! so this keeps the common case at 16 bytes instead of 32.

/// Most shards a node runs.
pub const SHARDS_MAX: usize = 256;

/// Set of shard ids below [`SHARDS_MAX`].
#[derive(Clone, Default, PartialEq, Eq, Debug)]
pub struct ShardSet {
    lo: u64,
    hi: Option<Box<[u64; SHARDS_MAX / 64 - 1]>>,
}

impl ShardSet {
    fn word(&self, w: usize) -> u64 {
        match w {
            0 => self.lo,
            _ => self.hi.as_ref().map_or(0, |h| h[w - 1]),
        }
    }

    fn word_mut(&mut self, w: usize) -> &mut u64 {
        match w {
            0 => &mut self.lo,
            _ => &mut self.hi.get_or_insert_with(Default::default)[w - 1],
        }
    }

    /// Adds `shard`; returns true if it was absent.
    pub fn insert(&mut self, shard: usize) -> bool {
        debug_assert!(shard < SHARDS_MAX);
        let (w, b) = (shard / 64, 1u64 << (shard % 64));
        let word = self.word_mut(w);
        let absent = *word & b == 0;
        *word |= b;
        absent
    }

    /// Removes `shard`; returns true if it was present.
    pub fn remove(&mut self, shard: usize) -> bool {
        let (w, b) = (shard / 64, 1u64 << (shard % 64));
        if self.word(w) & b == 0 {
            return false;
        }
        *self.word_mut(w) &= !b;
        if self.hi.as_ref().is_some_and(|h| h.iter().all(|x| *x == 0)) {
            self.hi = None;
        }
        true
    }

    /// True when `shard` is in the set.
    pub fn contains(&self, shard: usize) -> bool {
        self.word(shard / 64) & (1u64 << (shard % 64)) != 0
    }

    /// True when no shard is in the set.
    pub fn is_empty(&self) -> bool {
        self.lo == 0 && self.hi.is_none()
    }

    /// Adds every member of `other`.
    pub fn union_with(&mut self, other: &ShardSet) {
        self.lo |= other.lo;
        if let Some(h) = &other.hi {
            let mine = self.hi.get_or_insert_with(Default::default);
            for (a, b) in mine.iter_mut().zip(h.iter()) {
                *a |= *b;
            }
        }
    }

    /// Members in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        (0..SHARDS_MAX / 64).flat_map(move |w| {
            let mut bits = self.word(w);
            std::iter::from_fn(move || {
                if bits == 0 {
                    return None;
                }
                let b = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                Some(w * 64 + b)
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_iterate_in_order_across_words() {
        let mut s = ShardSet::default();
        for i in [200, 3, 64, 0] {
            assert!(s.insert(i));
        }
        assert!(!s.insert(3));
        assert_eq!(s.iter().collect::<Vec<_>>(), [0, 3, 64, 200]);
        assert!(s.remove(64));
        assert!(!s.contains(64));
        let mut t = ShardSet::default();
        t.insert(5);
        t.union_with(&s);
        assert_eq!(t.iter().collect::<Vec<_>>(), [0, 3, 5, 200]);
    }

    #[test]
    fn small_sets_stay_inline_and_the_tail_is_freed() {
        assert_eq!(std::mem::size_of::<ShardSet>(), 16);
        let mut s = ShardSet::default();
        s.insert(100);
        assert!(s.hi.is_some());
        s.remove(100);
        assert!(s.hi.is_none() && s.is_empty());
    }
}
