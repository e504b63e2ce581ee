//! Start-up configuration and the command line, against the real binary.

mod common;

use common::*;
use std::process::Command;
use std::time::Duration;

fn start_fails(key: &str, value: &str) -> String {
    match Broker::try_start(&[(key, value)]) {
        Ok(_) => panic!("started despite SHARDMQ_{key}={value}"),
        Err(log) => log,
    }
}

#[test]
fn unknown_key_fails_start_up_naming_it() {
    let log = start_fails("MQTT__NO_SUCH_KEY", "1");
    assert!(log.contains("mqtt.no_such_key"), "{log}");
}

#[test]
fn bad_value_fails_start_up_naming_the_key() {
    let log = start_fails("NODE__SHARDS", "abc");
    assert!(log.contains("node.shards"), "{log}");
    let log = start_fails("MQTT__QUEUE_DROP_POLICY", "sometimes");
    assert!(log.contains("mqtt.queue_drop_policy"), "{log}");
}

#[test]
fn config_file_sets_keys_and_env_overrides_it() {
    let dir = std::env::temp_dir().join(format!("shardmq-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let port = free_port();
    let file = dir.join("shardmq.toml");
    std::fs::write(
        &file,
        format!("[listeners.tcp.default]\nbind = \"127.0.0.1:{port}\"\n[node]\nshards = 1\n[cluster]\nbind = \"\"\n[management]\nbind = \"\"\n"),
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_shardmq"))
        .args(["start", "-c", file.to_str().unwrap()])
        .env("SHARDMQ_NODE__SHARDS", "2")
        .env("SHARDMQ_NODE__DATA_DIR", dir.join("data"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "not listening on the file's address"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (mut c, _) = RawClient::mqtt(addr, "from-file", true);
    assert!(c.ping());
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "SIGINT exit: {:?}", out.status);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains(&format!("127.0.0.1:{port}")) && log.contains("with 2 shards"),
        "{log}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn sigterm_shuts_down_gracefully_and_the_log_says_where_it_listens() {
    let mut b = Broker::start(&[]);
    let mut v5 = RawClient::connect(b.addr());
    v5.send(&connect_packet(5, "until-shutdown", true, 60, None));
    assert_eq!(v5.recv(WAIT).unwrap().first, 0x20);
    let listening = format!("listening on 127.0.0.1:{}", b.port);
    let log = b.log_with(&listening, WAIT);
    assert!(
        log.contains(&listening) && log.contains("2 shards"),
        "{log}"
    );
    let status = b
        .terminate(Duration::from_secs(5))
        .expect("exited within 5 s");
    assert!(status.success());
    let d = v5.recv(WAIT).expect("DISCONNECT before close");
    assert_eq!((d.first, d.body[0]), (0xE0, 0x8B), "server shutting down");
}

#[test]
fn embedded_default_listens_on_1883() {
    let out = Command::new(env!("CARGO_BIN_EXE_shardmq"))
        .arg("config")
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("bind = \"0.0.0.0:1883\""));
}
