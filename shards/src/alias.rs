//! Topic aliases of one connection (MQTT 3.3.2.3.4), both directions, sans-IO and bounded.
//!
//! *Outbound* (server → client): the client announces a Topic Alias Maximum; we give frequent
//! topics an alias so later messages carry only the number. The table never holds more than
//! that maximum nor more than a byte budget of topics; when full, an alias is reused for a new
//! topic with a clock (second-chance) policy, and a reused alias is always sent with its new
//! topic, which replaces the client's mapping (MQTT-3.3.2-12: the receiver replaces it).
//! Alias 0 is never used (MQTT-3.3.2-8) and no alias ever names two live topics.
//!
//! *Inbound* (client → server): aliases 1..=our maximum are checked by the caller; here the
//! topics a client pins are bounded by the same kind of byte budget. A client past it is cut
//! with Quota exceeded (0x97): it broke no protocol rule (its aliases are in range), it
//! exceeded a limit of ours, which is what 0x97 says.

use crate::hash::Map;
use std::sync::Arc;

/// Bytes charged per alias entry on top of its topic (map slot, `Arc` header, clock slot).
pub const ALIAS_ENTRY_OVERHEAD_BYTES: usize = 64;

/// What to put in an outgoing PUBLISH for a topic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AliasUse {
    /// The client knows this alias for the topic: send an empty topic and the alias.
    Known(u16),
    /// (Re)defines the alias: send the full topic and the alias.
    Assign(u16),
    /// No alias (topic too large for the budget): send the full topic only.
    None,
}

/// Server → client aliases: topic → alias, at most `max` aliases and `budget_bytes` bytes.
pub struct OutboundAliases {
    max: u16,
    budget_bytes: usize,
    by_topic: Map<Arc<str>, u16>,
    /// `slots[a - 1]` = the topic alias `a` names, and its second-chance bit.
    slots: Vec<Option<(Arc<str>, bool)>>,
    /// Aliases below `slots.len()` that name nothing (evicted to fit the byte budget).
    free: Vec<u16>,
    /// Clock hand: index into `slots` of the next eviction candidate.
    hand: usize,
    /// Bytes charged for the live entries.
    bytes: usize,
}

impl OutboundAliases {
    /// A table for a client whose Topic Alias Maximum is `max` (> 0).
    pub fn new(max: u16, budget_bytes: usize) -> OutboundAliases {
        debug_assert!(max > 0, "no table for a client that takes no aliases");
        OutboundAliases {
            max,
            budget_bytes,
            by_topic: Map::default(),
            slots: Vec::new(),
            free: Vec::new(),
            hand: 0,
            bytes: 0,
        }
    }

    /// Bytes charged for the live entries (≤ the budget).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Live aliases (≤ the client's maximum).
    pub fn len(&self) -> usize {
        self.by_topic.len()
    }

    /// True when no alias is live.
    pub fn is_empty(&self) -> bool {
        self.by_topic.is_empty()
    }

    /// The alias to use for `topic`, defining or reusing one as needed. The caller must send
    /// what this returns, in order: the client's view of the table follows these calls.
    pub fn resolve(&mut self, topic: &Arc<str>) -> AliasUse {
        if let Some(&alias) = self.by_topic.get(topic) {
            if let Some(Some(slot)) = self.slots.get_mut(alias as usize - 1) {
                slot.1 = true;
            }
            return AliasUse::Known(alias);
        }
        let cost = topic.len() + ALIAS_ENTRY_OVERHEAD_BYTES;
        if cost > self.budget_bytes {
            return AliasUse::None;
        }
        while self.bytes + cost > self.budget_bytes {
            let freed = self.evict();
            self.free.push(freed);
        }
        let alias = if let Some(a) = self.free.pop() {
            a
        } else if self.slots.len() < self.max as usize {
            self.slots.push(None);
            self.slots.len() as u16
        } else {
            self.evict()
        };
        debug_assert!(
            alias >= 1 && alias <= self.max,
            "MQTT-3.3.2-8: alias in 1..=max"
        );
        let slot = &mut self.slots[alias as usize - 1];
        debug_assert!(slot.is_none(), "an alias names one topic at a time");
        *slot = Some((topic.clone(), false));
        self.by_topic.insert(topic.clone(), alias);
        self.bytes += cost;
        debug_assert!(self.bytes <= self.budget_bytes);
        AliasUse::Assign(alias)
    }

    /// Frees the first entry the clock hand finds without its second chance and returns its
    /// alias, which the caller reuses or lists in `free`. Needs at least one live entry.
    fn evict(&mut self) -> u16 {
        debug_assert!(!self.by_topic.is_empty(), "evict from a non-empty table");
        // Bounded: one full turn clears every second-chance bit, the next finds a victim.
        for _ in 0..2 * self.slots.len() + 1 {
            let i = self.hand;
            self.hand = (self.hand + 1) % self.slots.len();
            match &mut self.slots[i] {
                Some((_, referenced @ true)) => *referenced = false,
                Some(_) => {
                    let (topic, _) = self.slots[i].take().expect("matched Some");
                    self.by_topic.remove(&topic);
                    self.bytes -= topic.len() + ALIAS_ENTRY_OVERHEAD_BYTES;
                    return (i + 1) as u16;
                }
                None => {}
            }
        }
        unreachable!("a non-empty clock always finds a victim within two turns")
    }
}

/// The inbound table is over its byte budget.
#[derive(Debug, PartialEq, Eq)]
pub struct AliasQuotaExceeded;

