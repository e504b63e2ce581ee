//! The shard's real driver: one io_uring, the shard's listener and the mesh doorbell, on the
//! shard's own pinned thread.
//!
//! [`RingIo`] is the [`ShardIo`] of a real node: it starts accepts, receives and writability
//! polls on the ring (see `ring`) and does the few syscalls the ring does not cover (`writev`,
//! `shutdown`, a non-blocking `recv` to drain lingering sockets, `getpeername`).
//! [`RingDriver::run`] is the shard's loop: read the node's clock, hand the turn's mesh
//! messages and ring completions (converted to [`ShardEvent`]s) to the core, then sleep in the
//! ring until a completion, the doorbell or the next timer tick. The ring is shared between
//! the two (`Rc<RefCell>`): the core reaches it through `RingIo` only while it handles an
//! event or a turn, the loop only between them.

use crate::mesh::MeshEndpoint;
use crate::node_shared::NodeShared;
use crate::ring::{Completion, Ring};
use crate::shard::Shard;
use crate::shard_io::{Done, IoError, ShardEvent, ShardIo, Token};
use crate::sock::Sock;
use crate::timer::TICK_MS;
use std::cell::RefCell;
use std::io::{self, IoSlice};
use std::net::{IpAddr, Shutdown};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// Submission queue entries of a shard's ring.
const RING_ENTRIES: u32 = 4096;
/// Receive buffers in a shard's pool: enough for one turn of completions; every buffer the
/// kernel ever fills stays resident, so the pool is kept small (2 MiB per shard).
const RECV_BUFFERS: u16 = 512;
/// Size of one receive buffer; larger packets are assembled across several.
const RECV_BUFFER_BYTES: usize = 4096;

/// The descriptor of a socket this driver made; the core never holds another kind.
fn fd_of(sock: &Sock) -> RawFd {
    let fd = sock.raw_fd();
    debug_assert!(fd.is_some(), "the ring driver only sees OS sockets");
    fd.unwrap_or(-1)
}

/// [`ShardIo`] on the shard's io_uring and its listener.
pub struct RingIo {
    ring: Rc<RefCell<Ring>>,
    listener: OwnedFd,
}

impl ShardIo for RingIo {
    fn accept(&mut self) {
        self.ring
            .borrow_mut()
            .accept_multi(self.listener.as_raw_fd());
    }

    fn recv(&mut self, sock: &Sock, token: Token, multishot: bool) {
        let mut ring = self.ring.borrow_mut();
        match (multishot, token) {
            (true, token) => ring.recv_multi_as(fd_of(sock), token),
            (false, Token::Recv { slot, gen }) => ring.recv_once(fd_of(sock), slot, gen),
            (false, token) => {
                debug_assert!(false, "single receives are for connections, not {token:?}");
                ring.recv_multi_as(fd_of(sock), token)
            }
        }
    }

    fn cancel(&mut self, token: Token) {
        self.ring.borrow_mut().cancel(token);
    }

    fn poll_writable(&mut self, sock: &Sock, token: Token) {
        self.ring.borrow_mut().poll_writable_as(fd_of(sock), token);
    }

    fn write(&mut self, sock: &Sock, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        // SAFETY: `IoSlice` is ABI-compatible with `iovec` on Unix, and the slices borrow
        // buffers that outlive the call.
        let written = unsafe {
            libc::writev(
                fd_of(sock),
                bufs.as_ptr().cast::<libc::iovec>(),
                bufs.len() as libc::c_int,
            )
        };
        if written < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(written as usize)
    }

    fn shutdown(&mut self, sock: &Sock, how: Shutdown) {
        let how = match how {
            Shutdown::Read => libc::SHUT_RD,
            Shutdown::Write => libc::SHUT_WR,
            Shutdown::Both => libc::SHUT_RDWR,
        };
        // SAFETY: shutdown on a descriptor the core owns; a pending receive on the ring then
        // completes, and is ignored by generation.
        unsafe {
            libc::shutdown(fd_of(sock), how);
        }
    }

    fn close(&mut self, sock: Sock) {
        // Dropping an OS socket closes its descriptor.
        drop(sock);
    }

