//! What the simulator's end-of-run checks read from a shard (tests only).

use super::*;

impl Shard {
    /// Client ids with a session on this shard and a live connection.
    pub(crate) fn online_clients(&self) -> Vec<Arc<str>> {
        self.sessions
            .iter()
            .flatten()
            .filter(|e| e.conn.is_some())
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
