//! Reading cluster frames: a byte stream split into frames by [`FrameReader`], each body
//! decoded field by field by a bounds-checked cursor. Every byte is a peer's, so every length
//! is checked before it is used and nothing recurses.

use super::*;
use crate::reader::{Reader, ShortInput};

/// Why a peer's bytes were refused; the link is closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds the maximum")]
    TooLarge(usize),
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
}

impl ShortInput for FrameError {
    fn short_input() -> Self {
        FrameError::Malformed("frame shorter than its fields")
    }
}

/// Cursor over a frame body; every read is bounds-checked.
type Cursor<'a> = Reader<'a, FrameError>;

/// The cluster's field types on top of the shared cursor.
impl<'a> Cursor<'a> {
    fn bytes(&mut self) -> Result<&'a [u8], FrameError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn string(&mut self) -> Result<String, FrameError> {
        let b = self.bytes()?;
        String::from_utf8(b.to_vec()).map_err(|_| FrameError::Malformed("string is not UTF-8"))
    }
    /// A count of items that each take at least `min_item` bytes, checked against what is left
    /// so a forged count cannot make us reserve memory.
    fn count(&mut self, min_item: usize) -> Result<usize, FrameError> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min_item) > self.remaining() {
            return Err(FrameError::Malformed("item count larger than the frame"));
        }
        Ok(n)
    }
    /// A counted list of messages (each at least 30 bytes on the wire).
    fn msgs(&mut self) -> Result<Vec<WireMessage>, FrameError> {
        let n = self.count(30)?;
        (0..n).map(|_| self.msg()).collect()
    }

    fn msg(&mut self) -> Result<WireMessage, FrameError> {
        let topic = self.string()?;
        let qos = self.u8()?;
        if qos > 2 {
            return Err(FrameError::Malformed("QoS above 2"));
        }
        Ok(WireMessage {
            topic,
            qos,
            retain: self.u8()? != 0,
            publisher: self.string()?,
            properties: Bytes::copy_from_slice(self.bytes()?),
            expiry_ms: self.u64()?,
            id: self.u64()?,
            payload: Bytes::copy_from_slice(self.bytes()?),
        })
    }
}

fn decode_body(kind: u8, body: &[u8]) -> Result<Frame, FrameError> {
    let mut c = Cursor::new(body);
    let f = match kind {
        1 => {
            let (version, node, cluster_addr) = (c.u32()?, c.string()?, c.string()?);
            if version != CLUSTER_PROTOCOL_VERSION {
                // Every version starts with these three fields: a node of another version is
                // named in the refusal rather than dropped as garbage. The rest is its own.
                return Ok(Frame::Hello {
                    version,
                    node,
                    cluster_addr,
                    nonce: [0; NONCE_BYTES],
                    started_ms: 0,
                });
            }
            Frame::Hello {
                version,
                node,
                cluster_addr,
                nonce: c.array()?,
                started_ms: c.u64()?,
            }
        }
        2 => Frame::Auth { proof: c.array()? },
        3 => Frame::Heartbeat {
            uptime_s: c.u64()?,
            connections: c.u64()?,
            routes: c.u64()?,
        },
        4 => {
            let n = c.count(8)?;
            let mut members = Vec::with_capacity(n);
            for _ in 0..n {
                members.push((c.string()?, c.string()?));
            }
            Frame::Members { members }
        }
        5 => Frame::Leave,
        18 => Frame::Superseded,
        6 => Frame::RouteAdd {
            seq: c.u64()?,
            filter: c.string()?,
        },
        7 => Frame::RouteDel {
            seq: c.u64()?,
            filter: c.string()?,
        },
        8 => {
            let seq = c.u64()?;
            let n = c.count(4)?;
            let mut filters = Vec::with_capacity(n);
            for _ in 0..n {
                filters.push(c.string()?);
            }
            Frame::RouteSnapshot { seq, filters }
        }
        9 => {
            let normal = c.u8()? != 0;
            let n = c.count(4)?;
            let mut shared = Vec::with_capacity(n);
            for _ in 0..n {
                shared.push(c.string()?);
            }
            let msg = c.msg()?;
            Frame::Publish {
                msg,
                normal,
                shared,
            }
        }
        10 => Frame::Retain { msg: c.msg()? },
        11 => Frame::Takeover {
            client_id: c.string()?,
            want_session: c.u8()? != 0,
            token: c.u64()?,
            at_ms: c.u64()?,
        },
        12 => {
            let token = c.u64()?;
            let client_id = c.string()?;
            let found = c.u8()? != 0;
            let n = c.count(9)?;
            let mut subscriptions = Vec::with_capacity(n);
            for _ in 0..n {
                subscriptions.push(WireSubscription {
                    filter: c.string()?,
                    options: c.u8()?,
                    id: c.u32()?,
                });
            }
            let messages = c.msgs()?;
            let mut ids = [Vec::new(), Vec::new(), Vec::new()];
            for list in &mut ids {
                let n = c.count(2)?;
                list.reserve(n);
                for _ in 0..n {
                    list.push(c.u16()?);
                }
            }
            let [pubrel, sent_ids, incoming_qos2] = ids;
            if sent_ids.len() > messages.len() {
                return Err(FrameError::Malformed("more packet ids than messages"));
            }
            Frame::SessionTransfer {
                token,
                client_id,
                found,
                subscriptions,
                messages,
                pubrel,
                sent_ids,
                incoming_qos2,
            }
        }
        13 => Frame::Query {
            token: c.u64()?,
            kind: c.u8()?,
        },
        14 => {
            let token = c.u64()?;
            let n = c.count(4)?;
            let mut rows = Vec::with_capacity(n);
            for _ in 0..n {
                rows.push(c.string()?);
            }
            Frame::QueryReply { token, rows }
        }
        15 => Frame::DataLink { shard: c.u16()? },
        16 => Frame::TakeoverEnd {
            client_id: c.string()?,
        },
        17 => {
            let client_id = c.string()?;
            let messages = c.msgs()?;
            Frame::SessionTail {
                client_id,
                messages,
            }
        }
        _ => return Err(FrameError::Malformed("unknown frame type")),
    };
    if c.remaining() != 0 {
        return Err(FrameError::Malformed("bytes left after the last field"));
    }
    Ok(f)
}