    fn read_now(&mut self, sock: &Sock, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: reads into a buffer of the length given, from a descriptor the core owns.
        let n = unsafe {
            libc::recv(
                fd_of(sock),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn peer_ip(&self, sock: &Sock) -> Option<IpAddr> {
        // SAFETY: the TcpStream borrows a descriptor the core owns and is never dropped
        // (ManuallyDrop), so it does not close it; only getpeername is called on it.
        let stream =
            std::mem::ManuallyDrop::new(unsafe { std::net::TcpStream::from_raw_fd(fd_of(sock)) });
        stream.peer_addr().ok().map(|a| a.ip())
    }

    fn unix_ms(&self) -> u64 {
        crate::clock::unix_ms()
    }
}

/// A shard on its ring: the core plus what only the real loop needs.
pub struct RingDriver {
    /// Dropped first (field order): it closes its sockets before the ring goes.
    shard: Shard,
    shared: Arc<NodeShared>,
    ring: Rc<RefCell<Ring>>,
    /// The mesh doorbell's eventfd (owned by the shard's mesh endpoint).
    doorbell: RawFd,
    /// Where the ring reads the doorbell's count; dropped after the ring (field order).
    doorbell_counter: Box<u64>,
}

impl RingDriver {
    /// Builds shard `mesh.id` on the calling thread (the ring is bound to it). Fails with
    /// the kernel's error where io_uring is unavailable.
    pub fn new(
        shared: Arc<NodeShared>,
        mesh: MeshEndpoint,
        listener: OwnedFd,
    ) -> io::Result<RingDriver> {
        let ring = Rc::new(RefCell::new(Ring::new(
            RING_ENTRIES,
            RECV_BUFFERS,
            RECV_BUFFER_BYTES,
        )?));
        let doorbell = mesh.doorbell().raw_fd();
        let io = RingIo {
            ring: ring.clone(),
            listener,
        };
        let shard = Shard::new(shared.clone(), mesh, Box::new(io), random_seed());
        Ok(RingDriver {
            shard,
            shared,
            ring,
            doorbell,
            doorbell_counter: Box::new(0),
        })
    }

    /// Runs the shard until the node shuts down.
    pub fn run(mut self) -> io::Result<()> {
        self.shard.start();
        self.arm_doorbell();
        let mut completions: Vec<Completion> = Vec::with_capacity(1024);
        loop {
            let now_ms = self.shared.clock.now_ms();
            if self.shared.shutdown.load(Ordering::Relaxed) {
                self.shard.shutdown();
                return Ok(());
            }
            let mut busy = self.shard.begin_turn(now_ms);
            busy |= !completions.is_empty();
            for mut c in completions.drain(..) {
                match c.token {
                    Token::Doorbell => self.arm_doorbell(),
                    Token::Ignore => {}
                    _ => {
                        // Owned here and given back to the pool when dropped, after the core
                        // has decoded the bytes in place.
                        let buf = c.take_buffer();
                        let ev = event(&c, buf.as_ref().map(|b| b.bytes()));
                        self.shard.on_event(ev);
                    }
                }
            }
            let pending = self.shard.end_turn();
            let wait = !busy && !pending && self.shard.try_sleep();
            self.ring.borrow_mut().submit_and_collect(
                wait,
                Duration::from_millis(TICK_MS),
                &mut completions,
            )?;
            if wait {
                self.shard.wake();
            }
        }
    }

    fn arm_doorbell(&mut self) {
        let counter: *mut u64 = &mut *self.doorbell_counter;
        // SAFETY: the counter is boxed and owned by the driver, which drops it after the ring.
        unsafe { self.ring.borrow_mut().read_doorbell(self.doorbell, counter) };
    }
}

/// A ring completion as the core takes it; `data` is the filled receive buffer, if any.
fn event<'a>(c: &Completion, data: Option<&'a [u8]>) -> ShardEvent<'a> {
    let result = if c.result < 0 {
        Err(io_error(c.token, -c.result))
    } else {
        match c.token {
            Token::Accept => {
                // SAFETY: a successful accept returns a new descriptor that we now own.
                let fd = unsafe { OwnedFd::from_raw_fd(c.result) };
                Ok(Done::Accepted(Sock::Os(fd)))
            }
            Token::Recv { .. } | Token::LinkRecv { .. } => match data {
                Some(data) => Ok(Done::Data(data)),
                // End of stream; bytes without a buffer do not happen with a buffer group.
                None if c.result == 0 => Ok(Done::Data(&[])),
                None => Err(IoError::NoBuffers),
            },
            _ => Ok(Done::Ready),
        }
    };
    ShardEvent {
        token: c.token,
        result,
        more: c.more(),
    }
}

/// The core's name for an operation's errno.
fn io_error(token: Token, errno: i32) -> IoError {
    match errno {
        libc::ECANCELED => IoError::Cancelled,
        // On accept, the process or system is out of descriptors or memory.
        libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM if token == Token::Accept => {
            IoError::NoDescriptors
        }
        // On a receive, the provided-buffer pool is empty.
        libc::ENOBUFS => IoError::NoBuffers,
        _ => IoError::Other(errno),
    }
}

/// A random seed for the shard's message ids, different per shard and process.
fn random_seed() -> u64 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one(std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_out_of_descriptors_is_told_apart_from_a_receive_out_of_buffers() {
        assert_eq!(
            io_error(Token::Accept, libc::EMFILE),
            IoError::NoDescriptors
        );
        assert_eq!(
            io_error(Token::Accept, libc::ENOBUFS),
            IoError::NoDescriptors
        );
        let recv = Token::Recv { slot: 1, gen: 2 };
        assert_eq!(io_error(recv, libc::ENOBUFS), IoError::NoBuffers);
        assert_eq!(io_error(recv, libc::ECANCELED), IoError::Cancelled);
        assert_eq!(
            io_error(recv, libc::ECONNRESET),
            IoError::Other(libc::ECONNRESET)
        );
    }
}
