//! This shard's subscription slice and its route replica: adding and removing one
//! subscription, telling the other shards (and, from a filter's home shard, the cluster)
//! when a filter gains its first or loses its last subscriber here, and applying the route
//! changes of other nodes.

use super::*;

impl Shard {
    /// Gives session `sidx` a new subscription, counted in the subscriptions gauge (the one
    /// place a subscription is added).
    pub(super) fn add_subscription(&mut self, sidx: u32, sub: Subscription) {
        debug_assert!(self
            .session(sidx)
            .session
            .subscriptions
            .get(&sub.filter)
            .is_none());
        self.session_mut(sidx).session.subscriptions.push(sub);
        self.shared
            .metrics
            .subscriptions
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Adds one subscription; returns true if the filter is new on this shard and a route
    /// change went out to the other shards carrying `token`.
    pub(super) fn subscribe_one(
        &mut self,
        sidx: u32,
        filter: Arc<str>,
        options: SubscriptionOptions,
        id: Option<NonZeroU32>,
        token: u64,
    ) -> bool {
        let session = &mut self.session_mut(sidx).session;
        match session.subscriptions.get_mut(&filter) {
            Some(existing) => {
                existing.options = options;
                existing.id = id;
            }
            None => {
                let sub = Subscription {
                    filter: filter.clone(),
                    options,
                    id,
                };
                self.add_subscription(sidx, sub);
            }
        }
        let list = &mut self
            .routes
            .get_or_insert_shared(&filter, Route::default)
            .subs;
        let fresh = list.is_empty();
        match list.iter_mut().find(|s| s.session == sidx) {
            Some(s) => {
                s.options = options;
                s.id = id;
            }
            None => list.push(Subscriber {
                session: sidx,
                options,
                id,
            }),
        }
        if !fresh {
            return false;
        }
        self.route_add_local(&filter, self.id);
        for to in 0..self.mesh.shards() {
            if to != self.id {
                let msg = MeshMsg::RouteAdd {
                    filter: filter.clone(),
                    shard: self.id as u16,
                    ack: token,
                };
                self.mesh.send(to, msg);
            }
        }
        true
    }

    /// Removes one session from a filter's subscriber list; withdraws the route if it was the
    /// last subscriber of that filter on this shard.
    pub(super) fn slice_remove(&mut self, filter: &str, sidx: u32) {
        let Some(entry) = self.routes.get_mut(filter) else {
            return;
        };
        entry.subs.retain(|s| s.session != sidx);
        if !entry.subs.is_empty() {
            return;
        }
        self.route_del(filter, self.id);
        let filter: Arc<str> = filter.into();
        for to in 0..self.mesh.shards() {
            if to != self.id {
                self.mesh.send(
                    to,
                    MeshMsg::RouteDel {
                        filter: filter.clone(),
                        shard: self.id as u16,
                    },
                );
            }
        }
    }

    pub(super) fn route_add_local(&mut self, filter: &Arc<str>, shard: usize) {
        let r = self.routes.get_or_insert_shared(filter, Route::default);
        let was_empty = r.shards.is_empty();
        r.shards.insert(shard);
        if was_empty {
            self.node_route_changed(filter, true);
        }
    }

    pub(super) fn route_del(&mut self, filter: &str, shard: usize) {
        let Some(r) = self.routes.get_mut(filter) else {
            return;
        };
        let had = !r.shards.is_empty();
        r.shards.remove(shard);
        let gone = had && r.shards.is_empty();
        if r.is_empty() {
            self.routes.remove(filter);
        }
        if gone {
            self.node_route_changed(filter, false);
        }
    }

    /// Tells the cluster that this node gained or lost its last subscriber of `filter`. Only
    /// the filter's home shard speaks for the node, so the changes it reports are ordered.
    pub(super) fn node_route_changed(&mut self, filter: &str, add: bool) {
        if !self.shared.cluster.enabled.load(Ordering::Relaxed)
            || home_shard(filter, self.mesh.shards()) != self.id
        {
            return;
        }
        let cluster = self.mesh.cluster();
        self.mesh.send(
            cluster,
            MeshMsg::ClusterRoute {
                filter: filter.into(),
                add,
            },
        );
    }

    /// Applies another node's route change to this shard's replica.
    pub(super) fn node_route(&mut self, filter: &str, node: u8, add: bool) {
        let bit = 1u64 << node;
        if let Some((_, real)) = shared::parse_shared(filter) {
            let key: Arc<str> = filter.into();
            let list = self.share_routes.get_or_insert_with(real, SmallVec::new);
            match list.iter_mut().find(|r| r.key == key) {
                Some(r) if add => r.nodes |= bit,
                Some(r) => r.nodes &= !bit,
                None if add => list.push(ShareRoute {
                    key,
                    shards: ShardSet::default(),
                    nodes: bit,
                }),
                None => {}
            }
            list.retain(|r| !r.shards.is_empty() || r.nodes != 0);
            if list.is_empty() {
                self.share_routes.remove(real);
            }
            return;
        }
        if add {
            self.routes.get_or_insert_with(filter, Route::default).nodes |= bit;
        } else if let Some(r) = self.routes.get_mut(filter) {
            r.nodes &= !bit;
            if r.is_empty() {
                self.routes.remove(filter);
            }
        }
    }

    /// Forgets every route of a node that went down or left.
    pub(super) fn node_down(&mut self, node: u8) {
        let mut filters = Vec::new();
        self.routes.for_each(|f, r| {
            if r.nodes & (1u64 << node) != 0 {
                filters.push(f.to_string());
            }
        });
        self.share_routes.for_each(|_, list| {
            for r in list.iter() {
                if r.nodes & (1u64 << node) != 0 {
                    filters.push(r.key.to_string());
                }
            }
        });
        for f in filters {
            self.node_route(&f, node, false);
        }
    }
}
