//! SUBSCRIBE and UNSUBSCRIBE as jobs worked through in slices, so that one packet cannot stall
//! the shard (issue 9: one SUBSCRIBE of 50,000 filters held every client of its shard for
//! seconds).
//!
//! A packet becomes a [`SubJob`]: its filters are handled `SLICE_UNITS` at a time, then (for
//! SUBSCRIBE) the job waits for the route acks of every other shard (SUBACK only after them,
//! docs/architecture.md "SUBSCRIBE"), sends SUBACK, and delivers the retained messages of the
//! granted filters, again in slices. A job that does not finish in its first slice pauses
//! reading its connection (what was already read is kept and handled after the job), so the
//! packets a client sends after a SUBSCRIBE are handled after it; the shard loop gives the
//! jobs at most `TURN_SLICES` slices per turn. Small packets finish in their first slice, at
//! once. The budgets count work, not time, so a run is the same on any machine and in the
//! simulator.
//!
//! Work per filter is O(1) in the session's subscriptions (an indexed list) and the retained
//! messages are found by walking the retained trie, so a job is linear in its packet plus the
//! retained messages it delivers. A filter repeated in one packet replaces the earlier one
//! (MQTT-3.8.4-3), so its retained messages go out once.

use super::*;
use std::collections::VecDeque;

/// Filters handled, or retained messages delivered, per slice of one job: a slice takes well
/// under a millisecond in a release build.
const SLICE_UNITS: usize = 64;
/// Slices of jobs the shard runs per loop turn, round robin over the ready jobs (about 2 ms
/// of work in a debug build, so other clients of the shard wait little for their turn).
const TURN_SLICES: usize = 4;

/// Where a job stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// Handling filters (both kinds).
    Filters,
    /// SUBSCRIBE: every filter handled; waiting for the route acks of other shards.
    Acks,
    /// SUBSCRIBE: SUBACK sent; delivering retained messages.
    Retained,
}

/// A retained-message request: a granted filter, with what it was granted under.
#[derive(Clone)]
struct RetainedWant {
    filter: Arc<str>,
    grant: Grant,
}

/// What a filter was granted under: its options and the packet's v5 Subscription Identifier.
#[derive(Clone, Copy)]
struct Grant {
    options: SubscriptionOptions,
    id: Option<NonZeroU32>,
}

/// One SUBSCRIBE or UNSUBSCRIBE in progress.
pub(super) struct SubJob {
    slot: u32,
    gen: u32,
    sidx: u32,
    protocol: Protocol,
    packet_id: u16,
    subscribe: bool,
    stage: Stage,
    /// Filters not handled yet (options unused for UNSUBSCRIBE).
    filters: std::vec::IntoIter<(String, SubscriptionOptions)>,
    /// v5 Subscription Identifier of the packet.
    sub_id: Option<NonZeroU32>,
    reasons: Vec<ReasonCode>,
    /// Route acks still awaited from other shards.
    waiting: usize,
    /// Granted filters whose retained messages are due, each filter once.
    wants: Vec<RetainedWant>,
    /// Filter → position in `wants` (a repeated filter updates its entry).
    want_at: Map<Arc<str>, usize>,
    /// Next entry of `wants` to look up.
    next_want: usize,
    /// Retained topics matched by the current entry, not delivered yet, with its options.
    topics: Vec<Arc<str>>,
    current: Option<Grant>,
    /// This job paused reading its connection.
    paused: bool,
}

/// Jobs of a shard: by token (the route-ack token of a SUBSCRIBE), the ones with work ready,
/// and how many jobs hold each connection's reading paused.
#[derive(Default)]
pub(super) struct SubJobs {
    jobs: Map<u64, SubJob>,
    ready: VecDeque<u64>,
    paused: Map<u64, u32>,
    /// Held connections whose client closed its side meanwhile: what it sent before the EOF
    /// is handled after the jobs (a DISCONNECT among it keeps the will), then it closes.
    eof: crate::hash::Set<u64>,
}

impl SubJobs {
    /// True when jobs have work for the next turn (the loop must not sleep).
    pub(super) fn has_work(&self) -> bool {
        !self.ready.is_empty()
    }

    /// True when a job holds the connection's reading paused.
    pub(super) fn holds(&self, slot: u32, gen: u32) -> bool {
        self.paused.contains_key(&conn_token(slot, gen))
    }

