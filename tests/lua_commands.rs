//! The scripts and the embedded engine agree.
//!
//! The embedded keyspace implements exactly the commands the scripts use, so a script that
//! starts calling another command would work on Redis and fail on the embedded engine, and a
//! command no script calls is emulation nobody needs. The first two tests catch both: they read
//! every `lua/*.lua`, find each `redis.call` and `redis.pcall`, and require the command name
//! (and a container command's subcommand, as in `XGROUP CREATE`) to be a string literal (a
//! computed name would escape this check) that `Keyspace::supports`; then every command and
//! subcommand the keyspace supports must be called somewhere. The remaining tests run probe
//! scripts through the embedded engine and check that values cross the Lua boundary the way
//! Redis converts them.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use kamigate::engine::embedded::EmbeddedEngine;
use kamigate::engine::keyspace::Keyspace;
use kamigate::engine::script::SCRIPTS;
use kamigate::engine::{EngineError, EngineKind, Reply, Script, ScriptEngine};

// ---- scanning the scripts ------------------------------------------------------------------

/// A Lua token, as much as finding `redis.call(...)` needs.
#[derive(Debug, Clone, PartialEq)]
enum Token {
    Name(String),
    Str(String),
    Punct(char),
    Other,
}

/// Splits Lua source into tokens with their line numbers, skipping comments, so that text in
/// comments and strings is never mistaken for code.
fn tokenize(source: &str) -> Result<Vec<(usize, Token)>, String> {
    let chars: Vec<char> = source.chars().collect();
    let mut tokens = Vec::new();
    let mut line = 1;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '\n' {
            line += 1;
            i += 1;
        } else if c.is_whitespace() {
            i += 1;
        } else if c == '-' && chars.get(i + 1) == Some(&'-') {
            i += 2;
            if let Some(level) = long_bracket(&chars, i) {
                let (_, end, lines) = long_string(&chars, i, level)
                    .ok_or_else(|| format!("line {line}: unterminated long comment"))?;
                line += lines;
                i = end;
            } else {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
        } else if c == '[' && long_bracket(&chars, i).is_some() {
            let level = long_bracket(&chars, i).unwrap_or(0);
            let start_line = line;
            let (text, end, lines) = long_string(&chars, i, level)
                .ok_or_else(|| format!("line {line}: unterminated long string"))?;
            line += lines;
            tokens.push((start_line, Token::Str(text)));
            i = end;
        } else if c == '\'' || c == '"' {
            let start_line = line;
            let mut text = String::new();
            i += 1;
            loop {
                let Some(&d) = chars.get(i) else {
                    return Err(format!("line {start_line}: unterminated string"));
                };
                i += 1;
                if d == c {
                    break;
                }
                if d == '\n' {
                    return Err(format!("line {start_line}: unterminated string"));
                }
                if d == '\\' {
                    let Some(&e) = chars.get(i) else {
                        return Err(format!("line {start_line}: unterminated string"));
                    };
                    i += 1;
                    if e == '\n' {
                        line += 1;
                    }
                    text.push(e);
                } else {
                    text.push(d);
                }
            }
            tokens.push((start_line, Token::Str(text)));
        } else if c.is_ascii_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            tokens.push((line, Token::Name(chars[start..i].iter().collect())));
        } else if c.is_ascii_digit() {
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
            tokens.push((line, Token::Other));
        } else {
            tokens.push((line, Token::Punct(c)));
            i += 1;
        }
    }
    Ok(tokens)
}

/// If `chars[at..]` opens a long bracket (`[[`, `[==[`), its level.
fn long_bracket(chars: &[char], at: usize) -> Option<usize> {
    if chars.get(at) != Some(&'[') {
        return None;
    }
    let level = chars[at + 1..].iter().take_while(|&&c| c == '=').count();
    (chars.get(at + 1 + level) == Some(&'[')).then_some(level)
}

/// The text of the long string opening at `at`, the index after it, and the newlines in it.
fn long_string(chars: &[char], at: usize, level: usize) -> Option<(String, usize, usize)> {
    let body = at + level + 2;
    let mut close = vec![']'];
    close.extend(std::iter::repeat_n('=', level));
    close.push(']');
    let end = (body..chars.len()).find(|&j| chars[j..].starts_with(&close))?;
    let text: String = chars[body..end].iter().collect();
    let lines = text.matches('\n').count();
    Some((text, end + close.len(), lines))
}

