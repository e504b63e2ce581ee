//! Filter → value index: a hash map for exact filters and a trie for filters with `+`/`#`.
//!
//! Used twice on every shard: as the route replica (value = which shards have subscribers) and
//! as the subscription slice (value = which local sessions subscribed). Most real filters are
//! exact, so they cost one hash-map entry; only wildcard filters pay for trie nodes. A publish
//! costs one hash lookup plus a trie walk that only follows `+`, `#` and the topic's own levels.

use ahash::AHashMap;
use smallvec::SmallVec;
use std::sync::Arc;

/// One trie level. `#` is always the last level of a filter, so it is a value slot on the parent
/// rather than a child node.
struct Node<V> {
    /// Value of the filter that ends exactly here.
    value: Option<V>,
    /// Value of the filter that ends here with `/#`.
    hash: Option<V>,
    /// Filters continuing with `+`.
    plus: Option<Box<Node<V>>>,
    /// Filters continuing with a literal level.
    children: AHashMap<Box<str>, Node<V>>,
}

impl<V> Default for Node<V> {
    fn default() -> Self {
        Node {
            value: None,
            hash: None,
            plus: None,
            children: AHashMap::default(),
        }
    }
}

impl<V> Node<V> {
    fn is_empty(&self) -> bool {
        self.value.is_none()
            && self.hash.is_none()
            && self.plus.is_none()
            && self.children.is_empty()
    }
}

/// Maps topic filters to values and finds every filter matching a topic name.
///
/// ```
/// use shardmq_shards::topic_index::TopicIndex;
/// let mut idx = TopicIndex::default();
/// *idx.get_or_insert_with("a/+", || 0) += 1;
/// *idx.get_or_insert_with("a/b", || 0) += 10;
/// let mut sum = 0;
/// idx.for_each_match("a/b", |v| sum += *v);
/// assert_eq!(sum, 11);
/// ```
pub struct TopicIndex<V> {
    /// Keyed by `Arc<str>` so the slice, the route replica and the sessions of every shard can
    /// share one allocation of a filter string.
    exact: AHashMap<Arc<str>, V>,
    root: Node<V>,
    wildcard_len: usize,
}

impl<V> Default for TopicIndex<V> {
    fn default() -> Self {
        TopicIndex {
            exact: AHashMap::default(),
            root: Node::default(),
            wildcard_len: 0,
        }
    }
}

impl<V> TopicIndex<V> {
    /// Number of distinct filters held.
    pub fn len(&self) -> usize {
        self.exact.len() + self.wildcard_len
    }

    /// True when no filter is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Value of `filter`, if present.
    pub fn get(&self, filter: &str) -> Option<&V> {
        if !crate::topic::is_wildcard(filter) {
            return self.exact.get(filter);
        }
        let mut node = &self.root;
        let mut levels = filter.split('/').peekable();
        while let Some(level) = levels.next() {
            match level {
                "#" => return node.hash.as_ref(),
                "+" => node = node.plus.as_deref()?,
                _ => node = node.children.get(level)?,
            }
            if levels.peek().is_none() {
                return node.value.as_ref();
            }
        }
        None
    }

    /// Mutable value of `filter`, if present.
    pub fn get_mut(&mut self, filter: &str) -> Option<&mut V> {
        if !crate::topic::is_wildcard(filter) {
            return self.exact.get_mut(filter);
        }
        let mut node = &mut self.root;
        let mut levels = filter.split('/').peekable();
        while let Some(level) = levels.next() {
            match level {
                "#" => return node.hash.as_mut(),
                "+" => node = node.plus.as_deref_mut()?,
                _ => node = node.children.get_mut(level)?,
            }
            if levels.peek().is_none() {
                return node.value.as_mut();
            }
        }
        None
    }

    /// Value of `filter`, inserting `make()` first if absent. The filter must be valid.
    pub fn get_or_insert_with(&mut self, filter: &str, make: impl FnOnce() -> V) -> &mut V {
        if !crate::topic::is_wildcard(filter) {
            if !self.exact.contains_key(filter) {
                self.exact.insert(filter.into(), make());
            }
            return self.exact.get_mut(filter).expect("present");
        }
        self.wildcard_entry(filter, make)
    }

