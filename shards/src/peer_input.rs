//! Checks on the filters and topics a peer node sends: the same rules as a client's SUBSCRIBE
//! and PUBLISH, bounded by the MQTT string length. Shared by the cluster thread (routes,
//! subscriptions, session transfers) and the shards (messages on a data link).

/// Longest string a peer may send where a client's would be an MQTT string (MQTT-1.5.4):
/// filters, topics, client ids. Also the hard cap on a filter's depth when
/// `mqtt.max_topic_levels` is 0 (at most 32,768 levels).
pub const MQTT_STRING_MAX_BYTES: usize = 65_535;

/// A route or subscription filter from a peer, checked as a client's SUBSCRIBE would be
/// (wildcard placement, shared-subscription syntax, levels), and never longer than an MQTT
/// string.
pub fn valid_peer_filter(filter: &str, max_levels: usize) -> bool {
    if filter.len() > MQTT_STRING_MAX_BYTES {
        return false;
    }
    let real = if crate::shared::is_shared(filter) {
        match crate::shared::parse_shared(filter) {
            Some((_, real)) => real,
            None => return false,
        }
    } else {
        filter
    };
    crate::topic::validate_filter(real, max_levels).is_ok()
}

/// A topic name from a peer, checked as a client's PUBLISH topic would be.
pub fn valid_peer_topic(topic: &str, max_levels: usize) -> bool {
    topic.len() <= MQTT_STRING_MAX_BYTES && crate::topic::validate_name(topic, max_levels).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_filters_are_checked_as_client_filters() {
        assert!(valid_peer_filter("a/+/#", 128));
        assert!(valid_peer_filter("$share/g/a/#", 128));
        assert!(!valid_peer_filter("a/#/b", 128));
        assert!(!valid_peer_filter("$share/g", 128));
        assert!(!valid_peer_filter("", 128));
        assert!(!valid_peer_filter(&"a/".repeat(200), 128));
        // With no level limit configured, the MQTT string length still bounds the depth.
        assert!(valid_peer_filter(&"a/".repeat(1000), 0));
        assert!(!valid_peer_filter(&"a/".repeat(300_000), 0));
        assert!(valid_peer_topic("a/b", 128));
        assert!(!valid_peer_topic("a/+", 128));
    }
}
