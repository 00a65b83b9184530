-- The transactional outbox in plain SQL: the business row and its message commit together, or
-- neither does. Run with: psql -v customer=alice -v total=42.50 -f examples/place_order.sql
BEGIN;

WITH new_order AS (
    INSERT INTO orders (customer, total)
    VALUES (:'customer', :'total')
    RETURNING id, customer, total
)
INSERT INTO outbox (aggregatetype, aggregateid, type, payload, headers)
SELECT 'order',
       new_order.id::text,
       'OrderPlaced',
       jsonb_build_object('order_id', new_order.id, 'customer', new_order.customer,
                          'total', new_order.total),
       jsonb_build_object('source', 'place_order.sql')
FROM new_order;

COMMIT;