    /// The held connection's client closed its side: close it once its jobs are done.
    pub(super) fn eof_while_held(&mut self, slot: u32, gen: u32) {
        debug_assert!(self.holds(slot, gen));
        self.eof.insert(conn_token(slot, gen));
    }
}

impl Shard {
    pub(super) fn on_subscribe(
        &mut self,
        slot: u32,
        gen: u32,
        sidx: u32,
        protocol: Protocol,
        s: Subscribe,
    ) {
        let sub_id = s
            .properties
            .subscription_identifiers
            .first()
            .copied()
            .and_then(NonZeroU32::new);
        let job = self.new_job(slot, gen, sidx, protocol, s.packet_id, true, s.filters);
        self.start_job(SubJob { sub_id, ..job });
    }

    pub(super) fn on_unsubscribe(
        &mut self,
        slot: u32,
        gen: u32,
        sidx: u32,
        protocol: Protocol,
        u: Unsubscribe,
    ) {
        let filters = u.filters.into_iter().map(|f| (f, Default::default()));
        let job = self.new_job(
            slot,
            gen,
            sidx,
            protocol,
            u.packet_id,
            false,
            filters.collect(),
        );
        self.start_job(job);
    }

    #[allow(clippy::too_many_arguments)]
    fn new_job(
        &mut self,
        slot: u32,
        gen: u32,
        sidx: u32,
        protocol: Protocol,
        packet_id: u16,
        subscribe: bool,
        filters: Vec<(String, SubscriptionOptions)>,
    ) -> SubJob {
        SubJob {
            slot,
            gen,
            sidx,
            protocol,
            packet_id,
            subscribe,
            stage: Stage::Filters,
            reasons: Vec::with_capacity(filters.len()),
            filters: filters.into_iter(),
            sub_id: None,
            waiting: 0,
            wants: Vec::new(),
            want_at: Map::default(),
            next_want: 0,
            topics: Vec::new(),
            current: None,
            paused: false,
        }
    }

    /// Registers a job and runs its first slice; one with more to do waits for the loop.
    fn start_job(&mut self, job: SubJob) {
        let token = self.next_token;
        self.next_token += 1;
        self.sub_jobs.jobs.insert(token, job);
        if self.step_job(token) {
            self.sub_jobs.ready.push_back(token);
        }
    }

    /// Runs ready jobs, round robin, for at most `TURN_SLICES` slices (called once per turn).
    pub(super) fn run_sub_jobs(&mut self) {
        for _ in 0..TURN_SLICES {
            let Some(token) = self.sub_jobs.ready.pop_front() else {
                break;
            };
            if self.step_job(token) {
                self.sub_jobs.ready.push_back(token);
            }
        }
    }

    /// A route ack for `token`: a SUBSCRIBE whose last ack arrives moves on.
    /// Returns false when the token is not a job's.
    pub(super) fn sub_job_ack(&mut self, token: u64) -> bool {
        let Some(job) = self.sub_jobs.jobs.get_mut(&token) else {
            return false;
        };
        debug_assert!(job.waiting > 0, "an ack is for a route add of this job");
        job.waiting = job.waiting.saturating_sub(1);
        if job.waiting == 0 && job.stage == Stage::Acks && self.step_job(token) {
            self.sub_jobs.ready.push_back(token);
        }
        true
    }

    /// Runs one slice of job `token`; true when it has more work ready. A job that goes on
    /// past its first slice pauses reading its connection until it ends.
    fn step_job(&mut self, token: u64) -> bool {
        let Some(mut job) = self.sub_jobs.jobs.remove(&token) else {
            return false;
        };
        let live = self
            .conns
            .get_mut(job.slot, job.gen)
            .is_some_and(|c| c.session == job.sidx);
        if !live {
            // The connection (and maybe its session) is gone: the rest is moot. Route acks
            // still on their way find no job and are ignored.
            self.end_job(job);
            return false;
        }
        let more = self.advance(&mut job, token);
        match more {
            Some(ready) => {
                if ready && !job.paused {
                    job.paused = true;
                    self.hold_conn(job.slot, job.gen);
                }
                self.sub_jobs.jobs.insert(token, job);
                ready
            }
            None => {
                self.end_job(job);
                false
            }
        }
    }

