-- A business transaction a broker may check back on (RocketMQ half message, DTM "query
-- prepared"): its first statement records the transaction key with the oracle of
-- sql/003_transactions.sql. The app sent a half message with this key before; it tells the broker
-- commit after COMMIT (rollback if anything failed). If the app dies in between, the broker asks
-- the relay, which answers from Postgres.
-- Run with: psql -v key=order-request-7f3a -v customer=alice -v total=42.50 -f examples/checked_order.sql
\set ON_ERROR_STOP on
BEGIN;
SELECT outbox_tx_begin(:'key');     -- fails (OB001) if a check already settled the key as rolled back
INSERT INTO orders (customer, total) VALUES (:'customer', :'total');
COMMIT;
