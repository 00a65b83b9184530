-- A business table for the examples: the service's own data.
CREATE TABLE IF NOT EXISTS orders (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    customer   text    NOT NULL,
    total      numeric NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
