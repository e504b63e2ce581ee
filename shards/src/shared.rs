//! Shared subscription groups (`$share/group/filter`, `$queue/filter`): who is in a group and
//! which member gets the next message. Sans-IO: the shard that owns the group (the home shard of
//! the group key) holds a [`Group`] and asks it to pick; delivery and rejection travel as mesh
//! messages.

use crate::message::Message;
use crate::node_shared::fnv1a;
use std::sync::Arc;

/// How a group picks the member for a message (`mqtt.shared_subscription_strategy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// Each member in turn (default, as EMQX).
    RoundRobin,
    /// A uniformly random member.
    Random,
    /// Same publisher → same member.
    HashClientId,
    /// Same topic → same member.
    HashTopic,
    /// Same member until it leaves or refuses.
    Sticky,
}

impl Strategy {
    /// Parses the config value.
    pub fn parse(s: &str) -> Option<Strategy> {
        Some(match s {
            "round_robin" => Strategy::RoundRobin,
            "random" => Strategy::Random,
            "hash_clientid" => Strategy::HashClientId,
            "hash_topic" => Strategy::HashTopic,
            "sticky" => Strategy::Sticky,
            _ => return None,
        })
    }
}

/// A member: a session on some shard, identified by slot and client id (the slot alone could
/// be reused by another session before a late message arrives).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub shard: u16,
    pub session: u32,
    pub client_id: Arc<str>,
}

impl Member {
    /// True when this member is (shard, session).
    pub fn is(&self, shard: u16, session: u32) -> bool {
        self.shard == shard && self.session == session
    }
}

/// Splits a shared filter into (group, real filter); `None` for ordinary filters.
/// `$queue/f` is the group `$queue` (EMQX's convention).
pub fn parse_shared(filter: &str) -> Option<(&str, &str)> {
    if let Some(rest) = filter.strip_prefix("$share/") {
        let (group, f) = rest.split_once('/')?;
        // MQTT-4.8.2-1/2: a non-empty group without wildcards, and a non-empty filter.
        if group.is_empty() || group.contains(['+', '#']) || f.is_empty() {
            return None;
        }
        return Some((group, f));
    }
    filter
        .strip_prefix("$queue/")
        .filter(|f| !f.is_empty())
        .map(|f| ("$queue", f))
}

/// True when the filter claims to be shared, valid or not.
pub fn is_shared(filter: &str) -> bool {
    filter.starts_with("$share/") || filter.starts_with("$queue/")
}

/// One group, held by its owner shard.
#[derive(Debug)]
pub struct Group {
    pub members: Vec<Member>,
    next: usize,
    sticky: Option<usize>,
    rng: u64,
}

impl Default for Group {
    fn default() -> Self {
        Group {
            members: Vec::new(),
            next: 0,
            sticky: None,
            rng: 0x9E37_79B9_7F4A_7C15,
        }
    }
}

impl Group {
    /// Adds a member (idempotent).
    pub fn join(&mut self, m: Member) {
        if !self.members.iter().any(|x| x.is(m.shard, m.session)) {
            self.members.push(m);
        }
    }

    /// Removes a member; true when the group is now empty.
    pub fn leave(&mut self, shard: u16, session: u32) -> bool {
        self.members.retain(|m| !m.is(shard, session));
        self.sticky = None;
        self.members.is_empty()
    }

