//! The Redis engine against real `redis-server` processes owned by each test: reply
//! conversion, script errors, script cache and function library recovery, surviving Redis
//! restarts, bounded failures while Redis is down or busy, and the shipped scripts compiling
//! in Redis.

mod support;

use std::time::{Duration, Instant};

use kamigate::engine::embedded::EmbeddedEngine;
use kamigate::engine::redis::{RedisEngine, RedisOptions};
use kamigate::engine::{EngineError, EngineKind, Reply, Script, ScriptEngine, LIBRARY, SCRIPTS};
use support::eventually::eventually;
use support::redis_server::{RedisCluster, RedisServer, Resp};

/// A probe script with the prelude prepended, like the shipped ones.
fn probe(name: &'static str, body: &str) -> &'static Script {
    Box::leak(Box::new(Script::new(name, body)))
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

fn bulk(s: &str) -> Reply {
    Reply::from(s)
}

/// Short timeouts so failure paths finish quickly.
fn fast_options() -> RedisOptions {
    RedisOptions {
        connect_timeout_ms: 500,
        command_timeout_ms: 500,
        reconnect_min_delay_ms: 20,
        reconnect_max_delay_ms: 200,
        ..RedisOptions::default()
    }
}

async fn engine_for(server: &RedisServer) -> RedisEngine {
    RedisEngine::connect(&server.url(), fast_options())
        .await
        .expect("connect to the test redis-server")
}

async fn eval(engine: &RedisEngine, script: &'static Script) -> Result<Reply, EngineError> {
    engine.eval(script, vec![], vec![]).await
}

fn assert_unavailable<T: std::fmt::Debug>(result: Result<T, EngineError>) {
    match result {
        Err(EngineError::Unavailable(_)) => {}
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

#[tokio::test]
async fn replies_convert_like_redis_converts_lua_values() {
    let server = RedisServer::start().await;
    let engine = engine_for(&server).await;
    assert_eq!(engine.kind(), EngineKind::Redis);

    let cases: &[(&str, Reply)] = &[
        ("return 42", Reply::Int(42)),
        ("return 3.99", Reply::Int(3)),
        ("return -2.7", Reply::Int(-2)),
        ("return 'text'", bulk("text")),
        ("return ''", bulk("")),
        ("return nil", Reply::Nil),
        ("return false", Reply::Nil),
        ("return true", Reply::Int(1)),
        ("return {ok='DONE'}", Reply::Status("DONE".into())),
        (
            "return redis.status_reply('FINE')",
            Reply::Status("FINE".into()),
        ),
        ("return {}", Reply::Array(vec![])),
        (
            "return {1, 'two', {3, 'four', {}}, 5.5, false, 'after-false'}",
            Reply::Array(vec![
                Reply::Int(1),
                bulk("two"),
                Reply::Array(vec![Reply::Int(3), bulk("four"), Reply::Array(vec![])]),
                Reply::Int(5),
                Reply::Nil,
                bulk("after-false"),
            ]),
        ),
        // Arrays stop at the first nil, nested ones too.
        (
            "return {1, {2, nil, 3}, nil, 4}",
            Reply::Array(vec![Reply::Int(1), Reply::Array(vec![Reply::Int(2)])]),
        ),
        (
            "return {'a', {ok='OK'}}",
            Reply::Array(vec![bulk("a"), Reply::Status("OK".into())]),
        ),
    ];
    for (i, (body, expected)) in cases.iter().enumerate() {
        let script = probe("probe", body);
        let reply = eval(&engine, script).await;
        assert_eq!(
            reply.as_ref().ok(),
            Some(expected),
            "case {i}: {body}: {reply:?}"
        );
    }

    // KEYS and ARGV arrive in order, binary-safe, and state persists between calls.
    let echo = probe(
        "echo",
        "redis.call('SET', KEYS[1], ARGV[1]); return {KEYS[1], KEYS[2], redis.call('GET', KEYS[1]), ARGV[2], #ARGV}",
    );
    let reply = engine
        .eval(
            echo,
            strings(&["kg:{sku}:a", "kg:{sku}:b"]),
            strings(&["héllo wörld\r\n", ""]),
        )
        .await
        .expect("echo");
    assert_eq!(
        reply,
        Reply::Array(vec![
            bulk("kg:{sku}:a"),
            bulk("kg:{sku}:b"),
            bulk("héllo wörld\r\n"),
            bulk(""),
            Reply::Int(2),
        ])
    );
}

/// Values the shipped scripts never pass or return, through both engines: the embedded
/// engine's conversions (`src/engine/embedded/stack.rs`) must give what Redis gives.
#[tokio::test]
async fn odd_values_convert_alike_in_redis_and_the_embedded_engine() {
    let server = RedisServer::start().await;
    let redis = engine_for(&server).await;
    let embedded = EmbeddedEngine::start().expect("engine starts");
    let bodies = [
        // Binary-safe both ways: NUL, CR LF and invalid UTF-8 stay bytes.
        "redis.call('HSET', 'b', 'a\\0b', '\\0\\r\\n\\255') \
         return {redis.call('HGET', 'b', 'a\\0b'), #redis.call('HGET', 'b', 'a\\0b')}",
        "return {redis.call('HSET', 'e', '', ''), redis.call('HGET', 'e', '')}",
        // Numbers as arguments: %.17g, exact integers, -0 and infinities.
        "redis.call('HSET', 'n', 'z', -0.0, 'big', 2^63, 'exact', 2^53, 'neg', -2^53, \
         'frac', 0.1, 'tiny', 1e-300, 'inf', 1/0, 'ninf', -1/0, 'ms', 1700000000123) \
         return redis.call('HMGET', 'n', 'z', 'big', 'exact', 'neg', 'frac', 'tiny', 'inf', \
         'ninf', 'ms')",
        // A -0 made at run time: Lua 5.1 folds the literal `-0.0` above into a `0` constant
        // the chunk already has, so only this one reaches `redis.call` with its sign.
        "local zero = 0 redis.call('HSET', 'm', 'z', -zero, 'p', zero) \
         return {redis.call('HMGET', 'm', 'z', 'p'), 1 / -zero < 0}",
        // Values without a reply of their own.
        "return {1, true, function() end, 2, false, 3}",
        "return {1.9, -1.9, 2^53}",
        // Only a string makes `err` or `ok` special.
        "return {err = 7, 'x'}",
        "return {ok = true}",
        "return {ok = 'FINE', 'x'}",
        // Metamethods on what a script returns.
        "return setmetatable({}, {__index = function() return 'meta' end})",
        "return setmetatable({1}, {__len = function() return 5 end})",
        // Command replies nested two deep, and many values at once.
        "redis.call('XADD', 's', '1-1', 'f', 'v', 'g', '') return redis.call('XRANGE', 's', '-', '+')",
        "local t = {} for i = 1, 5000 do t[i] = tostring(i) end \
         redis.call('RPUSH', 'many', unpack(t, 1, 5000)) \
         local r = redis.call('LPOP', 'many', 5000) return {#r, r[1], r[5000]}",
        // Errors: a status-looking table inside an array, a command's error caught.
        "return {1, {err = 'nested'}}",
        "redis.call('RPUSH', 'l', 'v') return redis.pcall('HGET', 'l', 'f')",
    ];
    for body in bodies {
        let script = probe("odd", body);
        let from_redis = redis.eval(script, vec![], vec![]).await;
        let from_embedded = embedded.eval(script, vec![], vec![]).await;
        match (&from_redis, &from_embedded) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "{body}"),
            (
                Err(EngineError::Script { message: a, .. }),
                Err(EngineError::Script { message: b, .. }),
            ) => assert!(
                a.contains(b.as_str()) || b.contains(a.as_str()),
                "{body}: Redis {a:?}, embedded {b:?}"
            ),
            _ => panic!("{body}: Redis {from_redis:?}, embedded {from_embedded:?}"),
        }
    }
}

#[tokio::test]
async fn script_errors_become_script_errors_without_arguments() {
    let server = RedisServer::start().await;
    let engine = engine_for(&server).await;
    let secret = "SECRET-CODE-0123456789";

    let returned = probe("returns_err", "return {err='BAD_THING happened'}");
    let raised = probe("raises", "error('exploded')");
    let wrong_type = probe(
        "wrong_type",
        "redis.call('SET', KEYS[1], ARGV[1]); return redis.call('INCR', KEYS[1])",
    );
    let nested = probe("nested_err", "return {1, {err='inner failure'}}");
    let compile = probe("compile_error", "return (");

    for (script, needle) in [
        (returned, "BAD_THING happened"),
        (raised, "exploded"),
        (wrong_type, "not an integer"),
        (nested, "inner failure"),
        (compile, "compiling"),
    ] {
        let result = engine
            .eval(script, strings(&["kg:{s}:k"]), strings(&[secret]))
            .await;
        match result {
            Err(EngineError::Script {
                script: name,
                message,
            }) => {
                assert_eq!(name, script.name());
                assert!(message.contains(needle), "{name}: {message}");
                assert!(
                    !message.contains(secret),
                    "{name} leaks an argument: {message}"
                );
                let shown = EngineError::Script {
                    script: name,
                    message,
                }
                .to_string();
                assert!(!shown.contains(secret), "{shown}");
            }
            other => panic!("{}: expected a script error, got {other:?}", script.name()),
        }
    }
    // A failed script leaves the engine usable.
    assert_eq!(
        eval(&engine, probe("ok", "return 1")).await.ok(),
        Some(Reply::Int(1))
    );
}

#[tokio::test]
async fn scripts_reload_after_script_flush() {
    let server = RedisServer::start().await;
    let engine = engine_for(&server).await;
    let counter = probe("counter", "return redis.call('INCR', KEYS[1])");
    let keys = || strings(&["kg:{flush}:n"]);

    assert_eq!(
        engine.eval(counter, keys(), vec![]).await.ok(),
        Some(Reply::Int(1))
    );
    let exists = server
        .redis_cli(&["SCRIPT", "EXISTS", counter.sha1()])
        .await;
    assert_eq!(
        exists,
        Resp::Array(Some(vec![Resp::Int(1)])),
        "EVAL cached the script"
    );

    server.redis_cli(&["SCRIPT", "FLUSH"]).await;
    let exists = server
        .redis_cli(&["SCRIPT", "EXISTS", counter.sha1()])
        .await;
    assert_eq!(exists, Resp::Array(Some(vec![Resp::Int(0)])));

    // NOSCRIPT → EVAL with the source, which runs it exactly once and caches it again.
    assert_eq!(
        engine.eval(counter, keys(), vec![]).await.ok(),
        Some(Reply::Int(2))
    );
    let exists = server
        .redis_cli(&["SCRIPT", "EXISTS", counter.sha1()])
        .await;
    assert_eq!(exists, Resp::Array(Some(vec![Resp::Int(1)])));
    assert_eq!(
        engine.eval(counter, keys(), vec![]).await.ok(),
        Some(Reply::Int(3))
    );
}

#[tokio::test]
async fn engine_survives_redis_kill_and_restart() {
    let mut server = RedisServer::start().await;
    let engine = engine_for(&server).await;
    let counter = probe("restart_counter", "return redis.call('INCR', KEYS[1])");
    let keys = || strings(&["kg:{restart}:n"]);

    engine.ping().await.expect("ping while up");
    assert_eq!(
        engine.eval(counter, keys(), vec![]).await.ok(),
        Some(Reply::Int(1))
    );

    server.kill9();
    // While Redis is down every call fails promptly with Unavailable: bounded by the command
    // timeout (500 ms), not by how long Redis stays away.
    for _ in 0..5 {
        let started = Instant::now();
        assert_unavailable(engine.eval(counter, keys(), vec![]).await);
        assert_unavailable(engine.ping().await);
        let took = started.elapsed();
        assert!(
            took < Duration::from_millis(1_500),
            "calls while down took {took:?}"
        );
        // Time passing is the point: a call fails as promptly after a while without Redis
        // as at once.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Same port, empty data set and empty script cache: the same engine recovers by itself.
    server.restart().await;
    let reply = match recovered(&engine, counter, keys).await {
        Ok(reply) => reply,
        Err(e) => panic!("engine did not recover after the restart: {e}"),
    };
    assert_eq!(
        reply,
        Reply::Int(1),
        "a fresh Redis without persistence starts empty"
    );
    engine.ping().await.expect("ping after the restart");
    assert_eq!(
        engine.eval(counter, keys(), vec![]).await.ok(),
        Some(Reply::Int(2))
    );
}

#[tokio::test]
async fn persisted_data_survives_a_restart_with_aof() {
    let mut server =
        RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]).await;
    let engine = engine_for(&server).await;
    let counter = probe("aof_counter", "return redis.call('INCR', KEYS[1])");
    let keys = || strings(&["kg:{aof}:n"]);
    for expected in 1..=3 {
        assert_eq!(
            engine.eval(counter, keys(), vec![]).await.ok(),
            Some(Reply::Int(expected))
        );
    }
    server.kill9();
    server.restart().await;
    match recovered(&engine, counter, keys).await {
        Ok(reply) => assert_eq!(reply, Reply::Int(4), "every acknowledged write survived"),
        Err(e) => panic!("engine did not recover after the restart: {e}"),
    }
}

/// The first answer to `script` that is not `Unavailable`, once Redis is back.
async fn recovered(
    engine: &RedisEngine,
    script: &'static Script,
    keys: impl Fn() -> Vec<String>,
) -> Result<Reply, EngineError> {
    eventually(
        Duration::from_secs(10),
        "the engine to reach the restarted Redis",
        || engine.eval(script, keys(), vec![]),
        |answer| !matches!(answer, Err(EngineError::Unavailable(_))),
    )
    .await
}

#[tokio::test]
async fn calls_time_out_while_redis_is_busy() {
    let server = RedisServer::start_with(&["--enable-debug-command", "yes"]).await;
    let engine = engine_for(&server).await;
    let one = probe("busy_probe", "return 1");
    assert_eq!(eval(&engine, one).await.ok(), Some(Reply::Int(1)));

    // DEBUG SLEEP blocks the whole server, like a stuck or overloaded Redis.
    let port = server.port();
    let sleeper = tokio::spawn(async move {
        let _ = RedisServer::cmd_on_port(port, &["DEBUG", "SLEEP", "2"]).await;
    });
    // Asleep once a PING goes unanswered for a while (it is answered when the server wakes).
    eventually(
        Duration::from_secs(10),
        "DEBUG SLEEP to block the server",
        || async {
            let ping = RedisServer::cmd_on_port(port, &["PING"]);
            tokio::time::timeout(Duration::from_millis(250), ping)
                .await
                .is_err()
        },
        |blocked| *blocked,
    )
    .await;
    let started = Instant::now();
    assert_unavailable(eval(&engine, one).await);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_millis(1_500),
        "the call should fail at the 500 ms command timeout, took {took:?}"
    );
    sleeper.await.expect("sleeper task");
    assert_eq!(eval(&engine, one).await.ok(), Some(Reply::Int(1)));
}

