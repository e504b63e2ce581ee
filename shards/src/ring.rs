//! The shard's io_uring: client sockets, the mesh doorbell and the shard's clock, on one ring.
//!
//! Receives use multishot recv into a provided-buffer ring shared by every connection of the
//! shard, so an idle connection owns no read buffer at all: the kernel picks a buffer only when
//! bytes arrive, and the shard hands it back as soon as it has decoded them. A filled buffer
//! reaches the shard as a [`RecvBuf`] inside its [`Completion`]; dropping either gives the
//! buffer back, so no path (error completions included) can starve the pool. Memory the kernel
//! reads or writes (descriptors, buffers) is reached only through raw pointers, never through a
//! Rust reference, except the one buffer a `RecvBuf` owns.
//!
//! Completions carry a [`Token`] in `user_data`: the operation kind plus, for connection
//! operations, the slab slot and its generation, so a completion that arrives after its
//! connection was closed and the slot reused is recognised and ignored.

use io_uring::types::{BufRingEntry, Fd, SubmitArgs, Timespec};
use io_uring::{cqueue, opcode, squeue, IoUring};
use std::cell::{Cell, RefCell};
use std::io;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

/// Provided-buffer group id of the shard's receive pool.
const BUF_GROUP: u16 = 0;

/// What a completion belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Token {
    /// Multishot accept on the shard's listener.
    Accept,
    /// Receive (single or multishot) on a connection slot of the given generation.
    Recv { slot: u32, gen: u32 },
    /// The socket of a connection became writable again.
    Writable { slot: u32, gen: u32 },
    /// The mesh doorbell eventfd was rung.
    Doorbell,
    /// Receive on a cluster data link of the given slot and generation.
    LinkRecv { slot: u32, gen: u32 },
    /// A cluster data link became writable again.
    LinkWritable { slot: u32, gen: u32 },
    /// Completions we do not act on (cancellations).
    Ignore,
}

impl Token {
    const GEN_MASK: u64 = (1 << 24) - 1;

    /// Packs the token into the 64 bits of `user_data`.
    pub fn encode(self) -> u64 {
        let (kind, slot, gen) = match self {
            Token::Accept => (1u64, 0u32, 0u32),
            Token::Recv { slot, gen } => (2, slot, gen),
            Token::Writable { slot, gen } => (3, slot, gen),
            Token::Doorbell => (4, 0, 0),
            Token::Ignore => (5, 0, 0),
            Token::LinkRecv { slot, gen } => (6, slot, gen),
            Token::LinkWritable { slot, gen } => (7, slot, gen),
        };
        (kind << 56) | ((gen as u64 & Self::GEN_MASK) << 32) | slot as u64
    }

    /// Unpacks `user_data`.
    pub fn decode(v: u64) -> Token {
        let slot = v as u32;
        let gen = ((v >> 32) & Self::GEN_MASK) as u32;
        match v >> 56 {
            1 => Token::Accept,
            2 => Token::Recv { slot, gen },
            3 => Token::Writable { slot, gen },
            4 => Token::Doorbell,
            6 => Token::LinkRecv { slot, gen },
            7 => Token::LinkWritable { slot, gen },
            _ => Token::Ignore,
        }
    }

    /// Generation numbers wrap at 24 bits to fit the token.
    pub fn next_gen(gen: u32) -> u32 {
        (gen + 1) & Self::GEN_MASK as u32
    }
}

/// One completion, copied out of the completion queue. Not `Clone`: it owns the receive buffer
/// the kernel filled for it, if any, and dropping it (or the [`RecvBuf`] taken from it) gives
/// that buffer back to the pool, whatever the result was.
#[derive(Debug)]
pub struct Completion {
    pub token: Token,
    pub result: i32,
    pub flags: u32,
    buf: Option<RecvBuf>,
}

impl Completion {
    /// The provided buffer the kernel filled, holding `result` bytes (none when `result <= 0`).
    pub fn take_buffer(&mut self) -> Option<RecvBuf> {
        self.buf.take()
    }

