//! `redis.call`'s arguments and replies, and a script's result, moved between Lua's stack and
//! Rust directly.
//!
//! mlua's general conversions make every value a [`Value`] first: a string becomes a reference
//! held in a slot of mlua's auxiliary thread, moved there and released again, one by one. A
//! coalesced claim passes and returns hundreds of strings (each order's reply carries the
//! event it appended), and those conversions were about two fifths of the engine thread's time
//! (BENCHMARKS.md, "The embedded engine's strings off the Lua stack"). Here strings are read
//! where they lie and pushed where they go, through Lua's C API; what each value becomes is
//! unchanged (`tests/lua_commands.rs` checks Redis's rules, `tests/engine_redis.rs` compares
//! odd values with a real Redis).
//!
//! # Safety
//!
//! mlua hands [`FromLuaMulti::from_stack_multi`] and [`IntoLuaMulti::push_into_stack_multi`]
//! the stack of the running state; the values read are the top `nvals`. Only these C API
//! calls are made, none of which can raise a Lua error here (a raised error would unwind
//! through these frames by `longjmp`):
//!
//! - reads: `lua_type`, `lua_toboolean`, `lua_tonumber`, `lua_tolstring` on strings only (no
//!   conversion happens), `lua_rawget`/`lua_rawgeti` (raw: no metamethod runs);
//! - pushes and `lua_rawset`/`lua_rawseti` into a table just created. These allocate, and in
//!   Lua an allocation failure raises; but this state has no memory limit, under which mlua's
//!   allocator aborts the process instead of failing (as Rust's allocator does), so Lua never
//!   sees a failed allocation. mlua pushes unprotected on the same grounds.
//!
//! Stack space is checked (`lua_checkstack`) before each level of nesting pushes anything.

use std::os::raw::c_int;

use bytes::Bytes;
use mlua::state::RawLua;
use mlua::{ffi, FromLuaMulti, IntoLuaMulti, Lua, MultiValue, Value};

use super::super::keyspace::Resp;
use super::super::Reply;
use super::{command_arg, MAX_REPLY_DEPTH};

/// The arguments of one `redis.call`, as Redis builds them; `None` if one was neither a
/// string nor a number.
pub(super) struct CommandArgs(pub(super) Option<Vec<Bytes>>);

impl FromLuaMulti for CommandArgs {
    fn from_lua_multi(values: MultiValue, _: &Lua) -> mlua::Result<Self> {
        Ok(CommandArgs(values.iter().map(command_arg).collect()))
    }

    unsafe fn from_stack_multi(nvals: c_int, lua: &RawLua) -> mlua::Result<Self> {
        let state = lua.state();
        let mut args = Vec::with_capacity(usize::try_from(nvals).unwrap_or(0));
        for idx in -nvals..0 {
            let arg = match ffi::lua_type(state, idx) {
                ffi::LUA_TSTRING => Bytes::copy_from_slice(string_at(state, idx)),
                ffi::LUA_TNUMBER => match command_arg(&number(ffi::lua_tonumber(state, idx))) {
                    Some(arg) => arg,
                    None => return Ok(CommandArgs(None)),
                },
                _ => return Ok(CommandArgs(None)),
            };
            args.push(arg);
        }
        Ok(CommandArgs(Some(args)))
    }
}

/// A Lua number as mlua sees it (so that [`command_arg`] formats it as before): an integer
/// when it holds one exactly, else a float.
fn number(n: f64) -> Value {
    // `as` saturates and maps NaN to 0; the round trip keeps only exact integers (and not
    // -0.0, whose bits differ from 0's).
    let i = n as mlua::Integer;
    if (i as f64).to_bits() == n.to_bits() {
        Value::Integer(i)
    } else {
        Value::Number(n)
    }
}

/// What `redis.call` hands back to Lua: the reply, or `nil, {err = message}` (the glue raises
/// it, or `redis.pcall` returns it).
pub(super) struct CommandReply(pub(super) Result<Resp, String>);

impl IntoLuaMulti for CommandReply {
    fn into_lua_multi(self, _: &Lua) -> mlua::Result<MultiValue> {
        // mlua returns a callback's values with `push_into_stack_multi`; nothing else asks.
        Err(mlua::Error::runtime(
            "a command's reply is pushed onto the stack",
        ))
    }

    unsafe fn push_into_stack_multi(self, lua: &RawLua) -> mlua::Result<c_int> {
        let state = lua.state();
        reserve(state, 2)?;
        match self.0 {
            Ok(resp) => {
                push_resp(state, resp, 0)?;
                ffi::lua_pushnil(state);
            }
            Err(message) => {
                ffi::lua_pushnil(state);
                push_error(state, &message)?;
            }
        }
        Ok(2)
    }
}

/// What a script called through Lua's `pcall` ended with: its first value as a [`Reply`]
/// (or why it cannot be one), or the value it raised.
pub(super) struct Outcome(pub(super) Result<Result<Reply, String>, Value>);

impl FromLuaMulti for Outcome {
    fn from_lua_multi(_: MultiValue, _: &Lua) -> mlua::Result<Self> {
        // `Function::call` takes its results with `from_stack_multi`; nothing else builds this.
        Err(mlua::Error::runtime(
            "a script's outcome is read off the stack",
        ))
    }