#[tokio::test]
async fn redis_busy_with_a_long_script_is_unavailable_not_a_script_error() {
    let server = RedisServer::start_with(&["--busy-reply-threshold", "50"]).await;
    let engine = engine_for(&server).await;
    let one = probe("busy_reply_probe", "return 1");

    // A script spinning for a second: past the threshold Redis answers BUSY to everyone else.
    let spin = "local t = redis.call('TIME') local start = t[1] * 1000000 + t[2] \
        while true do local n = redis.call('TIME') \
        if n[1] * 1000000 + n[2] - start > 1000000 then break end end return 1";
    let port = server.port();
    let spinner =
        tokio::spawn(async move { RedisServer::cmd_on_port(port, &["EVAL", spin, "0"]).await });
    let _busy = eventually(
        Duration::from_secs(10),
        "the script to run past the busy threshold",
        || RedisServer::cmd_on_port(port, &["PING"]),
        |reply| matches!(reply, Ok(Resp::Error(e)) if e.starts_with("BUSY")),
    )
    .await;
    match eval(&engine, one).await {
        Err(EngineError::Unavailable(message)) => assert!(message.contains("BUSY"), "{message}"),
        other => panic!("expected Unavailable(BUSY), got {other:?}"),
    }
    spinner
        .await
        .expect("spinner task")
        .expect("spinning script");
    assert_eq!(eval(&engine, one).await.ok(), Some(Reply::Int(1)));
}

