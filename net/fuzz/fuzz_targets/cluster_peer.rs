//! Bytes from a cluster peer through the whole handshake and as an authenticated peer: the
//! reader starts at the handshake limit and is raised after an `Auth`, as the cluster thread
//! does; a proof the fuzzer made up never verifies; and every frame an authenticated peer
//! could send goes through the checks the cluster thread applies (filters, topics, names,
//! member lists, message properties, listing rows), which must refuse or accept, never
//! panic, and never accept a name that would need escaping in JSON.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shardmq_net::cluster::{
    verify_proof, Frame, FrameReader, Role, Transcript, FRAME_MAX_BYTES,
    HANDSHAKE_FRAME_MAX_BYTES,
};
use shardmq_shards::cluster::{node_addr, valid_cluster_addr, valid_node_name};
use shardmq_shards::json::{flat_json_object, json_str};
use shardmq_shards::peer_input::{valid_peer_filter, valid_peer_topic};
use shardmq_shards::wire::from_wire;

fn check_name(name: &str) {
    if valid_node_name(name) {
        assert_eq!(json_str(name), format!("\"{name}\""));
        assert!(node_addr(name).is_some());
    }
}

fn check_filter(f: &str) {
    for levels in [0, 128] {
        if valid_peer_filter(f, levels) {
            assert!(f.len() <= 65_535);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, data)) = data.split_first() else {
        return;
    };
    let mut reader = FrameReader::with_max(HANDSHAKE_FRAME_MAX_BYTES);
    for chunk in data.chunks(usize::from(split).max(1)) {
        reader.extend(chunk);
        loop {
            let frame = match reader.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(_) => return,
            };
            match frame {
                Frame::Hello {
                    node,
                    cluster_addr,
                    nonce,
                    ..
                } => {
                    check_name(&node);
                    valid_cluster_addr(&cluster_addr);
                    let t = Transcript {
                        dialer: &node,
                        dialer_nonce: &nonce,
                        acceptor: "n1@127.0.0.1",
                        acceptor_nonce: &[7; 16],
                    };
                    // A made-up proof for a fresh transcript: the cookie is unknown here.
                    assert!(!verify_proof("fuzz-cookie-unknown", Role::Dialer, &t, &[0; 32]));
                }
                Frame::Auth { .. } => reader.set_max(FRAME_MAX_BYTES),
                Frame::Members { members } => {
                    for (name, addr) in &members {
                        check_name(name);
                        valid_cluster_addr(addr);
                    }
                }
                Frame::RouteAdd { filter, .. } | Frame::RouteDel { filter, .. } => {
                    check_filter(&filter)
                }
                Frame::RouteSnapshot { filters, .. } => filters.iter().for_each(|f| check_filter(f)),
                Frame::Publish { msg, shared, .. } => {
                    shared.iter().for_each(|f| check_filter(f));
                    valid_peer_topic(&msg.topic, 128);
                    from_wire(msg, 0);
                }
                Frame::Retain { msg } => {
                    valid_peer_topic(&msg.topic, 0);
                    from_wire(msg, 0);
                }
                Frame::SessionTransfer {
                    subscriptions,
                    messages,
                    ..
                } => {
                    subscriptions.iter().for_each(|s| check_filter(&s.filter));
                    for m in messages {
                        valid_peer_topic(&m.topic, 128);
                        from_wire(m, 0);
                    }
                }
                Frame::SessionTail { messages, .. } => {
                    for m in messages {
                        from_wire(m, 0);
                    }
                }
                Frame::QueryReply { rows, .. } => {
                    for r in &rows {
                        if flat_json_object(r) {
                            assert!(r.starts_with('{') && r.ends_with('}'));
                        }
                        shardmq_shards::metrics::parse_json(r);
                    }
                }
                _ => {}
            }
        }
    }
});
