//! shardmq-net: everything that puts bytes on a wire.
//!
//! - [`packet`]: MQTT control packets as values (all of 3.1, 3.1.1 and 5.0).
//! - [`cluster`]: cluster link frames between nodes.
//! - [`codec`]: incremental decoding from partial reads and encoding, with the maximum packet
//!   size enforced from the fixed header, before any body is buffered.
//!
//! The codec knows nothing of sessions or sockets; the shard runtime owns those.

pub mod cluster;
pub mod codec;
pub mod packet;
mod reader;

pub use codec::{
    decode, encode, encode_publish_header, encode_publish_header_parts, frame_len, DecodeError,
};
pub use packet::*;
