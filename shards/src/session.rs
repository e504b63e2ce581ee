//! A client's session: subscriptions, the outgoing in-flight window, the bounded queue behind
//! it, and the incoming QoS 2 packet ids. Plain state, no sockets and no clock: the shard feeds
//! it events and sends what it returns, so every rule here is unit-tested without a network.

use crate::config::DropPolicy;
use crate::message::Message;
use shardmq_net::{QoS, SubscriptionOptions};
use smallvec::SmallVec;
use std::collections::VecDeque;
use std::sync::Arc;

/// One message on its way to one session, with the options of the subscription that matched.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub msg: Arc<Message>,
    /// min(published QoS, granted QoS).
    pub qos: QoS,
    /// Retain flag to send (set for retained messages sent at subscribe time).
    pub retain: bool,
    /// v5 subscription identifiers of every matching subscription.
    pub sub_ids: SmallVec<[u32; 1]>,
    /// The shared subscription (`$share/g/f`) it came through, so it can be handed to another
    /// member if this one leaves before acknowledging it.
    pub share: Option<Arc<str>>,
}

/// Where an unacknowledged outgoing message stands (MQTT 4.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InflightState {
    /// QoS 1 PUBLISH sent, PUBACK awaited.
    AwaitPubAck,
    /// QoS 2 PUBLISH sent, PUBREC awaited.
    AwaitPubRec,
    /// QoS 2 PUBREL sent, PUBCOMP awaited; the message itself is no longer needed.
    AwaitPubComp,
}

/// An unacknowledged outgoing message.
#[derive(Debug)]
pub struct Inflight {
    pub packet_id: u16,
    pub state: InflightState,
    pub delivery: Delivery,
}

/// Result of offering a message to the queue.
#[derive(Debug, PartialEq, Eq)]
pub enum Enqueued {
    Queued,
    /// Queued after dropping the oldest message.
    DroppedOldest,
    /// Not queued: the queue is full and the policy keeps what is there.
    DroppedNew,
}

/// A subscription held by a session.
#[derive(Clone, Debug)]
pub struct Subscription {
    pub filter: Arc<str>,
    pub options: SubscriptionOptions,
    pub id: Option<std::num::NonZeroU32>,
}

/// Session state of one client id on its home shard.
#[derive(Debug)]
pub struct Session {
    pub client_id: Arc<str>,
    /// Clean session (3.x) or session expiry 0 (v5): the session ends with the connection.
    pub ephemeral: bool,
    pub subscriptions: crate::subscription_list::SubscriptionList,
    inflight: VecDeque<Inflight>,
    queue: VecDeque<Delivery>,
    /// Incoming QoS 2 packet ids whose PUBREL has not arrived (exactly-once, MQTT 4.3.3).
    incoming_qos2: Vec<u16>,
    next_packet_id: u16,
    /// Messages lost to a full queue since the session began.
    pub dropped: u64,
}

impl Session {
    /// A fresh session with nothing subscribed or queued.
    pub fn new(client_id: Arc<str>, ephemeral: bool) -> Session {
        Session {
            client_id,
            ephemeral,
            subscriptions: Default::default(),
            inflight: VecDeque::new(),
            queue: VecDeque::new(),
            incoming_qos2: Vec::new(),
            next_packet_id: 1,
            dropped: 0,
        }
    }

    /// Number of unacknowledged outgoing messages.
    pub fn inflight_len(&self) -> usize {
        self.inflight.len()
    }

    /// Number of queued messages.
    pub fn queue_len(&self) -> usize {
        self.queue.len()
    }

    /// Offers a delivery to the bounded queue.
    pub fn enqueue(&mut self, d: Delivery, max_len: usize, policy: DropPolicy) -> Enqueued {
        if self.queue.len() < max_len {
            self.queue.push_back(d);
            return Enqueued::Queued;
        }
        self.dropped += 1;
        match policy {
            DropPolicy::DropNewest => Enqueued::DroppedNew,
            DropPolicy::DropOldest => {
                self.queue.pop_front();
                if max_len == 0 {
                    return Enqueued::DroppedNew;
                }
                self.queue.push_back(d);
                Enqueued::DroppedOldest
            }
        }
    }

