//! Messages from the other shards and the cluster thread (`MeshMsg`), each dispatched to its
//! handler, and route acks, which complete a session move's `TakeoverEnd` or a SUBSCRIBE job.

use super::*;

impl Shard {
    pub(super) fn on_mesh(&mut self, m: MeshMsg) {
        match m {
            MeshMsg::Publish(msg) => self.deliver_local(&msg),
            MeshMsg::RouteAdd { filter, shard, ack } => {
                self.route_add_local(&filter, shard as usize);
                self.mesh
                    .send(shard as usize, MeshMsg::RouteAck { token: ack });
            }
            MeshMsg::RouteAck { token } => self.on_route_ack(token),
            MeshMsg::RouteDel { filter, shard } => self.route_del(&filter, shard as usize),
            MeshMsg::Retain { topic, msg } => {
                self.apply_retained(topic, msg);
            }
            MeshMsg::Handoff(h) => self.on_handoff(*h),
            MeshMsg::ShareJoin { key, member } => self.group_join(key, member),
            MeshMsg::LinkAttach(a) => self.on_link_attach(*a),
            MeshMsg::NodeRoute { filter, node, add } => self.node_route(&filter, node, add),
            MeshMsg::NodeDown { node } => {
                self.node_down(node);
                for slot in self.links.of_node(node) {
                    if let Some(sock) = self.links.remove(slot).and_then(|l| l.sock) {
                        close_now(&mut *self.io, sock);
                    }
                }
            }
            MeshMsg::RemoteTakeover {
                client_id,
                want_session,
                token,
                node,
                at_ms,
            } => self.on_remote_takeover(client_id, want_session, token, node, at_ms),
            MeshMsg::SessionImport(e) => self.on_session_import(*e),
            MeshMsg::RemoteTakeoverEnd { client_id, node } => {
                self.on_remote_takeover_end(client_id, node)
            }
            MeshMsg::SessionTail {
                client_id,
                messages,
            } => self.on_session_tail(client_id, messages),
            MeshMsg::Query { token, kind } => {
                let rows = self.query_rows(kind);
                let cluster = self.mesh.cluster();
                self.mesh.send(cluster, MeshMsg::QueryReply { token, rows });
            }
            MeshMsg::ClusterRoute { .. }
            | MeshMsg::ClusterLinkLost { .. }
            | MeshMsg::ClusterRetain { .. }
            | MeshMsg::ClusterTakeover { .. }
            | MeshMsg::ClusterSessionExport(_)
            | MeshMsg::ClusterTakeoverEnd { .. }
            | MeshMsg::ClusterSessionTail { .. }
            | MeshMsg::QueryReply { .. } => {
                debug_assert!(false, "cluster-bound message delivered to a shard");
            }
            MeshMsg::ShareLeave {
                key,
                shard,
                session,
            } => self.group_leave(&key, shard, session),
            MeshMsg::ShareRouteAdd {
                filter,
                key,
                shard,
                ack,
            } => {
                self.share_route_add(&filter, &key, shard as usize);
                self.mesh
                    .send(shard as usize, MeshMsg::RouteAck { token: ack });
            }
            MeshMsg::ShareRouteDel { filter, key, shard } => {
                self.share_route_del(&filter, &key, shard as usize)
            }
            MeshMsg::SharedPublish { key, msg, tried } => self.shared_dispatch(key, msg, tried),
            MeshMsg::SharedDeliver {
                key,
                msg,
                member,
                tried,
                force,
            } => self.shared_deliver(key, msg, member, tried, force),
            MeshMsg::Shutdown => self.shared.shutdown.store(true, Ordering::Relaxed),
        }
    }

    fn on_route_ack(&mut self, token: u64) {
        if let Some(end) = self.pending_ends.get_mut(&token) {
            end.acks_awaited -= 1;
            if end.acks_awaited == 0 {
                let end = self.pending_ends.remove(&token).expect("present");
                self.takeover_end(end.client_id, end.from);
            }
            return;
        }
        self.sub_job_ack(token);
    }
}