/// One `redis.call`/`redis.pcall` site.
#[derive(Debug)]
struct CallSite {
    line: usize,
    /// The literal command name, or why there is none.
    command: Result<String, String>,
    /// The argument after the command name when it is a string literal: a container
    /// command's subcommand.
    first_arg: Option<String>,
}

/// Every call site of `source`.
fn call_sites(source: &str) -> Result<Vec<CallSite>, String> {
    let tokens = tokenize(source)?;
    let mut sites = Vec::new();
    for (i, window) in tokens.windows(3).enumerate() {
        let [(line, Token::Name(redis)), (_, Token::Punct('.')), (_, Token::Name(method))] = window
        else {
            continue;
        };
        if redis != "redis" || (method != "call" && method != "pcall") {
            continue;
        }
        let after = |k: usize| tokens.get(i + 3 + k).map(|(_, t)| t);
        let first_arg = match (after(0), after(2), after(3), after(4)) {
            (
                Some(Token::Punct('(')),
                Some(Token::Punct(',')),
                Some(Token::Str(arg)),
                Some(Token::Punct(',' | ')')),
            ) => Some(arg.clone()),
            _ => None,
        };
        let command = match (after(0), after(1), after(2)) {
            (Some(Token::Punct('(')), Some(Token::Str(name)), Some(Token::Punct(',' | ')'))) => {
                Ok(name.clone())
            }
            (Some(Token::Punct('(')), Some(Token::Str(_)), _) => Err(format!(
                "redis.{method}'s command name is an expression, not a plain string literal"
            )),
            (Some(Token::Punct('(')), _, _) => Err(format!(
                "redis.{method}'s first argument is not a string literal"
            )),
            (Some(Token::Str(name)), _, _) => Ok(name.clone()),
            _ => Err(format!(
                "redis.{method} is used as a value, so its command name cannot be checked"
            )),
        };
        sites.push(CallSite {
            line: *line,
            command,
            first_arg,
        });
    }
    Ok(sites)
}

fn lua_files() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("lua");
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|ext| ext == "lua"))
        .collect();
    files.sort();
    files
}

/// What the scripts of `lua/` call: commands, and container commands with their subcommand
/// (`XGROUP CREATE`), upper case; and what in them the embedded keyspace does not support.
fn scan_scripts() -> (BTreeSet<String>, Vec<String>) {
    let mut used = BTreeSet::new();
    let mut problems = Vec::new();
    for path in lua_files() {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let source = fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        let sites = match call_sites(&source) {
            Ok(sites) => sites,
            Err(e) => {
                problems.push(format!("lua/{name}: cannot scan: {e}"));
                continue;
            }
        };
        for site in sites {
            let line = site.line;
            let command = match site.command {
                Ok(command) if Keyspace::supports(&command) => command.to_ascii_uppercase(),
                Ok(command) => {
                    problems.push(format!(
                        "lua/{name}:{line}: {command} is not implemented by the embedded \
                         keyspace (src/engine/keyspace)"
                    ));
                    continue;
                }
                Err(why) => {
                    problems.push(format!("lua/{name}:{line}: {why}"));
                    continue;
                }
            };
            let subcommands: Vec<&str> = Keyspace::subcommands(&command).collect();
            if subcommands.is_empty() {
                used.insert(command);
                continue;
            }
            match site.first_arg {
                Some(sub) if subcommands.iter().any(|s| s.eq_ignore_ascii_case(&sub)) => {
                    used.insert(format!("{command} {}", sub.to_ascii_uppercase()));
                }
                Some(sub) => problems.push(format!(
                    "lua/{name}:{line}: {command} {sub} is not implemented by the embedded \
                     keyspace (src/engine/keyspace)"
                )),
                None => problems.push(format!(
                    "lua/{name}:{line}: {command}'s subcommand is not a plain string literal"
                )),
            }
        }
    }
    (used, problems)
}

