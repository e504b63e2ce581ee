//! Starting and stopping the shards of one node.
//!
//! Listeners are bound here, before any thread starts, so a bad address fails start-up with a
//! clear error; each shard then builds its own ring on its own pinned thread and reports back
//! before the node is declared running.

use crate::cluster::PollDriver;
use crate::config::BrokerConfig;
use crate::mesh::{self, Doorbell};
use crate::metrics::Metrics;
use crate::node_shared::{ClusterControl, NodeShared};
use crate::ring_driver::RingDriver;
use socket2::{Domain, Protocol as SockProtocol, Socket, Type};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("io_uring is unavailable ({0}); shardmq needs Linux >= 6.0 with io_uring enabled (see /proc/sys/kernel/io_uring_disabled and any seccomp profile)")]
    IoUring(std::io::Error),
    #[error("node.shards = {0} is out of range 1..={max}", max = crate::shard_set::SHARDS_MAX)]
    Shards(usize),
    #[error("cannot start shard thread: {0}")]
    Thread(std::io::Error),
}

/// A running node: its shard threads and what they share.
pub struct Node {
    shared: Arc<NodeShared>,
    doorbells: Vec<Arc<Doorbell>>,
    threads: Vec<JoinHandle<()>>,
    cluster_thread: JoinHandle<()>,
}

impl Node {
    /// Binds the listeners and starts `cfg.shards` shards.
    ///
    /// ```no_run
    /// let node = shardmq_shards::Node::start(shardmq_shards::BrokerConfig::default()).unwrap();
    /// node.shutdown();
    /// ```
    pub fn start(cfg: BrokerConfig) -> Result<Node, StartError> {
        if cfg.shards == 0 || cfg.shards > crate::shard_set::SHARDS_MAX {
            return Err(StartError::Shards(cfg.shards));
        }
        let listeners = (0..cfg.shards)
            .map(|_| {
                listen(&cfg).map_err(|source| StartError::Listen {
                    addr: cfg.bind,
                    source,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut endpoints = mesh::build(cfg.shards).map_err(StartError::Thread)?;
        let doorbells: Vec<Arc<Doorbell>> = (0..=cfg.shards)
            .map(|i| endpoints[0].doorbell_of(i))
            .collect();
        let cluster_endpoint = endpoints.pop().expect("the mesh has a cluster endpoint");
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let cluster_cfg = cfg.cluster.clone();
        let cluster_bind = cluster_cfg.bind;
        let shared = Arc::new(NodeShared {
            cfg,
            metrics: Metrics::default(),
            shutdown: AtomicBool::new(false),
            cluster: Arc::new(ClusterControl::default()),
            cluster_bell: doorbells[doorbells.len() - 1].clone(),
            clock: crate::clock::NodeClock::start(),
        });
        let cluster = PollDriver::bind(
            cluster_cfg,
            shared.clone(),
            cluster_endpoint,
            shared.cluster.clone(),
        )
        .map_err(|source| StartError::Listen {
            addr: cluster_bind.unwrap_or_else(|| "0.0.0.0:0".parse().expect("literal")),
            source,
        })?;
        let cluster_shared = shared.clone();
        let cluster_thread = std::thread::Builder::new()
            .name("cluster".into())
            .spawn(move || cluster.run(&cluster_shared.shutdown))
            .map_err(StartError::Thread)?;
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), std::io::Error>>();
        let mut threads = Vec::new();
        for (endpoint, listener) in endpoints.into_iter().zip(listeners) {
            let id = endpoint.id;
            let shared = shared.clone();
            let ready = ready_tx.clone();
            let t = std::thread::Builder::new()
                .name(format!("shard-{id}"))
                .spawn(move || {
                    pin_to_core(id % cores);
                    match RingDriver::new(shared.clone(), endpoint, listener) {
                        Ok(shard) => {
                            let _ = ready.send(Ok(()));
                            if let Err(e) = shard.run() {
                                log::error!("shard {id} failed: {e}");
                                shared.shutdown.store(true, Ordering::Relaxed);
                            }
                        }
                        Err(e) => {
                            let _ = ready.send(Err(e));
                        }
                    }
                })
                .map_err(StartError::Thread)?;
            threads.push(t);
        }
        drop(ready_tx);
        let node = Node {
            shared,
            doorbells,
            threads,
            cluster_thread,
        };
        for _ in 0..node.threads.len() {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    node.stop_threads();
                    return Err(StartError::IoUring(e));
                }
                Err(_) => {
                    node.stop_threads();
                    return Err(StartError::Thread(std::io::Error::other(
                        "shard thread died",
                    )));
                }
            }
        }
        Ok(node)
    }

    /// Node-wide counters.
    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// A handle to the node's shared state for threads outside the shards (management API).
    pub fn shared(&self) -> Arc<NodeShared> {
        self.shared.clone()
    }

    /// Number of shards running.
    pub fn shards(&self) -> usize {
        self.threads.len()
    }

    /// True once any shard has stopped the node (a fatal shard error).
    pub fn is_stopping(&self) -> bool {
        self.shared.shutdown.load(Ordering::Relaxed)
    }

    fn stop_threads(&self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        for d in &self.doorbells {
            d.ring();
        }
    }

    /// Closes every connection and stops every shard, waiting for them.
    pub fn shutdown(self) {
        self.stop_threads();
        for t in self.threads {
            let _ = t.join();
        }
        let _ = self.cluster_thread.join();
    }
}

fn listen(cfg: &BrokerConfig) -> std::io::Result<OwnedFd> {
    let socket = Socket::new(
        Domain::for_address(cfg.bind),
        Type::STREAM,
        Some(SockProtocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    // Accepted sockets inherit TCP_NODELAY from the listener on Linux: no setsockopt per
    // connection.
    socket.set_nodelay(true)?;
    socket.set_nonblocking(true)?;
    socket.set_cloexec(true)?;
    if cfg.bind.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.bind(&cfg.bind.into())?;
    socket.listen(cfg.backlog)?;
    Ok(socket.into())
}

fn pin_to_core(core: usize) {
    // SAFETY: cpu_set_t is plain data; sched_setaffinity only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(core, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            log::debug!("could not pin shard thread to core {core}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, FromRawFd};

    #[test]
    fn accepted_sockets_inherit_nodelay_from_the_listener() {
        let cfg = BrokerConfig {
            bind: "127.0.0.1:0".parse().unwrap(),
            ..Default::default()
        };
        let listener = listen(&cfg).unwrap();
        let addr = Socket::from(listener.try_clone().unwrap())
            .local_addr()
            .unwrap()
            .as_socket()
            .unwrap();
        let _client = std::net::TcpStream::connect(addr).unwrap();
        let accepted = loop {
            // SAFETY: accept on a listener we own; a non-negative result is a new descriptor.
            let fd = unsafe {
                libc::accept(
                    listener.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                )
            };
            if fd >= 0 {
                // SAFETY: fd was just returned by accept and is owned by nobody else.
                break unsafe { OwnedFd::from_raw_fd(fd) };
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        assert!(Socket::from(accepted).nodelay().unwrap());
    }
}
