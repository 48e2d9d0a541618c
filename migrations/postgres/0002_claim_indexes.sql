-- Claims read pending deliveries in (next_attempt_at, id) order: index exactly
-- that. The (address, state) index served only admin counts and cost every
-- claim and settlement an index update; counts can scan.
DROP INDEX deliveries_due;
CREATE INDEX deliveries_pending ON deliveries (next_attempt_at, id) WHERE state = 'pending';
DROP INDEX deliveries_by_address;
-- Only unsubscribing (ON DELETE CASCADE) looks deliveries up by subscription,
-- rarely and on a table that holds only undelivered rows: a scan will do, and
-- every queued delivery saves two index updates.
DROP INDEX deliveries_by_subscription;