    /// False when a multishot operation has ended and must be re-armed.
    pub fn more(&self) -> bool {
        cqueue::more(self.flags)
    }
}

/// One `struct io_uring_buf` of the provided-buffer ring (`include/uapi/linux/io_uring.h`).
/// In the first entry, `resv` is the ring's tail, which the kernel reads: it is only ever
/// accessed atomically, through [`BufPool::publish_tail`].
#[repr(C)]
struct BufDesc {
    addr: u64,
    len: u32,
    bid: u16,
    resv: u16,
}

const _: () = assert!(std::mem::size_of::<BufDesc>() == std::mem::size_of::<BufRingEntry>());

/// The descriptor ring the kernel takes receive buffers from.
struct BufPool {
    entries: *mut BufDesc,
    entries_len: usize,
    mask: u16,
    tail: u16,
}

impl BufPool {
    fn new(count: u16) -> io::Result<BufPool> {
        assert!(count.is_power_of_two());
        let entries_len = count as usize * std::mem::size_of::<BufDesc>();
        // SAFETY: anonymous private mapping; checked for MAP_FAILED below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                entries_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(BufPool {
            entries: ptr as *mut BufDesc,
            entries_len,
            mask: count - 1,
            tail: 0,
        })
    }

    /// Writes the descriptor of buffer `bid` (at `addr`, `len` bytes) at the local tail; the
    /// kernel sees it after the next [`BufPool::publish_tail`].
    fn push(&mut self, addr: *mut u8, len: u32, bid: u16) {
        let idx = (self.tail & self.mask) as usize;
        // SAFETY: idx < count, so the entry lies in the mapping, which lives as long as `self`.
        // The kernel reads only entries below the published tail, and this one is at or past
        // it; it is free because every buffer is either in the kernel's part of the ring or
        // held by the shard, never both, so the ring never holds more than `count`. Fields
        // are written through raw pointers (no reference to memory the kernel reads), and
        // never `resv`, which in entry 0 is the tail the kernel loads concurrently.
        unsafe {
            let e = self.entries.add(idx);
            std::ptr::addr_of_mut!((*e).addr).write(addr as u64);
            std::ptr::addr_of_mut!((*e).len).write(len);
            std::ptr::addr_of_mut!((*e).bid).write(bid);
        }
        self.tail = self.tail.wrapping_add(1);
    }

    fn publish_tail(&self) {
        // SAFETY: the tail overlays entry 0's `resv` (2-byte aligned, inside the mapping) and
        // is only ever accessed atomically. The kernel loads it with acquire semantics, so
        // this release store publishes the descriptors written before it.
        unsafe {
            let tail = std::ptr::addr_of!((*self.entries).resv) as *const AtomicU16;
            (*tail).store(self.tail, Ordering::Release);
        }
    }
}

impl Drop for BufPool {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `new`.
        unsafe {
            libc::munmap(self.entries as *mut libc::c_void, self.entries_len);
        }
    }
}

/// The receive buffers themselves: memory the kernel writes, so never behind a Rust
/// reference except the one buffer a [`RecvBuf`] owns. Shared (`Rc`) by the ring and every
/// `RecvBuf`, so it stays mapped while any buffer is still being read.
struct PoolMem {
    ptr: *mut u8,
    len: usize,
    buf_size: usize,
    /// Buffers the shard holds (taken from a completion, not yet dropped).
    held: Box<[Cell<bool>]>,
    /// Buffers dropped since the last submit, to go back into the descriptor ring.
    returned: RefCell<Vec<u16>>,
}

