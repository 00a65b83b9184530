// The peer outbox-relay's bench measures itself against: pg-transactional-outbox 0.5.7, the
// npm library that reads an outbox table through pgoutput logical replication (or polls it),
// with a kafkajs 2.2.4 producer (acks=-1, idempotent where the broker allows) publishing each message to the same
// Kafka-protocol broker. Used as its README shows; nothing here is tuned beyond its settings.
//
//   node peer.cjs setup      creates the peer's own table, publication, slot and polling
//                            function with the library's DatabaseSetup SQL
//   node peer.cjs run        runs one listener (PEER_MODE=replication|polling) until SIGTERM;
//                            prints `ready` once the producer is connected, then on stop one
//                            JSON line: messages handled and commit→ack latency per message type
//
// Environment: PGHOST, PGPORT, PGUSER, PGDATABASE (the `pg` defaults), PEER_BROKERS
// (host:port,…), PEER_TOPIC, PEER_TABLE (peer_outbox), PEER_MODE, PEER_POLL_BATCH (polling batch
// size; the library's default is 5), PEER_IDEMPOTENT (true unless `false`), PEER_CONTROLLER
// (`mutex`, the default, or `segment`).
'use strict';

const { Client } = require('pg');
const { Kafka, logLevel } = require('kafkajs');
const outbox = require('pg-transactional-outbox');

const table = process.env.PEER_TABLE || 'peer_outbox';
const publication = `${table}_pub`;
const slot = `${table}_slot`;
const nextMessages = `${table}_next_messages`;
const listenerRole = process.env.PGUSER || 'postgres';
const database = process.env.PGDATABASE || 'postgres';

const dbConfig = () => ({
  host: process.env.PGHOST || '127.0.0.1',
  port: Number(process.env.PGPORT || 5432),
  user: listenerRole,
  database,
});

// Warnings and errors go to stderr; the rest is dropped (logging every message would cost the
// peer throughput it does not spend in production with a sensible level).
const logger = {
  level: 'warn',
  fatal: (...a) => console.error('peer fatal:', ...a),
  error: (...a) => console.error('peer error:', ...a),
  warn: (...a) => console.error('peer warn:', ...a),
  info: () => {},
  debug: () => {},
  trace: () => {},
  silent: () => {},
};

async function setup() {
  const base = {
    outboxOrInbox: 'outbox',
    database,
    schema: 'public',
    table,
    listenerRole,
  };
  const replication = { ...base, publication, replicationSlot: slot };
  const polling = { ...base, nextMessagesName: nextMessages };
  const s = outbox.DatabaseSetup;
  const client = new Client(dbConfig());
  await client.connect();
  try {
    await client.query(s.dropAndCreateTable(base));
    await client.query(s.grantPermissions(base));
    await client.query(s.createPollingFunction(polling));
    await client.query(s.setupPollingIndexes(polling));
    // ALTER ROLE … REPLICATION on a superuser is a no-op; the publication is the library's.
    await client.query(s.setupReplicationCore(replication));
    // Its own statement: a slot cannot be created in a transaction that wrote.
    await client.query(s.setupReplicationSlot(replication));
  } finally {
    await client.end();
  }
}

function percentile(sorted, p) {
  if (sorted.length === 0) return null;
  const i = Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1);
  return sorted[Math.max(0, i)];
}

async function run() {
  const mode = process.env.PEER_MODE || 'replication';
  const topic = process.env.PEER_TOPIC || 'peer.order';
  const kafka = new Kafka({
    clientId: 'pg-transactional-outbox-peer',
    brokers: (process.env.PEER_BROKERS || '127.0.0.1:9092').split(','),
    logLevel: logLevel.ERROR,
  });
  // acks from every in-sync replica, one request in flight (order kept through retries), as
  // the relay. Idempotence is on unless PEER_IDEMPOTENT=false: kafkajs 2.2.4 asks for a producer
  // id with InitProducerId v1, which Tansu 0.6.0's memory storage answers with
  // UNKNOWN_SERVER_ERROR (it needs the producer id/epoch fields of v3+).
  const idempotent = process.env.PEER_IDEMPOTENT !== 'false';
  const producer = kafka.producer({ idempotent, maxInFlightRequests: 1 });
  await producer.connect();

  const latencies = new Map(); // message type → commit→ack in ms
  let handled = 0;
  const handler = {
    handle: async (message) => {
      await producer.send({
        topic,
        acks: -1,
        messages: [
          {
            key: message.aggregateId,
            value: JSON.stringify(message.payload),
            headers: { id: message.id, type: message.messageType },
          },
        ],
      });
      // created_at is clock_timestamp() at the INSERT; in the single-row transactions of the
      // latency phase that is the commit to within microseconds.
      const ms = Date.now() - Date.parse(message.createdAt);
      let l = latencies.get(message.messageType);
      if (!l) {
        l = [];
        latencies.set(message.messageType, l);
      }
      l.push(ms);
      handled += 1;
    },
  };
  const settings = {
    dbSchema: 'public',
    dbTable: table,
    enableMaxAttemptsProtection: true,
    enablePoisonousMessageProtection: true,
  };
  let shutdown;
  if (mode === 'replication') {
    [shutdown] = outbox.initializeReplicationMessageListener(
      {
        outboxOrInbox: 'outbox',
        dbListenerConfig: dbConfig(),
        settings: { ...settings, dbPublication: publication, dbReplicationSlot: slot },
      },
      handler,
      logger,
      // One message at a time, in WAL order (the library README's example; the order the
      // relay keeps per aggregate holds). PEER_CONTROLLER=segment runs one at a time per
      // segment (= aggregate) instead: on a 10,000-row transaction that started 10,000 at
      // once here, hit the 15 s processing timeout and stalled with rows left unprocessed.
      {
        concurrencyStrategy:
          process.env.PEER_CONTROLLER === 'segment'
            ? outbox.createReplicationSegmentMutexConcurrencyController()
            : outbox.createReplicationMutexConcurrencyController(),
      },
    );
  } else if (mode === 'polling') {
    [shutdown] = outbox.initializePollingMessageListener(
      {
        outboxOrInbox: 'outbox',
        dbListenerConfig: dbConfig(),
        settings: {
          ...settings,
          nextMessagesFunctionName: nextMessages,
          nextMessagesBatchSize: Number(process.env.PEER_POLL_BATCH || 5),
        },
      },
      handler,
      logger,
    );
  } else {
    throw new Error(`PEER_MODE=${mode}: use replication or polling`);
  }
  console.log('ready');

  const progress = setInterval(() => console.error(`peer: handled ${handled}`), 5000);
  await new Promise((resolve) => {
    process.once('SIGTERM', resolve);
    process.once('SIGINT', resolve);
  });
  clearInterval(progress);
  const byType = {};
  for (const [type, l] of latencies) {
    l.sort((a, b) => a - b);
    byType[type] = { n: l.length, p50: percentile(l, 50), p99: percentile(l, 99) };
  }
  console.log(JSON.stringify({ handled, latency_ms: byType }));
  await Promise.race([
    (async () => {
      await shutdown();
      await producer.disconnect();
    })(),
    new Promise((r) => setTimeout(r, 5000)),
  ]);
  process.exit(0);
}

const command = process.argv[2];
const main = command === 'setup' ? setup : command === 'run' ? run : null;
if (!main) {
  console.error('usage: node peer.cjs setup|run');
  process.exit(2);
}
main().catch((e) => {
  console.error(`peer: ${e && e.stack ? e.stack : e}`);
  process.exit(1);
});
