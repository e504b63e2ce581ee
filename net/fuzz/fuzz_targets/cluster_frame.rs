//! Arbitrary bytes from a cluster peer: the frame reader must refuse or parse, never panic or
//! allocate beyond what arrived, and parsed frames must re-encode to themselves.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use shardmq_net::cluster::FrameReader;

fuzz_target!(|data: &[u8]| {
    let mut reader = FrameReader::default();
    for chunk in data.chunks(7) {
        reader.extend(chunk);
        loop {
            match reader.next_frame() {
                Ok(Some(frame)) => {
                    let mut out = BytesMut::new();
                    frame.encode(&mut out);
                    let mut again = FrameReader::default();
                    again.extend(&out);
                    assert_eq!(again.next_frame().unwrap(), Some(frame));
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
