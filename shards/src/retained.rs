//! The shard's replica of retained messages: a topic → message map, plus a trie of topic
//! levels so a SUBSCRIBE's wildcard filter finds its retained messages by walking only the
//! levels that can match (a literal level is one child lookup, `+` every child of one node,
//! `#` one subtree) instead of testing every retained message against every filter (issue 9:
//! 20,000 `#` filters × 5,000 retained messages stalled a shard for seconds).
//!
//! The trie indexes the first `TRIE_LEVELS_MAX` levels only; a deeper topic hangs, whole, in
//! the `deep` list of its node at that depth and is tested with the reference matcher there.
//! A trie level costs a few hundred bytes (a node and its children's table), so the cap keeps a
//! hostile deep topic from costing hundreds of times its size; the topics sharing a
//! `TRIE_LEVELS_MAX`-level prefix are few in practice, and so is that list. Every walk uses
//! an explicit stack and the trie drops iteratively.

use crate::hash::Map;
use crate::message::Message;
use crate::topic;
use std::sync::Arc;

/// Levels indexed by the trie (2 under test, so the property tests reach the `deep` lists).
const TRIE_LEVELS_MAX: usize = if cfg!(test) { 2 } else { 8 };

/// One topic level.
#[derive(Default)]
struct Level {
    /// The topic ending here (the same allocation as the key of `RetainedStore::by_topic`).
    topic: Option<Arc<str>>,
    children: Map<Box<str>, Level>,
    /// At depth `TRIE_LEVELS_MAX` only: the topics with more levels under this prefix (a set:
    /// clearing one of many is O(1); boxed: one pointer in every other level).
    deep: Option<Box<crate::hash::Set<Arc<str>>>>,
}

impl Level {
    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.topic.is_none() && self.children.is_empty() && self.deep.is_none()
    }
}

impl Drop for Level {
    fn drop(&mut self) {
        let mut stack: Vec<Level> = self.children.drain().map(|(_, l)| l).collect();
        while let Some(mut level) = stack.pop() {
            stack.extend(level.children.drain().map(|(_, l)| l));
        }
    }
}

/// Retained messages by topic name.
/// How many retained messages a store holds, and their topic + payload bytes.
#[derive(Clone, Copy, Debug)]
pub struct Held {
    pub count: usize,
    pub bytes: usize,
}

/// True when retaining `msg` in place of `old` (the message under the same topic, if any)
/// keeps a store holding `held` within `max_count` messages and `max_bytes` bytes (0 = no
/// limit); replacing a message with a smaller one always fits. The one rule for the shards'
/// replicas and the cluster thread's copy (`mqtt.max_retained_*`).
pub fn within_limits(
    held: Held,
    old: Option<&Message>,
    msg: &Message,
    max_count: usize,
    max_bytes: usize,
) -> bool {
    let grows = old.map_or(msg.topic.len() + msg.payload.len(), |o| {
        msg.payload.len().saturating_sub(o.payload.len())
    });
    let count_ok = max_count == 0 || old.is_some() || held.count < max_count;
    let bytes_ok = max_bytes == 0 || grows == 0 || held.bytes + grows <= max_bytes;
    count_ok && bytes_ok
}

#[derive(Default)]
pub struct RetainedStore {
    by_topic: Map<Arc<str>, Arc<Message>>,
    root: Level,
    /// Topic and payload bytes held, what `mqtt.max_retained_bytes` bounds.
    bytes: usize,
}

impl RetainedStore {
    /// Number of retained messages.
    pub fn len(&self) -> usize {
        self.by_topic.len()
    }

    /// True when nothing is retained.
    pub fn is_empty(&self) -> bool {
        self.by_topic.is_empty()
    }

    /// Topic and payload bytes of the retained messages.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// True when retaining `msg` under `topic` keeps the store within `max_count` messages
    /// and `max_bytes` bytes (0 = no limit). Replacing a message may always shrink it.
    pub fn fits(&self, topic: &str, msg: &Message, max_count: usize, max_bytes: usize) -> bool {
        let held = Held {
            count: self.by_topic.len(),
            bytes: self.bytes,
        };
        let old = self.by_topic.get(topic).map(|o| &**o);
        within_limits(held, old, msg, max_count, max_bytes)
    }

    /// The retained message of `topic`.
    pub fn get(&self, topic: &str) -> Option<&Arc<Message>> {
        self.by_topic.get(topic)
    }

