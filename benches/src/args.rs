//! Command line of `shardmq-bench`: emqtt-bench's flags plus rate, duration, JSON and scenarios.

use std::net::IpAddr;
use std::time::Duration;

/// What a run does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Connect and stay idle.
    Conn,
    /// Subscribe and count/measure what arrives.
    Sub,
    /// Publish.
    Pub,
    /// Subscribers and publishers in one process (end-to-end latency without clock skew).
    PubSub,
}

/// Shapes of the `pubsub` mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    /// Many publishers on `bench/<i>`, one subscriber on `bench/#`.
    FanIn,
    /// One publisher on `bench/fanout`, many subscribers on it.
    FanOut,
    /// Publisher i → subscriber i on `bench/<i>`.
    Pairs,
}

/// Everything a run needs.
#[derive(Clone, Debug)]
pub struct Args {
    pub mode: Mode,
    pub hosts: Vec<String>,
    pub port: u16,
    /// 3 = 3.1, 4 = 3.1.1, 5 = 5.0.
    pub version: u8,
    pub count: usize,
    pub start_index: usize,
    pub connect_interval: Duration,
    /// Most connections of a thread between `connect()` and CONNACK (0 = no limit): keeps a
    /// connection storm within the listen backlog, so the rate is not set by SYN retries.
    pub max_connecting: usize,
    pub publish_interval: Duration,
    pub topic: String,
    pub qos: u8,
    pub retain: bool,
    pub size: usize,
    pub limit: u64,
    pub keepalive: u16,
    pub clean: bool,
    pub username: Option<String>,
    pub password: Option<String>,
    pub ifaddrs: Vec<IpAddr>,
    pub prefix: String,
    pub shortids: bool,
    /// Total messages per second across all publishers (open loop), 0 = use `-I`.
    pub rate: u64,
    /// With `--rate`: consecutive messages of the schedule given to one publisher before the
    /// next (they leave in one write), so a generator core can drive many connections.
    pub batch: usize,
    pub duration: Option<Duration>,
    pub json: Option<String>,
    pub threads: usize,
    pub inflight: usize,
    pub scenario: Scenario,
    pub subs: usize,
    pub pubs: usize,
    pub quiet: bool,
    /// sub: filters each client subscribes (`%k` = 0..N in the topic; every 10th gets a `+`).
    pub subs_per_client: usize,
}

pub const USAGE: &str = "shardmq-bench: MQTT load generator (emqtt-bench compatible flags)

usage: shardmq-bench conn|sub|pub|pubsub [options]
  -h HOSTS        broker host(s), comma separated, each optionally host:port; clients
                  are spread over them (127.0.0.1)
  -p PORT         broker port (1883)
  -V VERSION      3 (MQTT 3.1), 4 (3.1.1, default) or 5
  -c COUNT        number of clients (conn/sub/pub)
  -n INDEX        first client sequence number (0)
  -i MS           interval between connects, per thread (10; 0 = as fast as possible)
  -I MS           interval between publishes per client (1000)
  -t TOPIC        topic; %i = client sequence, %c = client id, %rand_N = random 1..=N
  -q QOS          0, 1 or 2
  -r              retain
  -s SIZE         payload size in bytes (256; >= 16 carries a latency timestamp)
  -L LIMIT        pub: messages in total; sub: stop after receiving LIMIT
  -k SECONDS      keep-alive (300)
  -C true|false   clean session (true)
  -u USER -P PASS credentials
  --ifaddr IPS    local source addresses, comma separated (round robin)
  --prefix P      client id prefix (shardmq-bench)
  --shortids      client ids are the bare sequence number
  --max-connecting N  at most N handshakes (connect to CONNACK) in progress per thread (0 = any)
  --rate N        pub: N messages/s in total, open loop (latency from the scheduled time)
  --batch N       with --rate: N consecutive messages per publisher in turn (1)
  --duration S    end the run after S seconds and print the summary
  --json FILE     write the summary as JSON
  --threads N     event-loop threads (default: all cores)
  --inflight N    unacknowledged QoS 1/2 messages per client (32)
  --quiet         no per-second progress line
  --subs-per-client N  sub: N filters per client (%k in -t = 0..N-1; every 10th has a + level)
pubsub: --scenario fanin|fanout|pairs --subs N --pubs N (plus -t -q -s -I --rate ...)";

fn value<'a>(it: &mut impl Iterator<Item = &'a String>, flag: &str) -> Result<&'a String, String> {
    it.next().ok_or_else(|| format!("{flag} needs a value"))
}

fn num<T: std::str::FromStr>(s: &str, flag: &str) -> Result<T, String> {
    s.parse()
        .map_err(|_| format!("{flag}: {s:?} is not a number"))
}

