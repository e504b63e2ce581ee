//! What the simulator checks: a ledger of every message a client published and every copy a
//! client received, and the rules a broker cluster must keep.
//!
//! - Every QoS 1/2 message acknowledged to its publisher (PUBACK; PUBREC for QoS 2) reaches
//!   every subscriber that matched it when it was published, at least once for QoS 1 and
//!   exactly once for QoS 2, unless a fault was active around it: a link between nodes that
//!   is cut or partitioned drops the far side's routes by design (as EMQX does), so messages
//!   published during a fault, or shortly before or after one, are not owed.
//! - Each subscriber receives one publisher's messages in the order they were published.
//! - A persistent session is never lost: a CONNACK without "session present" for a session
//!   that was not expired is a loss.

use std::collections::BTreeMap;

/// Margin (ms) before a fault and after it ends within which a message is not owed: routes
/// are re-sent when a link comes back and take a few turns to land.
pub const SETTLE_MS: u64 = 1_500;
/// Margin (ms) after an acknowledgement within which a fault can still catch the message on
/// its way to another node.
pub const DELIVERY_MS: u64 = 1_000;

/// Identifies a message: publisher (client index) and its sequence number.
pub type MsgKey = (u32, u64);

/// One published message as the ledger knows it.
#[derive(Clone, Debug)]
pub struct Published {
    pub topic: String,
    pub qos: u8,
    pub sent_at: u64,
    pub acked_at: Option<u64>,
}

/// A subscriber's subscription, and from when it holds.
#[derive(Clone, Debug)]
pub struct SubRecord {
    pub client: u32,
    pub filter: String,
    pub qos: u8,
    /// When its SUBACK arrived (owed messages are the ones published after it settled).
    pub since: u64,
}

/// Everything that happened, for the checks at the end.
#[derive(Default)]
pub struct Ledger {
    pub msgs: BTreeMap<MsgKey, Published>,
    pub subs: Vec<SubRecord>,
    /// Copies received: (subscriber, message) -> count.
    pub got: BTreeMap<(u32, MsgKey), u32>,
    /// Last sequence received from each publisher by each subscriber (first receipts only).
    pub last_seq: BTreeMap<(u32, u32), u64>,
    /// Faults as (start ms, end ms; `u64::MAX` while active).
    pub faults: Vec<(u64, u64)>,
    pub violations: Vec<String>,
    /// Whether going backwards in a publisher's sequence is a violation.
    pub check_order: bool,
    /// What clients saw, for the trace of a failing seed.
    pub notes: Vec<String>,
    /// Sessions lost by design (to a fault), by client and time: what they held then is not
    /// owed.
    pub sessions_lost_by_design: Vec<(u32, u64)>,
    /// Sessions found lost, by client.
    pub lost_sessions: Vec<(u32, u64)>,
}

impl Ledger {
    pub fn published(&mut self, key: MsgKey, topic: &str, qos: u8, now: u64) {
        self.msgs.insert(
            key,
            Published {
                topic: topic.to_string(),
                qos,
                sent_at: now,
                acked_at: None,
            },
        );
    }

    pub fn acked(&mut self, key: MsgKey, now: u64) {
        if let Some(m) = self.msgs.get_mut(&key) {
            m.acked_at.get_or_insert(now);
        }
    }

    pub fn subscribed(&mut self, client: u32, filter: &str, qos: u8, now: u64) {
        if !self
            .subs
            .iter()
            .any(|s| s.client == client && s.filter == filter)
        {
            self.subs.push(SubRecord {
                client,
                filter: filter.to_string(),
                qos,
                since: now,
            });
        }
    }

    /// A copy of `key` reached `client` (a QoS 2 copy that the client already holds under
    /// the same packet id is not reported: it is the same delivery).
    pub fn received(&mut self, client: u32, key: MsgKey, now: u64) -> u32 {
        let count = self.got.entry((client, key)).or_insert(0);
        *count += 1;
        if *count > 1 {
            return *count;
        }
        let last = self.last_seq.entry((client, key.0)).or_insert(0);
        if key.1 < *last && self.check_order {
            self.violations.push(format!(
                "t={now}: client {client} got message {} of publisher {} after {}",
                key.1, key.0, *last
            ));
        }
        *last = (*last).max(key.1);
        1
    }

    pub fn note(&mut self, now: u64, what: String) {
        self.notes.push(format!("t={now} {what}"));
    }

    pub fn fault_started(&mut self, now: u64) -> usize {
        self.faults.push((now, u64::MAX));
        self.faults.len() - 1
    }

    pub fn fault_ended(&mut self, idx: usize, now: u64) {
        if let Some(f) = self.faults.get_mut(idx) {
            f.1 = now;
        }
    }

