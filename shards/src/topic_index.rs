//! Filter → value index: a hash map for exact filters and a trie for filters with `+`/`#`.
//!
//! Used twice on every shard: as the route replica (value = which shards have subscribers) and
//! as the subscription slice (value = which local sessions subscribed). Most real filters are
//! exact, so they cost one hash-map entry; only wildcard filters pay for trie nodes. A publish
//! costs one hash lookup plus a trie walk that only follows `+`, `#` and the topic's own levels.

use crate::hash::Map;
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
    children: Map<Box<str>, Node<V>>,
}

impl<V> Default for Node<V> {
    fn default() -> Self {
        Node {
            value: None,
            hash: None,
            plus: None,
            children: Map::default(),
        }
    }
}

impl<V> Node<V> {
    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.value.is_none()
            && self.hash.is_none()
            && self.plus.is_none()
            && self.children.is_empty()
    }

    /// Moves this node's children onto `stack` (for the iterative drop).
    fn take_children(&mut self, stack: &mut Vec<Node<V>>) {
        if let Some(plus) = self.plus.take() {
            stack.push(*plus);
        }
        stack.extend(self.children.drain().map(|(_, child)| child));
    }
}

/// Iterative drop: a filter's depth is set by a client or a peer (up to the packet size with
/// `mqtt.max_topic_levels = 0`), and the default recursive drop of a 300,000-level chain would
/// overflow the shard's stack.
impl<V> Drop for Node<V> {
    fn drop(&mut self) {
        let mut stack = Vec::new();
        self.take_children(&mut stack);
        while let Some(mut node) = stack.pop() {
            node.take_children(&mut stack);
        }
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
    exact: Map<Arc<str>, V>,
    root: Node<V>,
    wildcard_len: usize,
}

impl<V> Default for TopicIndex<V> {
    fn default() -> Self {
        TopicIndex {
            exact: Map::default(),
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

    /// Removes `filter` and prunes trie nodes left empty. Iterative: the depth is input.
    pub fn remove(&mut self, filter: &str) -> Option<V> {
        if !crate::topic::is_wildcard(filter) {
            return self.exact.remove(filter);
        }
        let levels: Vec<&str> = filter.split('/').collect();
        let hash = levels.last() == Some(&"#");
        // The node holding the value: for `a/#` the node of `a` (slot `hash`), else the node
        // of the last level (slot `value`).
        let steps = if hash {
            &levels[..levels.len() - 1]
        } else {
            &levels[..]
        };
        // First pass (shared): check the value is there and find `cut`, the shallowest depth
        // from which the path is a chain of nodes holding nothing but the next path node.
        let mut node = &self.root;
        let mut cut = None;
        for (i, level) in steps.iter().enumerate() {
            node = child_of(node, level)?;
            let depth = i + 1;
            if depth == steps.len() {
                break;
            }
            if holds_only_one_child(node) {
                cut.get_or_insert(depth);
            } else {
                cut = None;
            }
        }
        let slot = if hash { &node.hash } else { &node.value };
        slot.as_ref()?;
        let other = if hash { &node.value } else { &node.hash };
        let target_empties = other.is_none() && node.plus.is_none() && node.children.is_empty();
        // Second pass (mutable): take the value, then cut the emptied chain off in one piece
        // (its drop is iterative too).
        let mut node = &mut self.root;
        for level in steps {
            node = child_of_mut(node, level).expect("seen in the first pass");
        }
        let removed = if hash {
            node.hash.take()
        } else {
            node.value.take()
        };
        if target_empties && !steps.is_empty() {
            let depth = cut.unwrap_or(steps.len());
            let mut parent = &mut self.root;
            for level in &steps[..depth - 1] {
                parent = child_of_mut(parent, level).expect("seen in the first pass");
            }
            remove_child(parent, steps[depth - 1]);
        }
        self.wildcard_len -= 1;
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
        walk(&self.root, &levels, topic.starts_with('$'), &mut f);
    }

    /// Visits every (filter, value) pair; filters are rebuilt, so this is for snapshots only.
    pub fn for_each(&self, mut f: impl FnMut(&str, &V)) {
        for (k, v) in &self.exact {
            f(k, v);
        }
        visit(&self.root, &mut f);
    }
}

fn child_of<'a, V>(node: &'a Node<V>, level: &str) -> Option<&'a Node<V>> {
    if level == "+" {
        node.plus.as_deref()
    } else {
        node.children.get(level)
    }
}

fn child_of_mut<'a, V>(node: &'a mut Node<V>, level: &str) -> Option<&'a mut Node<V>> {
    if level == "+" {
        node.plus.as_deref_mut()
    } else {
        node.children.get_mut(level)
    }
}

fn remove_child<V>(node: &mut Node<V>, level: &str) {
    if level == "+" {
        node.plus = None;
    } else {
        node.children.remove(level);
    }
}

/// True when the node holds no value of its own and exactly one child.
fn holds_only_one_child<V>(node: &Node<V>) -> bool {
    node.value.is_none()
        && node.hash.is_none()
        && node.children.len() + usize::from(node.plus.is_some()) == 1
}

