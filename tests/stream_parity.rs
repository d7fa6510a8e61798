//! Stream consumer groups behave the same on Redis and on the embedded engine.
//!
//! The ledger writer consumes each SKU's event stream through a consumer group from Lua
//! scripts, which must work unchanged on both engines. Each test here starts a real
//! `redis-server` and an embedded engine and runs the same sequence of stream commands on
//! both, each through the same probe script (`redis.pcall` of its arguments), comparing the
//! replies: values, shapes, nils and error texts. Entries are added with explicit ids
//! (`1-1`, `1-2`, …) so ids match exactly.
//!
//! Idle times are the one thing that cannot match (Redis runs on the wall clock, and a real
//! server's time cannot be moved): they are blanked out where they appear, claims use a
//! minimum idle time of 0 (everything qualifies) or one hour (nothing does), and the
//! thresholds themselves are tested with a fake clock by the keyspace's unit tests.
//!
//! The Redis side is pinned to the 7.0 series ([`PINNED_REDIS`]): Debian 12's
//! `redis-server`, which `scripts/test` installs (7.0.15). Replies and error texts change
//! between Redis releases, so on another series every test here fails at once saying so,
//! rather than on the first reply that differs.
//!
//! Command lookup errors are left out on purpose: inside scripts Redis 7.0 reports a wrong
//! number of arguments as `Wrong number of args calling Redis command from script` and an
//! unknown (sub)command as `Unknown Redis command called from script`, whereas the keyspace,
//! like the rest of it, gives the command-line texts (`wrong number of arguments for
//! 'xgroup|create' command`, `unknown subcommand 'NOPE'. Try XINFO HELP.`).

mod support;

use std::sync::LazyLock;

use kamigate::engine::embedded::EmbeddedEngine;
use kamigate::engine::redis::{RedisEngine, RedisOptions};
use kamigate::engine::{Reply, Script, ScriptEngine};
use support::redis_server::RedisServer;

/// Runs `ARGV` as one command; an error reply comes back as `['(error)', message]` so that
/// errors are compared like any other reply instead of failing the script.
const PROBE_BODY: &str = r"
local reply = redis.pcall(unpack(ARGV))
if type(reply) == 'table' and reply.err then
  return {'(error)', reply.err}
end
return reply
";

static PROBE: LazyLock<Script> = LazyLock::new(|| Script::new("stream_probe", PROBE_BODY));

/// The Redis release series whose replies the embedded keyspace is compared with.
const PINNED_REDIS: &str = "7.0";

/// The `redis_version` a running server reports in `INFO server`.
async fn redis_version(server: &RedisServer) -> String {
    let info = server.redis_cli(&["INFO", "server"]).await;
    let info = info.as_str().expect("INFO answers text");
    info.lines()
        .find_map(|line| line.strip_prefix("redis_version:"))
        .expect("INFO server names redis_version")
        .trim()
        .to_owned()
}

/// Fails unless `server` runs the pinned Redis series.
async fn require_pinned_version(server: &RedisServer) {
    let version = redis_version(server).await;
    assert!(
        version.starts_with(&format!("{PINNED_REDIS}.")),
        "tests/stream_parity.rs compares the embedded engine with Redis {PINNED_REDIS}.x, \
         whose replies and error texts it pins; this redis-server is {version} \
         (install Redis {PINNED_REDIS}, e.g. Debian 12's redis-server)"
    );
}

/// The two engines under comparison; the Redis one on its own throwaway server.
struct Engines {
    redis: RedisEngine,
    embedded: EmbeddedEngine,
    _server: RedisServer,
}

impl Engines {
    async fn start() -> Engines {
        let server = RedisServer::start().await;
        require_pinned_version(&server).await;
        let redis = RedisEngine::connect(&server.url(), RedisOptions::default())
            .await
            .expect("connect to the test redis-server");
        let embedded = EmbeddedEngine::start().expect("start the embedded engine");
        Engines {
            redis,
            embedded,
            _server: server,
        }
    }

