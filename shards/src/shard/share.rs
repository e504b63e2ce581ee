//! Shared subscriptions (`$share/<group>/<filter>`): members join and leave the group on its
//! owner shard, which picks a member for each message (`shared_dispatch`); a member's shard
//! delivers or refuses back; a leaving member's unacknowledged messages go to the others.

use super::*;

impl Shard {
    /// Subscribes to a shared group; retained messages are never sent for these
    /// (MQTT-4.8.2-... / EMQX). Returns the SUBACK reason.
    pub(super) fn subscribe_shared(
        &mut self,
        sidx: u32,
        filter: String,
        options: SubscriptionOptions,
        id: Option<NonZeroU32>,
        token: u64,
        new_routes: &mut usize,
    ) -> ReasonCode {
        if !self.cfg().shared_subscription {
            return ReasonCode::SharedSubscriptionsNotSupported;
        }
        let Some((_, real)) = shared::parse_shared(&filter) else {
            return ReasonCode::TopicFilterInvalid;
        };
        if topic::validate_filter(real, self.cfg().max_topic_levels).is_err() {
            return ReasonCode::TopicFilterInvalid;
        }
        let max_subs = self.cfg().max_subscriptions;
        let key: Arc<str> = filter.as_str().into();
        let session = &mut self.session_mut(sidx).session;
        let count = session.subscriptions.len();
        match session.subscriptions.get_mut(&key) {
            Some(existing) => {
                existing.options = options;
                existing.id = id;
                return ReasonCode::granted(options.qos);
            }
            None if max_subs > 0 && count >= max_subs => {
                return ReasonCode::QuotaExceeded;
            }
            None => {
                let sub = Subscription {
                    filter: key.clone(),
                    options,
                    id,
                };
                self.add_subscription(sidx, sub);
            }
        }
        if self.share_join(sidx, key, token) {
            *new_routes += 1;
        }
        ReasonCode::granted(options.qos)
    }

    /// Adds a local member to group `key`: tells the owner, and announces this shard in the
    /// share routes if it is the first local member. True when a route change went out.
    pub(super) fn share_join(&mut self, sidx: u32, key: Arc<str>, token: u64) -> bool {
        let shards = self.mesh.shards();
        let owner = home_shard(&key, shards);
        let member = Member {
            shard: self.id as u16,
            session: sidx,
            client_id: self.session(sidx).session.client_id.clone(),
        };
        if owner == self.id {
            self.group_join(key.clone(), member);
        } else {
            self.mesh.send(
                owner,
                MeshMsg::ShareJoin {
                    key: key.clone(),
                    member,
                },
            );
        }
        let count = self.share_local.entry(key.clone()).or_insert(0);
        *count += 1;
        if *count > 1 {
            return false;
        }
        let real: Arc<str> = shared::parse_shared(&key)
            .map(|(_, f)| f)
            .unwrap_or_default()
            .into();
        self.share_route_add(&real, &key, self.id);
        for to in 0..shards {
            if to != self.id {
                let msg = MeshMsg::ShareRouteAdd {
                    filter: real.clone(),
                    key: key.clone(),
                    shard: self.id as u16,
                    ack: token,
                };
                self.mesh.send(to, msg);
            }
        }
        true
    }

    /// Removes a local member from group `key` (unsubscribe or session end).
    pub(super) fn share_leave(&mut self, sidx: u32, key: &Arc<str>) {
        let shards = self.mesh.shards();
        let owner = home_shard(key, shards);
        if owner == self.id {
            self.group_leave(key, self.id as u16, sidx);
        } else {
            let msg = MeshMsg::ShareLeave {
                key: key.clone(),
                shard: self.id as u16,
                session: sidx,
            };
            self.mesh.send(owner, msg);
        }
        let Some(count) = self.share_local.get_mut(key) else {
            return;
        };
        *count -= 1;
        if *count > 0 {
            return;
        }
        self.share_local.remove(key);
        let real: Arc<str> = shared::parse_shared(key)
            .map(|(_, f)| f)
            .unwrap_or_default()
            .into();
        self.share_route_del(&real, key, self.id);
        for to in 0..shards {
            if to != self.id {
                let msg = MeshMsg::ShareRouteDel {
                    filter: real.clone(),
                    key: key.clone(),
                    shard: self.id as u16,
                };
                self.mesh.send(to, msg);
            }
        }
    }

    /// On the group's owner shard: adds a member; the node announces the group to the
    /// cluster when it gets its first member here.
    pub(super) fn group_join(&mut self, key: Arc<str>, member: Member) {
        let group = self.groups.entry(key.clone()).or_default();
        let first = group.members.is_empty();
        group.join(member);
        if first {
            self.node_route_changed(&key, true);
        }
    }