    /// One slice: Some(true) = more ready, Some(false) = waiting for acks, None = done.
    fn advance(&mut self, job: &mut SubJob, token: u64) -> Option<bool> {
        let mut units = SLICE_UNITS;
        loop {
            match job.stage {
                Stage::Filters => {
                    while units > 0 {
                        let Some((filter, options)) = job.filters.next() else {
                            break;
                        };
                        units -= 1;
                        let reason = if job.subscribe {
                            self.job_subscribe(job, token, filter, options)
                        } else {
                            self.job_unsubscribe(job.sidx, &filter)
                        };
                        job.reasons.push(reason);
                    }
                    if job.filters.len() > 0 {
                        return Some(true);
                    }
                    if !job.subscribe {
                        let ack = UnsubAck {
                            packet_id: job.packet_id,
                            reasons: std::mem::take(&mut job.reasons),
                            properties: Properties::default(),
                        };
                        self.send_packet(job.slot, job.protocol, &Packet::UnsubAck(ack));
                        return None;
                    }
                    job.stage = Stage::Acks;
                }
                Stage::Acks => {
                    if job.waiting > 0 {
                        return Some(false);
                    }
                    self.send_suback(job);
                    job.stage = Stage::Retained;
                }
                Stage::Retained => {
                    while units > 0 {
                        units -= 1;
                        if let Some(topic) = job.topics.pop() {
                            self.deliver_retained(job, &topic);
                            continue;
                        }
                        // None: every want delivered, the job is done.
                        let RetainedWant { filter, grant } =
                            job.wants.get(job.next_want).cloned()?;
                        job.next_want += 1;
                        job.current = Some(grant);
                        // Topics, not messages: each is looked up when its turn comes, so a
                        // message replaced meanwhile goes out in its newest version.
                        self.retained.matching(&filter, &mut job.topics);
                        if job.topics.len() >= units {
                            // A match over a large retained store counts for its work: the
                            // topics it found fill the rest of the slice.
                            break;
                        }
                    }
                    return Some(true);
                }
            }
        }
    }

    /// Handles one SUBSCRIBE filter; returns its SUBACK reason.
    fn job_subscribe(
        &mut self,
        job: &mut SubJob,
        token: u64,
        filter: String,
        options: SubscriptionOptions,
    ) -> ReasonCode {
        let cap = self.cfg().max_subscribe_filters;
        if cap > 0 && job.reasons.len() >= cap {
            // The packet has more filters than `mqtt.max_subscribe_filters`: the excess is
            // refused (SUBACK 0x97; 3.1.1: 0x80) and costs nothing more.
            return ReasonCode::QuotaExceeded;
        }
        let others = self.mesh.shards() - 1;
        if shared::is_shared(&filter) {
            let mut new_routes = 0;
            let sub_id = job.sub_id;
            let reason =
                self.subscribe_shared(job.sidx, filter, options, sub_id, token, &mut new_routes);
            job.waiting += new_routes * others;
            return reason;
        }
        if topic::validate_filter(&filter, self.cfg().max_topic_levels).is_err() {
            return ReasonCode::TopicFilterInvalid;
        }
        let max_subs = self.cfg().max_subscriptions;
        let subs = &self.session(job.sidx).session.subscriptions;
        let exists = subs.get(&filter).is_some();
        if !exists && max_subs > 0 && subs.len() >= max_subs {
            return ReasonCode::QuotaExceeded;
        }
        let filter: Arc<str> = filter.into();
        if self.subscribe_one(job.sidx, filter.clone(), options, job.sub_id, token) {
            job.waiting += others;
        }
        let send = match options.retain_handling {
            RetainHandling::SendAtSubscribe => true,
            RetainHandling::SendIfNew => !exists,
            RetainHandling::DoNotSend => false,
        };
        // An exact filter with no retained message now is not remembered (most of a big
        // packet, usually); one retained before the delivery stage is also sent live.
        let may_match = topic::is_wildcard(&filter) || self.retained.get(&filter).is_some();
        if send && may_match {
            // MQTT-3.8.4-3: a repeated filter replaces the subscription; its retained messages
            // are sent once, under the latest options.
            let grant = Grant {
                options,
                id: job.sub_id,
            };
            match job.want_at.get(&filter) {
                Some(&i) => job.wants[i] = RetainedWant { filter, grant },
                None => {
                    job.want_at.insert(filter.clone(), job.wants.len());
                    job.wants.push(RetainedWant { filter, grant });
                }
            }
        }
        ReasonCode::granted(options.qos)
    }

