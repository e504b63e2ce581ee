//! What the simulator's end-of-run checks read from the cluster thread (tests only).

use super::*;

impl Cluster {
    /// This node's routes as it replicates them to its peers.
    pub(crate) fn own_routes(&self) -> Vec<String> {
        self.local_routes.iter().cloned().collect()
    }

    /// The routes this node holds for peer `name`, if it knows the peer and sees it up.
    pub(crate) fn replica_of(&self, name: &str) -> Option<Vec<String>> {
        let p = self.peer_index(name)?;
        (self.peers[p].state == PeerState::Up)
            .then(|| self.peers[p].routes.iter().cloned().collect())
    }
}