    /// Retains `msg` under `topic` (a valid topic name), replacing any message there.
    pub fn insert(&mut self, topic: Arc<str>, msg: Arc<Message>) {
        self.bytes += msg.payload.len();
        if let Some(old) = self.by_topic.insert(topic.clone(), msg) {
            self.bytes -= old.payload.len();
            return;
        }
        self.bytes += topic.len();
        let mut level = &mut self.root;
        let mut names = topic.split('/');
        for name in names.by_ref().take(TRIE_LEVELS_MAX) {
            level = level.children.entry(name.into()).or_default();
        }
        if names.next().is_some() {
            level.deep.get_or_insert_default().insert(topic);
        } else {
            debug_assert!(level.topic.is_none(), "trie and map hold the same topics");
            level.topic = Some(topic);
        }
    }

    /// Forgets the retained message of `topic` and prunes the levels left empty.
    pub fn remove(&mut self, topic: &str) -> Option<Arc<Message>> {
        let msg = self.by_topic.remove(topic)?;
        self.bytes -= topic.len() + msg.payload.len();
        let names: Vec<&str> = topic.split('/').take(TRIE_LEVELS_MAX + 1).collect();
        let deep = names.len() > TRIE_LEVELS_MAX;
        let names = &names[..names.len().min(TRIE_LEVELS_MAX)];
        // The shallowest depth from which the path is a chain of levels holding nothing but
        // the next level of the path (and, last, this topic); that chain goes in one piece.
        let mut cut = None;
        let mut level = &self.root;
        for (depth, name) in names.iter().enumerate() {
            let Some(child) = level.children.get(*name) else {
                debug_assert!(false, "trie and map hold the same topics");
                return Some(msg);
            };
            let empties = if depth + 1 < names.len() {
                child.topic.is_none() && child.deep.is_none() && child.children.len() == 1
            } else if deep {
                let alone = child.deep.as_ref().is_some_and(|d| d.len() == 1);
                child.topic.is_none() && child.children.is_empty() && alone
            } else {
                child.children.is_empty() && child.deep.is_none()
            };
            if !empties {
                cut = None;
            } else if cut.is_none() {
                cut = Some(depth);
            }
            level = child;
        }
        let mut level = &mut self.root;
        for (depth, name) in names.iter().enumerate() {
            if cut == Some(depth) {
                level.children.remove(*name);
                return Some(msg);
            }
            level = level.children.get_mut(*name).expect("walked above");
        }
        if deep {
            if let Some(set) = &mut level.deep {
                set.remove(topic);
                if set.is_empty() {
                    level.deep = None;
                }
            }
        } else {
            level.topic = None;
        }
        Some(msg)
    }

