//! The embedded engine: the scripts of `lua/` run in-process on Lua 5.1 (Redis's dialect,
//! through mlua) against a [`Keyspace`], with no Redis to set up.
//!
//! # Why one dedicated thread
//!
//! Redis runs one script at a time on one thread; that alone makes every script atomic: no
//! other command interleaves with it, so a script can read, decide and write without locks.
//! This engine gets the same guarantee the same way. One OS thread, `kamigate-engine`, owns
//! both the Lua state and the keyspace; [`ScriptEngine::eval`] queues a job to it and awaits
//! the reply on a oneshot channel, so tokio's workers never block and never touch the data.
//! It is also the only option: an mlua [`Lua`] state (built without mlua's `send` feature) is
//! `!Send`, so it cannot hop between tokio worker threads and must stay on the thread that
//! created it. The thread stops when the engine is dropped; if it ever dies, every call
//! answers [`EngineError::Unavailable`].
//!
//! # The same Lua as Redis
//!
//! Scripts must behave identically on both engines, so the environment copies Redis 7.0's:
//!
//! - Only the base, `table`, `string` and `math` libraries. No `os`, `io`, `package`/`require`,
//!   `debug`, `dofile` or `loadfile`; `load`, `loadstring` and `print` are removed as well
//!   (scripts must neither compile code at run time nor write to the gateway's stdout, where a
//!   secret code would end up in the logs).
//! - `redis.call`, `redis.pcall`, `redis.error_reply`, `redis.status_reply`, `redis.sha1hex`,
//!   `redis.log` (a no-op: Redis writes to its own log, which the gateway never sees either)
//!   and the `redis.LOG_*` constants.
//! - Arguments of `redis.call` convert like Redis: strings as bytes, numbers with `%.17g`
//!   (what Redis uses instead of Lua's lossy `%.14g`), anything else is an error. Replies
//!   convert back like Redis: integer → number, bulk → string, nil → `false`, array → table,
//!   status → `{ok = …}`, error → raised (`call`) or returned as `{err = …}` (`pcall`).
//!   These conversions, and the script's value's below, read and write Lua's stack directly
//!   (`embedded/stack.rs`): they carry every string a script passes or gets.
//! - Globals are protected: creating one raises `Script attempted to create global variable`
//!   and reading an undefined one `Script attempted to access nonexistent global variable`,
//!   so the script bugs Redis catches are caught here too.
//! - The script's value converts to a [`Reply`] by Redis's rules (numbers truncate, `true` is
//!   1, `false`/`nil` are nil, `{ok=…}` a status, `{err=…}` a failure, other tables arrays up
//!   to their first `nil`).
//!
//! The shipped scripts run in their library form ([`LIBRARY`]), as Redis runs them by `FCALL`:
//! the library is loaded once, which runs the prelude once, and each call runs only the
//! script's function, whose module-level state (`begin` resets it) lives across calls exactly
//! as in Redis. Other scripts (tests' probes) run in the EVAL form, compiled once by SHA-1.
//! Either way a call builds two small argument tables and nothing else, so the flash-sale
//! path pays for the script, not the machinery around it.
//!
//! The plain reads of the edge ([`ScriptEngine::hexists`], [`ScriptEngine::hget`]), which
//! Redis answers without a script, are jobs of their own here too: the command runs against
//! the keyspace with no Lua around it, in queue order with the scripts. So does the event
//! writer's read of new entries ([`ScriptEngine::read_new_entries`]): `stream.lua`
//! acknowledges and reports, then `XREADGROUP` runs on the keyspace in the same job, as Redis
//! runs the two in one transaction. Through Lua, each of a read's hundreds of entries became a
//! table of twenty strings and then a reply again, on the thread every claim waits for.

use std::cell::RefCell;
use std::collections::HashMap;
use std::panic::{self, AssertUnwindSafe};
use std::rc::Rc;
use std::sync::mpsc as std_mpsc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use mlua::chunk::ChunkMode;
use mlua::{Function, Lua, LuaOptions, MultiValue, StdLib, Table, Value};
use tokio::sync::{mpsc, oneshot};

use self::stack::{CommandArgs, CommandReply, Outcome};
use super::keyspace::{format_g17, Keyspace, Resp};
use super::script::LIBRARY;
use super::{with_new_entries, EngineError, EngineKind, Reply, Script, ScriptEngine, SCRIPTS};
use crate::clock::{Clock, SystemClock};

mod stack;

