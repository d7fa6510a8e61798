//! Rebuilds when a migration is added: `sqlx::migrate!` embeds the migration directories at
//! compile time but only notices changes to files it already knows.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