/// Splits a byte stream into frames; keeps at most one partial frame.
///
/// ```
/// use shardmq_net::cluster::{Frame, FrameReader};
/// let mut out = bytes::BytesMut::new();
/// Frame::Leave.encode(&mut out);
/// let mut r = FrameReader::default();
/// r.extend(&out[..2]);
/// assert_eq!(r.next_frame().unwrap(), None);
/// r.extend(&out[2..]);
/// assert_eq!(r.next_frame().unwrap(), Some(Frame::Leave));
/// ```
pub struct FrameReader {
    buf: Vec<u8>,
    pos: usize,
    /// Largest frame accepted, in bytes (length prefix excluded).
    max_bytes: usize,
}

impl Default for FrameReader {
    /// A reader for an authenticated peer (frames up to [`FRAME_MAX_BYTES`]).
    fn default() -> Self {
        FrameReader::with_max(FRAME_MAX_BYTES)
    }
}

impl FrameReader {
    /// A reader that refuses frames over `max_bytes`.
    pub fn with_max(max_bytes: usize) -> Self {
        FrameReader {
            buf: Vec::new(),
            pos: 0,
            max_bytes,
        }
    }

    /// Changes the largest frame accepted from now on (raised once the peer is authenticated).
    pub fn set_max(&mut self, max_bytes: usize) {
        self.max_bytes = max_bytes;
    }

    /// Bytes received and not yet returned as frames. At most one partial frame (bounded by
    /// the maximum) plus what the caller added since its last [`FrameReader::next_frame`].
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Adds received bytes.
    pub fn extend(&mut self, data: &[u8]) {
        if self.pos > 0 && self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        let avail = &self.buf[self.pos..];
        if avail.len() < 4 {
            self.compact();
            return Ok(None);
        }
        let len = u32::from_be_bytes(avail[..4].try_into().expect("4 bytes")) as usize;
        if len > self.max_bytes {
            return Err(FrameError::TooLarge(len));
        }
        if len == 0 {
            return Err(FrameError::Malformed("empty frame"));
        }
        if avail.len() < 4 + len {
            self.compact();
            return Ok(None);
        }
        let frame = decode_body(avail[4], &avail[5..4 + len])?;
        self.pos += 4 + len;
        Ok(Some(frame))
    }

    /// Bytes received but not yet returned as frames; the reader is empty afterwards. Used
    /// when a link's socket moves to another thread mid-stream.
    pub fn take_buffered(&mut self) -> Vec<u8> {
        let rest = self.buf.split_off(self.pos);
        self.buf.clear();
        self.pos = 0;
        rest
    }

    /// True when no received byte waits to be decoded.
    pub fn is_empty(&self) -> bool {
        self.pos == self.buf.len()
    }

    fn compact(&mut self) {
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
    }
}
