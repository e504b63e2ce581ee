//! Configuration: the embedded default TOML, an optional file over it, then `SHARDMQ_*`
//! environment overrides over both.
//!
//! The embedded default doubles as the schema: a key that is not in it is unknown, and a value
//! whose type differs from the default's is refused, both with the full key path in the error.
//! Semantic checks (addresses, enums, ranges) follow, again naming the key.

use shardmq_shards::{BrokerConfig, DropPolicy};
use std::net::SocketAddr;
use toml::{Table, Value};

/// The complete default configuration, compiled into the binary.
pub const DEFAULT_TOML: &str = include_str!("default.toml");

/// Prefix of environment overrides; levels are separated by `__`.
pub const ENV_PREFIX: &str = "SHARDMQ_";

/// A configuration problem, always naming the key (or file) at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {message}")]
    Parse { path: String, message: String },
    #[error("unknown config key `{key}`{from}")]
    UnknownKey { key: String, from: String },
    #[error("bad value for `{key}`{from}: {message}")]
    BadValue {
        key: String,
        from: String,
        message: String,
    },
}

/// The settings of a node, as the binary uses them.
#[derive(Debug, Clone)]
pub struct Settings {
    pub broker: BrokerConfig,
    /// Management API address; `None` when `management.bind` is empty.
    pub management_bind: Option<SocketAddr>,
    pub data_dir: String,
    pub log_level: log::LevelFilter,
}

/// Loads the default, then `file` if given, then overrides from `env` (name, value) pairs.
pub fn load(
    file: Option<&str>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Settings, ConfigError> {
    let mut table: Table = DEFAULT_TOML
        .parse()
        .expect("embedded default config is valid TOML");
    let schema = table.clone();
    if let Some(path) = file {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_string(),
            source,
        })?;
        let over: Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::Parse {
                path: path.to_string(),
                message: e.to_string(),
            })?;
        merge(&mut table, over, "", &format!(" (in {path})"))?;
    }
    let mut env: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX))
        .collect();
    env.sort();
    for (name, raw) in env {
        apply_env(&mut table, &schema, &name, &raw)?;
    }
    settings(&table)
}

/// Merges `over` into `base`, refusing keys `base` lacks and values of another type.
fn merge(base: &mut Table, over: Table, prefix: &str, from: &str) -> Result<(), ConfigError> {
    for (k, v) in over {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        let Some(slot) = base.get_mut(&k) else {
            return Err(ConfigError::UnknownKey {
                key,
                from: from.into(),
            });
        };
        match (slot, v) {
            (Value::Table(b), Value::Table(o)) => merge(b, o, &key, from)?,
            (slot, v) => {
                if !same_type(slot, &v) {
                    return Err(ConfigError::BadValue {
                        key,
                        from: from.into(),
                        message: format!("expected {}, found {}", slot.type_str(), v.type_str()),
                    });
                }
                *slot = v;
            }
        }
    }
    Ok(())
}

fn same_type(a: &Value, b: &Value) -> bool {
    std::mem::discriminant(a) == std::mem::discriminant(b)
}

/// Applies one `SHARDMQ_A__B__C=value` override. Variables without `__` are not config keys
/// (scripts use e.g. `SHARDMQ_BIN`) unless they look like a mistyped one.
fn apply_env(table: &mut Table, schema: &Table, name: &str, raw: &str) -> Result<(), ConfigError> {
    let from = format!(" (from environment variable {name})");
    let rest = &name[ENV_PREFIX.len()..];
    if !rest.contains("__") {
        let lower = rest.to_ascii_lowercase();
        if schema
            .keys()
            .any(|section| lower.starts_with(&format!("{section}_")))
        {
            return Err(ConfigError::UnknownKey {
                key: lower,
                from: format!("{from}; levels are separated by a double underscore, e.g. SHARDMQ_NODE__SHARDS"),
            });
        }
        return Ok(());
    }
    let path: Vec<String> = rest.split("__").map(|s| s.to_ascii_lowercase()).collect();
    let key = path.join(".");
    let mut node = table;
    for (i, part) in path.iter().enumerate() {
        let last = i + 1 == path.len();
        let Some(slot) = node.get_mut(part) else {
            return Err(ConfigError::UnknownKey { key, from });
        };
        if last {
            let value = match slot {
                Value::Table(_) => {
                    return Err(ConfigError::BadValue {
                        key,
                        from,
                        message: "is a section, not a value".into(),
                    })
                }
                Value::Integer(_) => raw
                    .trim()
                    .parse::<i64>()
                    .map(Value::Integer)
                    .map_err(|_| "expected an integer"),
                Value::Float(_) => raw
                    .trim()
                    .parse::<f64>()
                    .map(Value::Float)
                    .map_err(|_| "expected a number"),
                Value::Boolean(_) => raw
                    .trim()
                    .parse::<bool>()
                    .map(Value::Boolean)
                    .map_err(|_| "expected true or false"),
                Value::Array(_) => format!("v = {raw}")
                    .parse::<Table>()
                    .ok()
                    .and_then(|mut t| t.remove("v"))
                    .filter(|v| v.is_array())
                    .ok_or("expected a TOML array, e.g. [\"a\", \"b\"]"),
                _ => Ok(Value::String(raw.to_string())),
            };
            *slot = value.map_err(|m| ConfigError::BadValue {
                key: key.clone(),
                from: from.clone(),
                message: format!("{m}, found {raw:?}"),
            })?;
            return Ok(());
        }
        node = match slot {
            Value::Table(t) => t,
            _ => return Err(ConfigError::UnknownKey { key, from }),
        };
    }
    Ok(())
}