/// Jobs waiting for the engine thread. Bounded so that a burst beyond what the engine can
/// absorb waits in the callers (where the edge's in-flight cap sheds it) rather than growing
/// without limit here.
const QUEUE_DEPTH: usize = 1024;

/// How long the engine thread keeps polling for the next job before it parks.
const SPIN: Duration = Duration::from_micros(20);

/// Scripts slower than this are logged: on a single-threaded engine they stall everything.
const SLOW_SCRIPT: Duration = Duration::from_millis(100);

/// How deeply nested a script's returned tables may be (Redis: "reached lua stack limit").
/// Also what stops a self-referencing table from recursing forever.
const MAX_REPLY_DEPTH: usize = 1000;

/// Stack for the engine thread: Lua's C recursion and the reply conversion run on it.
const THREAD_STACK: usize = 8 * 1024 * 1024;

const ARGUMENT_TYPE_ERROR: &str = "ERR Lua redis lib command arguments must be strings or integers";

/// Installs Redis's `redis` table and global protection. Receives the native command function
/// (`raw`: returns the reply, or `nil, {err = …}`) and `sha1hex`.
const GLUE: &str = r#"
local raw, sha1hex = ...
local error, pcall, select, type = error, pcall, select, type

redis = {
  LOG_DEBUG = 0, LOG_VERBOSE = 1, LOG_NOTICE = 2, LOG_WARNING = 3,
  REPL_NONE = 0, REPL_AOF = 1, REPL_SLAVE = 2, REPL_REPLICA = 2, REPL_ALL = 3,
}

function redis.call(...)
  local reply, err = raw(...)
  if reply == nil then
    -- Where the script called us ("claim:12: "), for the final error message only.
    local _, at = pcall(error, '', 3)
    err.at = at
    error(err, 0)
  end
  return reply
end

function redis.pcall(...)
  local reply, err = raw(...)
  if reply == nil then return err end
  return reply
end

-- Redis 7: a leading '-' is dropped, and a message without an error code gets "ERR".
function redis.error_reply(msg)
  if type(msg) ~= 'string' then return { err = 'ERR wrong number or type of arguments' } end
  if msg:sub(1, 1) == '-' then msg = msg:sub(2) end
  if not msg:find(' ', 1, true) then msg = 'ERR ' .. msg end
  return { err = (msg:gsub('[\r\n]+$', '')) }
end

function redis.status_reply(msg)
  if type(msg) ~= 'string' then return { err = 'ERR wrong number or type of arguments' } end
  return { ok = msg }
end

redis.sha1hex = sha1hex

function redis.log(level, ...)
  if select('#', ...) < 1 then error('redis.log() requires two arguments or more.', 2) end
  if type(level) ~= 'number' or level < 0 or level > 3 then error('Invalid debug level.', 2) end
end

function redis.replicate_commands() return true end
function redis.set_repl(_) end

dofile, loadfile, load, loadstring, print = nil, nil, nil, nil, nil

setmetatable(_G, {
  __newindex = function(_, name)
    error("Script attempted to create global variable '" .. tostring(name) .. "'", 2)
  end,
  __index = function(_, name)
    error("Script attempted to access nonexistent global variable '" .. tostring(name) .. "'", 2)
  end,
})
"#;

/// One request to the engine thread.
enum Job {
    Eval {
        script: &'static Script,
        keys: Vec<String>,
        args: Vec<String>,
        reply: oneshot::Sender<Result<Reply, EngineError>>,
    },
    /// The event writer's read of new entries (see the module documentation).
    ReadNew {
        keys: Vec<String>,
        args: Vec<String>,
        reply: oneshot::Sender<Result<Reply, EngineError>>,
    },
    /// A plain read (`HEXISTS`, `HGET`), run without a script.
    Read {
        command: [Bytes; 3],
        reply: oneshot::Sender<Result<Resp, String>>,
    },
    Ping(oneshot::Sender<()>),
}