#[test]
fn every_redis_call_names_a_supported_command_literally() {
    let (used, problems) = scan_scripts();
    assert!(
        problems.is_empty(),
        "every redis.call/redis.pcall must name a supported command (and subcommand) as a \
         string literal:\n  {}",
        problems.join("\n  ")
    );
    println!("commands used by lua/: {used:?}");
}

#[test]
fn every_supported_command_is_called_by_a_script() {
    let (used, _) = scan_scripts();
    let mut supported = Vec::new();
    for command in Keyspace::commands() {
        let subcommands: Vec<&str> = Keyspace::subcommands(command).collect();
        if subcommands.is_empty() {
            supported.push(command.to_owned());
        }
        supported.extend(subcommands.iter().map(|sub| format!("{command} {sub}")));
    }
    let unused: Vec<&String> = supported.iter().filter(|c| !used.contains(*c)).collect();
    assert!(
        unused.is_empty(),
        "the embedded keyspace (src/engine/keyspace) implements what no script in lua/ calls; \
         delete it: {unused:?}"
    );
}

#[test]
fn the_scanner_finds_literals_and_rejects_everything_else() {
    let source = r#"
-- redis.call(not_code) in a comment
--[==[ redis.call(dynamic) in a long comment ]==]
local s = "redis.call(inside_a_string)"
local l = [[redis.call(in a long string)]]
redis.call('HGET', KEYS[1], 'f')
local x = redis.pcall("ZADD", k, 1, 'm')
redis.call(
  'LPOP', k, 2)
redis.call 'PING'
redis.call(cmd, k)
redis.call('H' .. 'GET', k)
local f = redis.call
redis.call(unpack(args))
local not_redis = myredis.call
"#;
    let sites = call_sites(source).expect("scans");
    let commands: Vec<(usize, Result<String, String>)> = sites
        .iter()
        .map(|site| (site.line, site.command.clone()))
        .collect();
    let expected: Vec<(usize, Result<String, String>)> = vec![
        (6, Ok("HGET".into())),
        (7, Ok("ZADD".into())),
        (8, Ok("LPOP".into())),
        (10, Ok("PING".into())),
        (
            11,
            Err("redis.call's first argument is not a string literal".into()),
        ),
        (
            12,
            Err("redis.call's command name is an expression, not a plain string literal".into()),
        ),
        (
            13,
            Err("redis.call is used as a value, so its command name cannot be checked".into()),
        ),
        (
            14,
            Err("redis.call's first argument is not a string literal".into()),
        ),
    ];
    assert_eq!(commands, expected);
    let first_args: Vec<Option<&str>> = sites.iter().map(|s| s.first_arg.as_deref()).collect();
    assert_eq!(first_args, [None, None, None, None, None, None, None, None]);
    let sites = call_sites(
        "redis.call('XGROUP', 'CREATE', k, 'g')\nredis.call('XINFO', sub, k)\n\
         redis.call('XINFO', 'GROUPS')\nredis.call('XGROUP', 'CRE' .. 'ATE', k)",
    )
    .expect("scans");
    let first_args: Vec<Option<&str>> = sites.iter().map(|s| s.first_arg.as_deref()).collect();
    assert_eq!(first_args, [Some("CREATE"), None, Some("GROUPS"), None]);
    assert!(call_sites("local s = 'open").is_err());
    assert!(call_sites("").expect("empty file scans").is_empty());
}

#[test]
fn shipped_scripts_compile_as_lua_5_1() {
    let lua = mlua::Lua::new();
    for script in SCRIPTS.all() {
        if let Err(e) = lua
            .load(script.source())
            .set_name(format!("={}", script.name()))
            .into_function()
        {
            panic!(
                "lua/{}.lua (with the prelude) does not compile: {e}",
                script.name()
            );
        }
    }
}

// ---- reply conversion through the embedded engine ------------------------------------------

fn probe(body: &str) -> &'static Script {
    Box::leak(Box::new(Script::new("probe", body)))
}

fn bulk(s: &str) -> Reply {
    Reply::from(s)
}

async fn eval(engine: &EmbeddedEngine, body: &str) -> Result<Reply, EngineError> {
    engine
        .eval(
            probe(body),
            vec!["k1".into(), "k2".into()],
            vec!["a1".into(), "a2".into()],
        )
        .await
}