    /// A reconnect did not find its session: a loss, unless a fault was near (a client that
    /// comes back on the other side of a partition from its session cannot have it; which
    /// side wins after the heal is issue 11's).
    pub fn session_lost(&mut self, client: u32, now: u64) {
        self.lost_sessions.push((client, now));
        if self.fault_near(now) {
            self.note(now, format!("client {client} lost its session to a fault"));
            self.sessions_lost_by_design.push((client, now));
            return;
        }
        self.violations.push(format!(
            "t={now}: client {client} reconnected and its persistent session was gone"
        ));
    }

    /// Whether a fault is in force at `now` or ended less than [`SETTLE_MS`] ago.
    pub fn fault_near(&self, now: u64) -> bool {
        self.faults
            .iter()
            .any(|&(s, e)| s <= now && e.saturating_add(SETTLE_MS) >= now)
    }

    /// Whether a message sent at `sent` and acknowledged at `acked` is owed to subscribers.
    fn owed(&self, sent: u64, acked: u64) -> bool {
        let (from, to) = (sent.saturating_sub(SETTLE_MS), acked + DELIVERY_MS);
        !self
            .faults
            .iter()
            .any(|&(s, e)| s <= to && e.saturating_add(SETTLE_MS) >= from)
    }

    /// The end-of-run checks; returns every violation found (empty when all held).
    pub fn check(&self) -> Vec<String> {
        let mut out = self.violations.clone();
        for (key, m) in &self.msgs {
            let Some(acked) = m.acked_at else { continue };
            if m.qos == 0 || !self.owed(m.sent_at, acked) {
                continue;
            }
            for s in &self.subs {
                if s.qos == 0
                    || s.since.saturating_add(SETTLE_MS) > m.sent_at
                    || !crate::topic::matches(&s.filter, &m.topic)
                {
                    continue;
                }
                let n = self.got.get(&(s.client, *key)).copied().unwrap_or(0);
                let held_by_lost_session = self
                    .sessions_lost_by_design
                    .iter()
                    .any(|&(c, t)| c == s.client && t >= acked);
                if n == 0 && held_by_lost_session {
                    continue;
                }
                let qos = m.qos.min(s.qos);
                if n == 0 {
                    out.push(format!(
                        "lost: message {} of publisher {} (QoS {qos}, sent t={}, acked t={acked}) \
                         never reached client {} ({})",
                        key.1, key.0, m.sent_at, s.client, s.filter
                    ));
                } else if qos == 2 && n > 1 {
                    out.push(format!(
                        "duplicate: QoS 2 message {} of publisher {} reached client {} {n} times",
                        key.1, key.0, s.client
                    ));
                }
            }
        }
        out
    }
}

/// The payload that identifies a message: publisher and sequence, 8 bytes each.
pub fn payload_of(key: MsgKey) -> Vec<u8> {
    let mut p = Vec::with_capacity(16);
    p.extend_from_slice(&(key.0 as u64).to_be_bytes());
    p.extend_from_slice(&key.1.to_be_bytes());
    p
}

/// The message a payload names; `None` for a payload the simulation did not write.
pub fn key_of(payload: &[u8]) -> Option<MsgKey> {
    let p: &[u8; 16] = payload.try_into().ok()?;
    let publisher = u64::from_be_bytes(p[..8].try_into().ok()?);
    let seq = u64::from_be_bytes(p[8..].try_into().ok()?);
    Some((publisher as u32, seq))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_acked_message_missing_at_a_subscriber_is_a_loss_unless_a_fault_was_near() {
        let mut l = Ledger::default();
        l.subscribed(1, "t/#", 1, 0);
        l.published((0, 1), "t/a", 1, 5_000);
        l.acked((0, 1), 5_010);
        assert_eq!(l.check().len(), 1, "lost");
        let f = l.fault_started(5_500);
        l.fault_ended(f, 6_000);
        assert!(l.check().is_empty(), "a fault right after: not owed");
    }

    #[test]
    fn qos2_twice_is_a_duplicate_and_going_backwards_is_disorder() {
        let mut l = Ledger {
            check_order: true,
            ..Ledger::default()
        };
        l.subscribed(1, "t/a", 2, 0);
        l.published((0, 2), "t/a", 2, 5_000);
        l.acked((0, 2), 5_001);
        assert_eq!(l.received(1, (0, 2), 5_002), 1);
        assert_eq!(l.received(1, (0, 2), 5_003), 2);
        l.received(1, (0, 1), 5_004);
        let v = l.check();
        assert!(v.iter().any(|v| v.contains("after 2")), "{v:?}");
        assert!(v.iter().any(|v| v.starts_with("duplicate")), "{v:?}");
        assert_eq!(key_of(&payload_of((3, 9))), Some((3, 9)));
    }
}
