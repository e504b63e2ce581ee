//! A fixed-size set of shard ids, the value of every route-replica entry.

/// Most shards a node runs; bounds [`ShardSet`] to four words so a route entry stays small.
pub const SHARDS_MAX: usize = 256;

/// Set of shard ids below [`SHARDS_MAX`], copied by value.
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub struct ShardSet([u64; SHARDS_MAX / 64]);

impl ShardSet {
    /// Adds `shard`; returns true if it was absent.
    pub fn insert(&mut self, shard: usize) -> bool {
        debug_assert!(shard < SHARDS_MAX);
        let (w, b) = (shard / 64, 1u64 << (shard % 64));
        let absent = self.0[w] & b == 0;
        self.0[w] |= b;
        absent
    }

    /// Removes `shard`; returns true if it was present.
    pub fn remove(&mut self, shard: usize) -> bool {
        let (w, b) = (shard / 64, 1u64 << (shard % 64));
        let present = self.0[w] & b != 0;
        self.0[w] &= !b;
        present
    }

    /// True when `shard` is in the set.
    pub fn contains(&self, shard: usize) -> bool {
        self.0[shard / 64] & (1u64 << (shard % 64)) != 0
    }

    /// True when no shard is in the set.
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|w| *w == 0)
    }

    /// Adds every member of `other`.
    pub fn union_with(&mut self, other: &ShardSet) {
        for (a, b) in self.0.iter_mut().zip(other.0.iter()) {
            *a |= *b;
        }
    }

    /// Members in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.0.iter().enumerate().flat_map(|(w, &word)| {
            let mut bits = word;
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
}
