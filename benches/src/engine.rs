//! The load engine: one mio event loop per thread, each owning its share of the clients.
//!
//! Clients are small state machines (connect → CONNACK → SUBSCRIBE/SUBACK → publish). All the
//! packets a client produces in one loop turn leave in one `write`. Publishers stamp the
//! payload with the time the message was *scheduled* (open loop under `--rate`), and
//! subscribers record now − stamp, so queueing in the generator counts against the broker's
//! latency only if the generator falls behind its own schedule, which the progress line shows.

use crate::args::{Args, Mode, Scenario};
use bytes::BytesMut;
use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use shardmq_net::{
    decode, encode, encode_publish_header_parts, Connect, Packet, Properties, Protocol, PubResp,
    QoS, ReasonCode, Subscribe, SubscriptionOptions,
};
use std::io::{Read, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Marks a payload that carries a send timestamp ("SHMQBNCH").
pub const STAMP_MAGIC: u64 = 0x5348_4d51_424e_4348;

/// Counters shared by all threads and the reporter.
pub struct Shared {
    pub connected: AtomicU64,
    pub connect_failures: AtomicU64,
    pub subscribed: AtomicU64,
    pub sent: AtomicU64,
    pub acked: AtomicU64,
    pub received: AtomicU64,
    pub errors: AtomicU64,
    /// Sends the open-loop schedule wanted but no client could take (all windows full).
    pub behind: AtomicU64,
    pub stop: AtomicBool,
    pub latency_us: Mutex<Histogram<u64>>,
    /// Time from start to the last CONNACK, in µs.
    pub last_connack_us: AtomicU64,
}

impl Shared {
    pub fn new() -> Shared {
        Shared {
            connected: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
            subscribed: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            received: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            behind: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            latency_us: Mutex::new(
                Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds"),
            ),
            last_connack_us: AtomicU64::new(0),
        }
    }
}

impl Default for Shared {
    fn default() -> Self {
        Self::new()
    }
}

/// What one client does.
#[derive(Clone, Debug)]
pub enum Role {
    Idle,
    Sub(String),
    Pub(String),
}

/// One client to run: its sequence number, id and role.
#[derive(Clone, Debug)]
pub struct Spec {
    pub seq: usize,
    pub id: String,
    pub role: Role,
}

/// Expands `%i`, `%c` and `%rand_N` in a topic template.
pub fn expand_topic(template: &str, seq: usize, id: &str, rng: &mut u64) -> String {
    let mut out = template.replace("%i", &seq.to_string()).replace("%c", id);
    while let Some(pos) = out.find("%rand_") {
        let digits: String = out[pos + 6..]
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect();
        let n: u64 = digits.parse().unwrap_or(1).max(1);
        *rng ^= *rng << 13;
        *rng ^= *rng >> 7;
        *rng ^= *rng << 17;
        let value = (*rng % n) + 1;
        out.replace_range(pos..pos + 6 + digits.len(), &value.to_string());
    }
    out
}

/// The clients of a run, in order (subscribers first in `pubsub`).
pub fn plan(a: &Args) -> Vec<Spec> {
    // As emqtt-bench: <prefix>_<mode>_<pid>_<seq>, so two generators never take each other's
    // client ids; --shortids gives the bare sequence number.
    let mode = match a.mode {
        Mode::Conn => "conn",
        Mode::Sub => "sub",
        Mode::Pub => "pub",
        Mode::PubSub => "ps",
    };
    let pid = std::process::id();
    let id = |kind: &str, seq: usize| {
        if a.shortids {
            format!("{kind}{seq}")
        } else {
            format!("{}_{mode}_{pid}_{kind}{seq}", a.prefix)
        }
    };
    match a.mode {
        Mode::Conn | Mode::Sub | Mode::Pub => (0..a.count)
            .map(|k| {
                let seq = a.start_index + k;
                let cid = id("", seq);
                let role = match a.mode {
                    Mode::Conn => Role::Idle,
                    Mode::Sub => Role::Sub(a.topic.clone()),
                    _ => Role::Pub(a.topic.clone()),
                };
                Spec { seq, id: cid, role }
            })
            .collect(),
        Mode::PubSub => {
            let (subs, pubs) = match a.scenario {
                Scenario::FanIn => (1, a.pubs),
                Scenario::FanOut => (a.subs, a.pubs.max(1)),
                Scenario::Pairs => (a.pubs.max(a.subs), a.pubs.max(a.subs)),
            };
            let sub_topic = |i: usize| match a.scenario {
                Scenario::FanIn => "bench/#".to_string(),
                Scenario::FanOut => "bench/fanout".to_string(),
                Scenario::Pairs => format!("bench/{i}"),
            };
            let pub_topic = |i: usize| match a.scenario {
                Scenario::FanOut => "bench/fanout".to_string(),
                _ => format!("bench/{i}"),
            };
            let mut v: Vec<Spec> = (0..subs)
                .map(|i| Spec {
                    seq: i,
                    id: id("s", i),
                    role: Role::Sub(sub_topic(i)),
                })
                .collect();
            v.extend((0..pubs).map(|i| Spec {
                seq: i,
                id: id("p", i),
                role: Role::Pub(pub_topic(i)),
            }));
            v
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    Connecting,
    WaitConnAck,
    Ready,
    Closed,
}

struct Client {
    spec: Spec,
    stream: TcpStream,
    state: State,
    out: Vec<u8>,
    inbuf: Vec<u8>,
    inflight: usize,
    next_pid: u16,
    next_pub: Instant,
    last_tx: Instant,
}

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn protocol(v: u8) -> Protocol {
    match v {
        3 => Protocol::V31,
        5 => Protocol::V5,
        _ => Protocol::V311,
    }
}

fn qos(q: u8) -> QoS {
    QoS::from_u8(q).unwrap_or(QoS::AtMostOnce)
}

fn open(addr: SocketAddr, ifaddr: Option<std::net::IpAddr>) -> std::io::Result<TcpStream> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    sock.set_nonblocking(true)?;
    sock.set_nodelay(true)?;
    if let Some(ip) = ifaddr {
        sock.bind(&SocketAddr::new(ip, 0).into())?;
    }
    match sock.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(TcpStream::from_std(sock.into()))
}

/// Runs one thread's clients until the shared stop flag is set.
pub fn run_thread(
    thread: usize,
    threads: usize,
    a: Arc<Args>,
    specs: Vec<Spec>,
    shared: Arc<Shared>,
    started: Instant,
) {
    let proto = protocol(a.version);
    let addrs: Vec<SocketAddr> = a
        .hosts
        .iter()
        .filter_map(|h| {
            // A host may carry its own port (`host:port`), e.g. the nodes of a local cluster.
            let resolved = if h.parse::<std::net::Ipv6Addr>().is_err() && h.contains(':') {
                h.as_str().to_socket_addrs()
            } else {
                (h.as_str(), a.port).to_socket_addrs()
            };
            resolved.ok().and_then(|mut it| it.next())
        })
        .collect();
    if addrs.is_empty() {
        eprintln!("cannot resolve {:?}", a.hosts);
        shared.errors.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let mut poll = match Poll::new() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("poll: {e}");
            return;
        }
    };
    let mut events = Events::with_capacity(4096);
    let mut clients: Vec<Option<Client>> = Vec::with_capacity(specs.len());
    let mut pending = specs.into_iter();
    let mut next_connect = Instant::now();
    let mut scratch = BytesMut::with_capacity(64 * 1024);
    let mut rng: u64 = 0x9E37_79B9_7F4A_7C15 ^ (thread as u64 + 1);
    let mut local_hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
    let mut last_merge = Instant::now();
    // Open loop: this thread's share of the total rate.
    let thread_rate = if a.rate > 0 {
        (a.rate as f64 / threads as f64).max(0.001)
    } else {
        0.0
    };
    let send_gap = if thread_rate > 0.0 {
        Duration::from_secs_f64(1.0 / thread_rate)
    } else {
        Duration::ZERO
    };
    let mut next_send = Instant::now();
    let mut publishing = false;
    let mut rr = 0usize;
    let mut batch_left = 0usize;
    // Connections between connect() and CONNACK (or failure).
    let mut handshaking = 0usize;
    // Clients given output (or events) this turn: the ones to flush.
    let mut touched: Vec<usize> = Vec::new();
    let keepalive = Duration::from_secs(a.keepalive.max(1) as u64 / 2 + 1);
    let mut last_keepalive_sweep = Instant::now();
    let payload_size = a.size;
    let sub_target = match a.mode {
        Mode::PubSub => plan(&a)
            .iter()
            .filter(|s| matches!(s.role, Role::Sub(_)))
            .count() as u64,
        _ => 0,
    };

    while !shared.stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        // 1. Connect more clients.
        while now >= next_connect && (a.max_connecting == 0 || handshaking < a.max_connecting) {
            let Some(spec) = pending.next() else { break };
            let idx = clients.len();
            let addr = addrs[spec.seq % addrs.len()];
            let ifaddr = (!a.ifaddrs.is_empty()).then(|| a.ifaddrs[spec.seq % a.ifaddrs.len()]);
            match open(addr, ifaddr) {
                Ok(mut stream) => {
                    if poll
                        .registry()
                        .register(
                            &mut stream,
                            Token(idx),
                            Interest::READABLE | Interest::WRITABLE,
                        )
                        .is_err()
                    {
                        shared.connect_failures.fetch_add(1, Ordering::Relaxed);
                        clients.push(None);
                        continue;
                    }
                    handshaking += 1;
                    clients.push(Some(Client {
                        spec,
                        stream,
                        state: State::Connecting,
                        out: Vec::new(),
                        inbuf: Vec::new(),
                        inflight: 0,
                        next_pid: 1,
                        next_pub: now,
                        last_tx: now,
                    }));
                }
                Err(e) => {
                    if shared.connect_failures.fetch_add(1, Ordering::Relaxed) == 0 {
                        eprintln!("connect to {addr}: {e}");
                    }
                    clients.push(None);
                }
            }
            if !a.connect_interval.is_zero() {
                next_connect += a.connect_interval;
                break;
            }
        }
        // 2. Events.
        let timeout = if thread_rate > 0.0 {
            Duration::from_micros(200)
        } else {
            Duration::from_millis(5)
        };
        if poll.poll(&mut events, Some(timeout)).is_err() {
            continue;
        }
        for ev in events.iter() {
            let idx = ev.token().0;
            let Some(Some(c)) = clients.get_mut(idx) else {
                continue;
            };
            let was_handshaking = matches!(c.state, State::Connecting | State::WaitConnAck);
            touched.push(idx);
            if c.state == State::Connecting && (ev.is_writable() || ev.is_readable()) {
                if c.stream.peer_addr().is_err() {
                    shared.connect_failures.fetch_add(1, Ordering::Relaxed);
                    c.state = State::Closed;
                    handshaking -= 1;
                    continue;
                }
                c.state = State::WaitConnAck;
                let connect = Connect {
                    protocol: proto,
                    clean_start: a.clean,
                    keep_alive: a.keepalive,
                    client_id: c.spec.id.clone(),
                    will: None,
                    username: a.username.clone(),
                    password: a.password.clone().map(Into::into),
                    properties: Properties::default(),
                };
                encode(&Packet::Connect(Box::new(connect)), proto, &mut scratch);
                c.out.extend_from_slice(&scratch.split());
            }
            if ev.is_readable() {
                on_readable(
                    c,
                    proto,
                    &a,
                    &shared,
                    &mut scratch,
                    &mut local_hist,
                    started,
                );
            }
            if was_handshaking && !matches!(c.state, State::Connecting | State::WaitConnAck) {
                handshaking -= 1;
            }
        }
        // 3. Publish.
        let may_publish = match a.mode {
            Mode::PubSub => shared.subscribed.load(Ordering::Relaxed) >= sub_target,
            Mode::Pub => true,
            _ => false,
        };
        if may_publish && !publishing {
            // The open-loop schedule starts when publishing can start, not at launch.
            publishing = true;
            next_send = Instant::now();
        }
        if may_publish {
            let now = Instant::now();
            if thread_rate > 0.0 {
                let mut budget = 10_000;
                while next_send <= now && budget > 0 && !shared.stop.load(Ordering::Relaxed) {
                    budget -= 1;
                    let scheduled = unix_ns() - now.duration_since(next_send).as_nanos() as u64;
                    next_send += send_gap;
                    let n = clients.len();
                    let mut done = false;
                    // Stay on the last publisher for `batch` messages, then move on.
                    let start = if batch_left > 0 { rr + n - 1 } else { rr };
                    for k in 0..n {
                        let idx = (start + k) % n;
                        let Some(Some(c)) = clients.get_mut(idx) else {
                            continue;
                        };
                        if c.state != State::Ready || !matches!(c.spec.role, Role::Pub(_)) {
                            continue;
                        }
                        if a.qos > 0 && c.inflight >= a.inflight {
                            continue;
                        }
                        if idx + 1 != rr || batch_left == 0 {
                            batch_left = a.batch;
                        }
                        batch_left -= 1;
                        rr = idx + 1;
                        if !claim(&a, &shared) {
                            break;
                        }
                        publish(
                            c,
                            &a,
                            proto,
                            scheduled,
                            payload_size,
                            &mut scratch,
                            &mut rng,
                        );
                        touched.push(idx);
                        done = true;
                        break;
                    }
                    if !done {
                        shared.behind.fetch_add(1, Ordering::Relaxed);
                    }
                }
            } else {
                for (idx, c) in clients.iter_mut().enumerate() {
                    let Some(c) = c else { continue };
                    if c.state != State::Ready
                        || !matches!(c.spec.role, Role::Pub(_))
                        || c.next_pub > now
                    {
                        continue;
                    }
                    if a.qos > 0 && c.inflight >= a.inflight {
                        continue;
                    }
                    if !claim(&a, &shared) {
                        break;
                    }
                    c.next_pub += a.publish_interval;
                    if c.next_pub < now {
                        c.next_pub = now + a.publish_interval;
                    }
                    publish(
                        c,
                        &a,
                        proto,
                        unix_ns(),
                        payload_size,
                        &mut scratch,
                        &mut rng,
                    );
                    touched.push(idx);
                }
            }
        }
        // 4. Keep-alive pings for quiet clients.
        if last_keepalive_sweep.elapsed() >= Duration::from_millis(500) {
            last_keepalive_sweep = Instant::now();
            for (idx, c) in clients.iter_mut().enumerate() {
                let Some(c) = c else { continue };
                if c.state == State::Ready && c.last_tx.elapsed() >= keepalive {
                    c.out.extend_from_slice(&[0xC0, 0x00]);
                    touched.push(idx);
                }
            }
        }
        // 5. Flush what this turn touched (scanning every client each turn would cost more
        // than the I/O with thousands of mostly idle connections).
        for idx in touched.drain(..) {
            let Some(Some(c)) = clients.get_mut(idx) else {
                continue;
            };
            if c.out.is_empty() || c.state == State::Connecting || c.state == State::Closed {
                continue;
            }
            match c.stream.write(&c.out) {
                Ok(n) => {
                    c.out.drain(..n);
                    c.last_tx = Instant::now();
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => {
                    if c.state == State::WaitConnAck {
                        handshaking -= 1;
                    }
                    c.state = State::Closed;
                    shared.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        if last_merge.elapsed() >= Duration::from_millis(200) {
            last_merge = Instant::now();
            if let Ok(mut h) = shared.latency_us.lock() {
                let _ = h.add(&local_hist);
            }
            local_hist.reset();
        }
    }
    if let Ok(mut h) = shared.latency_us.lock() {
        let _ = h.add(&local_hist);
    }
    // Polite goodbye, so brokers do not publish wills or keep sessions waiting.
    for c in clients.iter_mut().flatten() {
        if c.state == State::Ready {
            let _ = c.stream.write(&[0xE0, 0x00]);
        }
    }
}

/// Takes one message from the run's limit; false when the limit is reached.
fn claim(a: &Args, shared: &Shared) -> bool {
    if a.limit == 0 || a.mode == Mode::Sub {
        shared.sent.fetch_add(1, Ordering::Relaxed);
        return true;
    }
    let prev = shared.sent.fetch_add(1, Ordering::Relaxed);
    if prev >= a.limit {
        shared.sent.fetch_sub(1, Ordering::Relaxed);
        return false;
    }
    true
}

fn publish(
    c: &mut Client,
    a: &Args,
    proto: Protocol,
    stamp_ns: u64,
    size: usize,
    scratch: &mut BytesMut,
    rng: &mut u64,
) {
    let Role::Pub(template) = &c.spec.role else {
        return;
    };
    let topic = expand_topic(template, c.spec.seq, &c.spec.id, rng);
    let mut payload = vec![0u8; size];
    if size >= 16 {
        payload[..8].copy_from_slice(&stamp_ns.to_be_bytes());
        payload[8..16].copy_from_slice(&STAMP_MAGIC.to_be_bytes());
    }
    let pid = if a.qos > 0 {
        let id = c.next_pid;
        c.next_pid = if id == u16::MAX { 1 } else { id + 1 };
        c.inflight += 1;
        id
    } else {
        0
    };
    let empty = Properties::default();
    let props = proto.is_v5().then_some(&empty);
    encode_publish_header_parts(
        &topic,
        qos(a.qos),
        false,
        a.retain,
        pid,
        props,
        payload.len(),
        scratch,
    );
    c.out.extend_from_slice(&scratch.split());
    c.out.extend_from_slice(&payload);
}

fn on_readable(
    c: &mut Client,
    proto: Protocol,
    a: &Args,
    shared: &Shared,
    scratch: &mut BytesMut,
    hist: &mut Histogram<u64>,
    started: Instant,
) {
    let mut buf = [0u8; 64 * 1024];
    loop {
        match c.stream.read(&mut buf) {
            Ok(0) => {
                if c.state != State::Closed {
                    c.state = State::Closed;
                    shared.errors.fetch_add(1, Ordering::Relaxed);
                }
                return;
            }
            Ok(n) => c.inbuf.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(_) => {
                c.state = State::Closed;
                shared.errors.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
    }
    let mut off = 0;
    loop {
        match decode(&c.inbuf[off..], proto, u32::MAX) {
            Ok(Some((packet, used))) => {
                off += used;
                on_packet(c, packet, proto, a, shared, scratch, hist, started);
            }
            Ok(None) => break,
            Err(e) => {
                eprintln!("{}: bad packet from broker: {e}", c.spec.id);
                shared.errors.fetch_add(1, Ordering::Relaxed);
                c.state = State::Closed;
                break;
            }
        }
    }
    c.inbuf.drain(..off);
}

#[allow(clippy::too_many_arguments)]
fn on_packet(
    c: &mut Client,
    packet: Packet,
    proto: Protocol,
    a: &Args,
    shared: &Shared,
    scratch: &mut BytesMut,
    hist: &mut Histogram<u64>,
    started: Instant,
) {
    let packet_kind = packet.packet_type();
    match packet {
        Packet::ConnAck(ack) => {
            if ack.reason.is_error() {
                eprintln!("{}: CONNACK refused: {:?}", c.spec.id, ack.reason);
                shared.connect_failures.fetch_add(1, Ordering::Relaxed);
                c.state = State::Closed;
                return;
            }
            shared.connected.fetch_add(1, Ordering::Relaxed);
            shared
                .last_connack_us
                .fetch_max(started.elapsed().as_micros() as u64, Ordering::Relaxed);
            c.state = State::Ready;
            if let Role::Sub(filter) = &c.spec.role {
                let mut rng = c.spec.seq as u64 + 1;
                let base = expand_topic(filter, c.spec.seq, &c.spec.id, &mut rng);
                let options = SubscriptionOptions {
                    qos: qos(a.qos),
                    ..Default::default()
                };
                let filters: Vec<String> = if a.subs_per_client <= 1 {
                    vec![base]
                } else {
                    let base = if base.contains("%k") {
                        base
                    } else {
                        format!("{base}/%k")
                    };
                    (0..a.subs_per_client)
                        .map(|k| {
                            // Every 10th filter carries a wildcard level, as real fleets do.
                            let level = if k % 10 == 9 {
                                format!("+/{k}")
                            } else {
                                k.to_string()
                            };
                            base.replace("%k", &level)
                        })
                        .collect()
                };
                for (n, chunk) in filters.chunks(100).enumerate() {
                    let sub = Subscribe {
                        packet_id: n as u16 + 1,
                        filters: chunk.iter().map(|f| (f.clone(), options)).collect(),
                        properties: Properties::default(),
                    };
                    encode(&Packet::Subscribe(sub), proto, scratch);
                    c.out.extend_from_slice(&scratch.split());
                }
            }
        }
        Packet::SubAck(_) => {
            shared.subscribed.fetch_add(1, Ordering::Relaxed);
        }
        Packet::Publish(p) => {
            shared.received.fetch_add(1, Ordering::Relaxed);
            if p.payload.len() >= 16
                && u64::from_be_bytes(p.payload[8..16].try_into().expect("8 bytes")) == STAMP_MAGIC
            {
                let sent = u64::from_be_bytes(p.payload[..8].try_into().expect("8 bytes"));
                let us = unix_ns().saturating_sub(sent) / 1000;
                let _ = hist.record(us.clamp(1, 60_000_000));
            }
            let resp = PubResp {
                packet_id: p.packet_id,
                ..Default::default()
            };
            match p.qos {
                QoS::AtMostOnce => {}
                QoS::AtLeastOnce => encode(&Packet::PubAck(resp), proto, scratch),
                QoS::ExactlyOnce => encode(&Packet::PubRec(resp), proto, scratch),
            }
            c.out.extend_from_slice(&scratch.split());
            if a.mode == Mode::Sub
                && a.limit > 0
                && shared.received.load(Ordering::Relaxed) >= a.limit
            {
                shared.stop.store(true, Ordering::Relaxed);
            }
        }
        Packet::PubAck(_) | Packet::PubComp(_) => {
            c.inflight = c.inflight.saturating_sub(1);
            shared.acked.fetch_add(1, Ordering::Relaxed);
        }
        Packet::PubRec(r) | Packet::PubRel(r) => {
            let next = if packet_kind == 5 {
                Packet::PubRel(PubResp::new(r.packet_id, ReasonCode::Success))
            } else {
                Packet::PubComp(PubResp::new(r.packet_id, ReasonCode::Success))
            };
            encode(&next, proto, scratch);
            c.out.extend_from_slice(&scratch.split());
        }
        Packet::Disconnect(d) => {
            eprintln!("{}: DISCONNECT from broker: {:?}", c.spec.id, d.reason);
            c.state = State::Closed;
            shared.errors.fetch_add(1, Ordering::Relaxed);
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::parse;

    #[test]
    fn topic_templates_expand() {
        let mut rng = 7;
        assert_eq!(expand_topic("t/%i/%c", 3, "cid", &mut rng), "t/3/cid");
        for _ in 0..50 {
            let t = expand_topic("r/%rand_5", 0, "c", &mut rng);
            let n: u64 = t[2..].parse().unwrap();
            assert!((1..=5).contains(&n), "{t}");
        }
    }

    #[test]
    fn pubsub_scenarios_plan_the_right_clients() {
        let a = parse(&["pubsub", "--scenario", "fanin", "--pubs", "5"].map(String::from)).unwrap();
        let p = plan(&a);
        assert_eq!(
            p.iter().filter(|s| matches!(s.role, Role::Sub(_))).count(),
            1
        );
        assert_eq!(
            p.iter().filter(|s| matches!(s.role, Role::Pub(_))).count(),
            5
        );
        let a = parse(&["pubsub", "--scenario", "pairs", "--pubs", "3"].map(String::from)).unwrap();
        let p = plan(&a);
        assert!(matches!(&p[0].role, Role::Sub(t) if t == "bench/0"));
        assert!(matches!(&p[3].role, Role::Pub(t) if t == "bench/0"));
    }
}