    unsafe fn from_stack_multi(nvals: c_int, lua: &RawLua) -> mlua::Result<Self> {
        let state = lua.state();
        let first = ffi::lua_gettop(state) - nvals + 1;
        let succeeded = nvals >= 1
            && ffi::lua_type(state, first) == ffi::LUA_TBOOLEAN
            && ffi::lua_toboolean(state, first) != 0;
        // Like Redis, only the first value a script returns counts.
        if succeeded {
            let reply = if nvals >= 2 {
                reply_at(state, first + 1, 0)
            } else {
                Ok(Reply::Nil)
            };
            return Ok(Outcome(Ok(reply)));
        }
        let raised = if nvals >= 2 {
            reserve(state, 1)?;
            ffi::lua_pushvalue(state, first + 1);
            lua.pop_value()
        } else {
            Value::Nil
        };
        Ok(Outcome(Err(raised)))
    }
}

/// Makes room for `n` more values on the stack.
unsafe fn reserve(state: *mut ffi::lua_State, n: c_int) -> mlua::Result<()> {
    if ffi::lua_checkstack(state, n) == 0 {
        return Err(mlua::Error::StackError);
    }
    Ok(())
}

/// The bytes of the string at `idx`, borrowed from Lua (valid while it stays on the stack).
unsafe fn string_at<'a>(state: *mut ffi::lua_State, idx: c_int) -> &'a [u8] {
    let mut len = 0;
    let data = ffi::lua_tolstring(state, idx, &mut len);
    if data.is_null() {
        return &[];
    }
    std::slice::from_raw_parts(data.cast::<u8>(), len)
}

unsafe fn push_bytes(state: *mut ffi::lua_State, bytes: &[u8]) {
    ffi::lua_pushlstring(state, bytes.as_ptr().cast(), bytes.len());
}

/// Pushes `{err = message}`.
unsafe fn push_error(state: *mut ffi::lua_State, message: &str) -> mlua::Result<()> {
    reserve(state, 3)?;
    ffi::lua_createtable(state, 0, 1);
    push_bytes(state, b"err");
    push_bytes(state, message.as_bytes());
    ffi::lua_rawset(state, -3);
    Ok(())
}

/// Pushes a command's reply as Redis hands it to Lua: nil → `false`, integer → number,
/// bulk → string, status → `{ok = …}`, array → table.
unsafe fn push_resp(state: *mut ffi::lua_State, resp: Resp, depth: usize) -> mlua::Result<()> {
    match resp {
        Resp::Nil => ffi::lua_pushboolean(state, 0),
        // Lua 5.1 numbers are doubles; Redis pushes (lua_Number)value the same way.
        Resp::Int(i) => ffi::lua_pushnumber(state, i as f64),
        Resp::Bulk(bytes) => push_bytes(state, &bytes),
        Resp::Status(status) => {
            reserve(state, 3)?;
            ffi::lua_createtable(state, 0, 1);
            push_bytes(state, b"ok");
            push_bytes(state, status.as_bytes());
            ffi::lua_rawset(state, -3);
        }
        Resp::Array(items) => {
            if depth >= MAX_REPLY_DEPTH {
                return Err(mlua::Error::StackError);
            }
            reserve(state, 2)?;
            let len = c_int::try_from(items.len()).unwrap_or(c_int::MAX);
            ffi::lua_createtable(state, len, 0);
            for (i, item) in (1..=len).zip(items) {
                push_resp(state, item, depth + 1)?;
                ffi::lua_rawseti_(state, -2, i);
            }
        }
    }
    Ok(())
}

/// The value at `idx` (absolute) as Redis converts a script's return value: numbers
/// truncate, `true` is 1, `false`/`nil` are nil, functions and other values nil, tables as
/// [`table_reply`].
unsafe fn reply_at(state: *mut ffi::lua_State, idx: c_int, depth: usize) -> Result<Reply, String> {
    Ok(match ffi::lua_type(state, idx) {
        ffi::LUA_TBOOLEAN if ffi::lua_toboolean(state, idx) != 0 => Reply::Int(1),
        // C's (long long) cast: truncation toward zero (saturating here, where C is undefined).
        ffi::LUA_TNUMBER => Reply::Int(ffi::lua_tonumber(state, idx) as i64),
        ffi::LUA_TSTRING => Reply::Bulk(Bytes::copy_from_slice(string_at(state, idx))),
        ffi::LUA_TTABLE => table_reply(state, idx, depth)?,
        _ => Reply::Nil,
    })
}

/// `{err = …}` fails the script (also when nested in an array: a reply carries no errors),
/// `{ok = …}` is a status, anything else an array of `t[1..]` up to the first nil.
unsafe fn table_reply(
    state: *mut ffi::lua_State,
    idx: c_int,
    depth: usize,
) -> Result<Reply, String> {
    if depth >= MAX_REPLY_DEPTH || ffi::lua_checkstack(state, 2) == 0 {
        return Err("reached lua stack limit".into());
    }
    for (field, status) in [(&b"err"[..], false), (&b"ok"[..], true)] {
        push_bytes(state, field);
        ffi::lua_rawget(state, idx);
        if ffi::lua_type(state, -1) == ffi::LUA_TSTRING {
            let text = String::from_utf8_lossy(string_at(state, -1)).into_owned();
            ffi::lua_pop(state, 1);
            return if status {
                Ok(Reply::Status(text))
            } else {
                Err(text)
            };
        }
        ffi::lua_pop(state, 1);
    }
    let mut items = Vec::new();
    for i in 1..=c_int::MAX {
        ffi::lua_rawgeti_(state, idx, i);
        let item = match ffi::lua_type(state, -1) {
            ffi::LUA_TNIL => None,
            _ => Some(reply_at(state, ffi::lua_gettop(state), depth + 1)),
        };
        ffi::lua_pop(state, 1);
        match item {
            Some(item) => items.push(item?),
            None => break,
        }
    }
    Ok(Reply::Array(items))
}