#[tokio::test]
async fn ping_answers_when_redis_is_up() {
    let server = RedisServer::start().await;
    let engine = engine_for(&server).await;
    engine.ping().await.expect("ping");
}

#[tokio::test]
async fn connecting_to_a_closed_port_is_unavailable_within_the_timeout() {
    let mut server = RedisServer::start().await;
    let url = server.url();
    server.kill9();

    let started = Instant::now();
    let result = RedisEngine::connect(&url, fast_options()).await;
    let took = started.elapsed();
    assert_unavailable(result.map(|_| ()));
    assert!(took < Duration::from_secs(2), "connect took {took:?}");
}

#[tokio::test]
async fn invalid_urls_are_rejected_without_echoing_secrets() {
    for url in [
        "rediss://:hunter2@127.0.0.1:1",
        "redis://:hunter2@127.0.0.1:1,127.0.0.1:2",
        "redis-sentinel://:hunter2@127.0.0.1:1",
        "nonsense",
    ] {
        match RedisEngine::connect(url, fast_options()).await {
            Err(EngineError::Unavailable(message)) => {
                assert!(message.contains("invalid Redis URL"), "{url}: {message}");
                assert!(!message.contains("hunter2"), "{url}: {message}");
            }
            other => panic!("{url}: expected Unavailable, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn database_in_url_is_selected() {
    let server = RedisServer::start().await;
    let db3 = RedisEngine::connect(&format!("{}/3", server.url()), fast_options())
        .await
        .expect("connect to db 3");
    let db0 = engine_for(&server).await;
    let set = probe("set_marker", "return redis.call('SET', KEYS[1], 'x')");
    let exists = probe("marker_exists", "return redis.call('EXISTS', KEYS[1])");
    let key = || strings(&["kg:{db}:marker"]);

    assert_eq!(
        db3.eval(set, key(), vec![]).await.ok(),
        Some(Reply::Status("OK".into()))
    );
    assert_eq!(
        db3.eval(exists, key(), vec![]).await.ok(),
        Some(Reply::Int(1))
    );
    assert_eq!(
        db0.eval(exists, key(), vec![]).await.ok(),
        Some(Reply::Int(0))
    );
}

#[tokio::test]
async fn concurrent_calls_share_one_connection() {
    let server = RedisServer::start().await;
    let engine = engine_for(&server).await;
    let counter = probe("concurrent_counter", "return redis.call('INCR', KEYS[1])");

    let calls = (0..500).map(|_| engine.eval(counter, strings(&["kg:{c}:n"]), vec![]));
    let replies = futures_util::future::join_all(calls).await;
    let mut seen: Vec<i64> = replies
        .into_iter()
        .map(|r| r.expect("concurrent eval").as_i64().expect("integer"))
        .collect();
    seen.sort_unstable();
    assert_eq!(
        seen,
        (1..=500).collect::<Vec<_>>(),
        "every call ran exactly once"
    );

    // The engine's connection for scripts, the one for the event writer's reads, and the one
    // asking: 500 calls at once opened no other.
    let info = server.redis_cli(&["INFO", "clients"]).await;
    let info = info.as_str().expect("INFO text");
    assert!(info.contains("connected_clients:3\r\n"), "{info}");
}

#[tokio::test]
async fn shipped_scripts_compile_in_redis() {
    let server = RedisServer::start().await;
    let engine = engine_for(&server).await;
    for script in SCRIPTS.all() {
        let loaded = server
            .cmd(&["SCRIPT", "LOAD", script.source()])
            .await
            .expect("SCRIPT LOAD");
        assert_eq!(
            loaded.as_str(),
            Some(script.sha1()),
            "lua/{}.lua: {loaded:?}",
            script.name()
        );
    }
    server.redis_cli(&["SCRIPT", "FLUSH"]).await;
    engine
        .preload(SCRIPTS.all())
        .await
        .expect("preload the shipped scripts");
    // The shipped scripts are preloaded as the library's functions.
    assert_eq!(functions_listed(server.port()).await, shipped_functions());
    // Loading again (a second gateway, a restart) keeps the one library.
    engine.preload(SCRIPTS.all()).await.expect("preload again");
    let libraries = server.redis_cli(&["FUNCTION", "LIST"]).await;
    assert!(
        matches!(&libraries, Resp::Array(Some(l)) if l.len() == 1),
        "{libraries:?}"
    );
}

/// The function names `FUNCTION LIST` reports for the engine's library on one server.
async fn functions_listed(port: u16) -> Vec<String> {
    fn texts(reply: &Resp, out: &mut Vec<String>) {
        match reply {
            Resp::Array(Some(items)) => items.iter().for_each(|item| texts(item, out)),
            other => out.extend(other.as_str().map(str::to_owned)),
        }
    }
    let listed =
        RedisServer::cmd_on_port(port, &["FUNCTION", "LIST", "LIBRARYNAME", LIBRARY.name()])
            .await
            .expect("FUNCTION LIST");
    let mut out = Vec::new();
    texts(&listed, &mut out);
    let prefix = format!("{}_", LIBRARY.name());
    out.retain(|name| name.starts_with(&prefix));
    out.sort();
    out
}

/// Every shipped script's function name, sorted.
fn shipped_functions() -> Vec<String> {
    let mut names: Vec<String> = SCRIPTS
        .all()
        .iter()
        .map(|s| {
            s.function()
                .expect("a shipped script is a function")
                .to_owned()
        })
        .collect();
    names.sort();
    names
}

/// The `calls` count of `command` in `INFO commandstats` (0 when never called).
async fn calls_of(server: &RedisServer, command: &str) -> u64 {
    let info = server.redis_cli(&["INFO", "commandstats"]).await;
    let info = info.as_str().expect("INFO text").to_owned();
    let prefix = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn shipped_scripts_run_as_functions_and_reload_after_function_flush() {
    let server = RedisServer::start().await;
    let engine = engine_for(&server).await;
    let key = || strings(&["kg:{fn}:h"]);
    server.redis_cli(&["HSET", "kg:{fn}:h", "f", "v"]).await;
    let exists = |field: &str| engine.eval(&SCRIPTS.exists, key(), strings(&[field]));

    // A fresh Redis has no library: the first call loads it and runs once.
    assert_eq!(exists("f").await.ok(), Some(Reply::Int(1)));
    assert_eq!(exists("g").await.ok(), Some(Reply::Int(0)));
    assert_eq!(calls_of(&server, "function|load").await, 1);
    assert_eq!(
        calls_of(&server, "fcall").await,
        3,
        "one miss, then two runs"
    );
    assert_eq!(calls_of(&server, "evalsha").await, 0);
    assert_eq!(calls_of(&server, "eval").await, 0);

    // FUNCTION FLUSH drops the library (FLUSHALL does not): the next call reloads it.
    server.redis_cli(&["FUNCTION", "FLUSH"]).await;
    let listed = server.redis_cli(&["FUNCTION", "LIST"]).await;
    assert_eq!(listed, Resp::Array(Some(vec![])));
    assert_eq!(exists("f").await.ok(), Some(Reply::Int(1)));
    assert_eq!(calls_of(&server, "function|load").await, 2);
    assert_eq!(functions_listed(server.port()).await, shipped_functions());

    // A write across a reload runs exactly once: one event in the window, not two.
    server.redis_cli(&["FUNCTION", "FLUSH"]).await;
    let take = engine
        .eval(
            &SCRIPTS.window,
            strings(&["kg:lim:{fn}:events", "kg:lim:{fn}:lock"]),
            strings(&["take", "1000", "m1", "60000", "10"]),
        )
        .await;
    assert_eq!(
        take.ok(),
        Some(Reply::Array(vec![bulk("ok"), Reply::Int(9)]))
    );
    let events = server.redis_cli(&["ZCARD", "kg:lim:{fn}:events"]).await;
    assert_eq!(events.as_int(), Some(1));
    assert_eq!(calls_of(&server, "evalsha").await, 0);
    assert_eq!(calls_of(&server, "eval").await, 0);
}

#[tokio::test]
async fn preload_reports_a_script_that_does_not_compile() {
    let server = RedisServer::start().await;
    let engine = engine_for(&server).await;
    let broken = probe("broken", "return (");
    match engine.preload([broken]).await {
        Err(EngineError::Script { script, message }) => {
            assert_eq!(script, "broken");
            assert!(message.contains("compiling"), "{message}");
        }
        other => panic!("expected a script error, got {other:?}"),
    }
}

#[tokio::test]
async fn scripts_run_on_every_redis_cluster_node() {
    let cluster = RedisCluster::start(3).await;
    let engine = RedisEngine::connect(&cluster.url(), fast_options())
        .await
        .expect("connect to the cluster");
    engine.ping().await.expect("ping the cluster");
    let counter = probe("cluster_counter", "return redis.call('INCR', KEYS[1])");

    // Enough SKUs that every node owns some of them; each node first answers NOSCRIPT.
    let skus: Vec<String> = (0..30).map(|i| format!("kg:{{sku-{i}}}:n")).collect();
    for round in 1..=2 {
        for key in &skus {
            let reply = engine.eval(counter, vec![key.clone()], vec![]).await;
            assert_eq!(reply.ok(), Some(Reply::Int(round)), "{key}");
        }
    }
    for node in cluster.nodes() {
        let exists = node.redis_cli(&["SCRIPT", "EXISTS", counter.sha1()]).await;
        assert_eq!(
            exists,
            Resp::Array(Some(vec![Resp::Int(1)])),
            "node {} learned the script",
            node.port()
        );
    }

    // The shipped scripts' library reaches each node on its first "Function not found".
    for i in 0..30 {
        let key = format!("kg:{{sku-{i}}}:h");
        let reply = engine
            .eval(&SCRIPTS.exists, vec![key.clone()], strings(&["f"]))
            .await;
        assert_eq!(reply.ok(), Some(Reply::Int(0)), "{key}");
    }
    for node in cluster.nodes() {
        assert_eq!(
            functions_listed(node.port()).await,
            shipped_functions(),
            "node {} learned the library",
            node.port()
        );
    }
    // Preloading reaches every primary, not only the one a call would be routed to.
    for node in cluster.nodes() {
        node.redis_cli(&["FUNCTION", "FLUSH"]).await;
    }
    engine
        .preload(SCRIPTS.all())
        .await
        .expect("preload on every node");
    for node in cluster.nodes() {
        assert_eq!(
            functions_listed(node.port()).await,
            shipped_functions(),
            "node {} has the library after preload",
            node.port()
        );
    }

    // Keys of different hash tags in one script are a bug, reported as a script error.
    let two = probe("cross_slot", "return redis.call('MGET', KEYS[1], KEYS[2])");
    match engine
        .eval(two, strings(&["kg:{a}:x", "kg:{b}:x"]), vec![])
        .await
    {
        Err(EngineError::Script { script, message }) => {
            assert_eq!(script, "cross_slot");
            assert!(message.contains("CROSSSLOT"), "{message}");
        }
        other => panic!("expected a CROSSSLOT script error, got {other:?}"),
    }
}

#[tokio::test]
async fn sentinel_url_finds_the_master() {
    let master = RedisServer::start().await;
    let sentinel = RedisServer::start_sentinel(&master, "kg-master").await;
    let url = format!("redis-sentinel://127.0.0.1:{}/kg-master", sentinel.port());
    let engine = RedisEngine::connect(&url, fast_options())
        .await
        .expect("connect through Sentinel");
    let set = probe("sentinel_set", "return redis.call('SET', KEYS[1], ARGV[1])");
    assert_eq!(
        engine
            .eval(set, strings(&["kg:{s}:k"]), strings(&["v"]))
            .await
            .ok(),
        Some(Reply::Status("OK".into()))
    );
    let stored = master.redis_cli(&["GET", "kg:{s}:k"]).await;
    assert_eq!(stored.as_str(), Some("v"), "the write reached the master");
}

/// `stream.lua`'s keys for SKU `sku`.
fn stream_keys(sku: &str) -> Vec<String> {
    ["events", "dead", "meta"]
        .iter()
        .map(|k| format!("kg:{{{sku}}}:{k}"))
        .collect()
}

/// A `read` of new entries only, acknowledging `acks` of generation `gen` first.
fn read_new(count: &str, gen: &str, acks: &[&str]) -> Vec<String> {
    let mut args = strings(&["read", "ledger", "w1", count, "30000", "n"]);
    if !acks.is_empty() {
        args.push(gen.to_owned());
        args.extend(strings(acks));
    }
    args
}

/// Appends the same entry, with the same id, to the streams of SKUs `a` and `b`.
async fn add_to_both(cli: impl AsyncFn(&[&str]), id: &str, fields: &[&str]) {
    for sku in ["a", "b"] {
        let key = format!("kg:{{{sku}}}:events");
        let mut args = vec!["XADD", key.as_str(), id];
        args.extend_from_slice(fields);
        cli(&args).await;
    }
}

/// The writer's read of new entries through [`ScriptEngine::read_new_entries`] (SKU `b`)
/// answers exactly what `stream.lua` answers reading them itself (SKU `a`, identical), step
/// by step: the group created on the first read, partial and empty reads, acknowledgements
/// of the SKU's generation and of another one, entries of many and of empty fields.
async fn reads_of_new_entries_match_the_script(
    engine: &dyn ScriptEngine,
    cli: impl AsyncFn(&[&str]) + Copy,
) {
    let step = async |args: Vec<String>| {
        let scripted = engine
            .eval(&SCRIPTS.stream, stream_keys("a"), args.clone())
            .await
            .expect("the script's read");
        let beside = engine
            .read_new_entries(stream_keys("b"), args)
            .await
            .expect("the read beside the script");
        assert_eq!(beside, scripted);
        scripted
    };
    // A writer's first read of a SKU is a script call, which loads the library on the
    // SKU's node if it lacks it (see the test below for a read without it).
    for sku in ["a", "b"] {
        let backlog = strings(&["backlog", "ledger", "0"]);
        engine
            .eval(&SCRIPTS.stream, stream_keys(sku), backlog)
            .await
            .expect("a backlog");
    }
    let wide: Vec<String> = (0..20)
        .flat_map(|i| [format!("f{i}"), String::new()])
        .collect();
    let wide: Vec<&str> = wide.iter().map(String::as_str).collect();
    add_to_both(cli, "5-1", &["t", "claim", "at", "5", "ids", "1"]).await;
    add_to_both(cli, "5-2", &wide).await;
    add_to_both(cli, "6-0", &["t", "redeem", "at", "6", "ids", "1"]).await;

    let first = step(read_new("2", "", &[])).await;
    let items = first.as_array().expect("array");
    assert_eq!(items.len(), 11, "head and two entries: {first:?}");
    assert_eq!(items[6], Reply::Int(2), "two new");
    let second = step(read_new("10", "", &["5-1", "5-2"])).await;
    assert_eq!(second.as_array().expect("array").len(), 10, "{second:?}");
    assert_eq!(
        step(read_new("10", "", &["6-0"]))
            .await
            .as_array()
            .map(<[_]>::len),
        Some(9)
    );
    for sku in ["a", "b"] {
        cli(&["HSET", &format!("kg:{{{sku}}}:meta"), "gen", "7"]).await;
    }
    add_to_both(cli, "7-0", &["t", "void", "at", "7", "ids", "2"]).await;
    // Acknowledgements of another generation are ignored; the entry is read all the same.
    let other = step(read_new("10", "6", &["7-0"])).await;
    assert_eq!(other.as_array().map(<[_]>::len), Some(10), "{other:?}");
    assert_eq!(other.as_array().expect("array")[7], bulk("7"));
    step(read_new("10", "7", &["7-0"])).await;
}

#[tokio::test]
async fn the_writers_read_of_new_entries_answers_as_the_script_does() {
    let server = RedisServer::start().await;
    let engine = engine_for(&server).await;
    let cli = async |args: &[&str]| {
        server.redis_cli(args).await;
    };
    reads_of_new_entries_match_the_script(&engine, cli).await;
    // One transaction per read beside the script, no other round trip.
    assert_eq!(calls_of(&server, "exec").await, 5);
    assert_eq!(calls_of(&server, "xreadgroup").await, 5 + 5);
}

#[tokio::test]
async fn the_writers_read_of_new_entries_matches_the_script_on_a_cluster() {
    let cluster = RedisCluster::start(3).await;
    let engine = RedisEngine::connect(&cluster.url(), fast_options())
        .await
        .expect("connect to the cluster");
    let client = engine.client().clone();
    let cli = async |args: &[&str]| {
        use fred::interfaces::ClientLike;
        use fred::types::{ClusterHash, CustomCommand};
        let (command, rest) = args.split_first().expect("a command");
        let hash = ClusterHash::Custom(fred::util::redis_keyslot(rest[0].as_bytes()));
        let argv: Vec<fred::types::Value> = rest.iter().map(|a| (*a).into()).collect();
        client
            .custom::<fred::types::Value, _>(CustomCommand::new(*command, hash, false), argv)
            .await
            .expect("the command");
    };
    reads_of_new_entries_match_the_script(&engine, cli).await;
}

/// The embedded engine runs the read in two parts as well (`stream.lua`, then `XREADGROUP`
/// on its keyspace) and answers as the script does.
#[tokio::test]
async fn the_embedded_writers_read_of_new_entries_answers_as_the_script_does() {
    let engine = EmbeddedEngine::start().expect("engine starts");
    let command: &'static Script = Box::leak(Box::new(Script::new(
        "command",
        "return redis.call(unpack(ARGV))",
    )));
    let cli = async |args: &[&str]| {
        let args = args.iter().map(|a| (*a).to_owned()).collect();
        engine
            .eval(command, vec![], args)
            .await
            .expect("the command");
    };
    reads_of_new_entries_match_the_script(&engine, cli).await;
}

/// A read of new entries that finds no function library loads it and fails; the entries
/// its `XREADGROUP` delivered all the same are this consumer's own pending ones, which its
/// next read of its own entries takes, and the read after that works again.
#[tokio::test]
async fn a_read_of_new_entries_without_the_library_leaves_its_entries_pending() {
    let server = RedisServer::start().await;
    let engine = engine_for(&server).await;
    server
        .redis_cli(&["XADD", "kg:{b}:events", "5-1", "t", "claim", "at", "5"])
        .await;
    engine
        .eval(
            &SCRIPTS.exists,
            vec!["kg:{b}:meta".into()],
            strings(&["gen"]),
        )
        .await
        .expect("the library loaded");
    engine
        .read_new_entries(stream_keys("b"), read_new("10", "", &[]))
        .await
        .expect("a first read creates the group");
    server
        .redis_cli(&["XADD", "kg:{b}:events", "6-0", "t", "claim", "at", "6"])
        .await;
    server.redis_cli(&["FUNCTION", "FLUSH"]).await;
    assert_unavailable(
        engine
            .read_new_entries(stream_keys("b"), read_new("10", "", &[]))
            .await,
    );
    let mut own = read_new("10", "", &[]);
    own[5] = "ocn".into();
    let reply = engine
        .eval(&SCRIPTS.stream, stream_keys("b"), own)
        .await
        .expect("a read of its own entries");
    let items = reply.as_array().expect("array");
    assert_eq!(
        items[4],
        Reply::Int(2),
        "both delivered entries are its own: {reply:?}"
    );
    server
        .redis_cli(&["XADD", "kg:{b}:events", "7-0", "t", "claim", "at", "7"])
        .await;
    let next = engine
        .read_new_entries(stream_keys("b"), read_new("10", "", &["5-1", "6-0"]))
        .await
        .expect("the library is back");
    assert_eq!(
        next.as_array().expect("array")[6],
        Reply::Int(1),
        "{next:?}"
    );
}