/// Parses the command line (without the program name).
pub fn parse(argv: &[String]) -> Result<Args, String> {
    let mode = match argv.first().map(String::as_str) {
        Some("conn") => Mode::Conn,
        Some("sub") => Mode::Sub,
        Some("pub") => Mode::Pub,
        Some("pubsub") => Mode::PubSub,
        _ => return Err(USAGE.to_string()),
    };
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mut a = Args {
        mode,
        hosts: vec!["127.0.0.1".into()],
        port: 1883,
        version: 4,
        count: 1,
        start_index: 0,
        connect_interval: Duration::from_millis(10),
        max_connecting: 0,
        publish_interval: Duration::from_millis(1000),
        topic: String::new(),
        qos: 0,
        retain: false,
        size: 256,
        limit: 0,
        keepalive: 300,
        clean: true,
        username: None,
        password: None,
        ifaddrs: Vec::new(),
        prefix: "shardmq-bench".into(),
        shortids: false,
        rate: 0,
        batch: 1,
        duration: None,
        json: None,
        threads,
        inflight: 32,
        scenario: Scenario::Pairs,
        subs: 1,
        pubs: 1,
        quiet: false,
        subs_per_client: 1,
    };
    let mut it = argv[1..].iter();
    while let Some(flag) = it.next() {
        let f = flag.as_str();
        match f {
            "-h" | "--host" => {
                a.hosts = value(&mut it, f)?.split(',').map(str::to_string).collect()
            }
            "-p" | "--port" => a.port = num(value(&mut it, f)?, f)?,
            "-V" | "--version" => a.version = num(value(&mut it, f)?, f)?,
            "-c" | "--count" => a.count = num(value(&mut it, f)?, f)?,
            "-n" | "--startnumber" => a.start_index = num(value(&mut it, f)?, f)?,
            "-i" | "--interval" => {
                a.connect_interval = Duration::from_millis(num(value(&mut it, f)?, f)?)
            }
            "-I" | "--interval_of_msg" => {
                a.publish_interval = Duration::from_millis(num(value(&mut it, f)?, f)?)
            }
            "-t" | "--topic" => a.topic = value(&mut it, f)?.clone(),
            "-q" | "--qos" => a.qos = num(value(&mut it, f)?, f)?,
            "-r" | "--retain" => a.retain = true,
            "-s" | "--size" => a.size = num(value(&mut it, f)?, f)?,
            "-L" | "--limit" => a.limit = num(value(&mut it, f)?, f)?,
            "-k" | "--keepalive" => a.keepalive = num(value(&mut it, f)?, f)?,
            "-C" | "--clean" => a.clean = value(&mut it, f)? != "false",
            "-u" | "--username" => a.username = Some(value(&mut it, f)?.clone()),
            "-P" | "--password" => a.password = Some(value(&mut it, f)?.clone()),
            "--ifaddr" => {
                a.ifaddrs = value(&mut it, f)?
                    .split(',')
                    .map(|s| {
                        s.parse()
                            .map_err(|_| format!("--ifaddr: {s:?} is not an IP address"))
                    })
                    .collect::<Result<_, _>>()?
            }
            "--prefix" => a.prefix = value(&mut it, f)?.clone(),
            "--shortids" => a.shortids = true,
            "--rate" => a.rate = num(value(&mut it, f)?, f)?,
            "--max-connecting" => a.max_connecting = num(value(&mut it, f)?, f)?,
            "--batch" => a.batch = num::<usize>(value(&mut it, f)?, f)?.max(1),
            "--duration" => a.duration = Some(Duration::from_secs_f64(num(value(&mut it, f)?, f)?)),
            "--json" => a.json = Some(value(&mut it, f)?.clone()),
            "--threads" => a.threads = num::<usize>(value(&mut it, f)?, f)?.max(1),
            "--inflight" => a.inflight = num::<usize>(value(&mut it, f)?, f)?.max(1),
            "--subs" => a.subs = num(value(&mut it, f)?, f)?,
            "--pubs" => a.pubs = num(value(&mut it, f)?, f)?,
            "--quiet" => a.quiet = true,
            "--subs-per-client" => a.subs_per_client = num::<usize>(value(&mut it, f)?, f)?.max(1),
            "--scenario" => {
                a.scenario = match value(&mut it, f)?.as_str() {
                    "fanin" => Scenario::FanIn,
                    "fanout" => Scenario::FanOut,
                    "pairs" => Scenario::Pairs,
                    other => {
                        return Err(format!(
                            "--scenario: unknown {other:?} (fanin, fanout, pairs)"
                        ))
                    }
                }
            }
            "--help" => return Err(USAGE.to_string()),
            other => return Err(format!("unknown flag {other}\n\n{USAGE}")),
        }
    }
    if !(3..=5).contains(&a.version) {
        return Err("-V must be 3, 4 or 5".into());
    }
    if a.qos > 2 {
        return Err("-q must be 0, 1 or 2".into());
    }
    if a.topic.is_empty() {
        a.topic = match a.mode {
            Mode::Sub => "bench/#".into(),
            _ => "bench/%i".into(),
        };
    }
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn emqtt_bench_flags_parse() {
        let a = parse(&args("pub -h a,b -p 1884 -V 5 -c 10 -n 3 -i 0 -I 5 -t t/%i -q 1 -r -s 64 -L 100 -k 30 -C false --shortids")).unwrap();
        assert_eq!(a.mode, Mode::Pub);
        assert_eq!(a.hosts, ["a", "b"]);
        assert_eq!(
            (a.port, a.version, a.count, a.start_index),
            (1884, 5, 10, 3)
        );
        assert_eq!(
            (a.qos, a.retain, a.size, a.limit, a.keepalive, a.clean),
            (1, true, 64, 100, 30, false)
        );
        assert_eq!(a.publish_interval, Duration::from_millis(5));
        assert!(a.shortids);
    }

    #[test]
    fn bad_flags_are_refused() {
        assert!(parse(&args("pub -q 3")).is_err());
        assert!(parse(&args("pub --nope")).is_err());
        assert!(parse(&args("fly")).is_err());
        assert!(parse(&args("pubsub --scenario sideways")).is_err());
    }
}