async fn script_error(engine: &EmbeddedEngine, body: &str) -> String {
    match eval(engine, body).await {
        Err(EngineError::Script { script, message }) => {
            assert_eq!(script, "probe");
            message
        }
        other => panic!("{body}: expected a script error, got {other:?}"),
    }
}

#[tokio::test]
async fn script_values_convert_like_redis() {
    let engine = EmbeddedEngine::start().expect("engine starts");
    assert_eq!(engine.kind(), EngineKind::Embedded);
    engine.ping().await.expect("ping");
    let cases = [
        ("return 7", Reply::Int(7)),
        ("return 3.99", Reply::Int(3)),
        ("return -3.99", Reply::Int(-3)),
        // C's cast is undefined out of range; here it saturates.
        ("return 2^70", Reply::Int(i64::MAX)),
        ("return -2^70", Reply::Int(i64::MIN)),
        ("return true", Reply::Int(1)),
        ("return false", Reply::Nil),
        ("return nil", Reply::Nil),
        ("return", Reply::Nil),
        ("return 1, 2", Reply::Int(1)),
        ("return 'text'", bulk("text")),
        ("return {ok = 'FINE'}", Reply::Status("FINE".into())),
        (
            "return redis.status_reply('QUEUED')",
            Reply::Status("QUEUED".into()),
        ),
        ("return {}", Reply::Array(vec![])),
        (
            "return {1, 'two', {3.7, nil, 4}, nil, 5}",
            Reply::Array(vec![
                Reply::Int(1),
                bulk("two"),
                Reply::Array(vec![Reply::Int(3)]),
            ]),
        ),
        (
            "return {1, false, true, 2}",
            Reply::Array(vec![
                Reply::Int(1),
                Reply::Nil,
                Reply::Int(1),
                Reply::Int(2),
            ]),
        ),
        (
            "return {#KEYS, #ARGV, KEYS[1], ARGV[2]}",
            Reply::Array(vec![Reply::Int(2), Reply::Int(2), bulk("k1"), bulk("a2")]),
        ),
        (
            "return redis.sha1hex('')",
            bulk("da39a3ee5e6b4b0d3255bfef95601890afd80709"),
        ),
        ("return redis.error_reply('MY Error').err", bulk("MY Error")),
        ("return redis.error_reply('boom').err", bulk("ERR boom")),
        (
            "redis.log(redis.LOG_WARNING, 'hi') return redis.LOG_NOTICE",
            Reply::Int(2),
        ),
    ];
    for (body, expected) in cases {
        assert_eq!(eval(&engine, body).await.expect(body), expected, "{body}");
    }
}