    /// Like [`TopicIndex::get_or_insert_with`], keeping a clone of `filter` (no new string) as
    /// the key of an exact filter.
    pub fn get_or_insert_shared(&mut self, filter: &Arc<str>, make: impl FnOnce() -> V) -> &mut V {
        if !crate::topic::is_wildcard(filter) {
            if !self.exact.contains_key(&**filter) {
                self.exact.insert(filter.clone(), make());
            }
            return self.exact.get_mut(&**filter).expect("present");
        }
        self.wildcard_entry(filter, make)
    }

    fn wildcard_entry(&mut self, filter: &str, make: impl FnOnce() -> V) -> &mut V {
        let mut node = &mut self.root;
        let mut levels = filter.split('/').peekable();
        while let Some(level) = levels.next() {
            if level == "#" {
                debug_assert!(levels.peek().is_none(), "validated filter has # last");
                let slot = &mut node.hash;
                if slot.is_none() {
                    self.wildcard_len += 1;
                }
                return slot.get_or_insert_with(make);
            }
            node = if level == "+" {
                node.plus.get_or_insert_with(Default::default)
            } else {
                node.children.entry(level.into()).or_default()
            };
        }
        if node.value.is_none() {
            self.wildcard_len += 1;
        }
        node.value.get_or_insert_with(make)
    }

    /// Removes `filter` and prunes trie nodes left empty.
    pub fn remove(&mut self, filter: &str) -> Option<V> {
        if !crate::topic::is_wildcard(filter) {
            return self.exact.remove(filter);
        }
        let levels: SmallVec<[&str; 16]> = filter.split('/').collect();
        let removed = remove_in(&mut self.root, &levels);
        if removed.is_some() {
            self.wildcard_len -= 1;
        }
        removed
    }

    /// Calls `f` once for every filter that matches `topic` (a valid topic name).
    pub fn for_each_match(&self, topic: &str, mut f: impl FnMut(&V)) {
        if let Some(v) = self.exact.get(topic) {
            f(v);
        }
        if self.wildcard_len == 0 {
            return;
        }
        let levels: SmallVec<[&str; 16]> = topic.split('/').collect();
        // MQTT-4.7.2-1: a leading wildcard never matches a topic starting with '$'.
        let dollar = topic.starts_with('$');
        walk(&self.root, &levels, 0, dollar, &mut f);
    }

    /// Visits every (filter, value) pair; filters are rebuilt, so this is for snapshots only.
    pub fn for_each(&self, mut f: impl FnMut(&str, &V)) {
        for (k, v) in &self.exact {
            f(k, v);
        }
        let mut path = String::new();
        visit(&self.root, &mut path, &mut f);
    }
}

fn walk<V>(node: &Node<V>, levels: &[&str], idx: usize, dollar: bool, f: &mut impl FnMut(&V)) {
    let guard = idx == 0 && dollar;
    if !guard {
        if let Some(v) = &node.hash {
            f(v);
        }
    }
    if idx == levels.len() {
        if let Some(v) = &node.value {
            f(v);
        }
        return;
    }
    if let Some(child) = node.children.get(levels[idx]) {
        walk(child, levels, idx + 1, dollar, f);
    }
    if !guard {
        if let Some(plus) = &node.plus {
            walk(plus, levels, idx + 1, dollar, f);
        }
    }
}

fn remove_in<V>(node: &mut Node<V>, levels: &[&str]) -> Option<V> {
    let (first, rest) = levels.split_first()?;
    if *first == "#" {
        return node.hash.take();
    }
    let removed;
    if *first == "+" {
        let child = node.plus.as_deref_mut()?;
        removed = if rest.is_empty() {
            child.value.take()
        } else {
            remove_in(child, rest)
        };
        if child.is_empty() {
            node.plus = None;
        }
    } else {
        let child = node.children.get_mut(*first)?;
        removed = if rest.is_empty() {
            child.value.take()
        } else {
            remove_in(child, rest)
        };
        if child.is_empty() {
            node.children.remove(*first);
        }
    }
    removed
}

