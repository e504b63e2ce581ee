//! shardmq-shards
