//! What the simulator's end-of-run checks read from a shard (tests only).

use super::*;

impl Shard {
    /// Client ids with a session on this shard and a live connection.
    pub(crate) fn online_clients(&self) -> Vec<Arc<str>> {
        self.sessions
            .iter()
            .flatten()
            .filter(|e| e.conn().is_some())
            .map(|e| e.session.client_id.clone())
            .collect()
    }

    /// Every filter a session on this shard subscribes to (ordinary filters only).
    pub(crate) fn session_filters(&self) -> Vec<Arc<str>> {
        self.sessions
            .iter()
            .flatten()
            .flat_map(|e| e.session.subscriptions.iter().map(|s| s.filter.clone()))
            .collect()
    }
}

impl Shard {
    /// Queues past their stated bounds, each as a line (empty when every bound holds):
    /// per session the in-flight window, the queue and the QoS 2 ids awaiting PUBREL; per
    /// connection the responses it has not read; the mesh overflow.
    pub(crate) fn bounds_exceeded(&mut self) -> Vec<String> {
        let cfg = &self.shared.cfg;
        let mut out = Vec::new();
        let awaiting_max = cfg.max_awaiting_rel.max(usize::from(cfg.max_inflight));
        for e in self.sessions.iter().flatten() {
            let s = &e.session;
            if s.inflight_len() > usize::from(cfg.max_inflight) {
                out.push(format!("{}: {} in flight", s.client_id, s.inflight_len()));
            }
            if cfg.max_queued_messages > 0 && s.queue_len() > cfg.max_queued_messages {
                out.push(format!("{}: {} queued", s.client_id, s.queue_len()));
            }
            if cfg.max_awaiting_rel > 0 && s.incoming_qos2_len() > awaiting_max {
                out.push(format!(
                    "{}: {} QoS 2 ids awaiting PUBREL",
                    s.client_id,
                    s.incoming_qos2_len()
                ));
            }
        }
        let max_ctrl = cfg.max_conn_output_bytes;
        for slot in self.conns.live_slots() {
            if let Some(c) = self.conns.get_slot(slot) {
                if c.ctrl_bytes > max_ctrl {
                    out.push(format!(
                        "connection {slot}: {} B of responses",
                        c.ctrl_bytes
                    ));
                }
            }
        }
        if self.mesh.max_backlog() > 2 * MESH_QOS0_DROP_BACKLOG {
            out.push(format!("mesh overflow of {}", self.mesh.max_backlog()));
        }
        out
    }
}
