//! Shared harness of the integration tests: a real `shardmq` process per test, a rumqttc
//! client wrapper, and a raw TCP client that writes hand-made MQTT bytes (independent of the
//! project's own codec) for precise protocol control and bad input.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Default wait for anything that should happen.
pub const WAIT: Duration = Duration::from_secs(5);

/// A broker process on free loopback ports, stopped (SIGTERM, then SIGKILL) on drop.
pub struct Broker {
    pub child: Option<Child>,
    pub port: u16,
    pub dir: PathBuf,
    log: PathBuf,
}

/// A port for a broker to listen on, below the kernel's ephemeral range: a port the kernel
/// picked (bind to 0) can be taken by an outgoing connection (a cluster link, another test's
/// client) before the broker binds it. Random, so parallel test processes rarely collide, and
/// checked free by binding it once.
pub fn free_port() -> u16 {
    let low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768)
        .max(10_001);
    let mut state = {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos(),
        );
        h.finish() | 1
    };
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..1000 {
        // xorshift64: the generator only spreads picks, it guards nothing.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let port = 10_000 + (state % u64::from(low - 10_000)) as u16;
        if !handed_out.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            handed_out.push(port);
            return port;
        }
    }
    panic!("no free port below the ephemeral range");
}

impl Broker {
    /// Starts `shardmq start` with 2 shards and the given `SHARDMQ_*` overrides
    /// (keys without the prefix, e.g. `("MQTT__MAX_QUEUED_MESSAGES", "5")`).
    pub fn start(overrides: &[(&str, &str)]) -> Broker {
        Self::try_start(overrides).unwrap_or_else(|log| panic!("broker did not start:\n{log}"))
    }

    /// Like [`Broker::start`] but returns the log if the broker exits or never listens.
    pub fn try_start(overrides: &[(&str, &str)]) -> Result<Broker, String> {
        Self::try_start_with(overrides, |_| {})
    }