/// Runs the scripts in-process on a dedicated thread. See the module documentation.
#[derive(Debug)]
pub struct EmbeddedEngine {
    /// `None` only while dropping, so the thread sees the channel close before we join it.
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl EmbeddedEngine {
    /// An engine on an empty keyspace and the wall clock.
    pub fn start() -> Result<EmbeddedEngine, EngineError> {
        EmbeddedEngine::with_clock(SystemClock)
    }

    /// An engine on an empty keyspace whose time (key expiry, stream ids) comes from `clock`;
    /// tests pass a clock they can move.
    pub fn with_clock(clock: impl Clock) -> Result<EmbeddedEngine, EngineError> {
        EmbeddedEngine::with_keyspace(Keyspace::with_clock(clock))
    }

    /// An engine serving `keyspace`, e.g. one prepared by a test.
    pub fn with_keyspace(keyspace: Keyspace) -> Result<EmbeddedEngine, EngineError> {
        let (jobs, queue) = mpsc::channel(QUEUE_DEPTH);
        // The Lua state must be created on the thread that uses it; it reports back whether
        // that worked before we hand out the engine.
        let (ready_tx, ready_rx) = std_mpsc::sync_channel(1);
        let thread = thread::Builder::new()
            .name("kamigate-engine".into())
            .stack_size(THREAD_STACK)
            .spawn(move || serve(keyspace, queue, ready_tx))
            .map_err(|e| {
                EngineError::Unavailable(format!("cannot start the engine thread: {e}"))
            })?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(EmbeddedEngine {
                jobs: Some(jobs),
                thread: Some(thread),
            }),
            Ok(Err(message)) => Err(EngineError::Unavailable(format!(
                "cannot set up the Lua environment: {message}"
            ))),
            Err(_) => Err(EngineError::Unavailable(
                "the engine thread exited during startup".into(),
            )),
        }
    }

    fn sender(&self) -> Result<&mpsc::Sender<Job>, EngineError> {
        self.jobs.as_ref().ok_or_else(stopped)
    }

    /// Queues the job `job` builds around its reply channel and waits for the answer.
    async fn ask<T>(&self, job: impl FnOnce(oneshot::Sender<T>) -> Job) -> Result<T, EngineError> {
        let (reply, answer) = oneshot::channel();
        self.sender()?
            .send(job(reply))
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())
    }

    /// Runs `command` on the engine thread without a script. An error reply (a key of
    /// another type) is the script error `exists.lua`, which the edge ran for these reads
    /// before, would have raised.
    async fn read(&self, command: [&str; 3]) -> Result<Resp, EngineError> {
        let command = command.map(|part| Bytes::copy_from_slice(part.as_bytes()));
        self.ask(|reply| Job::Read { command, reply })
            .await?
            .map_err(|message| EngineError::Script {
                script: SCRIPTS.exists.name(),
                message,
            })
    }
}

fn stopped() -> EngineError {
    EngineError::Unavailable("the embedded engine thread has stopped".into())
}

/// A command's reply as a script's would come back: the same shapes, status text owned.
fn resp_to_reply(resp: Resp) -> Reply {
    match resp {
        Resp::Nil => Reply::Nil,
        Resp::Int(n) => Reply::Int(n),
        Resp::Bulk(bytes) => Reply::Bulk(bytes),
        Resp::Status(status) => Reply::Status(status.to_owned()),
        Resp::Array(items) => Reply::Array(items.into_iter().map(resp_to_reply).collect()),
    }
}

fn unexpected_read(reply: Resp) -> EngineError {
    EngineError::Script {
        script: SCRIPTS.exists.name(),
        message: format!("unexpected reply to a plain read: {reply:?}"),
    }
}

impl ScriptEngine for EmbeddedEngine {
    /// Queues the script; it runs alone, after every script queued before it. If this future
    /// is dropped before the script starts, the script does not run.
    fn eval(
        &self,
        script: &'static Script,
        keys: Vec<String>,
        args: Vec<String>,
    ) -> BoxFuture<'_, Result<Reply, EngineError>> {
        Box::pin(async move {
            self.ask(|reply| Job::Eval {
                script,
                keys,
                args,
                reply,
            })
            .await?
        })
    }

    fn hexists(&self, key: String, field: String) -> BoxFuture<'_, Result<bool, EngineError>> {
        Box::pin(async move {
            match self.read(["HEXISTS", &key, &field]).await? {
                Resp::Int(n) => Ok(n == 1),
                other => Err(unexpected_read(other)),
            }
        })
    }

    fn hget(
        &self,
        key: String,
        field: String,
    ) -> BoxFuture<'_, Result<Option<String>, EngineError>> {
        Box::pin(async move {
            match self.read(["HGET", &key, &field]).await? {
                Resp::Nil => Ok(None),
                // As a script's reply read as text: a value that is not UTF-8 is none.
                Resp::Bulk(value) => Ok(std::str::from_utf8(&value).ok().map(str::to_owned)),
                other => Err(unexpected_read(other)),
            }
        })
    }

    fn read_new_entries(
        &self,
        keys: Vec<String>,
        args: Vec<String>,
    ) -> BoxFuture<'_, Result<Reply, EngineError>> {
        Box::pin(async move { self.ask(|reply| Job::ReadNew { keys, args, reply }).await? })
    }

    /// Round-trips the engine thread, so it proves scripts can be served now.
    fn ping(&self) -> BoxFuture<'_, Result<(), EngineError>> {
        Box::pin(self.ask(Job::Ping))
    }

    fn kind(&self) -> EngineKind {
        EngineKind::Embedded
    }
}