/// Client → server aliases: alias → topic, bounded in bytes (the count by our maximum).
#[derive(Default)]
pub struct InboundAliases {
    map: Map<u16, Arc<str>>,
    bytes: usize,
}

impl InboundAliases {
    /// The topic `alias` names, if the client defined it.
    pub fn get(&self, alias: u16) -> Option<&Arc<str>> {
        self.map.get(&alias)
    }

    /// Sets (or replaces) `alias`; refused when the table would exceed `budget_bytes`.
    pub fn define(
        &mut self,
        alias: u16,
        topic: &str,
        budget_bytes: usize,
    ) -> Result<(), AliasQuotaExceeded> {
        let old = self
            .map
            .get(&alias)
            .map_or(0, |t| t.len() + ALIAS_ENTRY_OVERHEAD_BYTES);
        let bytes = self.bytes - old + topic.len() + ALIAS_ENTRY_OVERHEAD_BYTES;
        if bytes > budget_bytes {
            return Err(AliasQuotaExceeded);
        }
        self.map.insert(alias, topic.into());
        self.bytes = bytes;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What a client does with our PUBLISHes: resolves aliases as MQTT-3.3.2-12 says and
    /// returns the topic the message arrives under, or an error a client would raise.
    #[derive(Default)]
    struct ClientModel {
        map: std::collections::HashMap<u16, String>,
    }

    impl ClientModel {
        fn receive(&mut self, max: u16, topic: &str, use_: AliasUse) -> Result<String, String> {
            match use_ {
                AliasUse::None => Ok(topic.to_string()),
                AliasUse::Assign(a) | AliasUse::Known(a) if a == 0 || a > max => {
                    Err(format!("alias {a} outside 1..={max}"))
                }
                AliasUse::Assign(a) => {
                    self.map.insert(a, topic.to_string());
                    Ok(topic.to_string())
                }
                AliasUse::Known(a) => self
                    .map
                    .get(&a)
                    .cloned()
                    .ok_or(format!("unknown alias {a}")),
            }
        }
    }

    fn run(max: u16, budget: usize, topics: &[String]) {
        let mut table = OutboundAliases::new(max, budget);
        let mut client = ClientModel::default();
        for t in topics {
            let topic: Arc<str> = t.as_str().into();
            let use_ = table.resolve(&topic);
            let got = client
                .receive(max, t, use_)
                .expect("client accepts the packet");
            assert_eq!(&got, t, "message arrived under another topic");
            assert!(table.len() <= max as usize);
            assert!(table.bytes() <= budget);
            if let AliasUse::Assign(a) | AliasUse::Known(a) = use_ {
                let slot = table.slots[a as usize - 1].as_ref().map(|s| &*s.0);
                assert_eq!(slot, Some(t.as_str()), "alias {a} names another topic");
            }
        }
        // No alias names two live topics: topic → alias and alias → topic agree.
        assert_eq!(table.slots.iter().flatten().count(), table.len());
        for (topic, &a) in &table.by_topic {
            let slot = table.slots[a as usize - 1].as_ref().map(|s| &s.0);
            assert_eq!(slot, Some(topic), "alias {a} names two topics");
        }
    }

    #[test]
    fn first_use_assigns_and_later_uses_are_known() {
        let mut t = OutboundAliases::new(10, 1 << 20);
        let a: Arc<str> = "a/b".into();
        assert_eq!(t.resolve(&a), AliasUse::Assign(1));
        assert_eq!(t.resolve(&a), AliasUse::Known(1));
    }

    #[test]
    fn more_topics_than_aliases_reuse_aliases_in_range_never_zero() {
        let topics: Vec<String> = (0..200_000).map(|i| format!("al/{i}")).collect();
        run(3, 1 << 20, &topics);
        run(u16::MAX, 64 << 20, &topics);
    }

    #[test]
    fn topic_larger_than_the_budget_is_sent_without_alias() {
        let mut t = OutboundAliases::new(10, 100);
        let big: Arc<str> = "x".repeat(100).into();
        assert_eq!(t.resolve(&big), AliasUse::None);
        assert!(t.is_empty());
    }

    #[test]
    fn byte_budget_evicts_before_the_count_limit() {
        let mut t = OutboundAliases::new(100, 3 * (ALIAS_ENTRY_OVERHEAD_BYTES + 3));
        for i in 0..10 {
            let topic: Arc<str> = format!("t/{i}").into();
            assert!(matches!(t.resolve(&topic), AliasUse::Assign(_)));
            assert!(t.len() <= 3);
        }
    }

    #[test]
    fn inbound_budget_counts_replacements_once() {
        let mut t = InboundAliases::default();
        let budget = 2 * (ALIAS_ENTRY_OVERHEAD_BYTES + 4);
        assert_eq!(t.define(1, "aaaa", budget), Ok(()));
        assert_eq!(t.define(1, "bbbb", budget), Ok(()));
        assert_eq!(t.define(2, "cccc", budget), Ok(()));
        assert_eq!(t.define(3, "dddd", budget), Err(AliasQuotaExceeded));
        assert_eq!(t.get(1).map(|s| &**s), Some("bbbb"));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn alias_churn_delivers_every_message_under_its_own_topic(
            max in 1u16..12,
            budget in 0usize..1024,
            picks in proptest::collection::vec((0usize..40, 0usize..60), 1..3000),
        ) {
            // Topics of varied length drawn from a pool a bit larger than the table, so that
            // hits, misses, reuse and budget evictions all happen.
            let topics: Vec<String> = picks
                .iter()
                .map(|&(i, len)| format!("p/{i}/{}", "z".repeat(len % (i + 1))))
                .collect();
            run(max, budget, &topics);
        }
    }
}