    /// Handles one UNSUBSCRIBE filter; returns its UNSUBACK reason.
    fn job_unsubscribe(&mut self, sidx: u32, filter: &str) -> ReasonCode {
        let Some(sub) = self.session_mut(sidx).session.subscriptions.remove(filter) else {
            return ReasonCode::NoSubscriptionExisted;
        };
        self.shared
            .metrics
            .subscriptions
            .fetch_sub(1, Ordering::Relaxed);
        if shared::is_shared(&sub.filter) {
            self.share_leave(sidx, &sub.filter);
        } else {
            self.slice_remove(filter, sidx);
        }
        ReasonCode::Success
    }

    fn send_suback(&mut self, job: &mut SubJob) {
        let problem_info = self
            .conns
            .get_slot(job.slot)
            .is_some_and(|c| c.problem_info);
        // Each refusal reason once: a packet of 100,000 refused filters gets a short string.
        let mut refused: Vec<&str> = Vec::new();
        for r in job.reasons.iter().filter(|r| r.is_error()) {
            let text = reason_text(*r);
            if !refused.contains(&text) {
                refused.push(text);
            }
        }
        let properties = Properties {
            reason_string: (job.protocol == Protocol::V5 && problem_info && !refused.is_empty())
                .then(|| format!("refused: {}", refused.join(", "))),
            ..Default::default()
        };
        let suback = SubAck {
            packet_id: job.packet_id,
            reasons: std::mem::take(&mut job.reasons),
            properties,
        };
        self.send_packet(job.slot, job.protocol, &Packet::SubAck(suback));
    }

    fn deliver_retained(&mut self, job: &SubJob, topic: &str) {
        let (Some(msg), Some(Grant { options, id })) = (self.retained.get(topic), job.current)
        else {
            return;
        };
        let d = Delivery {
            qos: msg.qos.min(options.qos),
            // MQTT-3.3.1-8: retained messages sent on subscribe carry retain = 1.
            retain: true,
            sub_ids: id.map(NonZeroU32::get).into_iter().collect(),
            share: None,
            msg: msg.clone(),
        };
        self.deliver(job.sidx, d);
    }

    fn end_job(&mut self, job: SubJob) {
        if job.paused {
            self.release_conn(job.slot, job.gen);
        }
    }

    /// Stops reading a connection while a job of it runs; what arrives meanwhile is kept.
    fn hold_conn(&mut self, slot: u32, gen: u32) {
        *self
            .sub_jobs
            .paused
            .entry(conn_token(slot, gen))
            .or_insert(0) += 1;
        self.stop_reading(slot, gen);
    }

    /// Cancels the receive of a held connection (again, if cluster backpressure re-armed it).
    pub(super) fn stop_reading(&mut self, slot: u32, gen: u32) {
        if let Some(conn) = self.conns.get_mut(slot, gen) {
            if !conn.parked {
                conn.parked = true;
                self.io.cancel(Token::Recv { slot, gen });
            }
        }
    }

    /// A job that held the connection ended: read it again when no other job holds it,
    /// starting with what it sent meanwhile.
    fn release_conn(&mut self, slot: u32, gen: u32) {
        let key = conn_token(slot, gen);
        let Some(n) = self.sub_jobs.paused.get_mut(&key) else {
            debug_assert!(false, "a paused job is counted");
            return;
        };
        *n -= 1;
        if *n > 0 {
            return;
        }
        self.sub_jobs.paused.remove(&key);
        let eof = self.sub_jobs.eof.remove(&key);
        let Some(conn) = self.conns.get_mut(slot, gen) else {
            return;
        };
        if eof {
            // Nothing more can arrive: handle what was sent before the EOF, then close
            // (unless that started another job, which closes it when it ends).
            conn.parked = false;
            self.on_bytes(slot, gen, &[]);
            if self.sub_jobs.holds(slot, gen) {
                self.sub_jobs.eof.insert(key);
            } else if self.conns.get_mut(slot, gen).is_some() {
                self.close(slot, Close::Abnormal);
            }
            return;
        }
        if self.paused {
            // Cluster backpressure: `resume` reads it again with the others.
            let conn = ConnRef { slot, gen };
            if !self.parked.contains(&conn) {
                self.parked.push(conn);
            }
            return;
        }
        self.read_again(slot, gen);
    }
}
