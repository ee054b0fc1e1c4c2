-- Demo dataset for `gateway demo` and the tests. Idempotent: drops and recreates its tables.
-- Deterministic: every value is a literal or a function of the row number (no random(), no now()).

DROP TABLE IF EXISTS orders;
DROP TABLE IF EXISTS users;

CREATE TABLE users (
    id    int  PRIMARY KEY,
    name  text NOT NULL,
    email text NOT NULL,
    tier  text NOT NULL
);

INSERT INTO users (id, name, email, tier) VALUES
    (1,  'Ada Lovelace',       'ada@example.com',       'enterprise'),
    (2,  'Alan Turing',        'alan@example.com',      'pro'),
    (3,  'Grace Hopper',       'grace@example.com',     'enterprise'),
    (4,  'Edsger Dijkstra',    'edsger@example.com',    'free'),
    (5,  'Barbara Liskov',     'barbara@example.com',   'pro'),
    (6,  'Donald Knuth',       'donald@example.com',    'free'),
    (7,  'Margaret Hamilton',  'margaret@example.com',  'enterprise'),
    (8,  'Ken Thompson',       'ken@example.com',       'pro'),
    (9,  'Dennis Ritchie',     'dennis@example.com',    'free'),
    (10, 'Frances Allen',      'frances@example.com',   'pro'),
    (11, 'John Backus',        'john@example.com',      'free'),
    (12, 'Radia Perlman',      'radia@example.com',     'enterprise'),
    (13, 'Leslie Lamport',     'leslie@example.com',    'pro'),
    (14, 'Adele Goldberg',     'adele@example.com',     'free'),
    (15, 'Tony Hoare',         'tony@example.com',      'pro'),
    (16, 'Karen Sparck Jones', 'karen@example.com',     'free'),
    (17, 'Niklaus Wirth',      'niklaus@example.com',   'free'),
    (18, 'Shafi Goldwasser',   'shafi@example.com',     'enterprise'),
    (19, 'Guido van Rossum',   'guido@example.com',     'pro'),
    (20, 'Sophie Wilson',      'sophie@example.com',    'free');

CREATE TABLE orders (
    id         serial        PRIMARY KEY,
    user_id    int           NOT NULL REFERENCES users,
    sku        text          NOT NULL,
    quantity   int           NOT NULL,
    total      numeric(10,2) NOT NULL,
    created_at timestamptz   NOT NULL
);

-- 100 orders. user_id = 1 + (n * 7) % 20 walks all 20 users (7 and 20 are coprime), 5 orders each, interleaved
-- so consecutive orders belong to different users. Orders are about 7 hours apart from 2024-01-01 UTC on.
INSERT INTO orders (user_id, sku, quantity, total, created_at)
SELECT 1 + (n * 7) % 20,
       sku.code,
       1 + n % 4,
       sku.price * (1 + n % 4),
       timestamptz '2024-01-01 00:00:00+00' + n * interval '7 hours 13 minutes'
FROM generate_series(1, 100) AS n
JOIN (VALUES (0, 'SKU-KEYBOARD', 49.90::numeric),
             (1, 'SKU-MOUSE',    19.50),
             (2, 'SKU-MONITOR', 229.00),
             (3, 'SKU-CABLE',     7.25),
             (4, 'SKU-DOCK',    129.99),
             (5, 'SKU-HEADSET',  89.00)) AS sku (slot, code, price)
  ON sku.slot = n % 6
ORDER BY n;

-- Serves "latest orders of a user".
CREATE INDEX orders_user_id_created_at_idx ON orders (user_id, created_at DESC);

ANALYZE users;
ANALYZE orders;