    /// Runs `command` (whitespace-separated) on both engines and requires equal replies.
    async fn same(&self, command: &str) -> Reply {
        self.compare(command, |reply| reply).await
    }

    /// [`Engines::same`] with idle times blanked out.
    async fn same_but_idle(&self, command: &str) -> Reply {
        self.compare(command, mask_idle).await
    }

    async fn compare(&self, command: &str, normalise: fn(Reply) -> Reply) -> Reply {
        let args: Vec<String> = command.split_whitespace().map(str::to_owned).collect();
        let redis = probe(&self.redis, &args, "redis").await;
        let embedded = probe(&self.embedded, &args, "embedded").await;
        let (redis, embedded) = (normalise(redis), normalise(embedded));
        assert_eq!(
            embedded, redis,
            "{command}: embedded (left) vs Redis (right)"
        );
        redis
    }

    /// Like [`Engines::same`], and the reply must be `expected`, so both engines cannot be
    /// wrong the same way on the replies that matter most.
    async fn expect(&self, command: &str, expected: Reply) {
        assert_eq!(self.same(command).await, expected, "{command}");
    }

    /// Like [`Engines::same`], and the reply must be an error starting with `prefix`.
    async fn expect_error(&self, command: &str, prefix: &str) {
        let reply = self.same(command).await;
        let message = error_text(&reply).unwrap_or_else(|| panic!("{command}: {reply:?}"));
        assert!(message.starts_with(prefix), "{command}: {message}");
    }
}

async fn probe(engine: &dyn ScriptEngine, args: &[String], name: &str) -> Reply {
    engine
        .eval(&PROBE, Vec::new(), args.to_vec())
        .await
        .unwrap_or_else(|e| panic!("{name}: {args:?}: {e}"))
}

/// The message of a reply the probe turned into `['(error)', message]`.
fn error_text(reply: &Reply) -> Option<&str> {
    match reply.as_array()? {
        [tag, message] if tag.as_str() == Some("(error)") => message.as_str(),
        _ => None,
    }
}

/// Blanks the idle times of `XPENDING`'s extended form (`[id, consumer, idle, deliveries]`)
/// and of `XINFO CONSUMERS` (`… 'idle', n`).
fn mask_idle(reply: Reply) -> Reply {
    let Reply::Array(items) = reply else {
        return reply;
    };
    let pending_entry = matches!(
        items.as_slice(),
        [Reply::Bulk(_), Reply::Bulk(_), Reply::Int(_), Reply::Int(_)]
    );
    let mut out = Vec::with_capacity(items.len());
    let mut after_idle = false;
    for (i, item) in items.into_iter().enumerate() {
        let masked = (pending_entry && i == 2) || after_idle;
        after_idle = item.as_str() == Some("idle");
        out.push(if masked {
            Reply::Int(0)
        } else {
            mask_idle(item)
        });
    }
    Reply::Array(out)
}

fn bulk(s: &str) -> Reply {
    Reply::from(s)
}

#[tokio::test]
async fn redis_runs_the_release_series_these_replies_pin() {
    let server = RedisServer::start().await;
    require_pinned_version(&server).await;
}

fn array(items: Vec<Reply>) -> Reply {
    Reply::Array(items)
}

fn bulks(items: &[&str]) -> Reply {
    Reply::Array(items.iter().map(|s| bulk(s)).collect())
}

/// `[id, [field, value, …]]`.
fn entry(id: &str, fields: &[&str]) -> Reply {
    array(vec![bulk(id), bulks(fields)])
}