    pub(super) fn group_leave(&mut self, key: &Arc<str>, shard: u16, session: u32) {
        if let Some(g) = self.groups.get_mut(key) {
            if g.leave(shard, session) {
                self.groups.remove(key);
                self.node_route_changed(key, false);
            }
        }
    }

    pub(super) fn share_route_add(&mut self, filter: &str, key: &Arc<str>, shard: usize) {
        let list = self.share_routes.get_or_insert_with(filter, SmallVec::new);
        match list.iter_mut().find(|r| r.key == *key) {
            Some(r) => {
                r.shards.insert(shard);
            }
            None => {
                let mut shards = ShardSet::default();
                shards.insert(shard);
                list.push(ShareRoute {
                    key: key.clone(),
                    shards,
                    nodes: 0,
                });
            }
        }
    }

    pub(super) fn share_route_del(&mut self, filter: &str, key: &Arc<str>, shard: usize) {
        let Some(list) = self.share_routes.get_mut(filter) else {
            return;
        };
        for r in list.iter_mut() {
            if r.key == *key {
                r.shards.remove(shard);
            }
        }
        list.retain(|r| !r.shards.is_empty() || r.nodes != 0);
        if list.is_empty() {
            self.share_routes.remove(filter);
        }
    }

    /// On the owner: picks a member for `msg` and sends it there. When every member refused,
    /// the first one still present queues it anyway (`force`); with no member it is dropped.
    pub(super) fn shared_dispatch(
        &mut self,
        key: Arc<str>,
        msg: Arc<Message>,
        tried: Vec<(u16, u32)>,
    ) {
        let strategy = self.cfg().shared_strategy;
        let Some(group) = self.groups.get_mut(&key) else {
            self.shared.metrics.dropped(DropReason::NoSubscribers);
            return;
        };
        let (member, force) = match group.pick(strategy, &msg, &tried) {
            Some(m) => (m, false),
            None => match group.members.first() {
                Some(m) if tried.len() <= group.members.len() => (m.clone(), true),
                _ => {
                    self.shared.metrics.dropped(DropReason::NoSubscribers);
                    return;
                }
            },
        };
        if member.shard as usize == self.id {
            self.shared_deliver(key, msg, member, tried, force);
        } else {
            let to = member.shard as usize;
            let m = MeshMsg::SharedDeliver {
                key,
                msg,
                member,
                tried,
                force,
            };
            self.mesh.send(to, m);
        }
    }

    /// On the member's shard: deliver, or refuse back to the owner.
    pub(super) fn shared_deliver(
        &mut self,
        key: Arc<str>,
        msg: Arc<Message>,
        member: Member,
        mut tried: Vec<(u16, u32)>,
        force: bool,
    ) {
        let max_queued = self.cfg().max_queued_messages;
        let sidx = member.session;
        let options = match self.sessions.get(sidx as usize) {
            Some(Some(e)) if e.session.client_id == member.client_id => {
                e.session.subscriptions.get(&key).map(|s| {
                    (
                        s.options,
                        s.id,
                        e.conn().is_some() && e.session.queue_len() < max_queued,
                    )
                })
            }
            _ => None,
        };
        match options {
            Some((options, id, available)) if available || force => {
                let d = Delivery {
                    qos: msg.qos.min(options.qos),
                    retain: false,
                    sub_ids: id.map(NonZeroU32::get).into_iter().collect(),
                    share: Some(key),
                    msg,
                };
                self.deliver(sidx, d);
            }
            _ if force => self.shared.metrics.dropped(DropReason::NoSubscribers),
            _ => {
                tried.push((self.id as u16, sidx));
                self.shared_publish(key, msg, tried);
            }
        }
    }

    /// Sends a message to the owner of shared group `key` (or dispatches it here).
    pub(super) fn shared_publish(
        &mut self,
        key: Arc<str>,
        msg: Arc<Message>,
        tried: Vec<(u16, u32)>,
    ) {
        let owner = home_shard(&key, self.mesh.shards());
        if owner == self.id {
            self.shared_dispatch(key, msg, tried);
        } else {
            self.mesh
                .send(owner, MeshMsg::SharedPublish { key, msg, tried });
        }
    }

    /// Hands a leaving member's unacknowledged shared messages to other members (EMQX's
    /// redispatch).
    pub(super) fn redispatch_shared(&mut self, sidx: u32) {
        let taken = self.session_mut(sidx).session.take_shared();
        for d in taken {
            if let Some(key) = d.share {
                self.shared_publish(key, d.msg, vec![(self.id as u16, sidx)]);
            }
        }
    }
}
