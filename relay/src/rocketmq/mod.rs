//! RocketMQ: answering transaction check-backs from the oracle, over RocketMQ's remoting protocol
//! (a small codec of our own: the commands needed here, no client library).

pub mod checkback;
pub mod client;
pub mod connection;
pub mod message;
pub mod remoting;
