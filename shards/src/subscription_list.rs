//! A session's subscriptions, indexed by filter.
//!
//! A SUBSCRIBE of n filters looks each one up in the client's list; a plain `Vec` made that
//! n × (subscriptions held), which a single 50,000-filter packet turned into seconds of a
//! stalled shard (issue 9). The list keeps its `Vec` (cheap iteration, stable export order)
//! and, from `INDEX_FROM_LEN` subscriptions on, a hash index from filter to position, so a
//! lookup, an insert and a removal are O(1); smaller lists are scanned (no map to allocate
//! for the common session with a few subscriptions, and the session stays small).

use crate::hash::Map;
use crate::session::Subscription;
use std::sync::Arc;

/// Length from which a list keeps a hash index (below it, a scan is as fast).
const INDEX_FROM_LEN: usize = 16;

/// Subscriptions in insertion order (until a removal swaps the last one in), unique by filter.
#[derive(Debug, Default)]
pub struct SubscriptionList {
    list: Vec<Subscription>,
    /// Filter → index in `list`, with the same keys as `list` whenever present; present
    /// from `INDEX_FROM_LEN` subscriptions on (boxed: one pointer in every session).
    index: Option<Box<Map<Arc<str>, usize>>>,
}

impl SubscriptionList {
    fn position(&self, filter: &str) -> Option<usize> {
        match &self.index {
            Some(index) => index.get(filter).copied(),
            None => self.list.iter().position(|s| *s.filter == *filter),
        }
    }

    /// The subscription to `filter`, if held.
    pub fn get(&self, filter: &str) -> Option<&Subscription> {
        self.position(filter).map(|i| &self.list[i])
    }

    /// The subscription to `filter`, if held, to change its options.
    pub fn get_mut(&mut self, filter: &str) -> Option<&mut Subscription> {
        self.position(filter).map(|i| &mut self.list[i])
    }

    /// Adds a subscription, or replaces the one to the same filter (MQTT-3.8.4-3).
    pub fn push(&mut self, sub: Subscription) {
        if let Some(i) = self.position(&sub.filter) {
            self.list[i] = sub;
            return;
        }
        if let Some(index) = &mut self.index {
            index.insert(sub.filter.clone(), self.list.len());
        }
        self.list.push(sub);
        if self.index.is_none() && self.list.len() >= INDEX_FROM_LEN {
            let index = self.list.iter().enumerate();
            let index = index.map(|(i, s)| (s.filter.clone(), i)).collect();
            self.index = Some(Box::new(index));
        }
        debug_assert!(self
            .index
            .as_ref()
            .is_none_or(|i| i.len() == self.list.len()));
    }

    /// Removes the subscription to `filter`; the last one takes its place.
    pub fn remove(&mut self, filter: &str) -> Option<Subscription> {
        let i = self.position(filter)?;
        let sub = self.list.swap_remove(i);
        if let Some(index) = &mut self.index {
            index.remove(filter);
            if let Some(moved) = self.list.get(i) {
                index.insert(moved.filter.clone(), i);
            }
        }
        debug_assert!(self
            .index
            .as_ref()
            .is_none_or(|i| i.len() == self.list.len()));
        Some(sub)
    }
}

impl std::ops::Deref for SubscriptionList {
    type Target = [Subscription];

    fn deref(&self) -> &[Subscription] {
        &self.list
    }
}

impl<'a> IntoIterator for &'a SubscriptionList {
    type Item = &'a Subscription;
    type IntoIter = std::slice::Iter<'a, Subscription>;

    fn into_iter(self) -> Self::IntoIter {
        self.list.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shardmq_net::SubscriptionOptions;

    fn sub(f: &str) -> Subscription {
        Subscription {
            filter: f.into(),
            options: SubscriptionOptions::default(),
            id: None,
        }
    }

    #[test]
    fn removal_keeps_the_index_of_the_moved_subscription() {
        let mut l = SubscriptionList::default();
        for f in ["a", "b", "c"] {
            l.push(sub(f));
        }
        for i in 0..2 * INDEX_FROM_LEN {
            l.push(sub(&format!("x{i}")));
        }
        for i in 0..2 * INDEX_FROM_LEN {
            assert!(l.remove(&format!("x{i}")).is_some());
        }
        assert_eq!(l.remove("a").map(|s| s.filter), Some("a".into()));
        assert!(l.get("a").is_none());
        assert_eq!(&*l.get("c").expect("moved, still found").filter, "c");
        assert_eq!(l.remove("c").map(|s| s.filter), Some("c".into()));
        assert_eq!(l.len(), 1);
        assert!(l.remove("zz").is_none());
        assert_eq!(&*l.get_mut("b").expect("kept").filter, "b");
    }
}
