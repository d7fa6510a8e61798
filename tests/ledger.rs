//! The ledger, on both backends: every behaviour runs once on SQLite (a temp dir) and once on
//! PostgreSQL (a fresh database on the local server; see `support/postgres.rs`).

#[path = "support/eventually.rs"]
mod eventually;
#[path = "support/postgres.rs"]
mod pg_support;
#[path = "support/proxy.rs"]
mod proxy;

use std::sync::Arc;

use kamigate::code::digest;
use kamigate::engine::stream_id::StreamId;
use kamigate::ledger::{
    open, BatchCounts, BatchStart, InsertOutcome, KeyRecord, Ledger, LedgerError, LedgerEvent,
    NewKey, Seal, StateCounts, UPLOAD_LEASE_MS, UPLOAD_OWNER_SILENT_MS,
};
use tempfile::TempDir;

use pg_support::TestDatabase;

/// One ledger under test, and what it takes to open it again.
struct Env {
    ledger: Arc<dyn Ledger>,
    url: Option<String>,
    dir: TempDir,
    // Dropped last: the database outlives the pools that use it.
    _pg: Option<TestDatabase>,
}

impl Env {
    async fn sqlite() -> Env {
        let dir = TempDir::new().expect("temp dir");
        let ledger = open(None, dir.path())
            .await
            .expect("open the SQLite ledger");
        Env {
            ledger,
            url: None,
            dir,
            _pg: None,
        }
    }

    async fn postgres() -> Option<Env> {
        let pg = TestDatabase::create().await?;
        let dir = TempDir::new().expect("temp dir");
        let url = pg.url().to_owned();
        let ledger = open(Some(&url), dir.path())
            .await
            .expect("open the PostgreSQL ledger");
        Some(Env {
            ledger,
            url: Some(url),
            dir,
            _pg: Some(pg),
        })
    }

    /// SQLite in memory: the one SQLite ledger whose group commits go through the pool's
    /// connection rather than a thread of their own (a second connection would not see it),
    /// so the events suites below run on both paths.
    async fn sqlite_in_memory() -> Env {
        let dir = TempDir::new().expect("temp dir");
        let ledger = open(Some("sqlite::memory:"), dir.path())
            .await
            .expect("open an in-memory SQLite ledger");
        Env {
            ledger,
            url: None,
            dir,
            _pg: None,
        }
    }

    /// Runs `sql` on the database through a connection of its own, as another process
    /// would (an operator's hand, a fault).
    async fn exec_aside(&self, sql: &str) {
        use sqlx::Connection;
        match &self.url {
            Some(url) => {
                let mut conn = sqlx::PgConnection::connect(url).await.expect("connect");
                sqlx::raw_sql(sql).execute(&mut conn).await.expect("exec");
            }
            None => {
                let path = self.dir.path().join("ledger.sqlite3");
                let url = format!("sqlite://{}", path.display());
                let mut conn = sqlx::SqliteConnection::connect(&url)
                    .await
                    .expect("connect");
                sqlx::raw_sql(sql).execute(&mut conn).await.expect("exec");
            }
        }
    }

    /// PostgreSQL's plan for `sql` (`EXPLAIN`, one line per node), on a connection of its
    /// own; `None` on SQLite.
    async fn postgres_plan(&self, sql: &str) -> Option<String> {
        use sqlx::{Connection, Row};
        let url = self.url.as_ref()?;
        let mut conn = sqlx::PgConnection::connect(url).await.expect("connect");
        let rows = sqlx::query(&format!("EXPLAIN {sql}"))
            .fetch_all(&mut conn)
            .await
            .expect("explain");
        let lines: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        Some(lines.join("\n"))
    }

    /// The first column of the first row of `sql`, read through a connection of its own;
    /// `None` on PostgreSQL.
    async fn sqlite_number(&self, sql: &str) -> Option<i64> {
        use sqlx::Connection;
        if self.url.is_some() {
            return None;
        }
        let path = self.dir.path().join("ledger.sqlite3");
        let url = format!("sqlite://{}", path.display());
        let mut conn = sqlx::SqliteConnection::connect(&url)
            .await
            .expect("connect");
        Some(
            sqlx::query_scalar(sql)
                .fetch_one(&mut conn)
                .await
                .expect("query"),
        )
    }

    /// Opens the same database again (migrations run again).
    async fn reopen(&self) -> Arc<dyn Ledger> {
        open(self.url.as_deref(), self.dir.path())
            .await
            .expect("reopen the ledger")
    }
}

/// Runs each named `async fn(&Env)` as a test on SQLite and on PostgreSQL.
macro_rules! both_ledgers {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    let env = super::Env::sqlite().await;
                    super::$name(&env).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    if let Some(env) = super::Env::postgres().await {
                        super::$name(&env).await;
                    }
                }
            )*
        }
    };
}

both_ledgers!(
    migrations_are_idempotent_on_reopen,
    skus_are_created_then_updated,
    import_allocates_monotonic_ids_and_reports_duplicates,
    resent_batch_id_is_existing,
    a_batch_being_uploaded_is_in_progress_for_other_uploads,
    a_silent_upload_is_taken_over_and_fenced_off,
    the_uploads_of_a_gateway_gone_are_aborted_by_the_next_upload,
    pending_batch_is_invisible_until_activated,
    abort_removes_the_batch_keys,
    applying_the_same_events_twice_changes_nothing,
    events_had_before_beside_new_ones_change_their_keys_once,
    a_failed_group_commit_changes_nothing_and_runs_nothing_beside,
    batches_that_meet_commit_together_and_each_gets_its_own_answer,
    hold_confirm_release_and_expire_follow_the_engine,
    claim_redeem_void_and_restore_follow_the_engine,
    late_confirm_sells_fresh_keys,
    reusable_keys_count_issues,
    multi_use_keys_count_uses,
    the_latest_order_and_redemption_follow_the_engine_whatever_commits_last,
    counts_group_active_keys_by_state,
    key_events_are_an_audit_trail_oldest_first,
    unknown_keys_and_kinds_are_recorded_and_skipped,
    concurrent_writers_apply_each_event_once,
    large_import_pages_through_keys_after,
    order_events_page_by_recording_order,
    orders_are_found_by_id_as_the_ledger_grows,
    the_last_entry_is_the_largest_stream_id_of_the_sku,
    a_commit_behind_a_rebuilds_fence_marks_the_sku_to_rebuild_again,
);

/// The behaviours of applying events, once more on an in-memory SQLite ledger (see
/// [`Env::sqlite_in_memory`]).
macro_rules! sqlite_in_memory_too {
    ($($name:ident),* $(,)?) => {
        mod sqlite_in_memory {
            $(
                #[tokio::test]
                async fn $name() {
                    let env = super::Env::sqlite_in_memory().await;
                    super::$name(&env).await;
                }
            )*
        }
    };
}

sqlite_in_memory_too!(
    applying_the_same_events_twice_changes_nothing,
    events_had_before_beside_new_ones_change_their_keys_once,
    hold_confirm_release_and_expire_follow_the_engine,
    claim_redeem_void_and_restore_follow_the_engine,
    late_confirm_sells_fresh_keys,
    reusable_keys_count_issues,
    multi_use_keys_count_uses,
    the_latest_order_and_redemption_follow_the_engine_whatever_commits_last,
    key_events_are_an_audit_trail_oldest_first,
    unknown_keys_and_kinds_are_recorded_and_skipped,
    concurrent_writers_apply_each_event_once,
    a_commit_behind_a_rebuilds_fence_marks_the_sku_to_rebuild_again,
);

const NOW: i64 = 1_700_000_000_000;
/// The upload filling a test's batches, unless a test races several.
const UPLOAD: &str = "upload-1";

#[tokio::test]
async fn database_urls_choose_the_backend() {
    let dir = TempDir::new().expect("temp dir");
    // No URL: a file in the data dir, created with its directory.
    let data = dir.path().join("data");
    let l = open(None, &data).await.expect("default ledger");
    l.ping().await.expect("ping");
    assert!(data.join("ledger.sqlite3").exists());

    let path = dir.path().join("elsewhere/ledger.db");
    let l = open(Some(&format!("sqlite://{}", path.display())), &data)
        .await
        .expect("sqlite URL");
    l.ping().await.expect("ping");
    assert!(path.exists());

    let l = open(Some("sqlite::memory:"), &data)
        .await
        .expect("in memory");
    l.put_sku("gift", "{}", 1, NOW).await.expect("put_sku");
    assert!(l.get_sku("gift").await.expect("get").is_some());

    match open(Some("mysql://kg:s3cret@db/kg"), &data).await {
        Err(LedgerError::Corrupt(message)) => assert!(!message.contains("s3cret"), "{message}"),
        Err(other) => panic!("expected Corrupt, got {other:?}"),
        Ok(_) => panic!("mysql is not a ledger backend"),
    }
}

/// Stores codes as given: the ledger keeps whatever text it is handed (sealing is the
/// keyring's, tested in `secrets`), so these tests read back what they wrote.
struct Clear;

impl Seal for Clear {
    fn seal(&self, _sku: &str, _local_id: i64, code: &str) -> String {
        code.to_owned()
    }
}

fn key(code: &str) -> NewKey {
    NewKey {
        line: 1,
        digest: digest(code),
        code: code.to_owned(),
        expires_at_ms: None,
        max_issues: 1,
        max_uses: 1,
        format_version: 1,
    }
}

fn keys(codes: &[&str]) -> Vec<NewKey> {
    codes.iter().map(|c| key(c)).collect()
}

