//! Arbitrary bytes through the MQTT decoder for every protocol level: it must never panic, and
//! whatever it accepts must survive encode → decode unchanged.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use shardmq_net::{decode, encode, Protocol};

fuzz_target!(|data: &[u8]| {
    for protocol in [Protocol::V31, Protocol::V311, Protocol::V5] {
        let mut rest = data;
        // Decode a stream of packets, as a connection would.
        while let Ok(Some((packet, used))) = decode(rest, protocol, 64 * 1024) {
            assert!(used > 0 && used <= rest.len());
            let mut out = BytesMut::new();
            // CONNECT carries its own level; everything else is coded for the connection's.
            let level = match &packet {
                shardmq_net::Packet::Connect(c) => c.protocol,
                _ => protocol,
            };
            encode(&packet, level, &mut out);
            let again = decode(&out, level, u32::MAX).expect("re-encoded packet decodes");
            let (p2, n2) = again.expect("re-encoded packet is complete");
            assert_eq!(n2, out.len());
            assert_eq!(p2, packet);
            rest = &rest[used..];
        }
    }
});
