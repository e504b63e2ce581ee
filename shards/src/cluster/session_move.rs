//! The session move across nodes, as seen by the node where a client resumes: a takeover
//! waits for every peer's answer ([`Cluster::takeover_answer`]) and hands the session found
//! (or "nothing found") to the client's home shard ([`Cluster::finish_takeover`]).

use super::*;

impl Cluster {
    pub(super) fn takeover_answer(
        &mut self,
        token: u64,
        node: u8,
        export: Option<Box<SessionExport>>,
    ) {
        let Some(p) = self.pending.get_mut(&token) else {
            return;
        };
        p.waiting.remove(&node);
        if p.found.is_none() {
            p.found = export;
        }
        if p.waiting.is_empty() {
            self.finish_takeover(token);
        }
    }

    pub(super) fn finish_takeover(&mut self, token: u64) {
        let Some(p) = self.pending.remove(&token) else {
            // No peers at all: answer "nothing found" straight away.
            return;
        };
        let export = p.found.unwrap_or_else(|| {
            Box::new(SessionExport {
                token,
                node: 0,
                client_id: p.client_id.clone(),
                found: false,
                subscriptions: Vec::new(),
                messages: Vec::new(),
                pubrel: Vec::new(),
                sent_ids: Vec::new(),
                incoming_qos2: Vec::new(),
            })
        });
        self.mesh
            .send(p.shard as usize, MeshMsg::SessionImport(export));
    }
}