#[tokio::test]
async fn group_lifecycle_and_errors() {
    let e = Engines::start().await;
    e.expect_error(
        "XGROUP CREATE s g $",
        "ERR The XGROUP subcommand requires the key to exist",
    )
    .await;
    e.expect_error("XGROUP CREATE s g nope MKSTREAM", "ERR Invalid stream ID")
        .await;
    e.expect("EXISTS s", Reply::Int(0)).await;
    e.expect("XGROUP CREATE s g $ MKSTREAM", Reply::Status("OK".into()))
        .await;
    e.same("XINFO GROUPS s").await;
    e.expect("XLEN s", Reply::Int(0)).await;
    e.expect_error("XGROUP CREATE s g 0", "BUSYGROUP").await;
    e.same("XGROUP CREATE s g 0 MKSTREAM").await;
    e.same("XGROUP CREATE s g2 -").await;
    e.same("XGROUP CREATE s g2 +").await;
    e.same("XGROUP CREATE s g2 0 ENTRIESREAD -2").await;
    e.same("XGROUP CREATE s g2 0 ENTRIESREAD x").await;
    e.same("XGROUP CREATE s g2 0 FOO").await;
    e.same("xgroup create s g2 0 MKSTREAM MKSTREAM ENTRIESREAD 1")
        .await;
    e.same("XGROUP DELCONSUMER s nog c").await;
    e.same("XGROUP DELCONSUMER missing g c").await;
    e.same("HSET str f v").await;
    e.same("XGROUP CREATE str g $ MKSTREAM").await;
    e.same("XINFO GROUPS str").await;

    for i in 1..=3 {
        e.same(&format!("XADD s 1-{i} f {i}")).await;
    }
    e.same("XGROUP CREATE s g2 0").await;
    e.same("XGROUP CREATE s g3 1-2 ENTRIESREAD 2").await;
    e.same("XGROUP CREATE s g4 0 ENTRIESREAD 1000").await;
    e.same("XINFO GROUPS s").await;

    // Reading its (empty) history creates a consumer.
    e.same("XREADGROUP GROUP g c1 STREAMS s 0").await;
    e.same_but_idle("XINFO CONSUMERS s g").await;
    e.same("XREADGROUP GROUP g c1 COUNT 2 STREAMS s >").await;
    e.expect("XGROUP DELCONSUMER s g c1", Reply::Int(2)).await;
    e.expect("XGROUP DELCONSUMER s g c1", Reply::Int(0)).await;
    e.same("XPENDING s g").await;
    e.same_but_idle("XINFO CONSUMERS s g").await;
    e.same("XINFO CONSUMERS s nog").await;
    e.same("XINFO CONSUMERS missing g").await;
    e.same("XINFO GROUPS missing").await;
    e.same("XINFO GROUPS s").await;
}