    /// Takes the next queued delivery that may be sent now: QoS 0 always, QoS 1/2 only while
    /// the in-flight window (`window`) has room. QoS 1/2 get a packet id and enter the window.
    pub fn next_to_send(&mut self, window: usize) -> Option<(u16, Delivery)> {
        let front = self.queue.front()?;
        if front.qos == QoS::AtMostOnce {
            return self.queue.pop_front().map(|d| (0, d));
        }
        if self.inflight.len() >= window {
            return None;
        }
        let d = self.queue.pop_front()?;
        let pid = self.start_inflight(d.clone());
        Some((pid, d))
    }

    /// Puts a QoS 1/2 delivery straight into the window (the caller checked there is room)
    /// and returns its packet id.
    pub fn start_inflight(&mut self, d: Delivery) -> u16 {
        let packet_id = self.alloc_packet_id();
        self.restore_inflight(packet_id, d);
        packet_id
    }

    /// Puts a QoS 1/2 delivery in flight under a given packet id: one that was in flight when
    /// its session moved here keeps its id, so the client sees it again as a DUP of it.
    pub fn restore_inflight(&mut self, packet_id: u16, d: Delivery) {
        debug_assert!(d.qos != QoS::AtMostOnce);
        debug_assert!(
            !self.holds_packet_id(packet_id),
            "packet ids in flight are unique"
        );
        let state = if d.qos == QoS::AtLeastOnce {
            InflightState::AwaitPubAck
        } else {
            InflightState::AwaitPubRec
        };
        self.inflight.push_back(Inflight {
            packet_id,
            state,
            delivery: d,
        });
    }

    /// Whether `packet_id` is in flight (in any state): ids in flight are unique.
    pub fn holds_packet_id(&self, packet_id: u16) -> bool {
        self.inflight.iter().any(|i| i.packet_id == packet_id)
    }

    /// True when a delivery can bypass the queue: nothing queued ahead of it and, for QoS 1/2,
    /// room in the window.
    pub fn can_send_now(&self, qos: QoS, window: usize) -> bool {
        self.queue.is_empty() && (qos == QoS::AtMostOnce || self.inflight.len() < window)
    }

    fn alloc_packet_id(&mut self) -> u16 {
        // Skip ids still in flight; the window is far smaller than the id space.
        loop {
            let id = self.next_packet_id;
            self.next_packet_id = if id == u16::MAX { 1 } else { id + 1 };
            if !self.inflight.iter().any(|i| i.packet_id == id) {
                return id;
            }
        }
    }

    fn position(&self, packet_id: u16, state: InflightState) -> Option<usize> {
        // Acks usually arrive in order: the front is checked first by the linear scan.
        self.inflight
            .iter()
            .position(|i| i.packet_id == packet_id && i.state == state)
    }

    /// PUBACK received; false if no QoS 1 message with that id was in flight.
    pub fn on_puback(&mut self, packet_id: u16) -> bool {
        match self.position(packet_id, InflightState::AwaitPubAck) {
            Some(i) => {
                self.inflight.remove(i);
                true
            }
            None => false,
        }
    }

    /// PUBREC received; true if the caller must answer PUBREL (also for a repeated PUBREC of
    /// a message already released, MQTT-4.3.3).
    pub fn on_pubrec(&mut self, packet_id: u16) -> bool {
        if let Some(i) = self.position(packet_id, InflightState::AwaitPubRec) {
            self.inflight[i].state = InflightState::AwaitPubComp;
            return true;
        }
        self.position(packet_id, InflightState::AwaitPubComp)
            .is_some()
    }

    /// PUBCOMP received; false if no message awaited it.
    pub fn on_pubcomp(&mut self, packet_id: u16) -> bool {
        match self.position(packet_id, InflightState::AwaitPubComp) {
            Some(i) => {
                self.inflight.remove(i);
                true
            }
            None => false,
        }
    }

    /// Forgets an in-flight message that will never be sent (too large for the client).
    pub fn abandon(&mut self, packet_id: u16) {
        self.inflight.retain(|i| i.packet_id != packet_id);
    }

    /// Removes every unacknowledged or queued delivery that came through a shared
    /// subscription, for redispatch to another member (PUBREL-stage ones stay: the member
    /// already has the message).
    pub fn take_shared(&mut self) -> Vec<Delivery> {
        let mut out = Vec::new();
        self.inflight.retain(|i| {
            if i.delivery.share.is_some() && i.state != InflightState::AwaitPubComp {
                out.push(i.delivery.clone());
                return false;
            }
            true
        });
        self.queue.retain(|d| {
            if d.share.is_some() {
                out.push(d.clone());
                return false;
            }
            true
        });
        out
    }

