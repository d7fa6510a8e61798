-- Which upload is filling a batch, so that a second upload of the same batch id while the
-- first is running is told apart from a retry after it finished. `upload_id` is the token of
-- the upload in progress, NULL once it finished or was aborted (batches from before this
-- migration count as finished); `touched_at_ms` is its last sign of life: an upload silent
-- for the lease (src/ledger/mod.rs, UPLOAD_LEASE_MS) is presumed dead and may be taken over.
ALTER TABLE batches ADD COLUMN upload_id TEXT;
ALTER TABLE batches ADD COLUMN touched_at_ms BIGINT;