/// An event of `sku` at `NOW + n`, with stream entry id `<n>-0`.
fn event(sku: &str, n: i64, kind: &str, ids: &[i64]) -> LedgerEvent {
    LedgerEvent {
        event_id: format!("{sku}/{n}-0"),
        sku: sku.to_owned(),
        kind: kind.to_owned(),
        at_ms: NOW + n,
        key_local_ids: ids.to_vec(),
        order_id: Some(format!("o-{n}")),
        user_id: Some("u-1".into()),
        redeemer: None,
        reason: None,
        late: false,
        fields_json: format!(r#"{{"t":"{kind}"}}"#),
        gen: None,
    }
}

/// A redemption of key 1 of `sku` by `who` at `NOW + n`: a redeem event names no order.
fn redemption(sku: &str, n: i64, who: &str) -> LedgerEvent {
    let mut e = event(sku, n, "redeem", &[1]);
    e.order_id = None;
    e.redeemer = Some(who.into());
    e
}

fn inserted(local_id: i64, sku: &str) -> InsertOutcome {
    InsertOutcome::Inserted {
        key_id: format!("{sku}.{local_id}"),
        local_id,
    }
}

fn duplicate(local_id: i64, sku: &str, same_batch: bool) -> InsertOutcome {
    InsertOutcome::Duplicate {
        key_id: format!("{sku}.{local_id}"),
        same_batch,
    }
}

/// Creates each of `skus` with one key, `R1`, that may be issued and used 100 times.
async fn stocked_reusable(l: &dyn Ledger, skus: &[&str]) {
    let mut reusable = key("R1");
    reusable.max_issues = 100;
    reusable.max_uses = 100;
    for sku in skus {
        stocked(l, sku, std::slice::from_ref(&reusable)).await;
    }
}

/// Creates `sku` with one active batch holding `rows`; returns the batch's outcomes.
async fn stocked(l: &dyn Ledger, sku: &str, rows: &[NewKey]) -> Vec<InsertOutcome> {
    l.put_sku(sku, "{}", 1, NOW).await.expect("put_sku");
    let batch = format!("{sku}-b1");
    assert_eq!(
        l.begin_batch(sku, &batch, UPLOAD, NOW)
            .await
            .expect("begin"),
        BatchStart::New
    );
    let out = l
        .insert_keys(sku, &batch, UPLOAD, rows, &Clear)
        .await
        .expect("insert");
    let report = BatchCounts {
        accepted: rows.len() as u64,
        ..BatchCounts::default()
    };
    l.finish_batch(sku, &batch, UPLOAD, &report, true, NOW)
        .await
        .expect("finish");
    out
}

async fn get(l: &dyn Ledger, key_id: &str) -> KeyRecord {
    l.get_key(key_id)
        .await
        .expect("get_key")
        .unwrap_or_else(|| panic!("key {key_id} exists"))
}

/// (held, sold, uses, void, state) of a key.
async fn tally(l: &dyn Ledger, key_id: &str) -> (i64, i64, i64, bool, String) {
    let k = get(l, key_id).await;
    (k.held, k.sold, k.uses, k.void, k.state)
}

fn tallied(
    held: i64,
    sold: i64,
    uses: i64,
    void: bool,
    state: &str,
) -> (i64, i64, i64, bool, String) {
    (held, sold, uses, void, state.to_owned())
}

async fn migrations_are_idempotent_on_reopen(env: &Env) {
    env.ledger
        .put_sku("gift", r#"{"max_uses":1}"#, 3, NOW)
        .await
        .expect("put_sku");
    for _ in 0..2 {
        let again = env.reopen().await;
        again.ping().await.expect("ping");
        let sku = again.get_sku("gift").await.expect("get_sku").expect("kept");
        assert_eq!(sku.format_version, 3);
    }
}

async fn skus_are_created_then_updated(env: &Env) {
    let l = env.ledger.as_ref();
    assert_eq!(l.get_sku("gift").await.expect("get"), None);
    assert!(l
        .put_sku("gift", r#"{"a":1}"#, 1, NOW)
        .await
        .expect("create"));
    assert!(l.put_sku("aaa", "{}", 1, NOW).await.expect("create"));
    assert!(!l
        .put_sku("gift", r#"{"a":2}"#, 2, NOW + 5)
        .await
        .expect("update"));
    let sku = l.get_sku("gift").await.expect("get").expect("exists");
    assert_eq!(sku.config_json, r#"{"a":2}"#);
    assert_eq!(sku.format_version, 2);
    assert_eq!((sku.created_at_ms, sku.updated_at_ms), (NOW, NOW + 5));
    assert_eq!(sku.epoch, None);
    assert_eq!(l.list_skus().await.expect("list"), vec!["aaa", "gift"]);

    l.set_epoch("gift", "epoch-7").await.expect("set_epoch");
    let sku = l.get_sku("gift").await.expect("get").expect("exists");
    assert_eq!(sku.epoch.as_deref(), Some("epoch-7"));
    assert!(matches!(
        l.set_epoch("nope", "e").await,
        Err(LedgerError::NotFound(_))
    ));
}

async fn import_allocates_monotonic_ids_and_reports_duplicates(env: &Env) {
    let l = env.ledger.as_ref();
    l.put_sku("gift", "{}", 1, NOW).await.expect("put_sku");
    assert_eq!(
        l.begin_batch("gift", "b1", UPLOAD, NOW)
            .await
            .expect("begin"),
        BatchStart::New
    );
    let out = l
        .insert_keys(
            "gift",
            "b1",
            UPLOAD,
            &keys(&["AAA", "BBB", "CCC", "AAA"]),
            &Clear,
        )
        .await
        .expect("insert");
    assert_eq!(
        out,
        vec![
            inserted(1, "gift"),
            inserted(2, "gift"),
            inserted(3, "gift"),
            duplicate(1, "gift", true),
        ]
    );
    // A re-sent chunk of the same batch.
    let out = l
        .insert_keys("gift", "b1", UPLOAD, &keys(&["BBB", "DDD"]), &Clear)
        .await
        .expect("insert");
    assert_eq!(out, vec![duplicate(2, "gift", true), inserted(4, "gift")]);
    l.finish_batch("gift", "b1", UPLOAD, &BatchCounts::default(), true, NOW)
        .await
        .expect("finish");

    // Another batch: codes of b1 are duplicates from another batch; ids keep growing.
    l.begin_batch("gift", "b2", UPLOAD, NOW)
        .await
        .expect("begin");
    let out = l
        .insert_keys("gift", "b2", UPLOAD, &keys(&["CCC", "EEE"]), &Clear)
        .await
        .expect("insert");
    assert_eq!(out, vec![duplicate(3, "gift", false), inserted(5, "gift")]);

    // Ids are per SKU.
    l.put_sku("other", "{}", 1, NOW).await.expect("put_sku");
    l.begin_batch("other", "b1", UPLOAD, NOW)
        .await
        .expect("begin");
    let out = l
        .insert_keys("other", "b1", UPLOAD, &keys(&["AAA"]), &Clear)
        .await
        .expect("insert");
    assert_eq!(out, vec![inserted(1, "other")]);

    let k = get(l, "gift.5").await;
    assert_eq!(k.code, "EEE");
    assert_eq!(k.digest, digest("EEE"));
    assert_eq!(k.batch_id, "b2");
    assert_eq!(k.state, "available");
    assert!(matches!(
        l.insert_keys("gift", "missing", UPLOAD, &keys(&["X"]), &Clear)
            .await,
        Err(LedgerError::NotFound(_))
    ));
}

async fn resent_batch_id_is_existing(env: &Env) {
    let l = env.ledger.as_ref();
    assert!(matches!(
        l.begin_batch("nope", "b1", UPLOAD, NOW).await,
        Err(LedgerError::NotFound(_))
    ));
    l.put_sku("gift", "{}", 1, NOW).await.expect("put_sku");
    assert_eq!(
        l.begin_batch("gift", "b1", UPLOAD, NOW)
            .await
            .expect("begin"),
        BatchStart::New
    );
    l.insert_keys("gift", "b1", UPLOAD, &keys(&["A1", "A2"]), &Clear)
        .await
        .expect("insert");
    let report = BatchCounts {
        accepted: 2,
        rejected: 1,
        duplicate: 0,
    };
    l.finish_batch("gift", "b1", UPLOAD, &report, true, NOW + 1)
        .await
        .expect("finish");
    match l
        .begin_batch("gift", "b1", UPLOAD, NOW + 2)
        .await
        .expect("again")
    {
        BatchStart::Existing(b) => {
            assert_eq!(b.state, "active");
            assert_eq!((b.accepted, b.rejected, b.duplicate), (2, 1, 0));
            assert_eq!((b.created_at_ms, b.activated_at_ms), (NOW, Some(NOW + 1)));
        }
        other => panic!("expected Existing, got {other:?}"),
    }
    // An aborted batch id starts afresh.
    l.begin_batch("gift", "b2", UPLOAD, NOW)
        .await
        .expect("begin");
    l.abort_batch("gift", "b2", UPLOAD).await.expect("abort");
    assert_eq!(
        l.begin_batch("gift", "b2", UPLOAD, NOW + 3)
            .await
            .expect("restart"),
        BatchStart::New
    );
    let b = l
        .get_batch("gift", "b2")
        .await
        .expect("get")
        .expect("exists");
    assert_eq!((b.state.as_str(), b.created_at_ms), ("pending", NOW + 3));
}

async fn a_batch_being_uploaded_is_in_progress_for_other_uploads(env: &Env) {
    let l = env.ledger.as_ref();
    l.put_sku("gift", "{}", 1, NOW).await.expect("put_sku");
    assert_eq!(
        l.begin_batch("gift", "b1", "first", NOW)
            .await
            .expect("begin"),
        BatchStart::New
    );
    l.insert_keys("gift", "b1", "first", &keys(&["A1", "A2"]), &Clear)
        .await
        .expect("insert");

    // A second upload of the batch id while the first runs is told so, and can write nothing.
    match l.begin_batch("gift", "b1", "second", NOW + 1).await {
        Ok(BatchStart::InProgress(b)) => {
            assert_eq!(b.state, "pending");
            assert_eq!(b.upload_id.as_deref(), Some("first"));
            assert_eq!((b.created_at_ms, b.touched_at_ms), (NOW, Some(NOW)));
        }
        other => panic!("expected InProgress, got {other:?}"),
    }
    assert!(matches!(
        l.insert_keys("gift", "b1", "second", &keys(&["B1"]), &Clear)
            .await,
        Err(LedgerError::BatchBusy(_))
    ));
    assert!(matches!(
        l.touch_batch("gift", "b1", "second", NOW + 1).await,
        Err(LedgerError::BatchBusy(_))
    ));
    let counts = BatchCounts {
        accepted: 2,
        ..BatchCounts::default()
    };
    assert!(matches!(
        l.finish_batch("gift", "b1", "second", &counts, true, NOW + 1)
            .await,
        Err(LedgerError::BatchBusy(_))
    ));
    assert!(matches!(
        l.abort_batch("gift", "b1", "second").await,
        Err(LedgerError::BatchBusy(_))
    ));
    assert_eq!(
        get(l, "gift.2").await.batch_id,
        "b1",
        "the first upload's keys stay"
    );
    assert_eq!(l.get_key("gift.3").await.expect("get"), None);

    // Once the first finished, the batch id answers its record: a retry adds nothing.
    l.finish_batch("gift", "b1", "first", &counts, true, NOW + 2)
        .await
        .expect("finish");
    match l.begin_batch("gift", "b1", "third", NOW + 3).await {
        Ok(BatchStart::Existing(b)) => {
            assert_eq!((b.state.as_str(), b.accepted), ("active", 2));
            assert_eq!(b.upload_id, None);
        }
        other => panic!("expected Existing, got {other:?}"),
    }
    // Activation while its upload runs is refused: the batch is not complete yet. The upload
    // goes on writing and finishes as if it had not been asked.
    l.begin_batch("gift", "b3", "first", NOW)
        .await
        .expect("begin");
    l.insert_keys("gift", "b3", "first", &keys(&["C1"]), &Clear)
        .await
        .expect("insert");
    assert!(matches!(
        l.activate_batch("gift", "b3", NOW + 1).await,
        Err(LedgerError::BatchBusy(_))
    ));
    assert!(l.keys_after("gift", 2, 100).await.expect("keys").is_empty());
    l.insert_keys("gift", "b3", "first", &keys(&["C2"]), &Clear)
        .await
        .expect("insert after the refused activation");
    let two = BatchCounts {
        accepted: 2,
        ..BatchCounts::default()
    };
    l.finish_batch("gift", "b3", "first", &two, true, NOW + 2)
        .await
        .expect("finish");
    let b = l.get_batch("gift", "b3").await.expect("get").expect("kept");
    assert_eq!(
        (b.state.as_str(), b.accepted, b.activated_at_ms, b.upload_id),
        ("active", 2, Some(NOW + 2), None)
    );
    // A batch finished pending is finished too.
    l.begin_batch("gift", "b2", "first", NOW)
        .await
        .expect("begin");
    l.finish_batch("gift", "b2", "first", &BatchCounts::default(), false, NOW)
        .await
        .expect("finish pending");
    assert!(matches!(
        l.begin_batch("gift", "b2", "second", NOW + 1).await,
        Ok(BatchStart::Existing(b)) if b.state == "pending"
    ));

    // Two first uploads racing: exactly one starts the batch.
    let (a, b) = tokio::join!(
        l.begin_batch("gift", "race", "left", NOW),
        l.begin_batch("gift", "race", "right", NOW)
    );
    let mut starts = [a.expect("left"), b.expect("right")];
    starts.sort_by_key(|s| matches!(s, BatchStart::InProgress(_)));
    assert!(
        matches!(&starts, [BatchStart::New, BatchStart::InProgress(_)]),
        "{starts:?}"
    );
}

async fn a_silent_upload_is_taken_over_and_fenced_off(env: &Env) {
    let l = env.ledger.as_ref();
    l.put_sku("gift", "{}", 1, NOW).await.expect("put_sku");
    l.begin_batch("gift", "b1", "dead", NOW)
        .await
        .expect("begin");
    l.insert_keys("gift", "b1", "dead", &keys(&["X1", "X2"]), &Clear)
        .await
        .expect("insert");
    let in_progress =
        |start: Result<BatchStart, LedgerError>| matches!(start, Ok(BatchStart::InProgress(_)));
    // Each sign of life renews the lease.
    assert!(in_progress(
        l.begin_batch("gift", "b1", "next", NOW + UPLOAD_LEASE_MS - 1)
            .await
    ));
    l.touch_batch("gift", "b1", "dead", NOW + UPLOAD_LEASE_MS - 1)
        .await
        .expect("touch");
    let renewed = NOW + UPLOAD_LEASE_MS - 1;
    assert!(in_progress(
        l.begin_batch("gift", "b1", "next", renewed + UPLOAD_LEASE_MS - 1)
            .await
    ));

    // Silent for the whole lease: the next upload takes the batch over, afresh.
    let taken = renewed + UPLOAD_LEASE_MS;
    assert_eq!(
        l.begin_batch("gift", "b1", "next", taken)
            .await
            .expect("begin"),
        BatchStart::New
    );
    assert_eq!(
        l.get_key("gift.1").await.expect("get"),
        None,
        "its keys are gone"
    );
    let b = l.get_batch("gift", "b1").await.expect("get").expect("kept");
    assert_eq!(
        (b.state.as_str(), b.upload_id.as_deref(), b.created_at_ms),
        ("pending", Some("next"), taken)
    );

    // The presumed-dead upload, waking up, can change nothing.
    assert!(matches!(
        l.insert_keys("gift", "b1", "dead", &keys(&["X3"]), &Clear)
            .await,
        Err(LedgerError::BatchBusy(_))
    ));
    assert!(matches!(
        l.touch_batch("gift", "b1", "dead", taken).await,
        Err(LedgerError::BatchBusy(_))
    ));
    assert!(matches!(
        l.finish_batch("gift", "b1", "dead", &BatchCounts::default(), true, taken)
            .await,
        Err(LedgerError::BatchBusy(_))
    ));
    assert!(matches!(
        l.abort_batch("gift", "b1", "dead").await,
        Err(LedgerError::BatchBusy(_))
    ));

    // The successor imports normally; ids are never reused.
    let out = l
        .insert_keys("gift", "b1", "next", &keys(&["X1"]), &Clear)
        .await
        .expect("insert");
    assert_eq!(out, vec![inserted(3, "gift")]);
    let counts = BatchCounts {
        accepted: 1,
        ..BatchCounts::default()
    };
    l.finish_batch("gift", "b1", "next", &counts, true, taken)
        .await
        .expect("finish");
    assert_eq!(l.counts("gift").await.expect("counts").available, 1);
}

/// A gateway killed mid-upload stops reporting alive: its upload is presumed dead long before
/// the lease ends. The next upload of the SKU, under any batch id, aborts it (its codes then
/// import afresh, not as duplicates of keys nobody could activate); the dead upload, woken,
/// changes nothing; an upload whose gateway is seen alive, or one made outside a gateway,
/// keeps its batch.
async fn the_uploads_of_a_gateway_gone_are_aborted_by_the_next_upload(env: &Env) {
    let l = env.ledger.as_ref();
    l.put_sku("gift", "{}", 1, NOW).await.expect("put_sku");
    let dead = kamigate::ledger::upload_token(Some("gw-dead"));
    let live = kamigate::ledger::upload_token(Some("gw-live"));
    l.gateway_seen("gw-dead", NOW).await.expect("seen");
    for (batch, upload, code) in [("b-dead", &dead, "D1"), ("b-live", &live, "L1")] {
        l.begin_batch("gift", batch, upload, NOW)
            .await
            .expect("begin");
        l.insert_keys("gift", batch, upload, &keys(&[code]), &Clear)
            .await
            .expect("insert");
    }
    // Not seen yet (it reports every half second), but the upload has only just begun.
    l.begin_batch("gift", "b-cli", "cli-upload", NOW)
        .await
        .expect("begin");
    l.insert_keys("gift", "b-cli", "cli-upload", &keys(&["C1"]), &Clear)
        .await
        .expect("insert");
    let in_progress =
        |start: Result<BatchStart, LedgerError>| matches!(start, Ok(BatchStart::InProgress(_)));

    // Within the silence allowed, every upload keeps its batch.
    let soon = NOW + UPLOAD_OWNER_SILENT_MS - 1;
    assert!(in_progress(
        l.begin_batch("gift", "b-dead", "retry", soon).await
    ));
    assert!(in_progress(
        l.begin_batch("gift", "b-live", "retry", soon).await
    ));
    l.gateway_seen("gw-live", soon).await.expect("seen");

    // Past it: the dead gateway's upload is aborted by an upload of another batch id, whose
    // code it had is no duplicate; the others stand.
    let later = NOW + UPLOAD_OWNER_SILENT_MS;
    assert_eq!(
        l.begin_batch("gift", "b-again", UPLOAD, later)
            .await
            .expect("begin"),
        BatchStart::New
    );
    let out = l
        .insert_keys(
            "gift",
            "b-again",
            UPLOAD,
            &keys(&["D1", "L1", "C1"]),
            &Clear,
        )
        .await
        .expect("insert");
    assert!(matches!(out[0], InsertOutcome::Inserted { .. }), "{out:?}");
    assert!(matches!(out[1], InsertOutcome::Duplicate { .. }), "{out:?}");
    assert!(matches!(out[2], InsertOutcome::Duplicate { .. }), "{out:?}");
    let b = l
        .get_batch("gift", "b-dead")
        .await
        .expect("get")
        .expect("kept");
    assert_eq!((b.state.as_str(), b.upload_id), ("aborted", None));
    for (batch, upload) in [("b-live", live.as_str()), ("b-cli", "cli-upload")] {
        let b = l
            .get_batch("gift", batch)
            .await
            .expect("get")
            .expect("kept");
        assert_eq!(
            (b.state.as_str(), b.upload_id.as_deref()),
            ("pending", Some(upload))
        );
    }
    assert!(in_progress(
        l.begin_batch("gift", "b-live", "retry", later).await
    ));

    // The dead upload, woken, can change nothing; its batch id starts afresh for a retry,
    // and activating it finds nothing to activate.
    assert!(matches!(
        l.insert_keys("gift", "b-dead", &dead, &keys(&["D2"]), &Clear)
            .await,
        Err(LedgerError::BatchBusy(_))
    ));
    assert!(matches!(
        l.finish_batch(
            "gift",
            "b-dead",
            &dead,
            &BatchCounts::default(),
            true,
            later
        )
        .await,
        Err(LedgerError::BatchBusy(_))
    ));
    assert!(matches!(
        l.activate_batch("gift", "b-dead", later).await,
        Err(LedgerError::NotFound(_))
    ));
    assert_eq!(
        l.begin_batch("gift", "b-dead", "retry", later)
            .await
            .expect("begin"),
        BatchStart::New
    );

    // The live gateway falls silent in turn: activating its batch aborts it instead.
    let silent = soon + UPLOAD_OWNER_SILENT_MS;
    assert!(matches!(
        l.activate_batch("gift", "b-live", silent).await,
        Err(LedgerError::NotFound(_))
    ));
    // The upload outside a gateway keeps its batch for the whole lease.
    assert!(in_progress(
        l.begin_batch("gift", "b-cli", "retry", NOW + UPLOAD_LEASE_MS - 1)
            .await
    ));
}

async fn pending_batch_is_invisible_until_activated(env: &Env) {
    let l = env.ledger.as_ref();
    l.put_sku("gift", "{}", 1, NOW).await.expect("put_sku");
    l.begin_batch("gift", "b1", UPLOAD, NOW)
        .await
        .expect("begin");
    l.insert_keys("gift", "b1", UPLOAD, &keys(&["P1", "P2", "P3"]), &Clear)
        .await
        .expect("insert");
    let report = BatchCounts {
        accepted: 3,
        ..BatchCounts::default()
    };
    l.finish_batch("gift", "b1", UPLOAD, &report, false, NOW)
        .await
        .expect("finish pending");
    let b = l
        .get_batch("gift", "b1")
        .await
        .expect("get")
        .expect("exists");
    assert_eq!((b.state.as_str(), b.accepted), ("pending", 3));
    assert!(l.keys_after("gift", 0, 100).await.expect("keys").is_empty());
    assert_eq!(
        l.counts("gift").await.expect("counts"),
        StateCounts::default()
    );
    // Still findable by id (admin lookups), just not live.
    assert_eq!(get(l, "gift.2").await.batch_id, "b1");

    let b = l
        .activate_batch("gift", "b1", NOW + 9)
        .await
        .expect("activate");
    assert_eq!(
        (b.state.as_str(), b.activated_at_ms),
        ("active", Some(NOW + 9))
    );
    let live = l.keys_after("gift", 0, 100).await.expect("keys");
    assert_eq!(
        live.iter().map(|k| k.local_id).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert_eq!(l.counts("gift").await.expect("counts").available, 3);

    // Activating again changes nothing; an active batch takes no more keys.
    let again = l
        .activate_batch("gift", "b1", NOW + 20)
        .await
        .expect("again");
    assert_eq!(again.activated_at_ms, Some(NOW + 9));
    assert!(matches!(
        l.insert_keys("gift", "b1", UPLOAD, &keys(&["P4"]), &Clear)
            .await,
        Err(LedgerError::Conflict(_))
    ));
    assert!(matches!(
        l.finish_batch("gift", "b1", UPLOAD, &report, false, NOW)
            .await,
        Err(LedgerError::Conflict(_))
    ));
}

async fn abort_removes_the_batch_keys(env: &Env) {
    let l = env.ledger.as_ref();
    l.put_sku("gift", "{}", 1, NOW).await.expect("put_sku");
    l.begin_batch("gift", "b1", UPLOAD, NOW)
        .await
        .expect("begin");
    l.insert_keys("gift", "b1", UPLOAD, &keys(&["X1", "X2"]), &Clear)
        .await
        .expect("insert");
    l.abort_batch("gift", "b1", UPLOAD).await.expect("abort");
    l.abort_batch("gift", "b1", UPLOAD)
        .await
        .expect("abort is idempotent");
    assert_eq!(l.get_key("gift.1").await.expect("get"), None);
    let b = l.get_batch("gift", "b1").await.expect("get").expect("kept");
    assert_eq!(b.state, "aborted");
    // Its batch id is unused again: activating it finds no batch.
    assert!(matches!(
        l.activate_batch("gift", "b1", NOW).await,
        Err(LedgerError::NotFound(_))
    ));

    // Its codes are not duplicates any more; ids are never reused.
    l.begin_batch("gift", "b2", UPLOAD, NOW)
        .await
        .expect("begin");
    let out = l
        .insert_keys("gift", "b2", UPLOAD, &keys(&["X1"]), &Clear)
        .await
        .expect("insert");
    assert_eq!(out, vec![inserted(3, "gift")]);
    let one = BatchCounts {
        accepted: 1,
        ..BatchCounts::default()
    };
    l.finish_batch("gift", "b2", UPLOAD, &one, true, NOW)
        .await
        .expect("finish active");
    assert!(matches!(
        l.abort_batch("gift", "b2", UPLOAD).await,
        Err(LedgerError::Conflict(_))
    ));
    assert!(matches!(
        l.abort_batch("gift", "nope", UPLOAD).await,
        Err(LedgerError::NotFound(_))
    ));
}

async fn applying_the_same_events_twice_changes_nothing(env: &Env) {
    let l = env.ledger.as_ref();
    stocked(l, "gift", &keys(&["K1", "K2", "K3"])).await;
    let events = vec![
        event("gift", 1, "hold", &[1]),
        event("gift", 2, "claim", &[2]),
        event("gift", 3, "confirm", &[1]),
        event("gift", 3, "confirm", &[1]), // the same entry twice in one call
    ];
    assert_eq!(l.apply_events(&events).await.expect("apply"), 3);
    let before = (
        get(l, "gift.1").await,
        get(l, "gift.2").await,
        l.counts("gift").await.expect("counts"),
        l.key_events("gift.1").await.expect("audit").len(),
    );
    assert_eq!(l.apply_events(&events).await.expect("again"), 0);
    assert_eq!(l.apply_events(&events[1..2]).await.expect("part"), 0);
    let after = (
        get(l, "gift.1").await,
        get(l, "gift.2").await,
        l.counts("gift").await.expect("counts"),
        l.key_events("gift.1").await.expect("audit").len(),
    );
    assert_eq!(before, after);
    assert_eq!(tally(l, "gift.1").await, tallied(0, 1, 0, false, "claimed"));
    assert_eq!(l.apply_events(&[]).await.expect("empty"), 0);
}

/// A batch read again after a commit whose answer was lost carries events the ledger has,
/// beside new ones naming the same keys: only the new ones change them, whether the keys are
/// read by the statement recording the events (PostgreSQL, for one SKU's keys and one
/// statement's events: `Bulk::record_and_lock`) or on their own (keys of two SKUs, more
/// events than one statement takes).
async fn events_had_before_beside_new_ones_change_their_keys_once(env: &Env) {
    let l = env.ledger.as_ref();
    let codes: Vec<String> = (1..=80).map(|i| format!("K{i}")).collect();
    let codes: Vec<&str> = codes.iter().map(String::as_str).collect();
    stocked(l, "gift", &keys(&codes)).await;
    stocked(l, "card", &keys(&["C1", "C2"])).await;

    let claim = event("gift", 1, "claim", &[1]);
    assert_eq!(
        l.apply_events(std::slice::from_ref(&claim))
            .await
            .expect("claim"),
        1
    );
    let again = [
        claim.clone(),
        redemption("gift", 2, "r-2"),
        event("gift", 3, "claim", &[2]),
    ];
    assert_eq!(l.apply_events(&again).await.expect("again"), 2);
    let k = get(l, "gift.1").await;
    assert_eq!((k.sold, k.uses, k.state.as_str()), (1, 1, "redeemed"));
    assert_eq!(k.order_id.as_deref(), Some("o-1"));
    assert_eq!(k.redeemer.as_deref(), Some("r-2"));
    assert_eq!(tally(l, "gift.2").await, tallied(0, 1, 0, false, "claimed"));

    // Keys of two SKUs.
    let two = [
        event("gift", 3, "claim", &[2]),
        event("card", 4, "claim", &[1]),
        event("gift", 5, "claim", &[3]),
    ];
    assert_eq!(l.apply_events(&two).await.expect("two SKUs"), 2);
    assert_eq!(tally(l, "gift.2").await, tallied(0, 1, 0, false, "claimed"));
    assert_eq!(tally(l, "card.1").await, tallied(0, 1, 0, false, "claimed"));
    assert_eq!(tally(l, "gift.3").await, tallied(0, 1, 0, false, "claimed"));

    // More events than one statement of their exact number takes, two of them had before.
    let many: Vec<LedgerEvent> = (4..=80)
        .map(|id| event("gift", id + 10, "claim", &[id]))
        .chain([
            event("gift", 3, "claim", &[2]),
            event("gift", 5, "claim", &[3]),
        ])
        .collect();
    assert_eq!(l.apply_events(&many).await.expect("many"), 77);
    assert_eq!(tally(l, "gift.3").await, tallied(0, 1, 0, false, "claimed"));
    assert_eq!(
        tally(l, "gift.80").await,
        tallied(0, 1, 0, false, "claimed")
    );
    let counts = l.counts("gift").await.expect("counts");
    assert_eq!(
        (counts.claimed, counts.redeemed, counts.available),
        (79, 1, 0)
    );
}

/// The event writer reads its next batch beside a commit
/// ([`Ledger::apply_events_beside`]): that read runs once the statements succeeded, never
/// for a commit that failed, which records nothing of its batch.
async fn a_failed_group_commit_changes_nothing_and_runs_nothing_beside(env: &Env) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let l = env.ledger.as_ref();
    stocked(l, "gift", &keys(&["K1", "K2"])).await;

    let ran = AtomicBool::new(false);
    let first = [event("gift", 1, "claim", &[1])];
    let beside = Box::pin(async { ran.store(true, Ordering::SeqCst) });
    assert_eq!(
        l.apply_events_beside(&first, beside).await.expect("apply"),
        1
    );
    assert!(
        ran.load(Ordering::SeqCst),
        "beside runs with a commit that succeeds"
    );

    // The audit rows' table gone: the last statement of the next commit fails.
    env.exec_aside("DROP TABLE event_keys").await;
    let before = (
        get(l, "gift.2").await,
        l.counts("gift").await.expect("counts"),
    );
    let ran = AtomicBool::new(false);
    let second = [event("gift", 2, "claim", &[2])];
    let beside = Box::pin(async { ran.store(true, Ordering::SeqCst) });
    assert!(matches!(
        l.apply_events_beside(&second, beside).await,
        Err(LedgerError::Corrupt(_))
    ));
    assert!(
        !ran.load(Ordering::SeqCst),
        "nothing runs beside a failed commit"
    );
    let after = (
        get(l, "gift.2").await,
        l.counts("gift").await.expect("counts"),
    );
    assert_eq!(before, after, "the failed commit changed no key");
    assert!(
        l.order_events("gift", "o-2")
            .await
            .expect("events")
            .is_empty(),
        "the failed commit recorded no event"
    );
}

/// The event writer commits each SKU's batches on its own, concurrently, and batches that
/// meet at the ledger go in one transaction ("Commits that meet go together",
/// `src/ledger/sql/events.rs`). Each call still gets the answer it would have got alone: its
/// own count of new events (an event two batches carry counts for the first), and a batch
/// the ledger rejects fails alone, recording nothing, while the others commit.
async fn batches_that_meet_commit_together_and_each_gets_its_own_answer(env: &Env) {
    let l = env.ledger.as_ref();
    stocked(l, "gift", &keys(&["G1", "G2", "G3"])).await;
    stocked(l, "card", &keys(&["C1", "C2", "C3"])).await;
    stocked(l, "bad", &keys(&["B1"])).await;
    l.apply_events(&[event("gift", 1, "claim", &[1])])
        .await
        .expect("recorded before");
    // Every event of SKU `bad` is refused: its batch fails as one the ledger rejects.
    if env.url.is_some() {
        env.exec_aside(
            "CREATE FUNCTION reject_bad() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN RAISE EXCEPTION 'rejected'; END $$; \
             CREATE TRIGGER reject_bad BEFORE INSERT ON events FOR EACH ROW \
             WHEN (NEW.sku = 'bad') EXECUTE FUNCTION reject_bad();",
        )
        .await;
    } else {
        env.exec_aside(
            "CREATE TRIGGER reject_bad BEFORE INSERT ON events WHEN NEW.sku = 'bad' \
             BEGIN SELECT RAISE(ABORT, 'rejected'); END",
        )
        .await;
    }

    // The first call commits alone; the others come while it runs, and meet.
    let first = [event("gift", 2, "claim", &[2])];
    let gift = [
        event("gift", 1, "claim", &[1]),
        event("gift", 3, "claim", &[3]),
    ];
    let card = [
        event("card", 1, "claim", &[1]),
        event("card", 2, "claim", &[2]),
    ];
    let bad = [event("bad", 1, "claim", &[1])];
    let again = [
        event("card", 2, "claim", &[2]),
        event("card", 3, "claim", &[3]),
    ];
    let (first, gift, card, bad, again) = tokio::join!(
        l.apply_events(&first),
        l.apply_events(&gift),
        l.apply_events(&card),
        l.apply_events(&bad),
        l.apply_events(&again),
    );
    assert_eq!(first, Ok(1));
    assert_eq!(gift, Ok(1), "gift/1 was recorded before");
    assert_eq!(card, Ok(2));
    assert!(matches!(bad, Err(LedgerError::Corrupt(_))), "{bad:?}");
    assert_eq!(again, Ok(1), "card/2 counts for the batch before");

    for id in ["gift.1", "gift.2", "gift.3", "card.1", "card.2", "card.3"] {
        assert_eq!(get(l, id).await.state, "claimed", "{id}");
    }
    assert_eq!(get(l, "bad.1").await.state, "available");
    assert!(l
        .order_events("bad", "o-1")
        .await
        .expect("events")
        .is_empty());
    assert_eq!(
        l.key_events("card.2").await.expect("audit").len(),
        1,
        "recorded once"
    );
}

async fn hold_confirm_release_and_expire_follow_the_engine(env: &Env) {
    let l = env.ledger.as_ref();
    stocked(l, "gift", &keys(&["H1", "H2", "H3"])).await;
    l.apply_events(&[event("gift", 1, "hold", &[1, 2, 3])])
        .await
        .expect("hold");
    let k = get(l, "gift.1").await;
    assert_eq!((k.held, k.sold, k.state.as_str()), (1, 0, "held"));
    assert_eq!(k.order_id.as_deref(), Some("o-1"));
    assert_eq!(k.user_id.as_deref(), Some("u-1"));
    assert_eq!(k.updated_at_ms, NOW + 1);

    l.apply_events(&[
        event("gift", 2, "confirm", &[1]),
        event("gift", 3, "release", &[2]),
        event("gift", 4, "expire", &[3]),
    ])
    .await
    .expect("apply");
    assert_eq!(tally(l, "gift.1").await, tallied(0, 1, 0, false, "claimed"));
    assert_eq!(
        tally(l, "gift.2").await,
        tallied(0, 0, 0, false, "available")
    );
    assert_eq!(
        tally(l, "gift.3").await,
        tallied(0, 0, 0, false, "available")
    );

    // Two writers commit their batches in either order: a release committed before the hold
    // it ends reads as "none held" meanwhile, and lands where the engine is once both are in.
    l.apply_events(&[event("gift", 7, "release", &[2])])
        .await
        .expect("release first");
    assert_eq!(get(l, "gift.2").await.state, "available");
    l.apply_events(&[event("gift", 6, "hold", &[2])])
        .await
        .expect("then its hold");
    assert_eq!(
        tally(l, "gift.2").await,
        tallied(0, 0, 0, false, "available")
    );
}

async fn claim_redeem_void_and_restore_follow_the_engine(env: &Env) {
    let l = env.ledger.as_ref();
    stocked(l, "gift", &keys(&["C1", "C2"])).await;
    let mut redeem = event("gift", 2, "redeem", &[1]);
    redeem.redeemer = Some("user-42".into());
    redeem.order_id = None;
    let mut void = event("gift", 3, "void", &[2]);
    void.reason = Some("fraud".into());
    l.apply_events(&[event("gift", 1, "claim", &[1, 2]), redeem, void])
        .await
        .expect("apply");
    let k = get(l, "gift.1").await;
    assert_eq!((k.sold, k.uses, k.state.as_str()), (1, 1, "redeemed"));
    assert_eq!(k.redeemer.as_deref(), Some("user-42"));
    assert_eq!(k.redeemed_at_ms, Some(NOW + 2));
    assert_eq!(k.order_id.as_deref(), Some("o-1"));
    assert_eq!(tally(l, "gift.2").await, tallied(0, 1, 0, true, "void"));

    l.apply_events(&[event("gift", 4, "restore", &[2])])
        .await
        .expect("restore");
    assert_eq!(tally(l, "gift.2").await, tallied(0, 1, 0, false, "claimed"));

    // Committed by two writers in the other order, a void and the restore that undid it
    // leave the key as the engine has it: restored; and the next void still voids it.
    l.apply_events(&[event("gift", 6, "restore", &[2])])
        .await
        .expect("restore first");
    assert_eq!(tally(l, "gift.2").await, tallied(0, 1, 0, false, "claimed"));
    l.apply_events(&[event("gift", 5, "void", &[2])])
        .await
        .expect("then its void");
    assert_eq!(tally(l, "gift.2").await, tallied(0, 1, 0, false, "claimed"));
    l.apply_events(&[event("gift", 7, "void", &[2])])
        .await
        .expect("void again");
    assert_eq!(tally(l, "gift.2").await, tallied(0, 1, 0, true, "void"));
}

async fn late_confirm_sells_fresh_keys(env: &Env) {
    let l = env.ledger.as_ref();
    stocked(l, "gift", &keys(&["L1", "L2"])).await;
    // The hold on key 1 lapsed; the late confirm claimed key 2 instead.
    let mut late = event("gift", 3, "confirm", &[2]);
    late.late = true;
    late.order_id = Some("o-1".into());
    l.apply_events(&[
        event("gift", 1, "hold", &[1]),
        event("gift", 2, "expire", &[1]),
        late,
    ])
    .await
    .expect("apply");
    assert_eq!(
        tally(l, "gift.1").await,
        tallied(0, 0, 0, false, "available")
    );
    assert_eq!(tally(l, "gift.2").await, tallied(0, 1, 0, false, "claimed"));
    assert_eq!(get(l, "gift.2").await.order_id.as_deref(), Some("o-1"));
}

async fn reusable_keys_count_issues(env: &Env) {
    let l = env.ledger.as_ref();
    let mut shared = key("SHARED");
    shared.max_issues = 2;
    stocked(l, "gift", &[shared]).await;
    l.apply_events(&[event("gift", 1, "claim", &[1])])
        .await
        .expect("claim");
    // One issue of two taken: still available to another order.
    assert_eq!(
        tally(l, "gift.1").await,
        tallied(0, 1, 0, false, "available")
    );
    l.apply_events(&[event("gift", 2, "hold", &[1])])
        .await
        .expect("hold");
    assert_eq!(tally(l, "gift.1").await, tallied(1, 1, 0, false, "claimed"));
    l.apply_events(&[event("gift", 3, "release", &[1])])
        .await
        .expect("release");
    assert_eq!(
        tally(l, "gift.1").await,
        tallied(0, 1, 0, false, "available")
    );
    l.apply_events(&[event("gift", 4, "claim", &[1])])
        .await
        .expect("claim");
    assert_eq!(tally(l, "gift.1").await, tallied(0, 2, 0, false, "claimed"));
    assert_eq!(get(l, "gift.1").await.order_id.as_deref(), Some("o-4"));
}

async fn multi_use_keys_count_uses(env: &Env) {
    let l = env.ledger.as_ref();
    let mut twice = key("TWICE");
    twice.max_uses = 2;
    stocked(l, "gift", &[twice]).await;
    l.apply_events(&[
        event("gift", 1, "claim", &[1]),
        redemption("gift", 2, "alice"),
    ])
    .await
    .expect("apply");
    assert_eq!(tally(l, "gift.1").await, tallied(0, 1, 1, false, "claimed"));
    l.apply_events(&[redemption("gift", 3, "bob")])
        .await
        .expect("apply");
    let k = get(l, "gift.1").await;
    assert_eq!((k.uses, k.state.as_str()), (2, "redeemed"));
    assert_eq!(k.redeemer.as_deref(), Some("bob"));
    assert_eq!(k.redeemed_at_ms, Some(NOW + 3));
}

/// Two writers commit a SKU's events each in its own batch: here the one holding the later
/// take and redemption of a key commits first. The key still names the engine's latest order
/// and redeemer, which a rebuilt engine is loaded with (the last redeemer's retry is answered
/// from it).
async fn the_latest_order_and_redemption_follow_the_engine_whatever_commits_last(env: &Env) {
    let l = env.ledger.as_ref();
    let mut shared = key("SHARED");
    shared.max_issues = 2;
    shared.max_uses = 2;
    stocked(l, "gift", &[shared]).await;
    // In the engine: o-9 claims, o-10 claims, "first" redeems, "second" redeems.
    l.apply_events(&[
        event("gift", 10, "claim", &[1]),
        redemption("gift", 12, "second"),
    ])
    .await
    .expect("the later batch");
    l.apply_events(&[
        event("gift", 9, "claim", &[1]),
        redemption("gift", 11, "first"),
    ])
    .await
    .expect("the earlier batch");
    let k = get(l, "gift.1").await;
    assert_eq!((k.sold, k.uses, k.state.as_str()), (2, 2, "redeemed"));
    assert_eq!(k.order_id.as_deref(), Some("o-10"));
    assert_eq!(k.redeemer.as_deref(), Some("second"));
    assert_eq!(k.redeemed_at_ms, Some(NOW + 12));
    // One batch carrying both, the later first (a batch taken over from a dead writer).
    let mut again = key("AGAIN");
    again.max_issues = 2;
    again.max_uses = 2;
    stocked(l, "card", &[again]).await;
    let mut late = event("card", 21, "claim", &[1]);
    late.order_id = Some("late".into());
    let mut early = event("card", 20, "claim", &[1]);
    early.order_id = Some("early".into());
    l.apply_events(&[late, early]).await.expect("one batch");
    assert_eq!(get(l, "card.1").await.order_id.as_deref(), Some("late"));
}

/// The largest stream id the ledger holds of a SKU, which a rebuilt engine's events go
/// above (`inventory::warm::begin_restore`).
async fn the_last_entry_is_the_largest_stream_id_of_the_sku(env: &Env) {
    let l = env.ledger.as_ref();
    stocked_reusable(l, &["gift", "gift2"]).await;
    assert_eq!(l.last_entry("gift").await.expect("none yet"), None);
    // Ids compare as numbers (`10-0` after `9-0`, `9-10` after `9-9`), whatever order the
    // events were committed in; another SKU's, even one whose name starts alike, and an
    // id no engine made count for nothing.
    let mut late = redemption("gift", 9, "someone");
    late.event_id = "gift/9-10".into();
    let mut odd = event("gift", 11, "claim", &[1]);
    odd.event_id = "gift/imported".into();
    l.apply_events(&[
        event("gift", 10, "claim", &[1]),
        event("gift2", 99, "claim", &[1]),
    ])
    .await
    .expect("first commit");
    l.apply_events(&[event("gift", 9, "claim", &[1]), late, odd])
        .await
        .expect("second commit");
    let id = |ms, seq| Some(StreamId { ms, seq });
    assert_eq!(l.last_entry("gift").await.expect("gift"), id(10, 0));
    assert_eq!(l.last_entry("gift2").await.expect("gift2"), id(99, 0));
    let mut far = event("gift", 12, "claim", &[1]);
    far.event_id = "gift/18446744073709551615-3".into();
    l.apply_events(&[far]).await.expect("third commit");
    assert_eq!(l.last_entry("gift").await.expect("gift"), id(u64::MAX, 3));
    assert_eq!(l.last_entry("none").await.expect("unknown SKU"), None);
}

/// A rebuild's fence (`fence_rebuild`, before it reads the ledger): a commit of another
/// generation's events after it marks the SKU to be rebuilt again, and is committed all the
/// same; a fence of a new generation clears the mark.
async fn a_commit_behind_a_rebuilds_fence_marks_the_sku_to_rebuild_again(env: &Env) {
    let l = env.ledger.as_ref();
    stocked(l, "gift", &keys(&["K1", "K2", "K3"])).await;
    stocked(l, "card", &keys(&["C1"])).await;
    let of = |mut e: LedgerEvent, gen: &str| {
        e.gen = Some(gen.to_owned());
        e
    };
    let rereads = || async { l.rereads().await.expect("rereads") };
    // Never rebuilt: no fence, whatever the generation.
    l.apply_events(&[of(event("gift", 1, "claim", &[1]), "g1")])
        .await
        .expect("commit");
    assert!(rereads().await.is_empty());

    l.fence_rebuild("gift", "g2").await.expect("fence");
    // Of the generation fenced, or of none known: nothing marked.
    l.apply_events(&[
        of(event("gift", 2, "hold", &[2]), "g2"),
        event("gift", 3, "release", &[2]),
    ])
    .await
    .expect("commit");
    assert!(rereads().await.is_empty());
    // Of another generation (the lost one): marked, and committed.
    let late = of(event("gift", 4, "claim", &[2]), "g1");
    assert_eq!(
        l.apply_events(std::slice::from_ref(&late))
            .await
            .expect("commit"),
        1
    );
    assert_eq!(rereads().await, ["gift"]);
    assert_eq!(tally(l, "gift.2").await, tallied(0, 1, 0, false, "claimed"));
    // The fence of the same generation again (another gateway finishing that rebuild) does
    // not clear it: that rebuild may have read the ledger before the commit.
    l.fence_rebuild("gift", "g2").await.expect("fence again");
    assert_eq!(rereads().await, ["gift"]);
    // The fence of a new generation does: its rebuild reads the ledger after the commit.
    l.fence_rebuild("gift", "g3").await.expect("new fence");
    assert!(rereads().await.is_empty());
    // A copy of an event the ledger has changes nothing, and marks nothing; another SKU's
    // fences are its own.
    assert_eq!(l.apply_events(&[late]).await.expect("copy"), 0);
    l.apply_events(&[of(event("card", 5, "claim", &[1]), "c1")])
        .await
        .expect("commit");
    assert!(rereads().await.is_empty());
    // An event that changes no key passes the fence all the same (PostgreSQL reads the
    // fences with the keys' update, and without one in a statement of its own).
    l.apply_events(&[of(event("gift", 6, "pool", &[]), "g1")])
        .await
        .expect("commit");
    assert_eq!(rereads().await, ["gift"]);
}

/// A commit whose gateway stops in the middle of its transaction (paused, or cut off from the
/// database) holds its SKUs' rebuild fences for share (`pass_fence`), and a rebuild of those
/// SKUs waits for it. PostgreSQL ends a ledger session idle in a transaction after 10 s (the
/// ledger's `idle_in_transaction_session_timeout`), which rolls the commit back: the rebuild
/// goes on, and the commit, sent again as a writer does, lands behind the new fence and marks
/// the SKU to be rebuilt again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_stalled_mid_transaction_holds_a_rebuild_back_only_until_its_session_times_out() {
    let Some(pg) = TestDatabase::create().await else {
        return;
    };
    let dir = TempDir::new().expect("temp dir");
    let direct = open(Some(pg.url()), dir.path()).await.expect("open");
    stocked(direct.as_ref(), "gift", &keys(&["K1", "K2"])).await;
    // Text no statement holds: of the commit's replies, only the fence's row carries it.
    const FENCED: &str = "fenced-5c1e9a";
    direct.fence_rebuild("gift", FENCED).await.expect("fence");

    let authority = pg
        .url()
        .split_once('@')
        .and_then(|(_, rest)| rest.split_once('/'))
        .map(|(authority, _)| authority.to_owned())
        .expect("PostgreSQL address");
    let proxy = proxy::Proxy::start(authority.parse().expect("address")).await;
    let stalled = open(
        Some(&pg.url().replacen(&authority, &proxy.addr.to_string(), 1)),
        dir.path(),
    )
    .await
    .expect("open through the proxy");
    // The commit stops right after PostgreSQL answered its fence check: the row is locked
    // for share, the answer is held, and the session waits for a next statement.
    proxy.freeze_on(FENCED.as_bytes());
    let mut late = event("gift", 1, "claim", &[1]);
    late.gen = Some("lost".to_owned());
    let committing = tokio::spawn({
        let (stalled, late) = (stalled.clone(), late.clone());
        async move { stalled.apply_events(&[late]).await }
    });
    eventually::eventually(
        std::time::Duration::from_secs(60),
        "the commit checking the fence",
        || async { proxy.is_frozen() },
        |frozen| *frozen,
    )
    .await;

    tokio::time::timeout(
        std::time::Duration::from_secs(120),
        direct.fence_rebuild("gift", "rebuilt"),
    )
    .await
    .expect("a rebuild's fence waited on a stalled commit for good")
    .expect("fence");
    proxy.thaw();
    // The session was ended under the commit: nothing of it is in the ledger.
    let first = committing.await.expect("commit task");
    assert!(
        matches!(first, Err(LedgerError::Unavailable(_))),
        "the stalled commit went through, or failed for good: {first:?}"
    );
    assert_eq!(
        tally(direct.as_ref(), "gift.1").await,
        tallied(0, 0, 0, false, "available")
    );
    assert!(direct.rereads().await.expect("rereads").is_empty());
    // Sent again, it commits behind the new fence and marks the SKU.
    assert_eq!(stalled.apply_events(&[late]).await.expect("sent again"), 1);
    assert_eq!(
        tally(direct.as_ref(), "gift.1").await,
        tallied(0, 1, 0, false, "claimed")
    );
    assert_eq!(direct.rereads().await.expect("rereads"), ["gift"]);
}

/// Commits of events keep one connection from one commit to the next (PostgreSQL). One
/// ended while it waited (a restarted server, an operator's `pg_terminate_backend`, a
/// server-side idle timeout) costs the next commit nothing: it goes through on a new one,
/// and every event is recorded once.
#[tokio::test]
async fn a_commit_after_the_ledgers_sessions_ended_goes_through() {
    let Some(env) = Env::postgres().await else {
        return;
    };
    let l = env.ledger.as_ref();
    stocked(l, "gift", &keys(&["K1", "K2", "K3"])).await;
    let claim = |n: i64| event("gift", n, "claim", &[n]);
    assert_eq!(l.apply_events(&[claim(1)]).await.expect("first"), 1);

    for round in 2..=3 {
        // Every other session of the ledger's database ended, and gone before this goes on.
        env.exec_aside(
            "SELECT pg_terminate_backend(pid, 60000) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .await;
        assert_eq!(
            l.apply_events(&[claim(round - 1), claim(round)])
                .await
                .expect("a commit after the sessions ended"),
            1,
            "round {round}"
        );
    }
    for n in 1..=3 {
        let id = format!("gift.{n}");
        assert_eq!(get(l, &id).await.state, "claimed", "{id}");
    }
    let events = l.order_events("gift", "o-2").await.expect("events");
    assert_eq!(events.len(), 1, "recorded once: {events:?}");
}

/// Commits cost the same after PostgreSQL took the statistics of a small ledger: autovacuum
/// analyzes a fresh ledger's events table after its first few dozen events, and a plan made
/// from those statistics and kept (a foreign key's check, once) read the whole events table
/// for every key an event named, ever slower as the table grew, until the next analyze. The
/// commits after such an analyze never scan the events table.
#[tokio::test]
async fn commits_never_scan_the_events_table_after_it_was_analyzed_small() {
    let Some(env) = Env::postgres().await else {
        return;
    };
    let l = env.ledger.as_ref();
    let mut reusable = key("R1");
    reusable.max_issues = 1_000_000;
    reusable.max_uses = 1_000_000;
    stocked(l, "gift", std::slice::from_ref(&reusable)).await;
    let claim = |n: i64| event("gift", n, "claim", &[1]);
    for n in 1..=40 {
        l.apply_events(&[claim(n)]).await.expect("commit");
    }
    env.exec_aside("ANALYZE events").await;

    let url = env.url.clone().expect("PostgreSQL");
    // (sequential scans of `events`, rows inserted into `event_keys`) as the server's
    // statistics have them: a session reports its counts when idle, within seconds.
    let counters = || async {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&url).await.expect("connect");
        let row: (i64, i64) = sqlx::query_as(
            "SELECT (SELECT seq_scan FROM pg_stat_user_tables WHERE relname = 'events'), \
             (SELECT n_tup_ins FROM pg_stat_user_tables WHERE relname = 'event_keys')",
        )
        .fetch_one(&mut conn)
        .await
        .expect("statistics");
        row
    };
    // All links counted: the scans of the same transactions are too.
    let settled = |links: i64| {
        eventually::eventually(
            std::time::Duration::from_secs(60),
            "the commits' statistics",
            &counters,
            move |seen: &(i64, i64)| seen.1 >= links,
        )
    };
    let before = settled(40).await;
    for n in 41..=200 {
        l.apply_events(&[claim(n)]).await.expect("commit");
    }
    let after = settled(200).await;
    assert_eq!(
        after.0 - before.0,
        0,
        "commits scanned the events table ({before:?} → {after:?})"
    );
}

/// A rebuild restores a SKU's orders page by page (`order_events_after`, as
/// `inventory::warm::restore_orders` calls it): every order event of the SKU once, in the
/// order the ledger recorded them, none of another SKU's and no redemption (it names no order).
async fn order_events_page_by_recording_order(env: &Env) {
    let l = env.ledger.as_ref();
    stocked_reusable(l, &["gift", "card"]).await;
    // Recorded in three commits, the stream's order not the ledger's: a later entry of
    // "gift" committed before an earlier one (a batch a writer took over).
    let gift = |n: i64| event("gift", n, "claim", &[1]);
    l.apply_events(&[gift(7), gift(8), event("card", 1, "claim", &[1])])
        .await
        .expect("first commit");
    l.apply_events(&[
        redemption("gift", 9, "someone"),
        gift(3),
        event("card", 2, "claim", &[1]),
        gift(4),
    ])
    .await
    .expect("second commit");
    l.apply_events(&[gift(10), gift(11), gift(12)])
        .await
        .expect("third commit");
    let recorded = ["o-7", "o-8", "o-3", "o-4", "o-10", "o-11", "o-12"];

    for limit in [1, 2, 3, 7, 100] {
        let mut cursor = 0;
        let mut seen: Vec<String> = Vec::new();
        let mut last_seq = 0;
        for _ in 0..=recorded.len() {
            let page = l
                .order_events_after("gift", cursor, limit)
                .await
                .expect("a page of order events");
            assert!(
                page.len() <= limit as usize,
                "limit {limit}: a page of {}",
                page.len()
            );
            let Some((last, _)) = page.last() else { break };
            for (seq, e) in &page {
                assert!(*seq > last_seq, "limit {limit}: seq {seq} after {last_seq}");
                last_seq = *seq;
                assert_eq!(e.sku, "gift");
                seen.push(e.order_id.clone().expect("an order event names its order"));
            }
            cursor = *last;
        }
        assert_eq!(seen, recorded, "limit {limit}");
    }
    let card = l.order_events_after("card", 0, 100).await.expect("card");
    assert_eq!(card.len(), 2);
    assert!(l
        .order_events_after("none", 0, 100)
        .await
        .expect("none")
        .is_empty());
}

/// Statements, reconciliation and the restore of a retired order find an order's events by
/// its id however long the ledger has run: on SQLite through the runs built behind the
/// commits (`src/ledger/sqlite/order_runs.rs`) and the events above them, on PostgreSQL
/// through its index. Orders recorded early (in the runs), late (above them) and across the
/// two; an order of another SKU under the same id; an unknown id.
async fn orders_are_found_by_id_as_the_ledger_grows(env: &Env) {
    const HOLDS: i64 = 25_000;
    const CONFIRMS: i64 = 2_000;
    const PER_COMMIT: i64 = 500;
    let l = env.ledger.as_ref();
    let commit = |events: Vec<LedgerEvent>| async move {
        for part in events.chunks(PER_COMMIT as usize) {
            l.apply_events(part).await.expect("commit");
        }
    };
    // Orders o-1 … o-25000, each made by a hold.
    commit((1..=HOLDS).map(|n| event("gift", n, "hold", &[])).collect()).await;

    let covered = "SELECT coalesce(max(last_seq), 0) FROM order_run_list WHERE state = 'live'";
    if env.sqlite_number(covered).await.is_some() {
        // Built behind the commits: wait for the first run.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        while env.sqlite_number(covered).await < Some(20_000) {
            assert!(
                std::time::Instant::now() < deadline,
                "the runs cover {:?} events",
                env.sqlite_number(covered).await
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
    // Then confirms of o-1 … o-2000, recorded above the runs (until a cut covers them: a
    // few thousand events are cut once they have waited 10 s), and another SKU's o-1.
    commit(
        (1..=CONFIRMS)
            .map(|n| {
                let mut e = event("gift", HOLDS + n, "confirm", &[]);
                e.order_id = Some(format!("o-{n}"));
                e
            })
            .collect(),
    )
    .await;
    let mut card_o1 = event("card", HOLDS + CONFIRMS + 1, "hold", &[]);
    card_o1.order_id = Some("o-1".into());
    commit(vec![card_o1]).await;

    let kinds = |events: Vec<(i64, kamigate::ledger::EventRecord)>| -> Vec<(String, i64)> {
        events
            .into_iter()
            .map(|(_, e)| (e.kind, e.at_ms - NOW))
            .collect()
    };
    for l in [env.ledger.clone(), env.reopen().await] {
        for n in [1, 7, 1_999, 2_000, 2_001, 19_999, 20_001, 24_999, HOLDS] {
            let mut expected = vec![("hold".to_owned(), n)];
            if n <= CONFIRMS {
                expected.push(("confirm".to_owned(), HOLDS + n));
            }
            let found = l
                .order_events("gift", &format!("o-{n}"))
                .await
                .expect("o-n");
            assert_eq!(kinds(found), expected, "o-{n}");
        }
        assert_eq!(
            kinds(l.order_events("card", "o-1").await.expect("card o-1")),
            [("hold".to_owned(), HOLDS + CONFIRMS + 1)]
        );
        assert!(l.order_events("gift", "o-0").await.expect("o-0").is_empty());
        assert!(l
            .order_events("none", "o-1")
            .await
            .expect("none")
            .is_empty());

        let names: Vec<String> = ["o-1", "o-2001", "o-24999", "o-none"]
            .map(String::from)
            .to_vec();
        let mut orders: Vec<(String, String, String, i64, i64)> = l
            .find_orders(&names)
            .await
            .expect("find")
            .into_iter()
            .map(|o| {
                let created = o.created_at_ms - NOW;
                let updated = o.updated_at_ms - NOW;
                (o.sku, o.order_key, o.last_kind, created, updated)
            })
            .collect();
        orders.sort();
        let order = |sku: &str, name: &str, kind: &str, created: i64, updated: i64| {
            (sku.into(), name.into(), kind.into(), created, updated)
        };
        assert_eq!(
            orders,
            [
                order(
                    "card",
                    "o-1",
                    "hold",
                    HOLDS + CONFIRMS + 1,
                    HOLDS + CONFIRMS + 1
                ),
                order("gift", "o-1", "confirm", 1, HOLDS + 1),
                order("gift", "o-2001", "hold", 2_001, 2_001),
                order("gift", "o-24999", "hold", 24_999, 24_999),
            ]
        );
    }
}

async fn counts_group_active_keys_by_state(env: &Env) {
    let l = env.ledger.as_ref();
    let codes: Vec<String> = (0..8).map(|i| format!("N{i}")).collect();
    let refs: Vec<&str> = codes.iter().map(String::as_str).collect();
    stocked(l, "gift", &keys(&refs)).await;
    // A pending batch on the side never counts.
    l.begin_batch("gift", "side", UPLOAD, NOW)
        .await
        .expect("begin");
    l.insert_keys("gift", "side", UPLOAD, &keys(&["SIDE1", "SIDE2"]), &Clear)
        .await
        .expect("insert");
    l.apply_events(&[
        event("gift", 1, "hold", &[1, 2]),
        event("gift", 2, "claim", &[3, 4, 5]),
        event("gift", 3, "redeem", &[5]),
        event("gift", 4, "void", &[6]),
    ])
    .await
    .expect("apply");
    let counts = l.counts("gift").await.expect("counts");
    assert_eq!(
        counts,
        StateCounts {
            available: 2,
            held: 2,
            claimed: 2,
            redeemed: 1,
            void: 1,
        }
    );
    assert_eq!(counts.total(), 8);
    assert_eq!(
        l.counts("unknown").await.expect("counts"),
        StateCounts::default()
    );
}

async fn key_events_are_an_audit_trail_oldest_first(env: &Env) {
    let l = env.ledger.as_ref();
    stocked(l, "gift", &keys(&["A1", "A2"])).await;
    let mut add = event("gift", 0, "add", &[1, 2]);
    add.order_id = None;
    l.apply_events(&[add, event("gift", 1, "hold", &[1, 2])])
        .await
        .expect("apply");
    let mut void = event("gift", 3, "void", &[1]);
    void.reason = Some("merchant request".into());
    l.apply_events(&[event("gift", 2, "confirm", &[1]), void])
        .await
        .expect("apply");

    let trail = l.key_events("gift.1").await.expect("audit");
    let kinds: Vec<&str> = trail.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, vec!["add", "hold", "confirm", "void"]);
    assert_eq!(trail[1].event_id, "gift/1-0");
    assert_eq!(trail[1].order_id.as_deref(), Some("o-1"));
    assert_eq!(trail[3].reason.as_deref(), Some("merchant request"));
    assert_eq!(trail[3].at_ms, NOW + 3);
    assert_eq!(trail[3].fields_json, r#"{"t":"void"}"#);
    let other: Vec<String> = l
        .key_events("gift.2")
        .await
        .expect("audit")
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(other, vec!["add", "hold"]);
    assert!(l.key_events("gift.99").await.expect("audit").is_empty());
    assert!(l.key_events("not-a-key").await.expect("audit").is_empty());
    assert_eq!(l.get_key("gift.x").await.expect("get"), None);
}

async fn unknown_keys_and_kinds_are_recorded_and_skipped(env: &Env) {
    let l = env.ledger.as_ref();
    stocked(l, "gift", &keys(&["U1"])).await;
    let applied = l
        .apply_events(&[
            // Key 999 never existed (or its batch was aborted): skipped, key 1 still changes.
            event("gift", 1, "claim", &[1, 999]),
            event("gift", 2, "teleport", &[1]),
            event("elsewhere", 3, "hold", &[1]),
        ])
        .await
        .expect("apply");
    assert_eq!(applied, 3);
    assert_eq!(tally(l, "gift.1").await, tallied(0, 1, 0, false, "claimed"));
    let kinds: Vec<String> = l
        .key_events("gift.1")
        .await
        .expect("audit")
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(kinds, vec!["claim", "teleport"]);
    assert_eq!(l.key_events("gift.999").await.expect("audit").len(), 1);
}

async fn concurrent_writers_apply_each_event_once(env: &Env) {
    let l = env.ledger.clone();
    let codes: Vec<String> = (0..50).map(|i| format!("W{i}")).collect();
    let refs: Vec<&str> = codes.iter().map(String::as_str).collect();
    stocked(l.as_ref(), "gift", &keys(&refs)).await;
    let events: Vec<LedgerEvent> = (1..=50).map(|i| event("gift", i, "claim", &[i])).collect();
    // Two writers racing over overlapping, reclaimed entries.
    let (a, b) = (l.clone(), l.clone());
    let (first, second) = (events.clone(), events[10..].to_vec());
    let (x, y) = tokio::join!(
        tokio::spawn(async move { a.apply_events(&first).await }),
        tokio::spawn(async move { b.apply_events(&second).await }),
    );
    let total = x.expect("join").expect("apply") + y.expect("join").expect("apply");
    assert_eq!(total, 50);
    let counts = l.counts("gift").await.expect("counts");
    assert_eq!((counts.claimed, counts.available), (50, 0));
    assert_eq!(tally(l.as_ref(), "gift.20").await.1, 1);
}

/// A SQLite ledger's group commits reach the ledger file itself soon after they commit,
/// long before the WAL fills: checkpoints run on a thread of their own, not inside a commit
/// once the WAL passes 1,000 pages (src/ledger/sqlite/group_commit.rs). Read from a copy of
/// the file alone, without its WAL.
#[tokio::test]
async fn sqlite_group_commits_are_checkpointed_without_waiting_for_a_full_wal() {
    let env = Env::sqlite().await;
    let l = env.ledger.as_ref();
    let codes: Vec<String> = (0..300).map(|i| format!("K{i}")).collect();
    let refs: Vec<&str> = codes.iter().map(String::as_str).collect();
    stocked(l, "gift", &keys(&refs)).await;
    let events: Vec<LedgerEvent> = (1..=300).map(|i| event("gift", i, "claim", &[i])).collect();
    assert_eq!(l.apply_events(&events).await.expect("apply"), 300);

    let wal = std::fs::metadata(env.dir.path().join("ledger.sqlite3-wal")).expect("the WAL");
    assert!(
        wal.len() < 1_000 * 4_096,
        "a WAL of {} bytes: past SQLite's own checkpoint size, which this test is not about",
        wal.len()
    );
    let copies = TempDir::new().expect("temp dir");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut attempt = 0;
    let in_file = loop {
        attempt += 1;
        // A copy taken while a checkpoint writes may be torn: it then reads as an error, and
        // the next copy is taken.
        let copy = copies.path().join(format!("copy-{attempt}.sqlite3"));
        std::fs::copy(env.dir.path().join("ledger.sqlite3"), &copy).expect("copy the file");
        let claimed: Option<i64> = rusqlite::Connection::open(&copy).ok().and_then(|c| {
            c.query_row(
                "SELECT count(*) FROM events WHERE kind = 'claim'",
                [],
                |r| r.get(0),
            )
            .ok()
        });
        if claimed == Some(300) || std::time::Instant::now() > deadline {
            break claimed;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(
        in_file,
        Some(300),
        "the ledger file alone holds every committed event"
    );
}

async fn large_import_pages_through_keys_after(env: &Env) {
    let l = env.ledger.as_ref();
    l.put_sku("bulk", "{}", 1, NOW).await.expect("put_sku");
    l.begin_batch("bulk", "big", UPLOAD, NOW)
        .await
        .expect("begin");
    const TOTAL: usize = 20_000;
    let mut accepted = 0u64;
    for start in (0..TOTAL).step_by(1000) {
        let rows: Vec<NewKey> = (start..start + 1000)
            .map(|i| {
                let mut k = key(&format!("BULK{i:06}"));
                k.line = i as u64 + 1;
                k
            })
            .collect();
        let out = l
            .insert_keys("bulk", "big", UPLOAD, &rows, &Clear)
            .await
            .expect("insert");
        accepted += out
            .iter()
            .filter(|o| matches!(o, InsertOutcome::Inserted { .. }))
            .count() as u64;
    }
    assert_eq!(accepted, TOTAL as u64);
    let report = BatchCounts {
        accepted,
        ..BatchCounts::default()
    };
    l.finish_batch("bulk", "big", UPLOAD, &report, true, NOW)
        .await
        .expect("finish");
    // Warm-up reads the keys back at once: a page must come through the primary key in
    // order, not from all the SKU's later keys sorted (what PostgreSQL plans for a table
    // it has no statistics of yet).
    let page = "SELECT local_id FROM keys WHERE sku = 'bulk' AND local_id > 10 \
                AND batch_id NOT IN (SELECT batch_id FROM batches \
                WHERE sku = 'bulk' AND state <> 'active') ORDER BY local_id LIMIT 1000";
    if let Some(plan) = env.postgres_plan(page).await {
        assert!(
            plan.contains("Index Scan using keys_pkey") && !plan.contains("Sort"),
            "a warm-up page's plan:\n{plan}"
        );
    }

    let mut cursor = 0;
    let mut seen = 0;
    loop {
        let page = l.keys_after("bulk", cursor, 1500).await.expect("page");
        let Some(last) = page.last() else { break };
        for k in &page {
            assert!(k.local_id > cursor, "ids ascend across pages");
            cursor = k.local_id;
        }
        assert_eq!(cursor, last.local_id);
        seen += page.len();
    }
    assert_eq!(seen, TOTAL);
    assert_eq!(cursor, TOTAL as i64);
    let first = get(l, "bulk.1").await;
    assert_eq!(first.code, "BULK000000");
    assert_eq!(
        l.counts("bulk").await.expect("counts").available,
        TOTAL as u64
    );
}

/// A ledger written before keys took their visibility from their batch (0011): each key
/// carried an `active` copy. Rows as those versions left them: an active batch of two keys
/// and a pending one of one.
const BEFORE_BATCH_VISIBILITY: &str = "\
    INSERT INTO skus (sku, config_json, format_version, next_local_id, created_at_ms, \
        updated_at_ms) VALUES ('gift', '{}', 1, 4, 1, 1);
    INSERT INTO batches (sku, batch_id, state, accepted, created_at_ms, activated_at_ms) \
        VALUES ('gift', 'sold', 'active', 2, 1, 2), ('gift', 'later', 'pending', 1, 1, NULL);
    INSERT INTO keys (sku, local_id, digest, code, batch_id, active, format_version, \
        max_issues, max_uses, updated_at_ms) \
        VALUES ('gift', 1, 'd1', 'C1', 'sold', TRUE, 1, 1, 1, 2), \
               ('gift', 2, 'd2', 'C2', 'sold', TRUE, 1, 1, 1, 2), \
               ('gift', 3, 'd3', 'C3', 'later', FALSE, 1, 1, 1, 1);";

/// `migrator`'s migrations up to `version`: a ledger of those versions.
fn up_to(mut migrator: sqlx::migrate::Migrator, version: i64) -> sqlx::migrate::Migrator {
    migrator.migrations = migrator
        .migrations
        .iter()
        .filter(|m| m.version <= version)
        .cloned()
        .collect::<Vec<_>>()
        .into();
    migrator
}

/// After the upgrade the pending batch's key stays invisible until activated, and the active
/// batch's keys count and warm as before.
async fn upgraded_from_before_batch_visibility(l: &dyn Ledger) {
    let ids = |page: Vec<KeyRecord>| page.iter().map(|k| k.local_id).collect::<Vec<_>>();
    assert_eq!(
        ids(l.keys_after("gift", 0, 10).await.expect("keys")),
        [1, 2]
    );
    assert_eq!(l.counts("gift").await.expect("counts").available, 2);
    let by_version = l.counts_by_version("gift").await.expect("by version");
    assert_eq!(by_version.get(&1).map(|c| c.available), Some(2));
    l.activate_batch("gift", "later", NOW)
        .await
        .expect("activate");
    assert_eq!(
        ids(l.keys_after("gift", 0, 10).await.expect("keys")),
        [1, 2, 3]
    );
    assert_eq!(l.counts("gift").await.expect("counts").available, 3);
}

/// A SQLite ledger migrated up to `version` and holding `rows`, in a new directory.
async fn sqlite_ledger_at(version: i64, rows: &str) -> TempDir {
    use sqlx::{sqlite::SqliteConnectOptions, ConnectOptions, Connection};
    let dir = TempDir::new().expect("temp dir");
    let options = SqliteConnectOptions::new()
        .filename(dir.path().join("ledger.sqlite3"))
        .create_if_missing(true);
    let mut conn = options.connect().await.expect("connect");
    up_to(sqlx::migrate!("./migrations/sqlite"), version)
        .run(&mut conn)
        .await
        .expect("the older migrations");
    sqlx::raw_sql(rows)
        .execute(&mut conn)
        .await
        .expect("old rows");
    conn.close().await.expect("close");
    dir
}

/// A PostgreSQL ledger migrated up to `version` and holding `rows`, in a new database;
/// `None` if PostgreSQL is not there.
async fn postgres_ledger_at(version: i64, rows: &str) -> Option<TestDatabase> {
    use sqlx::Connection;
    let pg = TestDatabase::create().await?;
    let mut conn = sqlx::PgConnection::connect(pg.url())
        .await
        .expect("connect");
    up_to(sqlx::migrate!("./migrations/postgres"), version)
        .run(&mut conn)
        .await
        .expect("the older migrations");
    sqlx::raw_sql(rows)
        .execute(&mut conn)
        .await
        .expect("old rows");
    conn.close().await.expect("close");
    Some(pg)
}

#[tokio::test]
async fn sqlite_ledger_from_before_batch_visibility_upgrades_in_place() {
    let dir = sqlite_ledger_at(10, BEFORE_BATCH_VISIBILITY).await;
    let ledger = open(None, dir.path()).await.expect("open and upgrade");
    upgraded_from_before_batch_visibility(ledger.as_ref()).await;
}

#[tokio::test]
async fn postgres_ledger_from_before_batch_visibility_upgrades_in_place() {
    let Some(pg) = postgres_ledger_at(10, BEFORE_BATCH_VISIBILITY).await else {
        return;
    };
    let dir = TempDir::new().expect("temp dir");
    let ledger = open(Some(pg.url()), dir.path())
        .await
        .expect("open and upgrade");
    upgraded_from_before_batch_visibility(ledger.as_ref()).await;
}

/// A ledger written before voids were counted (0012): key 2 void, key 1 not.
const BEFORE_VOID_COUNT: &str = "\
    INSERT INTO skus (sku, config_json, format_version, next_local_id, created_at_ms, \
        updated_at_ms) VALUES ('gift', '{}', 1, 3, 1, 1);
    INSERT INTO batches (sku, batch_id, state, accepted, created_at_ms, activated_at_ms) \
        VALUES ('gift', 'b', 'active', 2, 1, 2);
    INSERT INTO keys (sku, local_id, digest, code, batch_id, format_version, max_issues, \
        max_uses, void, state, updated_at_ms) \
        VALUES ('gift', 1, 'd1', 'C1', 'b', 1, 1, 1, FALSE, 'available', 2), \
               ('gift', 2, 'd2', 'C2', 'b', 1, 1, 1, TRUE, 'void', 2);";

/// After the upgrade the void key is void and a restore makes it available, in either order
/// with a later void; the other key voids and restores as any.
async fn upgraded_from_before_void_count(l: &dyn Ledger) {
    assert_eq!(get(l, "gift.2").await.state, "void");
    l.apply_events(&[event("gift", 1, "restore", &[2])])
        .await
        .expect("restore");
    assert_eq!(get(l, "gift.2").await.state, "available");
    l.apply_events(&[event("gift", 3, "restore", &[2])])
        .await
        .expect("a restore before its void");
    l.apply_events(&[event("gift", 2, "void", &[2])])
        .await
        .expect("then the void");
    assert_eq!(get(l, "gift.2").await.state, "available");
    l.apply_events(&[event("gift", 4, "void", &[1, 2])])
        .await
        .expect("void both");
    let counts = l.counts("gift").await.expect("counts");
    assert_eq!((counts.available, counts.void), (0, 2));
}

#[tokio::test]
async fn sqlite_ledger_from_before_void_count_upgrades_in_place() {
    let dir = sqlite_ledger_at(11, BEFORE_VOID_COUNT).await;
    let ledger = open(None, dir.path()).await.expect("open and upgrade");
    upgraded_from_before_void_count(ledger.as_ref()).await;
}

#[tokio::test]
async fn postgres_ledger_from_before_void_count_upgrades_in_place() {
    let Some(pg) = postgres_ledger_at(11, BEFORE_VOID_COUNT).await else {
        return;
    };
    let dir = TempDir::new().expect("temp dir");
    let ledger = open(Some(pg.url()), dir.path())
        .await
        .expect("open and upgrade");
    upgraded_from_before_void_count(ledger.as_ref()).await;
}