impl PoolMem {
    /// `count` buffers of `buf_size` bytes, resident from the start: the pool is a fixed
    /// cost of the shard, paid at start-up rather than by page faults later.
    fn new(count: u16, buf_size: usize) -> io::Result<PoolMem> {
        let len = count as usize * buf_size;
        // SAFETY: anonymous private mapping; checked for MAP_FAILED below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(PoolMem {
            ptr: ptr as *mut u8,
            len,
            buf_size,
            held: (0..count).map(|_| Cell::new(false)).collect(),
            returned: RefCell::new(Vec::with_capacity(count as usize)),
        })
    }

    fn addr(&self, bid: u16) -> *mut u8 {
        debug_assert!((bid as usize) < self.held.len());
        // In bounds: bid < count, so the offset is below `len`.
        self.ptr.wrapping_add(bid as usize * self.buf_size)
    }
}

impl Drop for PoolMem {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `new`; no RecvBuf is left (each holds
        // an `Rc` of this), and the ring that gave the kernel these addresses is gone.
        unsafe {
            libc::munmap(self.ptr as *mut libc::c_void, self.len);
        }
    }
}

/// A receive buffer the kernel filled and handed to the shard. Dropping it gives it back:
/// the ring republishes it at the next submit, so no path can leak it.
pub struct RecvBuf {
    mem: Rc<PoolMem>,
    bid: u16,
    len: usize,
}

impl RecvBuf {
    /// The bytes received.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `bid < count` and `len <= buf_size` (checked in `Ring::collect_buffer`), so
        // the slice lies inside the mapping, which the `Rc` keeps alive. The kernel wrote the
        // buffer before posting the completion we read it from (acquire on the CQ tail), and
        // cannot write it again until it is back in the descriptor ring, which happens only
        // after this `RecvBuf` is dropped: each completion yields at most one `RecvBuf`, which
        // is neither `Clone` nor `Copy`, so nothing writes these bytes while `&self` lives.
        unsafe { std::slice::from_raw_parts(self.mem.addr(self.bid), self.len) }
    }
}

impl Drop for RecvBuf {
    fn drop(&mut self) {
        debug_assert!(self.mem.held[self.bid as usize].get());
        self.mem.held[self.bid as usize].set(false);
        self.mem.returned.borrow_mut().push(self.bid);
    }
}

impl std::fmt::Debug for RecvBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RecvBuf({}, {} bytes)", self.bid, self.len)
    }
}

/// The buffer a completion names, owned from here on. A buffer on a completion without data
/// (EOF, error, cancellation: the kernel normally keeps those itself) is taken all the same,
/// with no bytes, so that it too goes back when dropped instead of starving the pool.
fn collect_buffer(mem: &Rc<PoolMem>, result: i32, flags: u32) -> Option<RecvBuf> {
    let bid = cqueue::buffer_select(flags)?;
    if bid as usize >= mem.held.len() {
        // Not a buffer of ours: the kernel only hands back ids it was given.
        debug_assert!(false, "buffer id {bid} out of range");
        return None;
    }
    let held = &mem.held[bid as usize];
    debug_assert!(!held.get(), "buffer {bid} handed out twice");
    held.set(true);
    Some(RecvBuf {
        mem: mem.clone(),
        bid,
        len: (result.max(0) as usize).min(mem.buf_size),
    })
}

/// The shard's ring plus its receive buffer pool.
pub struct Ring {
    uring: IoUring,
    /// Dropped after `uring` (field order), so the kernel never sees the ring unmapped.
    pool: BufPool,
    mem: Rc<PoolMem>,
}