#[tokio::test]
async fn reading_acknowledging_and_pending() {
    let e = Engines::start().await;
    e.same("XGROUP CREATE s g $ MKSTREAM").await;
    e.expect("XREADGROUP GROUP g c1 STREAMS s >", Reply::Nil)
        .await;
    e.expect("XINFO CONSUMERS s g", array(vec![])).await;
    for i in 1..=4 {
        e.same(&format!("XADD s 1-{i} f {i} n x{i}")).await;
    }
    e.expect(
        "XREADGROUP GROUP g c1 COUNT 2 STREAMS s >",
        array(vec![array(vec![
            bulk("s"),
            array(vec![
                entry("1-1", &["f", "1", "n", "x1"]),
                entry("1-2", &["f", "2", "n", "x2"]),
            ]),
        ])]),
    )
    .await;
    e.same("XINFO GROUPS s").await;
    e.expect(
        "XPENDING s g",
        array(vec![
            Reply::Int(2),
            bulk("1-1"),
            bulk("1-2"),
            array(vec![bulks(&["c1", "2"])]),
        ]),
    )
    .await;
    e.same_but_idle("XPENDING s g - + 10").await;
    e.same_but_idle("XPENDING s g IDLE 0 - + 10 c1").await;
    e.same("XPENDING s g IDLE 3600000 - + 10").await;

    // A second consumer gets the rest; a re-read of history sees only one's own entries.
    e.same("XREADGROUP GROUP g c2 STREAMS s >").await;
    e.same("XREADGROUP GROUP g c1 STREAMS s 0").await;
    e.same("XREADGROUP GROUP g c2 COUNT 1 STREAMS s 0-0").await;
    e.same("XREADGROUP GROUP g c2 STREAMS s 1-3").await;
    e.same("XREADGROUP GROUP g c3 STREAMS s 0").await;
    e.same_but_idle("XPENDING s g - + 10").await;
    e.same("XPENDING s g").await;
    e.same_but_idle("XINFO CONSUMERS s g").await;

    e.expect("XACK s g 1-1 1-1 9-9 1-3", Reply::Int(2)).await;
    e.expect("XACK s g 1-1", Reply::Int(0)).await;
    e.same("XACK s g 1-2 nope").await;
    e.same("XACK missing g nope").await;
    e.same("XACK s nog nope").await;
    e.same("XPENDING s g").await;
    e.same("XPENDING s g - + 10 nobody").await;
    e.same("XPENDING s g (1-2 + -1").await;

    // NOACK, and a read over several streams.
    e.same("XADD t 1-1 f 1").await;
    e.same("XGROUP CREATE t g 0").await;
    e.same("XADD s 1-5 f 5").await;
    e.same("XREADGROUP GROUP g c1 NOACK STREAMS s t > >").await;
    e.same("XREADGROUP GROUP g c1 STREAMS s t > >").await;
    e.same("XREADGROUP GROUP g c1 STREAMS s t 0 0").await;
    e.same("XADD t 1-2 f 2").await;
    e.same("XREADGROUP GROUP g c1 STREAMS s t > >").await;
    e.same("XPENDING s g").await;
    e.same("XPENDING t g").await;
    e.same("XINFO GROUPS s").await;
    e.same("XINFO GROUPS t").await;

    e.same("HSET str f v").await;
    for command in [
        "XREADGROUP GROUP nog c STREAMS s >",
        "XREADGROUP GROUP g c STREAMS missing >",
        "XREADGROUP GROUP g c STREAMS str >",
        "XREADGROUP GROUP g c STREAMS s t > str",
        "XREADGROUP GROUP g c STREAMS s $",
        "XREADGROUP GROUP g c STREAMS s -",
        "XREADGROUP GROUP g c STREAMS s nope",
        "XREADGROUP GROUP g c STREAMS s > t",
        "XREADGROUP COUNT 1 NOACK STREAMS s >",
        "XREADGROUP GROUP g c FOO STREAMS s >",
        "XREADGROUP GROUP g c COUNT 1 STREAMS",
        "XREADGROUP GROUP g c COUNT x STREAMS s >",
        "XPENDING s g -",
        "XPENDING s g IDLE 10 - +",
        "XPENDING s g IDLE x - + 1",
        "XPENDING s g IDLE 10 - + 1 c extra",
        "XPENDING s g - + x",
        "XPENDING s g x + 1",
        "XPENDING s g (18446744073709551615-18446744073709551615 + 1",
        "XPENDING s g - (0-0 1",
        "XPENDING missing g x + 1",
        "XPENDING missing g",
        "XPENDING s nog",
        "XPENDING str g",
        "XACK str g 1-1",
    ] {
        let reply = e.same(command).await;
        assert!(error_text(&reply).is_some(), "{command}: {reply:?}");
    }
    e.expect_error(
        "XREADGROUP GROUP nog c STREAMS s >",
        "NOGROUP No such key 's' or consumer group 'nog' in XREADGROUP",
    )
    .await;
    e.expect_error(
        "XPENDING s nog",
        "NOGROUP No such key 's' or consumer group 'nog'",
    )
    .await;
    // Scripts cannot block, on either engine.
    e.expect_error(
        "XREADGROUP GROUP g c BLOCK 100 STREAMS s >",
        "ERR XREADGROUP command is not allowed with BLOCK option from scripts",
    )
    .await;
}