fn get<'a>(t: &'a Table, key: &str) -> &'a Value {
    let mut v: Option<&Value> = None;
    let mut cur = t;
    for part in key.split('.') {
        let next = cur.get(part).expect("key present in the embedded schema");
        if let Value::Table(inner) = next {
            cur = inner;
        }
        v = Some(next);
    }
    v.expect("non-empty key")
}

fn bad(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::BadValue {
        key: key.into(),
        from: String::new(),
        message: message.into(),
    }
}

fn int(t: &Table, key: &str, min: i64, max: i64) -> Result<i64, ConfigError> {
    let v = get(t, key)
        .as_integer()
        .expect("type checked against the schema");
    if v < min || v > max {
        return Err(bad(key, format!("{v} is out of range {min}..={max}")));
    }
    Ok(v)
}

/// A duration written as EMQX writes them: a number with a unit (`500ms`, `30s`, `5m`, `24h`,
/// `7d`); `0` or `off` is zero.
fn duration_ms(t: &Table, key: &str) -> Result<u64, ConfigError> {
    let v = string(t, key).trim();
    if v == "0" || v == "off" {
        return Ok(0);
    }
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (n, unit) = v.split_at(split);
    let scale = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => {
            return Err(bad(
                key,
                format!("{v:?} is not a duration like 30s, 5m or 24h"),
            ))
        }
    };
    n.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .ok_or_else(|| bad(key, format!("{v:?} is not a duration like 30s, 5m or 24h")))
}

fn string<'a>(t: &'a Table, key: &str) -> &'a str {
    get(t, key)
        .as_str()
        .expect("type checked against the schema")
}

fn boolean(t: &Table, key: &str) -> bool {
    get(t, key)
        .as_bool()
        .expect("type checked against the schema")
}

