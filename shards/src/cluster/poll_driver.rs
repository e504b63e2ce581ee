//! The cluster thread on a real node: binds the cluster listener, sleeps in `poll(2)` on the
//! mesh doorbell, the listener and the links, and runs a [`Cluster::turn`] after each wake
//! ([`PollDriver::run`]). [`PollIo`] is [`ClusterIo`] on the OS: non-blocking TCP sockets,
//! the system resolver, the OS random source, the wall clock and the member list in the
//! data dir. Nothing else in `cluster/` calls the OS.

use super::*;
use socket2::{Domain, Protocol, SockRef, Socket, Type};
use std::io::{IoSlice, Read, Write};
use std::net::{Shutdown, TcpListener, ToSocketAddrs};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

/// Longest sleep in `poll(2)`: the heartbeat and the deadlines are checked at least this often.
const POLL_TIMEOUT_MS: i32 = 100;

/// [`ClusterIo`] on the operating system.
pub struct PollIo {
    listener: Option<TcpListener>,
    /// Where the member list is kept across restarts.
    members_file: PathBuf,
}

impl ClusterIo for PollIo {
    fn accept(&mut self) -> Option<(Sock, String, Option<IpAddr>)> {
        let (stream, addr) = self.listener.as_ref()?.accept().ok()?;
        let _ = stream.set_nonblocking(true);
        let _ = stream.set_nodelay(true);
        Some((
            Sock::Os(OwnedFd::from(stream)),
            addr.to_string(),
            Some(addr.ip()),
        ))
    }

    /// Resolves `addr` with the system resolver (this blocks for a host name) and starts
    /// connecting without waiting.
    fn dial(&mut self, addr: &str) -> std::io::Result<(Sock, Option<IpAddr>)> {
        let sock = addr
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| std::io::Error::other(format!("{addr} does not resolve")))?;
        let s = Socket::new(Domain::for_address(sock), Type::STREAM, Some(Protocol::TCP))?;
        s.set_nonblocking(true)?;
        match s.connect(&sock.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(e),
        }
        let _ = s.set_nodelay(true);
        Ok((Sock::Os(OwnedFd::from(s)), Some(sock.ip())))
    }

    /// The system resolver (this blocks for a host name).
    fn resolve(&mut self, addr: &str) -> Vec<IpAddr> {
        addr.to_socket_addrs()
            .map(|all| all.map(|a| a.ip()).collect())
            .unwrap_or_default()
    }

    fn read(&mut self, sock: &Sock, buf: &mut [u8]) -> std::io::Result<usize> {
        (&*SockRef::from(os_fd(sock)?)).read(buf)
    }

    fn write(&mut self, sock: &Sock, bufs: &[IoSlice<'_>]) -> std::io::Result<usize> {
        (&*SockRef::from(os_fd(sock)?)).write_vectored(bufs)
    }

    fn close(&mut self, sock: Sock) {
        if let Sock::Os(fd) = &sock {
            let _ = SockRef::from(fd).shutdown(Shutdown::Both);
        }
    }

    fn nonce(&mut self) -> Result<Nonce, String> {
        shardmq_net::cluster::fresh_nonce().map_err(|e| format!("the OS random source: {e}"))
    }

    fn unix_ms(&self) -> u64 {
        crate::clock::unix_ms()
    }

    fn load_members(&mut self) -> Option<String> {
        std::fs::read_to_string(&self.members_file).ok()
    }

    fn save_members(&mut self, text: &str) {
        if let Err(e) = std::fs::write(&self.members_file, text) {
            log::warn!(
                "cluster: cannot save members to {:?}: {e}",
                self.members_file
            );
        }
    }
}

/// The descriptor of an OS socket; a simulated one is not this driver's.
fn os_fd(sock: &Sock) -> std::io::Result<&OwnedFd> {
    match sock {
        Sock::Os(fd) => Ok(fd),
        Sock::Sim(_) => Err(std::io::Error::from(std::io::ErrorKind::Unsupported)),
    }
}

