//! Every item one user has interacted with, in about 8 bytes an item.
//!
//! `exclude_seen` must be exact, so the set never forgets, and it is the one part of the
//! serving state that grows with every new (user, item) pair: in the soak, 3M pairs in 10
//! minutes. A hash set of `u64` costs 9 bytes a slot at a load of 44–88%, 10–20 bytes an item;
//! a sorted array costs 8, but an insert into it moves O(n) items on the writer thread, which
//! issue #15 ruled out. So the set is a sorted array plus a small sorted tail that takes the
//! inserts: the tail is merged in once it holds more than about √n items, so an insert costs
//! O(√n) amortized, a lookup is two binary searches, and memory stays at 8 bytes an item plus
//! the tail.

/// A set of item ids: a sorted, exactly sized base and a small sorted tail of recent inserts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SeenItems {
    base: Box<[u64]>,
    tail: Vec<u64>,
}

/// The tail never needs merging below this size: small sets stay one allocation or two.
const MIN_TAIL: usize = 32;

impl SeenItems {
    /// Whether `id` is in the set.
    pub fn contains(&self, id: u64) -> bool {
        self.tail.binary_search(&id).is_ok() || self.base.binary_search(&id).is_ok()
    }

    /// Adds `id`; returns whether it was new.
    pub fn insert(&mut self, id: u64) -> bool {
        if self.base.binary_search(&id).is_ok() {
            return false;
        }
        match self.tail.binary_search(&id) {
            Ok(_) => return false,
            Err(at) => self.tail.insert(at, id),
        }
        if self.tail.len() > MIN_TAIL.max(self.base.len().isqrt()) {
            self.merge();
        }
        true
    }

    /// Adds every id.
    pub fn extend(&mut self, ids: impl IntoIterator<Item = u64>) {
        for id in ids {
            self.insert(id);
        }
    }

    /// Number of items.
    pub fn len(&self) -> usize {
        self.base.len() + self.tail.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The items in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        Merged {
            a: &self.base,
            b: &self.tail,
        }
    }

    /// Folds the tail into a new, exactly sized base.
    fn merge(&mut self) {
        let mut base = Vec::with_capacity(self.len());
        base.extend(self.iter());
        self.base = base.into_boxed_slice();
        self.tail = Vec::new();
    }
}

impl FromIterator<u64> for SeenItems {
    fn from_iter<I: IntoIterator<Item = u64>>(ids: I) -> SeenItems {
        let mut base: Vec<u64> = ids.into_iter().collect();
        base.sort_unstable();
        base.dedup();
        SeenItems {
            base: base.into_boxed_slice(),
            tail: Vec::new(),
        }
    }
}

/// Two sorted, disjoint slices read as one ascending sequence.
struct Merged<'a> {
    a: &'a [u64],
    b: &'a [u64],
}

impl Iterator for Merged<'_> {
    type Item = u64;

    fn next(&mut self) -> Option<u64> {
        let take_a = match (self.a.first(), self.b.first()) {
            (Some(x), Some(y)) => x < y,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => return None,
        };
        let side = if take_a { &mut self.a } else { &mut self.b };
        let (&first, rest) = side.split_first()?;
        *side = rest;
        Some(first)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.a.len() + self.b.len();
        (n, Some(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn behaves_like_an_ordered_set_across_merges() {
        let mut seen = SeenItems::default();
        let mut model = BTreeSet::new();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for i in 0..20_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Repeats on purpose: a third of the draws hit an id already in the set.
            let id = if i % 3 == 0 { i / 2 } else { x % 50_000 };
            assert_eq!(seen.insert(id), model.insert(id), "insert {id}");
        }
        assert_eq!(seen.len(), model.len());
        assert!(seen.iter().eq(model.iter().copied()));
        for id in 0..60_000 {
            assert_eq!(seen.contains(id), model.contains(&id), "contains {id}");
        }
    }

    #[test]
    fn the_tail_stays_near_the_square_root_of_the_set() {
        let mut seen = SeenItems::default();
        seen.extend(0..100_000);
        assert!(
            seen.tail.len() <= 100_000usize.isqrt() + 1,
            "{}",
            seen.tail.len()
        );
        assert_eq!(seen.base.len(), seen.len() - seen.tail.len());
    }

    #[test]
    fn collects_sorted_and_without_duplicates() {
        let seen: SeenItems = [5, 1, 5, 3].into_iter().collect();
        assert_eq!(seen.iter().collect::<Vec<_>>(), [1, 3, 5]);
        assert!(seen.contains(3) && !seen.contains(4));
    }
}