    /// Removes every message not yet acknowledged, in-flight first then queued, for a
    /// session moving to another node (PUBREL-stage ones are done for the receiver).
    /// Packet ids of the in-flight messages `take_messages` returns first, in its order.
    pub fn sent_ids(&self) -> Vec<u16> {
        self.inflight
            .iter()
            .filter(|i| i.state != InflightState::AwaitPubComp)
            .map(|i| i.packet_id)
            .collect()
    }

    /// Packet ids of QoS 2 messages released (PUBREL sent) and awaiting PUBCOMP.
    pub fn released_ids(&self) -> Vec<u16> {
        self.inflight
            .iter()
            .filter(|i| i.state == InflightState::AwaitPubComp)
            .map(|i| i.packet_id)
            .collect()
    }

    /// A released QoS 2 message whose session moved here: only its PUBREL is left to send
    /// (again, with the same packet id), so it carries an empty message.
    pub fn restore_released(&mut self, packet_id: u16) {
        debug_assert!(
            !self.holds_packet_id(packet_id),
            "packet ids in flight are unique"
        );
        let msg = Arc::new(Message {
            topic: "".into(),
            payload: bytes::Bytes::new(),
            qos: QoS::ExactlyOnce,
            retain: false,
            properties: None,
            publisher: "".into(),
            expires_at: None,
            id: 0,
        });
        self.inflight.push_back(Inflight {
            packet_id,
            state: InflightState::AwaitPubComp,
            delivery: Delivery {
                msg,
                qos: QoS::ExactlyOnce,
                retain: false,
                sub_ids: SmallVec::new(),
                share: None,
            },
        });
    }

    pub fn take_messages(&mut self) -> Vec<Delivery> {
        let mut out: Vec<Delivery> = self
            .inflight
            .drain(..)
            .filter(|i| i.state != InflightState::AwaitPubComp)
            .map(|i| i.delivery)
            .collect();
        out.extend(self.queue.drain(..));
        out
    }

    /// In-flight messages, oldest first, to resend on session resume (MQTT-4.4.0-1).
    pub fn inflight(&self) -> impl Iterator<Item = &Inflight> {
        self.inflight.iter()
    }

    /// Incoming QoS 2 PUBLISH: true the first time `packet_id` is seen (route the message),
    /// false for a duplicate before PUBREL (only PUBREC again).
    pub fn incoming_qos2(&mut self, packet_id: u16) -> bool {
        if self.incoming_qos2.contains(&packet_id) {
            return false;
        }
        self.incoming_qos2.push(packet_id);
        true
    }

    /// Incoming QoS 2 packet ids awaiting their PUBREL, to move with the session.
    pub fn unreleased_qos2(&self) -> Vec<u16> {
        self.incoming_qos2.to_vec()
    }

    /// True while the incoming QoS 2 `packet_id` awaits its PUBREL.
    pub fn awaits_pubrel(&self, packet_id: u16) -> bool {
        self.incoming_qos2.contains(&packet_id)
    }

    /// Incoming PUBREL: forgets the id; true if it was known.
    pub fn release_qos2(&mut self, packet_id: u16) -> bool {
        match self.incoming_qos2.iter().position(|&p| p == packet_id) {
            Some(i) => {
                self.incoming_qos2.swap_remove(i);
                true
            }
            None => false,
        }
    }

    /// Incoming QoS 2 ids awaiting PUBREL.
    pub fn incoming_qos2_len(&self) -> usize {
        self.incoming_qos2.len()
    }

    /// Drops all messages, in flight and queued (clean start on a takeover).
    pub fn clear_messages(&mut self) {
        self.inflight.clear();
        self.queue.clear();
        self.incoming_qos2.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn delivery(n: u8, qos: QoS) -> Delivery {
        Delivery {
            msg: Arc::new(Message {
                topic: "t".into(),
                payload: Bytes::from(vec![n]),
                qos,
                retain: false,
                properties: None,
                publisher: "p".into(),
                expires_at: None,
                id: 0,
            }),
            qos,
            retain: false,
            sub_ids: SmallVec::new(),
            share: None,
        }
    }

    fn payloads(s: &mut Session) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some((_, d)) = s.next_to_send(usize::MAX) {
            out.push(d.msg.payload[0]);
        }
        out
    }