impl Ring {
    /// Creates a ring with `sq_entries` submission slots and `buf_count` receive buffers of
    /// `buf_size` bytes each. Fails with the kernel's error where io_uring is unavailable.
    pub fn new(sq_entries: u32, buf_count: u16, buf_size: usize) -> io::Result<Ring> {
        let uring = IoUring::builder()
            .setup_single_issuer()
            .setup_coop_taskrun()
            .setup_cqsize(sq_entries * 8)
            .build(sq_entries)
            .or_else(|_| {
                IoUring::builder()
                    .setup_cqsize(sq_entries * 8)
                    .build(sq_entries)
            })?;
        let mut pool = BufPool::new(buf_count)?;
        let mem = Rc::new(PoolMem::new(buf_count, buf_size)?);
        // SAFETY: the descriptor ring lives in `pool`, which the ring owner keeps alive and
        // which is dropped after `uring` (field order) so the kernel never sees it freed.
        unsafe {
            uring.submitter().register_buf_ring_with_flags(
                pool.entries as u64,
                buf_count,
                BUF_GROUP,
                0,
            )?;
        }
        for bid in 0..buf_count {
            pool.push(mem.addr(bid), buf_size as u32, bid);
        }
        pool.publish_tail();
        Ok(Ring { uring, pool, mem })
    }

    fn push(&mut self, entry: squeue::Entry) {
        // SAFETY: every entry built here points only at memory owned by the shard for the
        // operation's lifetime (the buffer pool, the doorbell counter) or at nothing.
        unsafe {
            while self.uring.submission().push(&entry).is_err() {
                // Submission queue full: hand what we have to the kernel and retry.
                let _ = self.uring.submit();
            }
        }
    }