fn visit<V>(node: &Node<V>, path: &mut String, f: &mut impl FnMut(&str, &V)) {
    let base = path.len();
    if let Some(v) = &node.value {
        f(path, v);
    }
    if let Some(v) = &node.hash {
        push_level(path, base, "#");
        f(path, v);
        path.truncate(base);
    }
    if let Some(plus) = &node.plus {
        push_level(path, base, "+");
        visit(plus, path, f);
        path.truncate(base);
    }
    for (level, child) in &node.children {
        push_level(path, base, level);
        visit(child, path, f);
        path.truncate(base);
    }
}

fn push_level(path: &mut String, base: usize, level: &str) {
    if base > 0 || !path.is_empty() {
        path.push('/');
    }
    path.push_str(level);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic::matches;
    use proptest::prelude::*;

    fn matched(idx: &TopicIndex<String>, topic: &str) -> Vec<String> {
        let mut out = Vec::new();
        idx.for_each_match(topic, |v| out.push(v.clone()));
        out.sort();
        out
    }

    #[test]
    fn exact_and_wildcard_filters_both_match() {
        let mut idx = TopicIndex::default();
        for f in ["a/b", "a/+", "a/#", "#", "+/b", "a/b/c", "+"] {
            idx.get_or_insert_with(f, || f.to_string());
        }
        assert_eq!(matched(&idx, "a/b"), ["#", "+/b", "a/#", "a/+", "a/b"]);
        assert_eq!(matched(&idx, "a"), ["#", "+", "a/#"]);
        assert_eq!(idx.len(), 7);
    }

    #[test]
    fn removing_prunes_and_keeps_siblings() {
        let mut idx = TopicIndex::default();
        for f in ["a/+/c", "a/+/d", "a/#"] {
            idx.get_or_insert_with(f, || f.to_string());
        }
        assert_eq!(idx.remove("a/+/c").as_deref(), Some("a/+/c"));
        assert_eq!(idx.remove("a/+/c"), None);
        assert_eq!(matched(&idx, "a/x/d"), ["a/#", "a/+/d"]);
        idx.remove("a/+/d");
        idx.remove("a/#");
        assert!(idx.is_empty());
        assert!(idx.root.is_empty());
    }

    #[test]
    fn root_wildcards_skip_dollar_topics() {
        let mut idx = TopicIndex::default();
        for f in ["#", "+/x", "$SYS/#"] {
            idx.get_or_insert_with(f, || f.to_string());
        }
        assert_eq!(matched(&idx, "$SYS/x"), ["$SYS/#"]);
        assert_eq!(matched(&idx, "a/x"), ["#", "+/x"]);
    }

    #[test]
    fn for_each_rebuilds_every_filter() {
        let mut idx = TopicIndex::default();
        let filters = ["a/b", "a/+", "a/#", "#", "+/b/#", "x"];
        for f in filters {
            idx.get_or_insert_with(f, || ());
        }
        let mut seen = Vec::new();
        idx.for_each(|f, _| seen.push(f.to_string()));
        seen.sort();
        let mut want: Vec<_> = filters.iter().map(|s| s.to_string()).collect();
        want.sort();
        assert_eq!(seen, want);
    }

    fn level() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("a".to_string()),
            Just("b".to_string()),
            Just("".to_string()),
            Just("$s".to_string())
        ]
    }

    fn filter() -> impl Strategy<Value = String> {
        (
            proptest::collection::vec(prop_oneof![level(), Just("+".to_string())], 1..4),
            any::<bool>(),
        )
            .prop_map(|(mut levels, hash)| {
                if hash {
                    levels.push("#".into());
                }
                levels.join("/")
            })
    }

    proptest! {
        #[test]
        fn index_agrees_with_reference_matcher(
            filters in proptest::collection::vec(filter(), 0..20),
            topic in proptest::collection::vec(level(), 1..5),
        ) {
            let topic = topic.join("/");
            let mut idx = TopicIndex::default();
            for f in &filters {
                idx.get_or_insert_with(f, || f.clone());
            }
            let mut want: Vec<String> = filters.iter().filter(|f| matches(f, &topic)).cloned().collect();
            want.sort();
            want.dedup();
            prop_assert_eq!(matched(&idx, &topic), want);
        }
    }
}
