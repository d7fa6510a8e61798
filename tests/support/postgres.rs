//! PostgreSQL for tests: a throwaway database per test on the local server.
//!
//! The server is expected at `postgres://postgres@127.0.0.1:5432/postgres` (trust auth);
//! `KAMIGATE_TEST_POSTGRES_URL` points elsewhere (a URL of the maintenance database). Each
//! test gets its own `kg_test_<random>` database, dropped when the guard drops, also after a
//! failed assertion, so tests run in parallel without seeing each other.
//!
//! No server: with `CI` set that is a failure (CI must test both backends); locally the
//! PostgreSQL half is skipped with a loud note, so a laptop without PostgreSQL still runs the
//! SQLite half.
#![allow(dead_code)]

use std::io::Write;
use std::sync::Once;
use std::time::Duration;

use sqlx::{Connection, Executor, PgConnection};

const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A database of its own for one test, dropped with the guard.
pub struct TestDatabase {
    admin_url: String,
    name: String,
    url: String,
}

impl TestDatabase {
    /// Creates a fresh database, or `None` when no server answers and `CI` is not set.
    pub async fn create() -> Option<TestDatabase> {
        let admin_url = std::env::var("KAMIGATE_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| DEFAULT_ADMIN_URL.into());
        let mut admin = match connect(&admin_url).await {
            Ok(conn) => conn,
            Err(e) => {
                if std::env::var_os("CI").is_some() {
                    panic!("PostgreSQL is not reachable at {admin_url} and CI is set: {e}");
                }
                static NOTE: Once = Once::new();
                NOTE.call_once(|| {
                    // Straight to the process's stderr: the harness captures `eprintln!` of
                    // passing tests, and this note must not be missed.
                    let note = format!(
                        "\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\
                         !!! PostgreSQL is not reachable at {admin_url}: {e}\n\
                         !!! The PostgreSQL half of these tests was SKIPPED; only SQLite ran.\n\
                         !!! Start it: pg_ctlcluster --skip-systemctl-redirect <version> main start\n\
                         !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n"
                    );
                    let _ = std::io::stderr().write_all(note.as_bytes());
                });
                return None;
            }
        };
        let name = format!("kg_test_{:016x}", rand::random::<u64>());
        admin
            .execute(format!("CREATE DATABASE {name}").as_str())
            .await
            .expect("create the test database");
        let _ = admin.close().await;
        let base = admin_url
            .rsplit_once('/')
            .map_or(admin_url.as_str(), |(base, _)| base);
        let url = format!("{base}/{name}");
        Some(TestDatabase {
            admin_url,
            name,
            url,
        })
    }

    /// The test database's URL.
    pub fn url(&self) -> &str {
        &self.url
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // Drop runs inside the test's runtime, which cannot block on itself: drop the database
        // from a thread with its own. FORCE ends the ledger's pooled connections still open.
        let admin_url = self.admin_url.clone();
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime to drop the test database");
            runtime.block_on(async {
                let mut admin = connect(&admin_url).await?;
                admin.execute(sql.as_str()).await?;
                admin.close().await
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop test database {}", self.name);
        }
    }
}

async fn connect(url: &str) -> Result<PgConnection, sqlx::Error> {
    match tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect(url)).await {
        Ok(result) => result,
        Err(_) => Err(sqlx::Error::PoolTimedOut),
    }
}