    /// Arms multishot accept on `listener`.
    pub fn accept_multi(&mut self, listener: RawFd) {
        let e = opcode::AcceptMulti::new(Fd(listener))
            .flags(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
            .build()
            .user_data(Token::Accept.encode());
        self.push(e);
    }

    /// Arms one receive into a pool buffer (used until CONNECT is complete, so that no
    /// operation is pending when the socket is handed to another shard).
    pub fn recv_once(&mut self, fd: RawFd, slot: u32, gen: u32) {
        let e = opcode::Recv::new(Fd(fd), std::ptr::null_mut(), self.mem.buf_size as u32)
            .buf_group(BUF_GROUP)
            .build()
            .flags(squeue::Flags::BUFFER_SELECT)
            .user_data(Token::Recv { slot, gen }.encode());
        self.push(e);
    }

    /// Arms multishot receive into pool buffers.
    pub fn recv_multi(&mut self, fd: RawFd, slot: u32, gen: u32) {
        self.recv_multi_as(fd, Token::Recv { slot, gen });
    }

    /// Arms multishot receive into pool buffers, completing with `token`.
    pub fn recv_multi_as(&mut self, fd: RawFd, token: Token) {
        let e = opcode::RecvMulti::new(Fd(fd), BUF_GROUP)
            .build()
            .user_data(token.encode());
        self.push(e);
    }

    /// Asks for one completion when `fd` becomes writable.
    pub fn poll_writable(&mut self, fd: RawFd, slot: u32, gen: u32) {
        self.poll_writable_as(fd, Token::Writable { slot, gen });
    }

    /// Asks for one completion, with `token`, when `fd` becomes writable.
    pub fn poll_writable_as(&mut self, fd: RawFd, token: Token) {
        let e = opcode::PollAdd::new(Fd(fd), libc::POLLOUT as u32)
            .build()
            .user_data(token.encode());
        self.push(e);
    }

    /// Cancels the pending operation submitted with `token` (its completion then reports
    /// ECANCELED, after any data it had already received).
    pub fn cancel(&mut self, token: Token) {
        let e = opcode::AsyncCancel::new(token.encode())
            .build()
            .user_data(Token::Ignore.encode());
        self.push(e);
    }

    /// Arms an 8-byte read of the doorbell eventfd into `counter`.
    ///
    /// # Safety
    /// `counter` must stay valid until the read completes.
    pub unsafe fn read_doorbell(&mut self, fd: RawFd, counter: *mut u64) {
        let e = opcode::Read::new(Fd(fd), counter as *mut u8, 8)
            .build()
            .user_data(Token::Doorbell.encode());
        self.push(e);
    }

    /// Buffers the shard holds right now (taken by completions, not yet dropped).
    pub fn buffers_held(&self) -> usize {
        self.mem.held.iter().filter(|h| h.get()).count()
    }

    /// Puts every buffer dropped since the last call back into the descriptor ring.
    fn return_buffers(&mut self) {
        let mut returned = self.mem.returned.borrow_mut();
        if returned.is_empty() {
            return;
        }
        for bid in returned.drain(..) {
            self.pool
                .push(self.mem.addr(bid), self.mem.buf_size as u32, bid);
        }
        self.pool.publish_tail();
    }

    /// Submits queued entries and waits up to `timeout` for at least one completion when
    /// `wait` is set; then copies completions into `out`.
    pub fn submit_and_collect(
        &mut self,
        wait: bool,
        timeout: Duration,
        out: &mut Vec<Completion>,
    ) -> io::Result<()> {
        self.return_buffers();
        let result = if wait && self.uring.completion().is_empty() {
            let ts = Timespec::new()
                .sec(timeout.as_secs())
                .nsec(timeout.subsec_nanos());
            let args = SubmitArgs::new().timespec(&ts);
            self.uring.submitter().submit_with_args(1, &args)
        } else {
            self.uring.submit()
        };
        match result {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY)
                ) => {}
            Err(e) => return Err(e),
        }
        let mem = &self.mem;
        for cqe in self.uring.completion() {
            let (result, flags) = (cqe.result(), cqe.flags());
            out.push(Completion {
                token: Token::decode(cqe.user_data()),
                result,
                flags,
                buf: collect_buffer(mem, result, flags),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_through_user_data() {
        for t in [
            Token::Accept,
            Token::Recv { slot: 7, gen: 3 },
            Token::Writable {
                slot: u32::MAX,
                gen: (1 << 24) - 1,
            },
            Token::Doorbell,
            Token::Ignore,
            Token::LinkRecv { slot: 1, gen: 2 },
            Token::LinkWritable { slot: 9, gen: 8 },
        ] {
            assert_eq!(Token::decode(t.encode()), t);
        }
        assert_eq!(Token::next_gen((1 << 24) - 1), 0);
    }

    /// One completion for `token`, waiting up to 5 s.
    fn completion_for(ring: &mut Ring, token: Token) -> Completion {
        let mut out = Vec::new();
        for _ in 0..50 {
            ring.submit_and_collect(true, Duration::from_millis(100), &mut out)
                .unwrap();
            if let Some(i) = out.iter().position(|c| c.token == token) {
                return out.swap_remove(i);
            }
        }
        panic!("no completion for {token:?}");
    }

    #[test]
    fn a_buffer_dropped_on_an_error_path_goes_back_to_the_pool() {
        let mut fds = [0; 2];
        // SAFETY: socketpair writes two descriptors into `fds`.
        assert_eq!(
            unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, fds.as_mut_ptr()) },
            0
        );
        // Two buffers: a pool that lost one per error completion would starve in two rounds.
        let mut ring = Ring::new(8, 2, 64).unwrap();
        for round in 0..10u8 {
            let token = Token::Recv {
                slot: 0,
                gen: round as u32,
            };
            ring.recv_once(fds[0], 0, round as u32);
            // SAFETY: writes one byte from a live u8 to our socket.
            assert_eq!(
                unsafe { libc::write(fds[1], &round as *const u8 as *const _, 1) },
                1
            );
            let mut c = completion_for(&mut ring, token);
            assert_eq!(c.result, 1, "round {round}: the pool ran dry");
            if round % 2 == 0 {
                assert_eq!(c.take_buffer().unwrap().bytes(), &[round]);
            } else {
                // As if it had come with an error: the shard drops it unread.
                c.result = -libc::ECONNRESET;
            }
            assert_eq!(ring.buffers_held(), (round % 2) as usize);
            drop(c);
            assert_eq!(ring.buffers_held(), 0);
        }
        // SAFETY: closing the descriptors socketpair gave us.
        unsafe {
            libc::close(fds[0]);
            libc::close(fds[1]);
        }
    }
}
