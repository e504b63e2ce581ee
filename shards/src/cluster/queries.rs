//! Management requests and cluster-wide listings: `join`/`leave`/status from the control
//! queue ([`Cluster::on_control`]), the status and routes JSON, and queries (clients,
//! subscriptions, routes, metrics) collected from this node's shards and every peer, with a
//! deadline, before the answer goes back.

use super::*;

impl Cluster {
    pub(super) fn status(&self) -> String {
        let mut nodes = vec![format!(
            "{{\"node\":{},\"status\":\"running\",\"self\":true,\"addr\":{},\"uptime_s\":{},\"connections\":{},\"routes\":{}}}",
            json_str(&self.node),
            json_str(&self.advertised),
            self.now_ms.saturating_sub(self.started_at_ms) / 1000,
            self.metrics.metrics.connections.load(Ordering::Relaxed),
            self.local_routes.len()
        )];
        for p in self.peers.iter().filter(|p| p.state != PeerState::Gone) {
            let status = if p.state == PeerState::Up {
                "running"
            } else {
                "down"
            };
            nodes.push(format!(
                "{{\"node\":{},\"status\":\"{status}\",\"self\":false,\"addr\":{},\"uptime_s\":{},\"connections\":{},\"routes\":{}}}",
                json_str(&p.name),
                json_str(&p.addr),
                p.uptime_s,
                p.connections,
                p.routes.len()
            ));
        }
        format!("{{\"nodes\":[{}]}}", nodes.join(","))
    }

    pub(super) fn on_control(&mut self) {
        let cmds: Vec<ControlCmd> = match self.control.queue.lock() {
            Ok(mut q) => q.drain(..).collect(),
            Err(_) => return,
        };
        for cmd in cmds {
            match cmd {
                ControlCmd::Join(target, reply) => {
                    let _ = reply.send(self.join(&target));
                }
                ControlCmd::Leave(reply) => {
                    let _ = reply.send(Ok(self.leave()));
                }
                ControlCmd::Status(reply) => {
                    let _ = reply.send(Ok(self.status()));
                }
                ControlCmd::Query(QueryKind::Routes, reply) => {
                    let _ = reply.send(Ok(self.routes_json()));
                }
                ControlCmd::Query(kind, reply) => self.start_query(kind, QueryOrigin::Local(reply)),
            }
        }
    }

    pub(super) fn routes_json(&self) -> String {
        let mut rows: Vec<String> = self
            .local_routes
            .iter()
            .map(|f| {
                format!(
                    "{{\"topic\":{},\"node\":{}}}",
                    json_str(f),
                    json_str(&self.node)
                )
            })
            .collect();
        for p in self.peers.iter().filter(|p| p.state == PeerState::Up) {
            rows.extend(p.routes.iter().map(|f| {
                format!(
                    "{{\"topic\":{},\"node\":{}}}",
                    json_str(f),
                    json_str(&p.name)
                )
            }));
        }
        format!("[{}]", rows.join(","))
    }

    pub(super) fn start_query(&mut self, kind: QueryKind, origin: QueryOrigin) {
        let token = self.next_query;
        self.next_query += 1;
        let mut peers_left = HashSet::default();
        if matches!(origin, QueryOrigin::Local(_)) {
            for (p, link) in self.up_links() {
                let kind = kind.wire();
                self.send(link, &Frame::Query { token, kind });
                peers_left.insert(p);
            }
        }
        // Figures are node-wide counters, answered here; listings come from every shard.
        let (shards, rows) = if kind == QueryKind::Metrics {
            (0, vec![self.metrics.metrics.json(&self.node)])
        } else {
            (self.mesh.shards(), Vec::new())
        };
        for shard in 0..shards {
            self.mesh.send(shard, MeshMsg::Query { token, kind });
        }
        let done = shards == 0 && peers_left.is_empty();
        self.queries.insert(
            token,
            PendingQuery {
                origin,
                shards_left: shards,
                peers_left,
                rows,
                deadline_ms: self.now_ms + QUERY_WAIT_MS,
            },
        );
        if done {
            self.finish_query(token);
        }
    }

    pub(super) fn query_rows(&mut self, token: u64, rows: Vec<String>, from_peer: Option<usize>) {
        let Some(q) = self.queries.get_mut(&token) else {
            return;
        };
        let before = q.rows.len();
        match from_peer {
            // One answer per asked peer; a second (or unasked) one is dropped.
            Some(p) if !q.peers_left.remove(&p) => return,
            Some(p) => {
                let all = rows.len();
                q.rows
                    .extend(rows.into_iter().filter(|r| flat_json_object(r)));
                if q.rows.len() - before < all {
                    log::warn!(
                        "cluster: dropped {} malformed listing row(s) from {}",
                        all - (q.rows.len() - before),
                        self.peers[p].name
                    );
                }
            }
            None => {
                q.shards_left = q.shards_left.saturating_sub(1);
                q.rows.extend(rows);
            }
        }
        if q.shards_left == 0 && q.peers_left.is_empty() {
            self.finish_query(token);
        }
    }

    pub(super) fn finish_query(&mut self, token: u64) {
        let Some(q) = self.queries.remove(&token) else {
            return;
        };
        match q.origin {
            QueryOrigin::Local(reply) => {
                let _ = reply.send(Ok(format!("[{}]", q.rows.join(","))));
            }
            QueryOrigin::Peer(p, remote) => {
                if let Some(link) = self.peers.get(p).and_then(|p| p.link) {
                    self.send(
                        link,
                        &Frame::QueryReply {
                            token: remote,
                            rows: q.rows,
                        },
                    );
                }
            }
        }
    }
}