    /// Picks a member for `msg` among those not in `tried`.
    pub fn pick(
        &mut self,
        strategy: Strategy,
        msg: &Message,
        tried: &[(u16, u32)],
    ) -> Option<Member> {
        let n = self.members.len();
        if n == 0 {
            return None;
        }
        let ok = |m: &Member| !tried.iter().any(|&(s, x)| m.is(s, x));
        let start = match strategy {
            Strategy::RoundRobin => {
                let s = self.next % n;
                self.next = self.next.wrapping_add(1);
                s
            }
            Strategy::Random => {
                // xorshift64: no syscall, no shared state.
                self.rng ^= self.rng << 13;
                self.rng ^= self.rng >> 7;
                self.rng ^= self.rng << 17;
                (self.rng % n as u64) as usize
            }
            Strategy::HashClientId => (fnv1a(msg.publisher.as_bytes()) % n as u64) as usize,
            Strategy::HashTopic => (fnv1a(msg.topic.as_bytes()) % n as u64) as usize,
            Strategy::Sticky => self.sticky.filter(|&i| i < n).unwrap_or(0),
        };
        let idx = (0..n)
            .map(|k| (start + k) % n)
            .find(|&i| ok(&self.members[i]))?;
        if strategy == Strategy::Sticky {
            self.sticky = Some(idx);
        }
        Some(self.members[idx].clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use shardmq_net::QoS;

    fn msg(topic: &str, publisher: &str) -> Message {
        Message {
            topic: topic.into(),
            payload: Bytes::new(),
            qos: QoS::AtMostOnce,
            retain: false,
            properties: None,
            publisher: publisher.into(),
            expires_at: None,
            id: 0,
        }
    }

    fn group(n: u32) -> Group {
        let mut g = Group::default();
        for i in 0..n {
            g.join(Member {
                shard: (i % 2) as u16,
                session: i,
                client_id: format!("m{i}").into(),
            });
        }
        g
    }

    #[test]
    fn shared_filters_parse_group_and_filter() {
        assert_eq!(parse_shared("$share/g/a/b"), Some(("g", "a/b")));
        assert_eq!(parse_shared("$queue/a/#"), Some(("$queue", "a/#")));
        assert_eq!(parse_shared("$share/g"), None);
        assert_eq!(parse_shared("$share//a"), None);
        assert_eq!(parse_shared("$share/g+/a"), None);
        assert_eq!(parse_shared("a/b"), None);
    }

    #[test]
    fn round_robin_visits_every_member_evenly() {
        let mut g = group(3);
        let mut counts = [0; 3];
        for _ in 0..30 {
            counts[g
                .pick(Strategy::RoundRobin, &msg("t", "p"), &[])
                .unwrap()
                .session as usize] += 1;
        }
        assert_eq!(counts, [10, 10, 10]);
    }

    #[test]
    fn tried_members_are_skipped_until_none_is_left() {
        let mut g = group(3);
        let m = msg("t", "p");
        let tried = [(0u16, 0u32), (1, 1)];
        for _ in 0..5 {
            assert_eq!(g.pick(Strategy::RoundRobin, &m, &tried).unwrap().session, 2);
        }
        assert!(g
            .pick(Strategy::Random, &m, &[(0, 0), (1, 1), (0, 2)])
            .is_none());
    }

    #[test]
    fn hash_strategies_are_stable_and_sticky_sticks() {
        let mut g = group(4);
        let a = g.pick(Strategy::HashTopic, &msg("x/1", "p"), &[]).unwrap();
        for _ in 0..5 {
            assert_eq!(
                g.pick(Strategy::HashTopic, &msg("x/1", "q"), &[]),
                Some(a.clone())
            );
        }
        let b = g
            .pick(Strategy::HashClientId, &msg("t1", "pub-7"), &[])
            .unwrap();
        assert_eq!(
            g.pick(Strategy::HashClientId, &msg("t2", "pub-7"), &[]),
            Some(b)
        );
        let s = g.pick(Strategy::Sticky, &msg("t", "p"), &[(0, 0)]).unwrap();
        for _ in 0..5 {
            assert_eq!(
                g.pick(Strategy::Sticky, &msg("t", "p"), &[]),
                Some(s.clone())
            );
        }
    }

    #[test]
    fn hash_picks_do_not_move_between_versions() {
        // Pinned values (FNV-1a 64 of the topic or publisher, modulo the member count).
        let mut g = group(4);
        let pick = |g: &mut Group, s, m: &Message| g.pick(s, m, &[]).unwrap().session;
        assert_eq!(
            pick(&mut g, Strategy::HashTopic, &msg("sensor/42/temp", "p")),
            1
        );
        assert_eq!(pick(&mut g, Strategy::HashTopic, &msg("a", "p")), 0);
        assert_eq!(pick(&mut g, Strategy::HashClientId, &msg("t", "pub-7")), 0);
        assert_eq!(pick(&mut g, Strategy::HashClientId, &msg("t", "")), 1);
        let mut g = group(3);
        assert_eq!(pick(&mut g, Strategy::HashTopic, &msg("a", "p")), 1);
        assert_eq!(pick(&mut g, Strategy::HashClientId, &msg("t", "")), 2);
    }

    #[test]
    fn random_spreads_over_members() {
        let mut g = group(4);
        let mut seen = [false; 4];
        for _ in 0..200 {
            seen[g
                .pick(Strategy::Random, &msg("t", "p"), &[])
                .unwrap()
                .session as usize] = true;
        }
        assert!(seen.iter().all(|s| *s));
    }

    #[test]
    fn leaving_empties_the_group() {
        let mut g = group(2);
        assert!(!g.leave(0, 0));
        assert!(g.leave(1, 1));
    }
}