fn settings(t: &Table) -> Result<Settings, ConfigError> {
    let name = string(t, "node.name");
    if !shardmq_shards::cluster::valid_node_name(name) {
        return Err(bad(
            "node.name",
            format!(
                "{name:?} is not of the form name@host (letters, digits and -_. in the name, \
                 a host name or address after @)"
            ),
        ));
    }
    let mut shards = int(
        t,
        "node.shards",
        0,
        shardmq_shards::shard_set::SHARDS_MAX as i64,
    )? as usize;
    if shards == 0 {
        shards = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
    }
    let bind_key = "listeners.tcp.default.bind";
    let bind: SocketAddr = string(t, bind_key).parse().map_err(|_| {
        bad(
            bind_key,
            format!("{:?} is not an address:port", string(t, bind_key)),
        )
    })?;
    let policy = match string(t, "mqtt.queue_drop_policy") {
        "drop_oldest" => DropPolicy::DropOldest,
        "drop_newest" => DropPolicy::DropNewest,
        other => {
            return Err(bad(
                "mqtt.queue_drop_policy",
                format!("{other:?} is not drop_oldest or drop_newest"),
            ))
        }
    };
    let strategy_key = "mqtt.shared_subscription_strategy";
    let shared_strategy = shardmq_shards::shared::Strategy::parse(string(t, strategy_key))
        .ok_or_else(|| {
            bad(
                strategy_key,
                format!(
                    "{:?} is not one of round_robin, random, hash_clientid, hash_topic, sticky",
                    string(t, strategy_key)
                ),
            )
        })?;
    let log_level = match string(t, "log.level") {
        "error" => log::LevelFilter::Error,
        "warn" => log::LevelFilter::Warn,
        "info" => log::LevelFilter::Info,
        "debug" => log::LevelFilter::Debug,
        "trace" => log::LevelFilter::Trace,
        other => {
            return Err(bad(
                "log.level",
                format!("{other:?} is not one of error, warn, info, debug, trace"),
            ))
        }
    };
    let cluster_key = "cluster.bind";
    let cluster_bind = match string(t, cluster_key) {
        "" => None,
        text => Some(
            text.parse()
                .map_err(|_| bad(cluster_key, format!("{text:?} is not an address:port")))?,
        ),
    };
    let seeds: Vec<String> = get(t, "cluster.static.seeds")
        .as_array()
        .expect("type checked against the schema")
        .iter()
        .map(|v| {
            v.as_str()
                .map(str::to_string)
                .ok_or_else(|| bad("cluster.static.seeds", "expected strings"))
        })
        .collect::<Result<_, _>>()?;
    for seed in &seeds {
        if shardmq_shards::cluster::node_addr(seed).is_none() {
            return Err(bad(
                "cluster.static.seeds",
                format!("{seed:?} is not name@host[:port]"),
            ));
        }
    }
    let discovery = match string(t, "cluster.discovery_strategy") {
        "manual" => shardmq_shards::cluster::Discovery::Manual,
        "static" => shardmq_shards::cluster::Discovery::Static(seeds),
        other => {
            return Err(bad(
                "cluster.discovery_strategy",
                format!("{other:?} is not supported (manual, static)"),
            ))
        }
    };
    let cookie = string(t, "cluster.cookie");
    if cookie.is_empty() {
        return Err(bad("cluster.cookie", "must not be empty"));
    }
    let cluster = shardmq_shards::cluster::ClusterConfig {
        bind: cluster_bind,
        cookie: cookie.to_string(),
        discovery,
        heartbeat_ms: int(t, "cluster.heartbeat_ms", 50, 60_000)? as u64,
        down_after_ms: int(t, "cluster.down_after_ms", 100, 600_000)? as u64,
        autoclean_ms: duration_ms(t, "cluster.autoclean")?,
        link_buffer_bytes: int(t, "cluster.link_buffer_bytes", 65_536, 1 << 34)? as usize,
        allow_node_name_mismatch: boolean(t, "cluster.allow_node_name_mismatch"),
        data_dir: string(t, "node.data_dir").into(),
    };
    let broker = BrokerConfig {
        cluster,
        node_name: name.to_string(),
        shards,
        bind,
        backlog: int(t, "listeners.tcp.default.backlog", 1, i32::MAX as i64)? as i32,
        max_connections: int(t, "listeners.tcp.default.max_connections", 1, i64::MAX)? as usize,
        // MQTT 2.2.3: a packet is at most 268,435,455 bytes of body plus a 5-byte header.
        max_packet_size: int(t, "mqtt.max_packet_size", 64, 268_435_460)? as u32,
        max_connect_packet_size: int(t, "mqtt.max_connect_packet_size", 64, 268_435_460)? as u32,
        max_clientid_len: int(t, "mqtt.max_clientid_len", 23, 65535)? as usize,
        max_sessions_per_ip: int(t, "mqtt.max_sessions_per_ip", 0, i64::from(u32::MAX))? as usize,
        max_topic_levels: int(t, "mqtt.max_topic_levels", 0, 65535)? as usize,
        max_inflight: int(t, "mqtt.max_inflight", 1, 65535)? as u16,
        max_awaiting_rel: int(t, "mqtt.max_awaiting_rel", 0, 65535)? as usize,
        max_queued_messages: int(t, "mqtt.max_queued_messages", 0, i64::from(u32::MAX))? as usize,
        queue_drop_policy: policy,
        queue_qos0: boolean(t, "mqtt.queue_qos0"),
        max_subscriptions: int(t, "mqtt.max_subscriptions", 0, i64::from(u32::MAX))? as usize,
        max_subscribe_filters: int(t, "mqtt.max_subscribe_filters", 0, i64::from(u32::MAX))?
            as usize,
        connect_timeout_ms: int(t, "mqtt.connect_timeout_ms", 1, 3_600_000)? as u64,
        session_expiry_interval_s: int(t, "mqtt.session_expiry_interval_s", 0, i64::from(u32::MAX))?
            as u32,
        retain_available: boolean(t, "mqtt.retain_available"),
        max_retained_messages: int(t, "mqtt.max_retained_messages", 0, i64::MAX)? as usize,
        max_retained_bytes: int(t, "mqtt.max_retained_bytes", 0, i64::MAX)? as usize,
        shared_subscription: boolean(t, "mqtt.shared_subscription"),
        shared_strategy,
        sys_interval_s: int(t, "sys.interval_s", 0, 86_400)? as u64,
        server_keepalive_s: int(t, "mqtt.server_keepalive_s", 0, 65535)? as u16,
        max_topic_alias: int(t, "mqtt.max_topic_alias", 0, 65535)? as u16,
        max_topic_alias_bytes: int(t, "mqtt.max_topic_alias_bytes", 0, i64::from(u32::MAX))?
            as usize,
        max_conn_output_bytes: int(t, "mqtt.max_conn_output_bytes", 4096, i64::from(u32::MAX))?
            as usize,
        response_information: string(t, "mqtt.response_information").to_string(),
    };
    let mgmt_key = "management.bind";
    let management_bind = match string(t, mgmt_key) {
        "" => None,
        text => Some(
            text.parse()
                .map_err(|_| bad(mgmt_key, format!("{text:?} is not an address:port")))?,
        ),
    };
    Ok(Settings {
        broker,
        management_bind,
        data_dir: string(t, "node.data_dir").to_string(),
        log_level,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn autoclean_takes_emqx_style_durations() {
        let ms = |v: &str| {
            load(None, env(&[("SHARDMQ_CLUSTER__AUTOCLEAN", v)]))
                .map(|s| s.broker.cluster.autoclean_ms)
        };
        assert_eq!(
            load(None, env(&[])).unwrap().broker.cluster.autoclean_ms,
            86_400_000
        );
        assert_eq!(ms("5m").unwrap(), 300_000);
        assert_eq!(ms("1500ms").unwrap(), 1500);
        assert_eq!(ms("7d").unwrap(), 604_800_000);
        assert_eq!(ms("off").unwrap(), 0);
        for wrong in ["5", "m", "5 min", "-1s", "99999999999999999999d"] {
            let e = ms(wrong).unwrap_err().to_string();
            assert!(e.contains("cluster.autoclean"), "{wrong}: {e}");
        }
    }

    #[test]
    fn embedded_default_loads_and_listens_on_1883() {
        let s = load(None, env(&[])).unwrap();
        assert_eq!(s.broker.bind.port(), 1883);
        assert!(s.broker.shards >= 1);
    }

    #[test]
    fn env_overrides_nest_with_double_underscore() {
        let s = load(
            None,
            env(&[
                ("SHARDMQ_LISTENERS__TCP__DEFAULT__BIND", "0.0.0.0:1884"),
                ("SHARDMQ_NODE__SHARDS", "2"),
                ("SHARDMQ_MQTT__QUEUE_QOS0", "false"),
                ("SHARDMQ_BIN", "ignored: not a config key"),
            ]),
        )
        .unwrap();
        assert_eq!(s.broker.bind.port(), 1884);
        assert_eq!(s.broker.shards, 2);
        assert!(!s.broker.queue_qos0);
    }

    #[test]
    fn unknown_env_key_is_refused_by_name() {
        let e = load(None, env(&[("SHARDMQ_MQTT__NO_SUCH_KEY", "1")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("mqtt.no_such_key"), "{e}");
    }

    #[test]
    fn single_underscore_section_override_is_refused() {
        let e = load(None, env(&[("SHARDMQ_NODE_SHARDS", "2")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("double underscore"), "{e}");
    }

    #[test]
    fn bad_value_names_the_key() {
        let e = load(None, env(&[("SHARDMQ_NODE__SHARDS", "abc")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("node.shards") && e.contains("integer"), "{e}");
        let e = load(None, env(&[("SHARDMQ_MQTT__QUEUE_DROP_POLICY", "fifo")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("mqtt.queue_drop_policy"), "{e}");
        let e = load(
            None,
            env(&[("SHARDMQ_LISTENERS__TCP__DEFAULT__BIND", "nowhere")]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("listeners.tcp.default.bind"), "{e}");
        let e = load(None, env(&[("SHARDMQ_MQTT__MAX_INFLIGHT", "0")]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("mqtt.max_inflight") && e.contains("range"),
            "{e}"
        );
    }

    #[test]
    fn file_keys_are_checked_against_the_schema() {
        let dir = std::env::temp_dir().join(format!("shardmq-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.toml");
        std::fs::write(&good, "[mqtt]\nmax_inflight = 7\n").unwrap();
        let s = load(Some(good.to_str().unwrap()), env(&[])).unwrap();
        assert_eq!(s.broker.max_inflight, 7);
        let unknown = dir.join("unknown.toml");
        std::fs::write(&unknown, "[mqtt]\nmax_inflite = 7\n").unwrap();
        let e = load(Some(unknown.to_str().unwrap()), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("mqtt.max_inflite"), "{e}");
        let typed = dir.join("typed.toml");
        std::fs::write(&typed, "[node]\nshards = \"two\"\n").unwrap();
        let e = load(Some(typed.to_str().unwrap()), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("node.shards") && e.contains("expected integer"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn env_wins_over_file() {
        let dir = std::env::temp_dir().join(format!("shardmq-cfg2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("c.toml");
        std::fs::write(&f, "[node]\nshards = 3\n").unwrap();
        let s = load(
            Some(f.to_str().unwrap()),
            env(&[("SHARDMQ_NODE__SHARDS", "1")]),
        )
        .unwrap();
        assert_eq!(s.broker.shards, 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