    #[test]
    fn full_queue_drops_oldest_and_counts() {
        let mut s = Session::new("c".into(), false);
        for n in 1..=10 {
            s.enqueue(delivery(n, QoS::AtLeastOnce), 5, DropPolicy::DropOldest);
        }
        assert_eq!(s.dropped, 5);
        assert_eq!(payloads(&mut s), [6, 7, 8, 9, 10]);
    }

    #[test]
    fn full_queue_drops_newest_when_configured() {
        let mut s = Session::new("c".into(), false);
        for n in 1..=10 {
            s.enqueue(delivery(n, QoS::AtLeastOnce), 5, DropPolicy::DropNewest);
        }
        assert_eq!(payloads(&mut s), [1, 2, 3, 4, 5]);
    }

    #[test]
    fn window_limits_unacknowledged_messages() {
        let mut s = Session::new("c".into(), false);
        for n in 0..5 {
            s.enqueue(delivery(n, QoS::AtLeastOnce), 100, DropPolicy::DropOldest);
        }
        let first = s.next_to_send(2).unwrap().0;
        s.next_to_send(2).unwrap();
        assert!(s.next_to_send(2).is_none());
        assert!(s.on_puback(first));
        assert!(
            !s.on_puback(first),
            "a second PUBACK for the same id is not an ack"
        );
        assert!(s.next_to_send(2).is_some());
        assert_eq!(s.inflight_len(), 2);
        assert_eq!(s.queue_len(), 2);
    }

    #[test]
    fn qos2_outgoing_walks_rec_rel_comp() {
        let mut s = Session::new("c".into(), false);
        let pid = s.start_inflight(delivery(1, QoS::ExactlyOnce));
        assert!(!s.on_pubcomp(pid), "PUBCOMP before PUBREC is not accepted");
        assert!(s.on_pubrec(pid));
        assert!(
            s.on_pubrec(pid),
            "repeated PUBREC is answered with PUBREL again"
        );
        assert_eq!(
            s.inflight().next().unwrap().state,
            InflightState::AwaitPubComp
        );
        assert!(s.on_pubcomp(pid));
        assert_eq!(s.inflight_len(), 0);
    }

    #[test]
    fn incoming_qos2_is_routed_once_until_released() {
        let mut s = Session::new("c".into(), false);
        assert!(s.incoming_qos2(7));
        assert!(!s.incoming_qos2(7));
        assert!(s.release_qos2(7));
        assert!(s.incoming_qos2(7), "after PUBREL the id may be reused");
    }

    #[test]
    fn packet_ids_skip_zero_and_ids_in_flight() {
        let mut s = Session::new("c".into(), false);
        s.next_packet_id = u16::MAX;
        let a = s.start_inflight(delivery(1, QoS::AtLeastOnce));
        let b = s.start_inflight(delivery(2, QoS::AtLeastOnce));
        assert_eq!((a, b), (u16::MAX, 1));
        s.next_packet_id = u16::MAX;
        let c = s.start_inflight(delivery(3, QoS::AtLeastOnce));
        assert_eq!(c, 2);
    }

    #[test]
    fn shared_deliveries_are_taken_back_unless_released() {
        let mut s = Session::new("c".into(), false);
        let mut d = delivery(1, QoS::ExactlyOnce);
        d.share = Some("$share/g/t".into());
        let released = s.start_inflight(d.clone());
        s.on_pubrec(released);
        s.start_inflight(d.clone());
        s.enqueue(d, 10, DropPolicy::DropOldest);
        s.enqueue(delivery(2, QoS::AtLeastOnce), 10, DropPolicy::DropOldest);
        assert_eq!(s.take_shared().len(), 2);
        assert_eq!(s.inflight_len(), 1, "the PUBREL-stage message stays");
        assert_eq!(s.queue_len(), 1, "the non-shared message stays");
    }

    #[test]
    fn qos0_passes_a_full_window() {
        let mut s = Session::new("c".into(), false);
        s.enqueue(delivery(1, QoS::AtMostOnce), 10, DropPolicy::DropOldest);
        assert_eq!(s.next_to_send(0).map(|(pid, _)| pid), Some(0));
    }
}
