//! The shard's io_uring: client sockets, the mesh doorbell and the shard's clock, on one ring.
//!
//! Receives use multishot recv into a provided-buffer ring shared by every connection of the
//! shard, so an idle connection owns no read buffer at all: the kernel picks a buffer only when
//! bytes arrive, and the shard hands it back as soon as it has decoded them.
//!
//! Completions carry a [`Token`] in `user_data`: the operation kind plus, for connection
//! operations, the slab slot and its generation, so a completion that arrives after its
//! connection was closed and the slot reused is recognised and ignored.

use io_uring::types::{BufRingEntry, Fd, SubmitArgs, Timespec};
use io_uring::{cqueue, opcode, squeue, IoUring};
use std::io;
use std::os::fd::RawFd;
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

/// One completion, copied out of the completion queue.
#[derive(Clone, Copy, Debug)]
pub struct Completion {
    pub token: Token,
    pub result: i32,
    pub flags: u32,
}

impl Completion {
    /// Provided buffer the kernel filled, if any; it must go back through [`Ring::recycle`].
    pub fn buffer(&self) -> Option<u16> {
        cqueue::buffer_select(self.flags)
    }

    /// False when a multishot operation has ended and must be re-armed.
    pub fn more(&self) -> bool {
        cqueue::more(self.flags)
    }
}

/// The provided-buffer pool: a ring of descriptors shared with the kernel plus the buffers.
struct BufPool {
    entries: *mut BufRingEntry,
    entries_len: usize,
    mask: u16,
    tail: u16,
    mem: Box<[u8]>,
    buf_size: usize,
}

impl BufPool {
    fn new(count: u16, buf_size: usize) -> io::Result<BufPool> {
        assert!(count.is_power_of_two());
        let entries_len = count as usize * std::mem::size_of::<BufRingEntry>();
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
            entries: ptr as *mut BufRingEntry,
            entries_len,
            mask: count - 1,
            tail: 0,
            mem: prefaulted(count as usize * buf_size),
            buf_size,
        })
    }

    fn push(&mut self, bid: u16) {
        let idx = (self.tail & self.mask) as usize;
        // SAFETY: idx < count, the mapping holds `count` entries and lives as long as `self`.
        let entry = unsafe { &mut *self.entries.add(idx) };
        let offset = bid as usize * self.buf_size;
        entry.set_addr(self.mem[offset..].as_ptr() as u64);
        entry.set_len(self.buf_size as u32);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    fn publish_tail(&self) {
        // SAFETY: the tail field overlays the first entry's reserved field; the kernel reads it
        // with acquire semantics, so a release store publishes the entries written before.
        unsafe {
            let tail = BufRingEntry::tail(self.entries) as *const AtomicU16;
            (*tail).store(self.tail, Ordering::Release);
        }
    }
}

/// Zeroed memory whose pages are already resident: the pool is a fixed cost of the shard,
/// paid at start-up rather than by the first connections (and without page faults later).
fn prefaulted(len: usize) -> Box<[u8]> {
    let mut mem = vec![0u8; len].into_boxed_slice();
    for page in mem.chunks_mut(4096) {
        // SAFETY: a volatile write to memory we own, so the store is not optimised away.
        unsafe { std::ptr::write_volatile(page.as_mut_ptr(), 0) };
    }
    mem
}

impl Drop for BufPool {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `new`.
        unsafe {
            libc::munmap(self.entries as *mut libc::c_void, self.entries_len);
        }
    }
}

/// The shard's ring plus its receive buffer pool.
pub struct Ring {
    uring: IoUring,
    pool: BufPool,
    pending_tail: bool,
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
        let mut pool = BufPool::new(buf_count, buf_size)?;
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
            pool.push(bid);
        }
        pool.publish_tail();
        Ok(Ring {
            uring,
            pool,
            pending_tail: false,
        })
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
        let e = opcode::Recv::new(Fd(fd), std::ptr::null_mut(), self.pool.buf_size as u32)
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

    /// Bytes of a filled pool buffer.
    pub fn buffer(&self, bid: u16, len: usize) -> &[u8] {
        let offset = bid as usize * self.pool.buf_size;
        &self.pool.mem[offset..offset + len.min(self.pool.buf_size)]
    }

    /// Gives a pool buffer back to the kernel (published at the next submit).
    pub fn recycle(&mut self, bid: u16) {
        self.pool.push(bid);
        self.pending_tail = true;
    }

    /// Submits queued entries and waits up to `timeout` for at least one completion when
    /// `wait` is set; then copies completions into `out`.
    pub fn submit_and_collect(
        &mut self,
        wait: bool,
        timeout: Duration,
        out: &mut Vec<Completion>,
    ) -> io::Result<()> {
        if self.pending_tail {
            self.pool.publish_tail();
            self.pending_tail = false;
        }
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
        for cqe in self.uring.completion() {
            out.push(Completion {
                token: Token::decode(cqe.user_data()),
                result: cqe.result(),
                flags: cqe.flags(),
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
}
