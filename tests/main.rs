//! The integration tests: one binary, one module per area, one support module per server
//! (`support/`). Every test starts its own Postgres cluster, brokers and relay on free ports.

mod support;

mod chaos;
mod e2e;
mod exactly_once;
mod examples;
mod failover;
mod ledger;
mod lifecycle;
mod nats;
mod operations;
mod poison;
mod rabbitmq;
mod replication_client;
mod rocketmq;
mod security;
mod supervision;
mod tableless;
mod transactions;
mod world;