#[tokio::test]
async fn claiming_and_trimmed_entries() {
    let e = Engines::start().await;
    for i in 1..=6 {
        e.same(&format!("XADD s 1-{i} f {i}")).await;
    }
    e.same("XGROUP CREATE s g 0").await;
    e.same("XREADGROUP GROUP g c1 COUNT 5 STREAMS s >").await;
    e.expect("XTRIM s MINID 1-2", Reply::Int(1)).await;
    // Trimmed entries stay pending.
    e.same("XPENDING s g").await;
    e.same("XREADGROUP GROUP g c1 STREAMS s 0").await;

    e.expect(
        "XAUTOCLAIM s g c2 0 1-3 COUNT 1",
        array(vec![
            bulk("1-4"),
            array(vec![entry("1-3", &["f", "3"])]),
            array(vec![]),
        ]),
    )
    .await;
    e.expect(
        "XAUTOCLAIM s g c2 0 0 COUNT 2",
        array(vec![
            bulk("1-3"),
            array(vec![entry("1-2", &["f", "2"])]),
            bulks(&["1-1"]),
        ]),
    )
    .await;
    e.same_but_idle("XPENDING s g - + 10").await;
    // Nothing idle for an hour: nothing claimed, no consumer created, trimmed ones cleaned.
    e.expect("XTRIM s MINID 1-3", Reply::Int(1)).await;
    e.expect(
        "XAUTOCLAIM s g c3 3600000 0",
        array(vec![bulk("0-0"), array(vec![]), bulks(&["1-2"])]),
    )
    .await;
    e.same_but_idle("XINFO CONSUMERS s g").await;
    e.same("XAUTOCLAIM s g c2 -5 (1-4 JUSTID").await;
    e.same("XAUTOCLAIM s g c2 0 - COUNT 100").await;
    e.same_but_idle("XPENDING s g - + 10").await;
    e.same_but_idle("XINFO CONSUMERS s g").await;
    e.same("XINFO GROUPS s").await;

    // COUNT bounds the PEL entries looked at to ten per entry wanted.
    e.same("DEL s").await;
    for i in 1..=25 {
        e.same(&format!("XADD s 1-{i} f {i}")).await;
    }
    e.same("XGROUP CREATE s g 0").await;
    e.same("XREADGROUP GROUP g c1 STREAMS s >").await;
    e.expect(
        "XAUTOCLAIM s g c2 3600000 0 COUNT 2 JUSTID",
        array(vec![bulk("1-21"), array(vec![]), array(vec![])]),
    )
    .await;
    e.same("XAUTOCLAIM s g c2 3600000 1-21 COUNT 2 JUSTID")
        .await;
    e.same("XAUTOCLAIM s g c2 0 1-24 COUNT 2 JUSTID").await;
    e.same("XAUTOCLAIM s g c2 0 (1-24 COUNT 1").await;

    for command in [
        "XAUTOCLAIM s g c2 x 0",
        "XAUTOCLAIM s g c2 0 x",
        "XAUTOCLAIM s g c2 0 (18446744073709551615-18446744073709551615",
        "XAUTOCLAIM s g c2 0 0 COUNT 0",
        "XAUTOCLAIM s g c2 0 0 COUNT x",
        "XAUTOCLAIM s g c2 0 0 COUNT",
        "XAUTOCLAIM s g c2 0 0 FOO",
        "XAUTOCLAIM s nog c2 0 0",
        "XAUTOCLAIM missing g c2 0 x",
    ] {
        let reply = e.same(command).await;
        assert!(error_text(&reply).is_some(), "{command}: {reply:?}");
    }
    e.expect_error(
        "XAUTOCLAIM s nog c2 0 0",
        "NOGROUP No such key 's' or consumer group 'nog'",
    )
    .await;
}