impl Drop for EmbeddedEngine {
    /// Closes the queue and waits for the thread: it finishes the scripts already queued
    /// (each is short) and exits, releasing the keyspace.
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("the embedded engine thread had panicked");
            }
        }
    }
}

/// The engine thread's body.
fn serve(
    keyspace: Keyspace,
    mut queue: mpsc::Receiver<Job>,
    ready: std_mpsc::SyncSender<Result<(), String>>,
) {
    let mut vm = match Vm::new(keyspace) {
        Ok(vm) => vm,
        Err(e) => {
            // The receiver waits in `with_keyspace`; if it is gone there is no one to tell.
            let _ = ready.send(Err(e.to_string()));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    drop(ready);

    // A panic here is a bug in the engine; the state may be half-changed, so the engine stops
    // (callers get `Unavailable`) rather than serve from it.
    let outcome = panic::catch_unwind(AssertUnwindSafe(|| {
        while let Some(job) = next_job(&mut queue) {
            match job {
                Job::Eval {
                    script,
                    keys,
                    args,
                    reply,
                } => {
                    if reply.is_closed() {
                        continue; // the caller gave up before the script started
                    }
                    let started = Instant::now();
                    let result = vm.eval(script, &keys, &args);
                    let elapsed = started.elapsed();
                    if elapsed >= SLOW_SCRIPT {
                        tracing::warn!(
                            script = script.name(),
                            elapsed_ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
                            "slow script in the embedded engine"
                        );
                    }
                    let _ = reply.send(result);
                }
                Job::ReadNew { keys, args, reply } => {
                    if !reply.is_closed() {
                        let _ = reply.send(vm.read_new_entries(&keys, args));
                    }
                }
                Job::Read { command, reply } => {
                    if !reply.is_closed() {
                        let _ = reply.send(vm.command(&command));
                    }
                }
                Job::Ping(reply) => {
                    let _ = reply.send(());
                }
            }
        }
    }));
    if outcome.is_err() {
        tracing::error!("the embedded engine thread panicked; the engine is unavailable");
    }
}

/// The next job, or `None` once the engine is dropped and the queue drained.
///
/// After a job the thread polls for [`SPIN`] before parking: under load the next job usually
/// arrives within microseconds, and catching it without a park/unpark round trip through the
/// kernel roughly halves a script's latency. When idle, it parks, costing nothing.
fn next_job(queue: &mut mpsc::Receiver<Job>) -> Option<Job> {
    let deadline = Instant::now() + SPIN;
    loop {
        match queue.try_recv() {
            Ok(job) => return Some(job),
            Err(mpsc::error::TryRecvError::Disconnected) => return None,
            Err(mpsc::error::TryRecvError::Empty) if Instant::now() >= deadline => {
                return queue.blocking_recv();
            }
            Err(mpsc::error::TryRecvError::Empty) => std::hint::spin_loop(),
        }
    }
}

/// The Lua state and the compiled scripts; lives on the engine thread only.
struct Vm {
    lua: Lua,
    /// Lua's own `pcall`: calling scripts through it hands us the raw error value (a string,
    /// or the `{err = …}` table `redis.call` raised) instead of mlua's wrapped error.
    pcall: Function,
    /// The library's functions by name (what [`Script::function`] names).
    functions: HashMap<String, Function>,
    /// Scripts outside the library, compiled in their EVAL form, by SHA-1.
    compiled: HashMap<&'static str, Function>,
    /// The data, shared with `redis.call`'s native function: scripts reach it through Lua,
    /// plain reads directly. Only ever borrowed for one command, on this thread.
    keyspace: Rc<RefCell<Keyspace>>,
}

impl Vm {
    fn new(keyspace: Keyspace) -> mlua::Result<Vm> {
        let lua = Lua::new_with(
            StdLib::TABLE | StdLib::STRING | StdLib::MATH,
            LuaOptions::default(),
        )?;

        let keyspace = Rc::new(RefCell::new(keyspace));
        let shared = keyspace.clone();
        let raw = lua.create_function(move |_, CommandArgs(args)| {
            Ok(CommandReply(match args {
                Some(args) => shared.borrow_mut().call(&args),
                None => Err(ARGUMENT_TYPE_ERROR.to_owned()),
            }))
        })?;
        let sha1hex = lua.create_function(|_, args: MultiValue| {
            let (1, Some(Value::String(s))) = (args.len(), args.front()) else {
                return Err(mlua::Error::runtime("wrong number of arguments"));
            };
            Ok(sha1_smol::Sha1::from(&*s.as_bytes()).digest().to_string())
        })?;
        lua.load(GLUE)
            .set_name("=redis")
            .set_mode(ChunkMode::Text)
            .call::<()>((raw, sha1hex))?;
        let functions = load_library(&lua)?;
        let pcall = lua.globals().raw_get("pcall")?;
        Ok(Vm {
            lua,
            pcall,
            functions,
            compiled: HashMap::new(),
            keyspace,
        })
    }

    /// Runs one command against the keyspace, outside any script.
    fn command(&self, args: &[Bytes]) -> Result<Resp, String> {
        self.keyspace.borrow_mut().call(args)
    }

    /// [`ScriptEngine::read_new_entries`]: `stream.lua` with no sources, then `XREADGROUP …
    /// >` on the keyspace, nothing between them. Any other read goes to the script whole.
    /// Unlike Redis's `EXEC`, a failed script reads nothing.
    fn read_new_entries(
        &mut self,
        keys: &[String],
        mut args: Vec<String>,
    ) -> Result<Reply, EngineError> {
        let script = &SCRIPTS.stream;
        let (Some(events), [op, group, consumer, count, _, sources, ..]) =
            (keys.first(), args.as_slice())
        else {
            return self.eval(script, keys, &args);
        };
        if op != "read" || sources != "n" {
            return self.eval(script, keys, &args);
        }
        let read: Vec<Bytes> = [
            "XREADGROUP",
            "GROUP",
            group,
            consumer,
            "COUNT",
            count,
            "STREAMS",
            events,
            ">",
        ]
        .into_iter()
        .map(|part| Bytes::copy_from_slice(part.as_bytes()))
        .collect();
        args[5].clear();
        let fail = |message: String| EngineError::Script {
            script: script.name(),
            message,
        };
        let head = self.eval(script, keys, &args)?;
        let fresh = self.command(&read).map_err(fail)?;
        with_new_entries(head, resp_to_reply(fresh)).map_err(fail)
    }

    fn eval(
        &mut self,
        script: &'static Script,
        keys: &[String],
        args: &[String],
    ) -> Result<Reply, EngineError> {
        let fail = |message: String| EngineError::Script {
            script: script.name(),
            message,
        };
        let lua_fail = |e: mlua::Error| fail(e.to_string());

        let keys = self
            .lua
            .create_sequence_from(keys.iter().map(String::as_str))
            .map_err(lua_fail)?;
        // The last argument is the call's deadline (`begin` in the prelude): none here. A
        // call queued here runs only if its caller still waits for it (the engine's `eval`), so
        // it never takes effect after its caller gave up.
        let args = self
            .lua
            .create_sequence_from(args.iter().map(String::as_str).chain([""]))
            .map_err(lua_fail)?;
        let out = if let Some(name) = script.function() {
            // A library function takes KEYS and ARGV as its parameters, as under FCALL.
            let Some(function) = self.functions.get(name) else {
                return Err(fail(format!("the library has no function {name}")));
            };
            self.pcall.call::<Outcome>((function, keys, args))
        } else {
            if !self.compiled.contains_key(script.sha1()) {
                let function = self
                    .lua
                    .load(script.source())
                    .set_name(format!("={}", script.name()))
                    .set_mode(ChunkMode::Text)
                    .into_function()
                    .map_err(lua_fail)?;
                self.compiled.insert(script.sha1(), function);
            }
            let Some(function) = self.compiled.get(script.sha1()) else {
                return Err(fail("compiled script went missing".into()));
            };
            let globals = self.lua.globals();
            globals.raw_set("KEYS", keys).map_err(lua_fail)?;
            globals.raw_set("ARGV", args).map_err(lua_fail)?;
            self.pcall.call::<Outcome>(function)
        };
        match out.map_err(lua_fail)?.0 {
            Ok(reply) => reply.map_err(fail),
            Err(raised) => Err(fail(error_message(&raised))),
        }
    }
}

/// Loads [`LIBRARY`] as `FUNCTION LOAD` does: its text runs once, and each
/// `redis.register_function(name, function)` it makes is collected. `register_function`
/// exists only during the load, as in Redis.
fn load_library(lua: &Lua) -> mlua::Result<HashMap<String, Function>> {
    let registered = std::rc::Rc::new(RefCell::new(HashMap::new()));
    let register = {
        let registered = std::rc::Rc::clone(&registered);
        lua.create_function(move |_, (name, function): (String, Function)| {
            registered.borrow_mut().insert(name, function);
            Ok(())
        })?
    };
    let redis: Table = lua.globals().raw_get("redis")?;
    redis.raw_set("register_function", register)?;
    // The first line (`#!lua name=…`) is Redis's header, not Lua; blanking it keeps the line
    // numbers of errors those of the library's text.
    let source = LIBRARY.source();
    let body = source.find('\n').map_or("", |at| &source[at..]);
    lua.load(body)
        .set_name(format!("={}", LIBRARY.name()))
        .set_mode(ChunkMode::Text)
        .exec()?;
    redis.raw_set("register_function", Value::Nil)?;
    let functions = registered.take();
    Ok(functions)
}

/// A `redis.call` argument as Redis builds it: strings as they are, numbers with `%.17g`;
/// `None` for any other type.
fn command_arg(value: &Value) -> Option<Bytes> {
    match value {
        Value::String(s) => Some(Bytes::copy_from_slice(&s.as_bytes())),
        Value::Integer(i) => {
            let i = lua_integer(*i);
            // Below 1e17, %.17g prints an integer's digits exactly.
            Some(Bytes::from(if i.unsigned_abs() < 100_000_000_000_000_000 {
                i.to_string()
            } else {
                format_g17(i as f64)
            }))
        }
        Value::Number(n) => Some(Bytes::from(format_g17(*n))),
        _ => None,
    }
}

/// mlua's integer type is `i64` on 64-bit targets, `i32` elsewhere.
#[allow(clippy::useless_conversion)]
fn lua_integer(i: mlua::Integer) -> i64 {
    i64::from(i)
}

/// The message of whatever a script raised.
fn error_message(error: &Value) -> String {
    match error {
        Value::String(s) => s.to_string_lossy(),
        Value::Table(table) => match table.raw_get::<Value>("err") {
            Ok(Value::String(err)) => {
                let at = match table.raw_get::<Value>("at") {
                    Ok(Value::String(at)) => at.to_string_lossy(),
                    _ => String::new(),
                };
                format!("{at}{}", err.to_string_lossy())
            }
            _ => "(error object is a table value)".into(),
        },
        Value::Error(e) => e.to_string(),
        other => format!("(error object is a {} value)", other.type_name()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;

    use super::*;

    fn probe(body: &str) -> &'static Script {
        Box::leak(Box::new(Script::new("probe", body)))
    }

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| (*s).to_string()).collect()
    }

    #[tokio::test]
    async fn runs_scripts_against_the_keyspace_in_order() {
        let engine = EmbeddedEngine::start().expect("engine starts");
        engine.ping().await.expect("ping");
        assert_eq!(engine.kind(), EngineKind::Embedded);
        let incr = probe("return redis.call('HINCRBY', KEYS[1], 'n', ARGV[1])");
        let futures: Vec<_> = (0..50)
            .map(|_| engine.eval(incr, strings(&["n"]), strings(&["2"])))
            .collect();
        let mut replies = Vec::new();
        for f in futures {
            replies.push(f.await.expect("incr"));
        }
        assert_eq!(replies.last(), Some(&Reply::Int(100)));
        let get = probe("return redis.call('HGET', KEYS[1], 'n')");
        assert_eq!(
            engine
                .eval(get, strings(&["n"]), vec![])
                .await
                .expect("get"),
            Reply::from("100")
        );
    }

    /// A call whose caller gave up while it waited behind another never runs: the embedded
    /// engine's side of "a call runs while its caller waits for it, or never" (the Redis
    /// engine's is the deadline, `conformance::redis_a_void_that_arrives_after_its_caller_gave_up_runs_nothing`).
    #[tokio::test]
    async fn a_call_given_up_before_it_starts_never_runs() {
        let engine = EmbeddedEngine::start().expect("engine starts");
        let write = probe("return redis.call('HSET', KEYS[1], 'f', ARGV[1])");
        let read = probe("return redis.call('HGET', KEYS[1], 'f')");
        let clear = probe("return redis.call('DEL', KEYS[1])");
        // Keeps the engine busy while the write is queued behind it and given up on.
        let spin = probe("local n = 0 for i = 1, tonumber(ARGV[1]) do n = n + 1 end return n");
        let mut spins: u64 = 20_000_000;
        loop {
            let spun = AtomicBool::new(false);
            // `join` polls the spin first: it is queued before the write.
            let (_, conclusive) = futures_util::future::join(
                async {
                    let n = engine.eval(spin, vec![], vec![spins.to_string()]).await;
                    spun.store(true, Ordering::SeqCst);
                    n.expect("spin")
                },
                async {
                    let call = engine.eval(write, strings(&["h"]), strings(&["late"]));
                    let given_up = tokio::time::timeout(Duration::from_millis(5), call).await;
                    // Conclusive only if the spin still ran when the write was given up on.
                    given_up.is_err() && !spun.load(Ordering::SeqCst)
                },
            )
            .await;
            if conclusive {
                break;
            }
            engine
                .eval(clear, strings(&["h"]), vec![])
                .await
                .expect("cleared");
            spins = spins.saturating_mul(4);
        }
        let after = engine.eval(read, strings(&["h"]), vec![]).await;
        assert_eq!(after.expect("read"), Reply::Nil, "the given-up write ran");
    }

    /// The plain reads answer what `exists.lua`, which served them before, answers, and in
    /// queue order with the scripts: a read queued after a write sees it.
    #[tokio::test]
    async fn plain_reads_answer_as_the_exists_script_and_in_turn() {
        let engine = EmbeddedEngine::start().expect("engine starts");
        let setup = probe(
            "redis.call('HSET', 'h', 'f', 'v', 'bin', '\\255') \
             redis.call('RPUSH', 'list', 'x') return 1",
        );
        let write = probe("return redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])");
        engine.eval(setup, vec![], vec![]).await.expect("setup");
        for (key, field) in [("h", "f"), ("h", "none"), ("gone", "f"), ("h", "bin")] {
            let by_script = engine
                .eval(&SCRIPTS.exists, strings(&[key]), strings(&[field, "get"]))
                .await
                .expect("script get");
            let read = engine
                .hget(key.into(), field.into())
                .await
                .expect("plain get");
            assert_eq!(read.as_deref(), by_script.as_str(), "HGET {key} {field}");
            let by_script = engine
                .eval(&SCRIPTS.exists, strings(&[key]), strings(&[field]))
                .await
                .expect("script exists");
            let exists = engine
                .hexists(key.into(), field.into())
                .await
                .expect("plain exists");
            assert_eq!(
                exists,
                by_script.as_i64() == Some(1),
                "HEXISTS {key} {field}"
            );
        }
        assert_eq!(
            engine.hget("h".into(), "f".into()).await.expect("get"),
            Some("v".into())
        );
        assert!(!engine
            .hexists("h".into(), "none".into())
            .await
            .expect("exists"));
        for wrong in [
            engine.hget("list".into(), "f".into()).await.err(),
            engine.hexists("list".into(), "f".into()).await.err(),
        ] {
            assert!(
                matches!(&wrong, Some(EngineError::Script { message, .. }) if message.starts_with("WRONGTYPE")),
                "{wrong:?}"
            );
        }

        // Queued together, the read runs after the write queued before it.
        let (written, read) = tokio::join!(
            engine.eval(write, strings(&["h"]), strings(&["late", "1"])),
            engine.hget("h".into(), "late".into())
        );
        written.expect("write");
        assert_eq!(read.expect("read"), Some("1".into()));
    }

    #[tokio::test]
    async fn injected_clock_drives_expiry_and_stream_ids() {
        let now = Arc::new(AtomicU64::new(5_000));
        let clock = Arc::clone(&now);
        let engine = EmbeddedEngine::with_clock(move || clock.load(Ordering::SeqCst))
            .expect("engine starts");
        let set = probe(
            "redis.call('HSET', KEYS[1], 'f', 'v') redis.call('PEXPIRE', KEYS[1], 100) \
             return redis.call('XADD', KEYS[2], '*', 'f', 'v')",
        );
        let get = probe("return redis.call('HGET', KEYS[1], 'f')");
        let keys = strings(&["k", "s"]);
        assert_eq!(
            engine.eval(set, keys.clone(), vec![]).await.expect("set"),
            Reply::from("5000-0")
        );
        assert_eq!(
            engine.eval(get, keys.clone(), vec![]).await.expect("get"),
            Reply::from("v")
        );
        now.store(5_101, Ordering::SeqCst);
        assert_eq!(
            engine.eval(get, keys.clone(), vec![]).await.expect("get"),
            Reply::Nil
        );
        now.store(1_000, Ordering::SeqCst);
        assert_eq!(
            engine.eval(set, keys, vec![]).await.expect("set"),
            Reply::from("5000-1")
        );
    }

    #[tokio::test]
    async fn compile_errors_are_script_errors() {
        let engine = EmbeddedEngine::start().expect("engine starts");
        let broken = probe("return (");
        match engine.eval(broken, vec![], vec![]).await {
            Err(EngineError::Script { script, message }) => {
                assert_eq!(script, "probe");
                assert!(message.contains("probe:"), "{message}");
            }
            other => panic!("expected a script error, got {other:?}"),
        }
        // The engine keeps serving.
        engine.ping().await.expect("ping");
    }

    #[tokio::test]
    async fn redis_call_errors_carry_the_script_line() {
        let engine = EmbeddedEngine::start().expect("engine starts");
        // Not a tail call: `return redis.call(...)` replaces the script's frame, as in Redis.
        let script = probe("local x = redis.call('HGET', 'h')\nreturn x");
        let Err(EngineError::Script { message, .. }) = engine.eval(script, vec![], vec![]).await
        else {
            panic!("expected a script error");
        };
        let lines = script.source().lines().count();
        assert_eq!(
            message,
            format!(
                "probe:{}: ERR wrong number of arguments for 'hget' command",
                lines - 1
            )
        );
    }

    #[tokio::test]
    async fn shipped_scripts_run_as_functions_of_the_library() {
        let engine = EmbeddedEngine::start().expect("engine starts");
        let exists = &crate::engine::SCRIPTS.exists;
        assert_eq!(
            engine
                .eval(exists, strings(&["h"]), strings(&["f"]))
                .await
                .expect("exists"),
            Reply::Int(0)
        );
        // An error names where it happened: the library's text, as under FCALL, not the
        // script's EVAL form. (`index get` calls HMGET on KEYS[1], here missing.)
        let index = &crate::engine::SCRIPTS.index;
        let Err(EngineError::Script { script, message }) =
            engine.eval(index, vec![], strings(&["get", "d"])).await
        else {
            panic!("a call without its key must fail");
        };
        assert_eq!(script, "index");
        assert!(
            message.starts_with(&format!("{}:", LIBRARY.name())),
            "{message}"
        );
        assert!(message.ends_with(ARGUMENT_TYPE_ERROR), "{message}");
        // `register_function` exists only while the library loads, as in Redis.
        let probe = probe("return type(redis.register_function)");
        assert_eq!(
            engine.eval(probe, vec![], vec![]).await.expect("probe"),
            Reply::from("nil")
        );
    }

    #[tokio::test]
    async fn a_stopped_thread_is_unavailable() {
        let (jobs, queue) = mpsc::channel(1);
        drop(queue);
        let engine = EmbeddedEngine {
            jobs: Some(jobs),
            thread: None,
        };
        assert!(matches!(
            engine.ping().await,
            Err(EngineError::Unavailable(_))
        ));
        let script = probe("return 1");
        assert!(matches!(
            engine.eval(script, vec![], vec![]).await,
            Err(EngineError::Unavailable(_))
        ));
    }

    #[test]
    fn dropping_the_engine_stops_its_thread() {
        let engine = EmbeddedEngine::start().expect("engine starts");
        let thread = engine
            .thread
            .as_ref()
            .map(|t| t.thread().name().map(str::to_owned));
        assert_eq!(thread, Some(Some("kamigate-engine".to_owned())));
        drop(engine); // joins: returning at all means the thread exited
    }

    #[test]
    fn numbers_become_arguments_like_redis() {
        let arg = |v: Value| command_arg(&v).map(|b| String::from_utf8_lossy(&b).into_owned());
        assert_eq!(arg(Value::Integer(42)), Some("42".into()));
        assert_eq!(arg(Value::Integer(-7)), Some("-7".into()));
        assert_eq!(arg(Value::Number(2.5)), Some("2.5".into()));
        assert_eq!(arg(Value::Number(0.1)), Some("0.10000000000000001".into()));
        assert_eq!(arg(Value::Number(1e20)), Some("1e+20".into()));
        assert_eq!(arg(Value::Boolean(true)), None);
        assert_eq!(arg(Value::Nil), None);
    }
}
