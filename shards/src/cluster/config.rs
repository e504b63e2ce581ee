//! Cluster settings ([`ClusterConfig`], [`Discovery`]) and the node names and cluster
//! addresses they hold: the checks a node name or address passes before it is accepted from
//! the configuration or a peer ([`valid_node_name`], [`valid_cluster_addr`],
//! [`name_matches_ip`]), how a name maps to an address ([`node_addr`]), how a peer's name is
//! shown in a log line, and the warning for the shipped cookie.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

/// Default cluster port, used when a node is named without one.
pub const DEFAULT_PORT: u16 = 4370;
/// Longest node name or cluster address accepted from a peer.
pub const NODE_NAME_MAX_BYTES: usize = 255;
/// The cookie in the shipped configuration: a node listening beyond loopback with it is
/// joinable by anyone who read the docs, and says so at start-up.
pub const SHIPPED_COOKIE: &str = "shardmq-cluster-cookie";

/// How a node finds its peers at start-up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Discovery {
    /// `shardmq ctl cluster join` only.
    Manual,
    /// Join the listed seeds (`name@host[:port]`) at start-up.
    Static(Vec<String>),
}

/// Cluster settings.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// Cluster listener; `None` = this node never clusters.
    pub bind: Option<SocketAddr>,
    /// Shared secret checked on every link handshake.
    pub cookie: String,
    pub discovery: Discovery,
    /// Interval of heartbeats, in ms.
    pub heartbeat_ms: u64,
    /// Silence after which a peer is marked down, in ms.
    pub down_after_ms: u64,
    /// A peer down this long (ms) is removed from the cluster (EMQX's autoclean); 0 = never.
    pub autoclean_ms: u64,
    /// Where the member list is kept across restarts.
    pub data_dir: PathBuf,
    /// Bytes a shard queues on its link to one peer before it drops QoS 0 and pauses its
    /// clients (backpressure).
    pub link_buffer_bytes: usize,
    /// Accept a peer whose node name's host is not the address its link comes from (NAT,
    /// names that do not resolve here). Off: such a peer is refused after the handshake.
    pub allow_node_name_mismatch: bool,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            bind: None,
            cookie: SHIPPED_COOKIE.into(),
            discovery: Discovery::Manual,
            heartbeat_ms: 1000,
            down_after_ms: 5000,
            autoclean_ms: 24 * 3600 * 1000,
            data_dir: PathBuf::from("./data"),
            link_buffer_bytes: 16 * 1024 * 1024,
            allow_node_name_mismatch: false,
        }
    }
}

/// True for `name@host[:port]` made of characters that need no escaping anywhere (JSON,
/// Prometheus labels, logs, the member file): letters, digits, `-_.` in the name, and
/// `-.:[]` in the host.
pub fn valid_node_name(node: &str) -> bool {
    let Some((name, host)) = node.split_once('@') else {
        return false;
    };
    node.len() <= NODE_NAME_MAX_BYTES
        && !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && valid_host(host)
}

fn valid_host(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= NODE_NAME_MAX_BYTES
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
}

/// True for a cluster address `host:port` a peer may tell us to dial.
pub fn valid_cluster_addr(addr: &str) -> bool {
    addr.rsplit_once(':')
        .is_some_and(|(host, port)| valid_host(host) && port.parse::<u16>().is_ok_and(|p| p > 0))
}

/// True when the host of node name `node` is `ip` or `resolve` (given its `host:port`) finds
/// it among the host's addresses. Called only for a peer that has proven the cookie (a host
/// name costs a resolver look-up).
pub fn name_matches_ip(node: &str, ip: IpAddr, resolve: impl FnOnce(&str) -> Vec<IpAddr>) -> bool {
    let Some(addr) = node_addr(node) else {
        return false;
    };
    let want = ip.to_canonical();
    resolve(&addr).iter().any(|a| a.to_canonical() == want)
}

/// A name from a peer for a log line: as is when it is a valid node name, quoted and
/// escaped otherwise (so it cannot forge log lines).
pub(super) fn shown(name: &str) -> String {
    if valid_node_name(name) {
        name.to_string()
    } else {
        format!("{:?}", name.chars().take(64).collect::<String>())
    }
}

/// True when a listener on `bind` with `cookie` lets anyone beyond this host join.
pub fn exposed_with_shipped_cookie(bind: SocketAddr, cookie: &str) -> bool {
    !bind.ip().is_loopback() && cookie == SHIPPED_COOKIE
}

/// Host part of `name@host[:port]` and the cluster address it stands for.
pub fn node_addr(node: &str) -> Option<String> {
    let (_, host) = node.split_once('@')?;
    if host.is_empty() {
        return None;
    }
    if host
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        Some(host.to_string())
    } else {
        Some(format!("{host}:{DEFAULT_PORT}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_map_to_cluster_addresses() {
        assert_eq!(node_addr("n1@127.0.0.1").as_deref(), Some("127.0.0.1:4370"));
        assert_eq!(
            node_addr("n2@127.0.0.1:4371").as_deref(),
            Some("127.0.0.1:4371")
        );
        assert_eq!(node_addr("n1@"), None);
        assert_eq!(node_addr("n1"), None);
    }

    #[test]
    fn node_names_that_would_need_escaping_are_not_node_names() {
        assert!(valid_node_name("n1@127.0.0.1"));
        assert!(valid_node_name("emqx-1.a_b@host.example:4370"));
        assert!(valid_node_name("n@[::1]:4370"));
        for bad in [
            "n1", "@h", "n@", "a\"b@h", "n@h\n", "n@h\\", "n@h\"}", "n@h h", "a@b@c",
        ] {
            assert!(!valid_node_name(bad), "{bad:?}");
        }
        assert!(!valid_node_name(&format!("n@{}", "h".repeat(300))));
        assert!(valid_cluster_addr("127.0.0.1:4370"));
        assert!(!valid_cluster_addr("127.0.0.1"));
        assert!(!valid_cluster_addr("127.0.0.1:0"));
        assert!(!valid_cluster_addr("x\":1"));
    }

    #[test]
    fn the_shipped_cookie_is_flagged_beyond_loopback_only() {
        let any: SocketAddr = "0.0.0.0:4370".parse().unwrap();
        let lo: SocketAddr = "127.0.0.1:4370".parse().unwrap();
        assert!(exposed_with_shipped_cookie(any, SHIPPED_COOKIE));
        assert!(!exposed_with_shipped_cookie(lo, SHIPPED_COOKIE));
        assert!(!exposed_with_shipped_cookie(any, "a-secret"));
        // The shipped configuration carries that cookie.
        assert_eq!(ClusterConfig::default().cookie, SHIPPED_COOKIE);
    }

    #[test]
    fn a_name_matches_the_address_it_names() {
        // IP literals only: nothing to look up.
        let resolve = |addr: &str| -> Vec<IpAddr> {
            addr.parse::<SocketAddr>()
                .map(|a| a.ip())
                .into_iter()
                .collect()
        };
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        assert!(name_matches_ip("n1@127.0.0.1", lo, resolve));
        assert!(name_matches_ip("n1@127.0.0.1:4371", lo, resolve));
        assert!(name_matches_ip(
            "n1@127.0.0.1",
            "::ffff:127.0.0.1".parse().unwrap(),
            resolve
        ));
        assert!(!name_matches_ip("n1@10.0.0.1", lo, resolve));
        assert!(!name_matches_ip("n1", lo, resolve));
    }
}