    /// Appends the topic of every retained message matching `filter` (a valid filter).
    pub fn matching(&self, filter: &str, out: &mut Vec<Arc<str>>) {
        if !topic::is_wildcard(filter) {
            out.extend(self.by_topic.get_key_value(filter).map(|(t, _)| t.clone()));
            return;
        }
        let names: Vec<&str> = filter.split('/').collect();
        let mut stack: Vec<(&Level, usize)> = vec![(&self.root, 0)];
        while let Some((level, idx)) = stack.pop() {
            // MQTT-4.7.2-1: a leading wildcard never matches a topic starting with '$'.
            let visible = |name: &str| idx > 0 || !name.starts_with('$');
            match names.get(idx).copied() {
                None => out.extend(level.topic.clone()),
                Some("#") => {
                    // `a/#` matches `a` itself and everything below it.
                    out.extend(level.topic.clone());
                    out.extend(level.deep.iter().flat_map(|d| d.iter().cloned()));
                    let mut below: Vec<&Level> = level
                        .children
                        .iter()
                        .filter(|(name, _)| visible(name))
                        .map(|(_, l)| l)
                        .collect();
                    while let Some(l) = below.pop() {
                        out.extend(l.topic.clone());
                        out.extend(l.deep.iter().flat_map(|d| d.iter().cloned()));
                        below.extend(l.children.values());
                    }
                }
                Some(name) => {
                    // Deeper than the trie: the prefix matched, test the rest of each topic.
                    let deep = level.deep.iter().flat_map(|d| d.iter());
                    out.extend(deep.filter(|t| topic::matches(filter, t)).cloned());
                    if name == "+" {
                        for (name, child) in &level.children {
                            if visible(name) {
                                stack.push((child, idx + 1));
                            }
                        }
                    } else if let Some(child) = level.children.get(name) {
                        stack.push((child, idx + 1));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic::matches;
    use proptest::prelude::*;

    #[test]
    fn limits_refuse_new_topics_but_let_existing_ones_be_replaced() {
        let mut s = RetainedStore::default();
        let with = msg_with;
        s.insert("a".into(), with("a", b"1234"));
        s.insert("bb".into(), with("bb", b"12"));
        assert_eq!(s.bytes(), 1 + 4 + 2 + 2);
        // Count: two held, a third topic is refused at max 2, a replacement fits.
        assert!(!s.fits("c", &with("c", b"1"), 2, 0));
        assert!(s.fits("a", &with("a", b"123456789"), 2, 0));
        // Bytes: 9 held; a new topic of 2 bytes fits at 11, not at 10; shrinking always fits.
        assert!(s.fits("c", &with("c", b"1"), 0, 11));
        assert!(!s.fits("c", &with("c", b"1"), 0, 10));
        assert!(s.fits("a", &with("a", b""), 0, 1));
        s.insert("a".into(), with("a", b"123456789"));
        assert_eq!(s.bytes(), 1 + 9 + 2 + 2);
        s.remove("a");
        s.remove("bb");
        assert_eq!(s.bytes(), 0);
    }

    fn msg(topic: &str) -> Arc<Message> {
        msg_with(topic, b"")
    }

    fn msg_with(topic: &str, payload: &'static [u8]) -> Arc<Message> {
        Arc::new(Message {
            topic: topic.into(),
            payload: bytes::Bytes::from_static(payload),
            qos: shardmq_net::QoS::AtMostOnce,
            retain: true,
            properties: None,
            publisher: "p".into(),
            expires_at: None,
            id: 0,
        })
    }

    fn matched(store: &RetainedStore, filter: &str) -> Vec<String> {
        let mut out = Vec::new();
        store.matching(filter, &mut out);
        let mut out: Vec<String> = out.iter().map(|t| t.to_string()).collect();
        out.sort();
        out
    }

    #[test]
    fn wildcards_find_only_matching_topics() {
        let mut s = RetainedStore::default();
        for t in ["a", "a/b", "a/b/c", "x/b", "$SYS/b", "/b"] {
            s.insert(t.into(), msg(t));
        }
        assert_eq!(matched(&s, "a/#"), ["a", "a/b", "a/b/c"]);
        assert_eq!(matched(&s, "+/b"), ["/b", "a/b", "x/b"]);
        assert_eq!(matched(&s, "#"), ["/b", "a", "a/b", "a/b/c", "x/b"]);
        assert_eq!(matched(&s, "$SYS/+"), ["$SYS/b"]);
        assert_eq!(matched(&s, "a/b"), ["a/b"]);
        assert_eq!(matched(&s, "a/b/c/d"), Vec::<String>::new());
    }

    #[test]
    fn a_300000_level_topic_is_stored_matched_and_removed_without_recursion() {
        std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(|| {
                let deep = vec!["d"; 300_000].join("/");
                let mut s = RetainedStore::default();
                s.insert("d".into(), msg("d"));
                s.insert(deep.as_str().into(), msg(&deep));
                assert_eq!(matched(&s, "#").len(), 2);
                assert_eq!(
                    matched(&s, &format!("{}/+", vec!["+"; 299_999].join("/"))).len(),
                    1
                );
                assert!(s.remove(&deep).is_some());
                assert!(s.root.children["d"].children.is_empty());
                assert!(s.root.children["d"].deep.is_none());
                s.insert(deep.as_str().into(), msg(&deep));
                // Dropped with the deep topic held.
            })
            .expect("spawn")
            .join()
            .expect("no stack overflow");
    }

    fn level() -> impl Strategy<Value = String> {
        prop_oneof![Just("a"), Just("b"), Just(""), Just("$s")].prop_map(String::from)
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
        fn store_agrees_with_reference_matcher(
            topics in proptest::collection::vec(proptest::collection::vec(level(), 1..4), 0..12),
            gone in proptest::collection::vec(any::<bool>(), 12),
            filter in filter(),
        ) {
            let topics: Vec<String> = topics.iter().map(|t| t.join("/")).collect();
            let mut s = RetainedStore::default();
            for t in &topics {
                s.insert(t.as_str().into(), msg(t));
            }
            for (t, g) in topics.iter().zip(&gone) {
                if *g {
                    s.remove(t);
                }
            }
            let mut want: Vec<String> = topics
                .iter()
                .filter(|t| s.get(t).is_some() && matches(&filter, t))
                .cloned()
                .collect();
            want.sort();
            want.dedup();
            prop_assert_eq!(matched(&s, &filter), want);
            for t in &topics {
                s.remove(t);
            }
            prop_assert!(s.root.is_empty());
        }
    }
}