/// Every filter matching `levels`, with an explicit stack (the depth is input).
fn walk<V>(root: &Node<V>, levels: &[&str], dollar: bool, f: &mut impl FnMut(&V)) {
    let mut stack: Vec<(&Node<V>, usize)> = vec![(root, 0)];
    while let Some((node, idx)) = stack.pop() {
        // MQTT-4.7.2-1: a leading wildcard never matches a topic starting with '$'.
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
            continue;
        }
        if let Some(child) = node.children.get(levels[idx]) {
            stack.push((child, idx + 1));
        }
        if !guard {
            if let Some(plus) = &node.plus {
                stack.push((plus, idx + 1));
            }
        }
    }
}

/// Depth-first visit of every filter with an explicit stack; `path` is rebuilt in place: a
/// node's entry remembers the length of its parent's path, which stays intact below it.
fn visit<V>(root: &Node<V>, f: &mut impl FnMut(&str, &V)) {
    let mut path = String::new();
    // (node, its level, length of the parent's path, depth)
    let mut stack: Vec<(&Node<V>, &str, usize, usize)> = vec![(root, "", 0, 0)];
    while let Some((node, level, parent_len, depth)) = stack.pop() {
        path.truncate(parent_len);
        if depth > 1 {
            path.push('/');
        }
        path.push_str(level);
        let base = path.len();
        if let Some(v) = &node.value {
            f(&path, v);
        }
        if let Some(v) = &node.hash {
            if depth > 0 {
                path.push('/');
            }
            path.push('#');
            f(&path, v);
            path.truncate(base);
        }
        if let Some(plus) = &node.plus {
            stack.push((plus, "+", base, depth + 1));
        }
        for (level, child) in &node.children {
            stack.push((child, level, base, depth + 1));
        }
    }
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

    /// Runs `f` on a thread with a small stack: any recursion over the depth would overflow.
    fn on_small_stack(f: impl FnOnce() + Send + 'static) {
        std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(f)
            .expect("spawn")
            .join()
            .expect("no stack overflow");
    }

    #[test]
    fn a_300000_level_filter_is_inserted_matched_listed_and_removed_without_recursion() {
        on_small_stack(|| {
            let depth = 300_000;
            let topic = vec!["a"; depth].join("/");
            let plus = format!("{}/+", vec!["a"; depth - 1].join("/"));
            let hash = format!("{}/#", vec!["a"; depth - 1].join("/"));
            let mut idx = TopicIndex::default();
            idx.get_or_insert_with(&plus, || 1);
            idx.get_or_insert_with(&hash, || 2);
            let mut seen = Vec::new();
            idx.for_each_match(&topic, |v| seen.push(*v));
            seen.sort();
            assert_eq!(seen, [1, 2]);
            let mut listed = 0;
            idx.for_each(|f, _| {
                assert!(f == plus || f == hash);
                listed += 1;
            });
            assert_eq!(listed, 2);
            assert_eq!(idx.remove(&plus), Some(1));
            assert_eq!(idx.len(), 1);
            idx.get_or_insert_with(&plus, || 3);
            // Dropped with two deep filters still held.
        });
    }

    #[test]
    fn removing_a_deep_filter_prunes_its_whole_chain() {
        on_small_stack(|| {
            let filter = format!("{}/+", vec!["x"; 300_000].join("/"));
            let mut idx = TopicIndex::default();
            idx.get_or_insert_with("x/#", || 0);
            idx.get_or_insert_with(&filter, || 1);
            assert_eq!(idx.remove(&filter), Some(1));
            assert_eq!(idx.remove(&filter), None);
            assert_eq!(idx.len(), 1);
            let x = idx.root.children.get("x").expect("x/# kept");
            assert!(x.children.is_empty() && x.plus.is_none());
        });
    }

    #[test]
    fn for_each_keeps_empty_levels() {
        let mut idx = TopicIndex::default();
        for f in ["/+", "+//#", "/"] {
            idx.get_or_insert_with(f, || ());
        }
        let mut seen = Vec::new();
        idx.for_each(|f, _| seen.push(f.to_string()));
        seen.sort();
        assert_eq!(seen, ["+//#", "/", "/+"]);
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

        #[test]
        fn removal_agrees_with_reference_matcher_and_prunes_everything(
            filters in proptest::collection::vec(filter(), 0..20),
            gone in proptest::collection::vec(any::<bool>(), 20),
            topic in proptest::collection::vec(level(), 1..5),
        ) {
            let topic = topic.join("/");
            let mut idx = TopicIndex::default();
            for f in &filters {
                idx.get_or_insert_with(f, || f.clone());
            }
            let mut kept: Vec<String> = Vec::new();
            for (f, g) in filters.iter().zip(&gone) {
                if *g {
                    idx.remove(f);
                } else {
                    kept.push(f.clone());
                }
            }
            kept.retain(|f| !filters.iter().zip(&gone).any(|(x, g)| *g && x == f));
            let mut want: Vec<String> = kept.iter().filter(|f| matches(f, &topic)).cloned().collect();
            want.sort();
            want.dedup();
            prop_assert_eq!(matched(&idx, &topic), want);
            for f in &filters {
                idx.remove(f);
            }
            prop_assert!(idx.is_empty());
            prop_assert!(idx.root.is_empty());
        }
    }
}