#[tokio::test]
async fn command_replies_and_arguments_convert_like_redis() {
    let engine = EmbeddedEngine::start().expect("engine starts");
    let cases = [
        // nil bulk → false, which the script returns as nil
        ("return redis.call('HGET', 'missing', 'f')", Reply::Nil),
        (
            "return redis.call('HGET', 'missing', 'f') == false",
            Reply::Int(1),
        ),
        (
            "return {redis.call('HGET', 'missing', 'f')}",
            Reply::Array(vec![Reply::Nil]),
        ),
        // status → {ok = …}
        (
            "return redis.call('XGROUP', 'CREATE', KEYS[1], 'g', '$', 'MKSTREAM').ok",
            bulk("OK"),
        ),
        (
            "return redis.call('XGROUP', 'CREATE', KEYS[1], 'g2', '$')",
            Reply::Status("OK".into()),
        ),
        // integer → number
        (
            "return type(redis.call('HINCRBY', 'counter', 'n', 1))",
            bulk("number"),
        ),
        // numbers as arguments: %.17g like Redis, integers exact
        (
            "return redis.call('HSET', 'h', 'i', 42, 'f', 2.5, 't', 0.1)",
            Reply::Int(3),
        ),
        (
            "return redis.call('HMGET', 'h', 'i', 'f', 't', 'none')",
            Reply::Array(vec![
                bulk("42"),
                bulk("2.5"),
                bulk("0.10000000000000001"),
                Reply::Nil,
            ]),
        ),
        (
            "redis.call('HSET', 'ms', 'f', 1700000000123) return redis.call('HGET', 'ms', 'f')",
            bulk("1700000000123"),
        ),
        // arrays → tables; nested arrays too
        (
            "redis.call('RPUSH', 'l', 'a', 'b') return redis.call('LPOP', 'l', 2)",
            Reply::Array(vec![bulk("a"), bulk("b")]),
        ),
        (
            "redis.call('XADD', 's', '1-1', 'f', 'v') return redis.call('XRANGE', 's', '-', '+')",
            Reply::Array(vec![Reply::Array(vec![
                bulk("1-1"),
                Reply::Array(vec![bulk("f"), bulk("v")]),
            ])]),
        ),
        // Redis 7: LPOP with a count on a missing key is a nil array → false
        (
            "return redis.call('LPOP', 'nothing', 2) == false",
            Reply::Int(1),
        ),
        // pcall hands the error back as a table
        (
            "return redis.pcall('HGET', 'h').err",
            bulk("ERR wrong number of arguments for 'hget' command"),
        ),
        (
            "local ok, e = pcall(redis.call, 'HGET', 'h') return {tostring(ok), e.err}",
            Reply::Array(vec![
                bulk("false"),
                bulk("ERR wrong number of arguments for 'hget' command"),
            ]),
        ),
        (
            "return redis.pcall('HSET', 'k', 'f', true).err",
            bulk("ERR Lua redis lib command arguments must be strings or integers"),
        ),
    ];
    for (body, expected) in cases {
        assert_eq!(eval(&engine, body).await.expect(body), expected, "{body}");
    }
}

#[tokio::test]
async fn errors_fail_the_script_like_redis() {
    let engine = EmbeddedEngine::start().expect("engine starts");
    assert_eq!(script_error(&engine, "return {err = 'boom'}").await, "boom");
    assert_eq!(
        script_error(&engine, "return redis.error_reply('MY Error')").await,
        "MY Error"
    );
    assert_eq!(
        script_error(&engine, "return {1, {err = 'nested'}}").await,
        "nested"
    );
    assert_eq!(
        script_error(&engine, "error({err = 'raised'})").await,
        "raised"
    );
    assert!(script_error(&engine, "error('custom')")
        .await
        .ends_with("custom"));

    let global = script_error(&engine, "x = 1").await;
    assert!(
        global.contains("Script attempted to create global variable 'x'"),
        "{global}"
    );
    let global = script_error(&engine, "return undefined_thing").await;
    assert!(
        global.contains("Script attempted to access nonexistent global variable 'undefined_thing'"),
        "{global}"
    );
    for missing in [
        "os",
        "io",
        "require",
        "dofile",
        "loadfile",
        "loadstring",
        "load",
        "print",
        "debug",
    ] {
        let message = script_error(&engine, &format!("return {missing}")).await;
        assert!(
            message.contains(&format!("nonexistent global variable '{missing}'")),
            "{missing}: {message}"
        );
    }

    for body in [
        "return redis.call('HSET', 'k', 'f', true)",
        "return redis.call('HSET', 'k', 'f', {})",
        "return redis.call('HSET', 'k', 'f', nil)",
    ] {
        let message = script_error(&engine, body).await;
        assert!(
            message.contains("Lua redis lib command arguments must be strings or integers"),
            "{body}: {message}"
        );
    }
    let message = script_error(&engine, "return redis.call('NOSUCH', 'k')").await;
    assert!(
        message.contains("ERR unknown command 'NOSUCH'"),
        "{message}"
    );
    let message = script_error(
        &engine,
        "redis.call('RPUSH', 'str', 'v') return redis.call('HGET', 'str', 'f')",
    )
    .await;
    assert!(message.contains("WRONGTYPE"), "{message}");
    let message = script_error(&engine, "local t = {} t[1] = t return t").await;
    assert!(message.contains("reached lua stack limit"), "{message}");

    // None of this hurt the engine.
    engine.ping().await.expect("ping");
    assert_eq!(
        eval(&engine, "return 1").await.expect("runs"),
        Reply::Int(1)
    );
}