    /// Like [`Broker::try_start`], with a last say on the command (limits, for instance).
    pub fn try_start_with(
        overrides: &[(&str, &str)],
        configure: impl FnOnce(&mut Command),
    ) -> Result<Broker, String> {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("shardmq-it-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("broker.log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_shardmq"));
        cmd.arg("start")
            .env(
                "SHARDMQ_LISTENERS__TCP__DEFAULT__BIND",
                format!("127.0.0.1:{port}"),
            )
            .env("SHARDMQ_NODE__SHARDS", "2")
            .env("SHARDMQ_NODE__DATA_DIR", dir.join("data"))
            .env("SHARDMQ_MANAGEMENT__BIND", "")
            .env("SHARDMQ_CLUSTER__BIND", "");
        for (k, v) in overrides {
            cmd.env(format!("SHARDMQ_{k}"), v);
        }
        configure(&mut cmd);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut b = Broker {
            child: Some(child),
            port,
            dir,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(status) = b.child.as_mut().unwrap().try_wait().unwrap() {
                return Err(format!("exited with {status}:\n{}", b.log()));
            }
            if TcpStream::connect(b.addr()).is_ok() {
                return Ok(b);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!("not listening after 10 s:\n{}", b.log()))
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The log once it holds `needle` (it is written by another thread than the one that
    /// accepts connections, so a connection can succeed before a line appears), or after
    /// `timeout` whatever it holds.
    pub fn log_with(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log();
            if log.contains(needle) || Instant::now() >= deadline {
                return log;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Resident memory of the broker process in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap()
    }

    /// Sends SIGTERM and waits up to `timeout` for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(s) = child.try_wait().unwrap() {
                self.child = None;
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if self.child.is_some() && self.terminate(Duration::from_secs(5)).is_none() {
            if let Some(mut c) = self.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        if std::thread::panicking() {
            eprintln!("---- broker log ----\n{}", self.log());
        }
        if self.log().contains("panicked") {
            eprintln!("---- broker log ----\n{}", self.log());
            if !std::thread::panicking() {
                panic!("the broker panicked");
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ------------------------------------------------------------------------------ raw client

/// MQTT remaining-length encoding.
fn varint(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
}

/// A UTF-8 / binary field with its 2-byte length.
pub fn field(s: &[u8]) -> Vec<u8> {
    let mut v = (s.len() as u16).to_be_bytes().to_vec();
    v.extend_from_slice(s);
    v
}

/// A packet from its first byte and body.
pub fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![first];
    varint(body.len(), &mut v);
    v.extend_from_slice(body);
    v
}

/// CONNECT for 3.1.1 (level 4) or 5 (level 5, empty properties).
pub fn connect_packet(
    level: u8,
    client_id: &str,
    clean: bool,
    keep_alive: u16,
    will: Option<(&str, &[u8], u8)>,
) -> Vec<u8> {
    let mut body = field(b"MQTT");
    body.push(level);
    let mut flags = if clean { 0x02 } else { 0 };
    if let Some((_, _, qos)) = will {
        flags |= 0x04 | (qos << 3);
    }
    body.push(flags);
    body.extend_from_slice(&keep_alive.to_be_bytes());
    if level == 5 {
        body.push(0);
    }
    body.extend(field(client_id.as_bytes()));
    if let Some((topic, payload, _)) = will {
        if level == 5 {
            body.push(0);
        }
        body.extend(field(topic.as_bytes()));
        body.extend(field(payload));
    }
    packet(0x10, &body)
}

/// A v5 CONNECT (clean start) with the given keep-alive and property bytes (< 128 bytes).
pub fn connect_v5(client_id: &str, keep_alive: u16, props: &[u8]) -> Vec<u8> {
    let mut body = field(b"MQTT");
    body.extend_from_slice(&[5, 0x02]);
    body.extend_from_slice(&keep_alive.to_be_bytes());
    body.push(props.len() as u8);
    body.extend_from_slice(props);
    body.extend(field(client_id.as_bytes()));
    packet(0x10, &body)
}

/// A v5 PUBLISH with the given property bytes (< 128 bytes).
pub fn publish_v5(topic: &str, qos: u8, pid: u16, props: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut body = field(topic.as_bytes());
    if qos > 0 {
        body.extend_from_slice(&pid.to_be_bytes());
    }
    body.push(props.len() as u8);
    body.extend_from_slice(props);
    body.extend_from_slice(payload);
    packet(0x30 | qos << 1, &body)
}

pub fn subscribe_packet(level: u8, pid: u16, filter: &str, qos: u8) -> Vec<u8> {
    let mut body = pid.to_be_bytes().to_vec();
    if level == 5 {
        body.push(0);
    }
    body.extend(field(filter.as_bytes()));
    body.push(qos);
    packet(0x82, &body)
}

pub fn publish_packet(
    topic: &str,
    payload: &[u8],
    qos: u8,
    pid: u16,
    dup: bool,
    retain: bool,
) -> Vec<u8> {
    let mut body = field(topic.as_bytes());
    if qos > 0 {
        body.extend_from_slice(&pid.to_be_bytes());
    }
    body.extend_from_slice(payload);
    packet(0x30 | (dup as u8) << 3 | qos << 1 | retain as u8, &body)
}

pub fn ack_packet(first: u8, pid: u16) -> Vec<u8> {
    packet(first, &pid.to_be_bytes())
}

/// One decoded packet: first byte and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Raw {
    pub first: u8,
    pub body: Vec<u8>,
}

impl Raw {
    pub fn kind(&self) -> u8 {
        self.first >> 4
    }
    /// (topic, packet id, payload) of a 3.1.1 PUBLISH.
    pub fn publish(&self) -> (String, u16, Vec<u8>) {
        assert_eq!(self.kind(), 3, "not a PUBLISH: {self:?}");
        let n = u16::from_be_bytes([self.body[0], self.body[1]]) as usize;
        let topic = String::from_utf8(self.body[2..2 + n].to_vec()).unwrap();
        let qos = (self.first >> 1) & 3;
        let mut at = 2 + n;
        let mut pid = 0;
        if qos > 0 {
            pid = u16::from_be_bytes([self.body[at], self.body[at + 1]]);
            at += 2;
        }
        (topic, pid, self.body[at..].to_vec())
    }
    pub fn dup(&self) -> bool {
        self.first & 0x08 != 0
    }
    pub fn retain(&self) -> bool {
        self.first & 0x01 != 0
    }
    pub fn qos(&self) -> u8 {
        (self.first >> 1) & 3
    }
}

/// A TCP client speaking hand-written MQTT.
pub struct RawClient {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl RawClient {
    pub fn connect(addr: SocketAddr) -> RawClient {
        Self::from_stream(TcpStream::connect(addr).unwrap())
    }

    pub fn from_stream(stream: TcpStream) -> RawClient {
        stream.set_nodelay(true).unwrap();
        RawClient {
            stream,
            buf: Vec::new(),
        }
    }

    /// Connects and completes a 3.1.1 CONNECT; returns (client, session present).
    pub fn mqtt(addr: SocketAddr, client_id: &str, clean: bool) -> (RawClient, bool) {
        let mut c = RawClient::connect(addr);
        c.send(&connect_packet(4, client_id, clean, 60, None));
        let ack = c.recv(WAIT).expect("CONNACK");
        assert_eq!(
            (ack.first, ack.body[1]),
            (0x20, 0),
            "CONNACK refused: {ack:?}"
        );
        (c, ack.body[0] & 1 == 1)
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// Sends, ignoring a connection the broker already closed.
    pub fn try_send(&mut self, bytes: &[u8]) -> bool {
        self.stream.write_all(bytes).is_ok()
    }

    /// Next packet within `timeout`; `None` on timeout, EOF or reset.
    pub fn recv(&mut self, timeout: Duration) -> Option<Raw> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(p) = self.parse() {
                return Some(p);
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            self.stream
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .unwrap();
            let mut tmp = [0u8; 65536];
            match self.stream.read(&mut tmp) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
                Err(_) => return None,
            }
        }
    }

    fn parse(&mut self) -> Option<Raw> {
        if self.buf.len() < 2 {
            return None;
        }
        let mut len = 0usize;
        let mut mult = 1usize;
        let mut i = 1;
        loop {
            let b = *self.buf.get(i)?;
            len += (b & 0x7F) as usize * mult;
            mult *= 128;
            i += 1;
            if b & 0x80 == 0 {
                break;
            }
        }
        if self.buf.len() < i + len {
            return None;
        }
        let raw = Raw {
            first: self.buf[0],
            body: self.buf[i..i + len].to_vec(),
        };
        self.buf.drain(..i + len);
        Some(raw)
    }

    /// True if the broker closes the connection within `timeout` (packets before EOF are
    /// skipped).
    pub fn closed_within(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return false;
            };
            self.stream
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .unwrap();
            let mut tmp = [0u8; 65536];
            match self.stream.read(&mut tmp) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    return false
                }
                Err(_) => return true,
            }
        }
    }

    /// Subscribes (3.1.1) and waits for SUBACK; returns its return code.
    pub fn subscribe(&mut self, pid: u16, filter: &str, qos: u8) -> u8 {
        self.send(&subscribe_packet(4, pid, filter, qos));
        let ack = self.recv(WAIT).expect("SUBACK");
        assert_eq!(ack.kind(), 9, "expected SUBACK, got {ack:?}");
        ack.body[2]
    }

    /// PINGREQ / PINGRESP round trip: proves the connection is alive and served.
    pub fn ping(&mut self) -> bool {
        if !self.try_send(&[0xC0, 0]) {
            return false;
        }
        matches!(self.recv(WAIT), Some(Raw { first: 0xD0, .. }))
    }
}

/// Proves the broker still serves: a fresh subscriber gets a fresh publish.
pub fn assert_broker_serves(b: &Broker) {
    let topic = format!("alive/{}", free_port());
    let (mut sub, _) = RawClient::mqtt(b.addr(), &format!("alive-sub-{topic}"), true);
    assert_eq!(sub.subscribe(1, &topic, 1), 1);
    let (mut publisher, _) = RawClient::mqtt(b.addr(), &format!("alive-pub-{topic}"), true);
    publisher.send(&publish_packet(&topic, b"ok", 1, 1, false, false));
    let msg = sub.recv(WAIT).expect("the broker stopped delivering");
    assert_eq!(msg.publish().2, b"ok");
}

// ------------------------------------------------------------------------------ rumqttc

pub mod v311 {
    use super::*;
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    use tokio::sync::mpsc;

    /// A rumqttc 3.1.1 client whose incoming PUBLISH packets are collected.
    pub struct Client {
        pub client: AsyncClient,
        pub rx: mpsc::UnboundedReceiver<rumqttc::Publish>,
        pub session_present: bool,
        task: tokio::task::JoinHandle<()>,
    }

    pub fn qos(q: u8) -> QoS {
        match q {
            0 => QoS::AtMostOnce,
            1 => QoS::AtLeastOnce,
            _ => QoS::ExactlyOnce,
        }
    }

    impl Client {
        pub async fn connect(b: &Broker, id: &str, clean: bool) -> Client {
            Self::connect_with(b, id, clean, |_| {}).await
        }

        pub async fn connect_with(
            b: &Broker,
            id: &str,
            clean: bool,
            f: impl FnOnce(&mut MqttOptions),
        ) -> Client {
            let mut opts = MqttOptions::new(id, "127.0.0.1", b.port);
            opts.set_clean_session(clean);
            opts.set_keep_alive(Duration::from_secs(30));
            f(&mut opts);
            let (client, mut ev) = AsyncClient::new(opts, 1000);
            let (tx, rx) = mpsc::unbounded_channel();
            let (ack_tx, mut ack_rx) = mpsc::unbounded_channel();
            let task = tokio::spawn(async move {
                loop {
                    match ev.poll().await {
                        Ok(Event::Incoming(Packet::Publish(p))) => {
                            let _ = tx.send(p);
                        }
                        Ok(Event::Incoming(Packet::ConnAck(a))) => {
                            let _ = ack_tx.send(a.session_present);
                        }
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
            });
            let session_present = tokio::time::timeout(WAIT, ack_rx.recv())
                .await
                .expect("CONNACK in time")
                .expect("connected");
            Client {
                client,
                rx,
                session_present,
                task,
            }
        }

        pub async fn subscribe(&self, filter: &str, q: u8) {
            self.client.subscribe(filter, qos(q)).await.unwrap();
            // SUBACK is asynchronous in rumqttc: a ping round trip after it orders us behind it.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        pub async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>, q: u8, retain: bool) {
            self.client
                .publish(topic, qos(q), retain, payload.into())
                .await
                .unwrap();
        }

        pub async fn next(&mut self) -> rumqttc::Publish {
            tokio::time::timeout(WAIT, self.rx.recv())
                .await
                .expect("a message in time")
                .expect("client running")
        }

        pub async fn collect(&mut self, n: usize) -> Vec<rumqttc::Publish> {
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                v.push(self.next().await);
            }
            v
        }

        /// Asserts nothing arrives for `wait`.
        pub async fn nothing_for(&mut self, wait: Duration) {
            if let Ok(Some(p)) = tokio::time::timeout(wait, self.rx.recv()).await {
                panic!("unexpected message on {}: {:?}", p.topic, p.payload);
            }
        }

        pub async fn disconnect(self) {
            let _ = self.client.disconnect().await;
            let _ = tokio::time::timeout(WAIT, self.task).await;
        }
    }
}