#[tokio::test]
async fn trimming_while_entries_are_pending() {
    let e = Engines::start().await;
    for i in 1..=5 {
        e.same(&format!("XADD s 1-{i} f {i}")).await;
    }
    e.same("XGROUP CREATE s g 0").await;
    e.same("XGROUP CREATE s late 1-3").await;
    e.same("XREADGROUP GROUP g c1 COUNT 3 STREAMS s >").await;
    e.expect("XTRIM s MINID = 1-3", Reply::Int(2)).await;
    e.same("XINFO GROUPS s").await;
    e.same("XPENDING s g").await;
    e.expect(
        "XREADGROUP GROUP g c1 STREAMS s 0",
        array(vec![array(vec![
            bulk("s"),
            array(vec![
                array(vec![bulk("1-1"), Reply::Nil]),
                array(vec![bulk("1-2"), Reply::Nil]),
                entry("1-3", &["f", "3"]),
            ]),
        ])]),
    )
    .await;
    e.expect(
        "XAUTOCLAIM s g c2 0 0",
        array(vec![
            bulk("0-0"),
            array(vec![entry("1-3", &["f", "3"])]),
            bulks(&["1-1", "1-2"]),
        ]),
    )
    .await;
    e.same_but_idle("XPENDING s g - + 10").await;
    e.same("XREADGROUP GROUP late c1 STREAMS s >").await;
    e.same("XINFO GROUPS s").await;
    e.same("XADD s MINID 1-5 1-6 f 6").await;
    e.same("XINFO GROUPS s").await;
    e.same("XTRIM s MAXLEN 0").await;
    e.same("XINFO GROUPS s").await;
    e.same("XPENDING s g").await;
    e.same("XREADGROUP GROUP g c2 STREAMS s 0").await;
    e.same("XREADGROUP GROUP g c2 STREAMS s >").await;
    // Deleting the key deletes its groups.
    e.same("DEL s").await;
    e.same("XREADGROUP GROUP g c2 STREAMS s >").await;
    e.same("XADD s 1-1 f 1").await;
    e.same("XINFO GROUPS s").await;
}

#[tokio::test]
async fn lag_and_entries_read_after_trimming() {
    let e = Engines::start().await;
    for i in 1..=5 {
        e.same(&format!("XADD s 1-{i} f {i}")).await;
    }
    e.same("XGROUP CREATE s g 0 ENTRIESREAD 0").await;
    e.same("XGROUP CREATE s fresh 0").await;
    e.same("XGROUP CREATE s future 9-9").await;
    e.same("XGROUP CREATE s counted 0 ENTRIESREAD 1000").await;
    e.same("XREADGROUP GROUP g c COUNT 1 STREAMS s >").await;
    e.same("XINFO GROUPS s").await;
    e.same("XTRIM s MINID 1-3").await;
    e.same("XINFO GROUPS s").await;
    e.same("XREADGROUP GROUP g c COUNT 1 STREAMS s >").await;
    e.same("XREADGROUP GROUP fresh c COUNT 1 STREAMS s >").await;
    e.same("XINFO GROUPS s").await;
    e.same("XGROUP CREATE s middle 1-3").await;
    e.same("XINFO GROUPS s").await;
    e.same("XREADGROUP GROUP middle c COUNT 1 STREAMS s >")
        .await;
    e.same("XINFO GROUPS s").await;
    e.same("XREADGROUP GROUP g c STREAMS s >").await;
    e.same("XREADGROUP GROUP middle c STREAMS s >").await;
    e.same("XINFO GROUPS s").await;
    e.same("XTRIM s MAXLEN 0").await;
    e.same("XGROUP CREATE s empty 0").await;
    e.same("XGROUP CREATE s ahead 1-9").await;
    e.same("XINFO GROUPS s").await;
    e.same("XADD s 2-1 f 6").await;
    e.same("XINFO GROUPS s").await;
    e.same("XREADGROUP GROUP empty c STREAMS s >").await;
    e.same("XREADGROUP GROUP fresh c STREAMS s >").await;
    e.same("XINFO GROUPS s").await;
}