/// The cluster thread, bound and ready to run: a [`Cluster`] on `PollIo`, driven by
/// `poll(2)`. The core is built on the thread itself (a [`ClusterIo`] need not be `Send`).
pub struct PollDriver {
    cfg: ClusterConfig,
    shared: Arc<NodeShared>,
    mesh: MeshEndpoint,
    control: Arc<ClusterControl>,
    io: PollIo,
    advertised: String,
}

impl PollDriver {
    /// Binds the cluster listener (if `cfg.bind` is set); the thread is started with
    /// [`PollDriver::run`].
    pub fn bind(
        cfg: ClusterConfig,
        shared: Arc<NodeShared>,
        mesh: MeshEndpoint,
        control: Arc<ClusterControl>,
    ) -> std::io::Result<PollDriver> {
        let listener = match cfg.bind {
            Some(addr) => {
                if exposed_with_shipped_cookie(addr, &cfg.cookie) {
                    log::warn!(
                        "cluster: listening on {addr} with the shipped default cookie: anyone \
                         who can reach this port can join the cluster; set cluster.cookie \
                         (or bind cluster.bind to a loopback or private address)"
                    );
                }
                let l = TcpListener::bind(addr)?;
                l.set_nonblocking(true)?;
                Some(l)
            }
            None => None,
        };
        let port = listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .map(|a| a.port())
            .unwrap_or(DEFAULT_PORT);
        let host = shared
            .cfg
            .node_name
            .split_once('@')
            .map(|(_, h)| h.to_string())
            .unwrap_or_default();
        let advertised = match cfg.bind {
            Some(a) if !a.ip().is_unspecified() => format!("{}:{port}", a.ip()),
            _ => format!("{host}:{port}"),
        };
        let io = PollIo {
            listener,
            members_file: cfg.data_dir.join("cluster_members"),
        };
        Ok(PollDriver {
            cfg,
            shared,
            mesh,
            control,
            io,
            advertised,
        })
    }

    /// The address peers reach this node at.
    pub fn advertised(&self) -> &str {
        &self.advertised
    }

    /// Runs until `stop` is set.
    pub fn run(self, stop: &AtomicBool) {
        let clock = self.shared.clock;
        // The listener stays owned by the `PollIo` inside the core, which outlives the loop.
        let listener_fd = self.io.listener.as_ref().map(|l| l.as_raw_fd());
        let io = Box::new(self.io);
        let mut cluster = Cluster::new(
            self.cfg,
            self.shared,
            self.mesh,
            self.control,
            io,
            self.advertised,
        );
        cluster.start(clock.now_ms());
        while !stop.load(Ordering::Relaxed) {
            poll_once(&cluster, listener_fd, POLL_TIMEOUT_MS);
            cluster.turn(clock.now_ms());
        }
        cluster.finish();
    }
}

/// Sleeps until the doorbell rings, the listener or a link is ready, or `timeout_ms`.
fn poll_once(cluster: &Cluster, listener_fd: Option<RawFd>, timeout_ms: i32) {
    let mesh = cluster.mesh();
    let mut fds = vec![libc::pollfd {
        fd: mesh.doorbell().raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    if let Some(fd) = listener_fd {
        fds.push(libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        });
    }
    for (sock, interest) in cluster.link_interest() {
        let Some(fd) = sock.raw_fd() else { continue };
        let mut events = if interest.readable { libc::POLLIN } else { 0 };
        if interest.writable {
            events |= libc::POLLOUT;
        }
        fds.push(libc::pollfd {
            fd,
            events,
            revents: 0,
        });
    }
    if !mesh.park() {
        return;
    }
    // SAFETY: fds is a live array of pollfd of the given length.
    unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
    mesh.unpark();
    if fds[0].revents & libc::POLLIN != 0 {
        let mut b = [0u8; 8];
        // SAFETY: reads 8 bytes into a live buffer from our eventfd.
        unsafe { libc::read(fds[0].fd, b.as_mut_ptr() as *mut libc::c_void, 8) };
    }
}
